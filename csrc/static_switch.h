// static_switch.h: runtime launch values -> template arguments of the CUDA kernels (and of their host
// emulation), in one place. Each switch calls `fn.template operator()<...>()` of a generic lambda,
// e.g.
//
//   dtype_radius_switch(args.dtype, args.radius, [&]<typename scalar_t, int R>() { ...<scalar_t, R>... });
//
// and raises (naming the value) where no case matches, instead of silently doing nothing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "ssim_params.h"

namespace ssimkd {

// scalar_t: the input type of a DType.
template <typename Fn>
decltype(auto) dtype_switch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn.template operator()<float>();
    case DType::kFloat64: return fn.template operator()<double>();
    case DType::kFloat16: return fn.template operator()<c10::Half>();
    case DType::kBFloat16: return fn.template operator()<c10::BFloat16>();
  }
  TORCH_CHECK(false, "ssimkd: no kernel for dtype code ", int(dtype));
}

// R: the window radius, 1 to kMaxRadius (kernels specialise on it: SPEC section 2).
template <typename Fn>
decltype(auto) radius_switch(int radius, Fn&& fn) {
  static_assert(kMaxRadius == 7, "one case per radius below");
  switch (radius) {
    case 1: return fn.template operator()<1>();
    case 2: return fn.template operator()<2>();
    case 3: return fn.template operator()<3>();
    case 4: return fn.template operator()<4>();
    case 5: return fn.template operator()<5>();
    case 6: return fn.template operator()<6>();
    case 7: return fn.template operator()<7>();
  }
  TORCH_CHECK(false, "ssimkd: no kernel for window radius ", radius, " (window sizes ", kMinWindow, " to ", kMaxWindow,
              ")");
}

template <typename Fn>
decltype(auto) dtype_radius_switch(DType dtype, int radius, Fn&& fn) {
  return dtype_switch(dtype, [&]<typename scalar_t>() {
    return radius_switch(radius, [&]<int R>() { return fn.template operator()<scalar_t, R>(); });
  });
}

}  // namespace ssimkd
