// minmax_cpu.cpp: the min-max normalisation's CPU kernels (ops minmax_affine, minmax_affine_bwd and
// minmax_grad): per-group bounds and the (scale, offset) affine of every map of a call in one pass, and
// the bounds' gradient split evenly among the ties, as torch.amin/amax do. Loops are cloned per
// instruction set (target_clones); every plane is one task of the dynamic parallel loop.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "ssim_params.h"

namespace ssimkd {
namespace {

struct NoState {};
// Run body(plane) for every plane of a normalisation call, the large planes first.
template <typename Body>
void for_each_plane(int64_t planes, const Body& body) {
  for_each_item<NoState>(planes, [](NoState&) {}, [&](int64_t i, NoState&) { body(i); });
}

// Calls fn(lane, v) for every element v of plane (n, c) of x, in the accumulation type. On rows that
// are contiguous, lane is the column's place in its block of kLanes, so the per-lane accumulators of
// fn vectorise; strided rows and the last columns of a row use lane 0.
template <typename T, typename scalar_t, typename Fn>
SSIMKD_INLINE void for_each_element(const scalar_t* x, const int64_t* stride, int64_t n, int64_t c, int64_t H,
                                    int64_t W, const Fn& fn) {
  const scalar_t* plane = x + n * stride[0] + c * stride[1];
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* row = plane + h * stride[2];
    const int64_t step = stride[3];
    int64_t w = 0;
    if (step == 1) {
      for (; w + kLanes <= W; w += kLanes)
        for (int l = 0; l < kLanes; ++l) fn(l, static_cast<T>(row[w + l]));
    }
    for (; w < W; ++w) fn(0, static_cast<T>(row[w * step]));
  }
}

// Min and max of one plane, and whether it holds a NaN (torch.amin/amax then give NaN).
template <typename T>
struct PlaneBounds {
  T low = std::numeric_limits<T>::infinity(), high = -std::numeric_limits<T>::infinity();
  bool nan = false;
};

template <typename scalar_t, typename T = AccType<scalar_t>>
SSIMKD_CPU_CLONES PlaneBounds<T> plane_bounds(const scalar_t* x, const int64_t* stride, int64_t n, int64_t c, int64_t H,
                                              int64_t W) {
  T lo[kLanes], hi[kLanes], nans[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lo[l] = std::numeric_limits<T>::infinity();
    hi[l] = -std::numeric_limits<T>::infinity();
    nans[l] = T(0);
  }
  for_each_element<T>(x, stride, n, c, H, W, [&](int l, T v) {
    lo[l] = v < lo[l] ? v : lo[l];
    hi[l] = v > hi[l] ? v : hi[l];
    nans[l] += v != v ? T(1) : T(0);
  });
  PlaneBounds<T> b;
  for (int l = 0; l < kLanes; ++l) {
    b.low = lo[l] < b.low ? lo[l] : b.low;
    b.high = hi[l] > b.high ? hi[l] : b.high;
    b.nan = b.nan || nans[l] != T(0);
  }
  return b;
}

// How many elements of plane (n, c) equal low, and high (the ties that share the bounds' gradient).
template <typename scalar_t, typename T = AccType<scalar_t>>
SSIMKD_CPU_CLONES void count_ties(const scalar_t* x, const int64_t* stride, int64_t n, int64_t c, int64_t H, int64_t W,
                                  T low, T high, int64_t* n_low, int64_t* n_high) {
  int64_t lows[kLanes] = {}, highs[kLanes] = {};
  for_each_element<T>(x, stride, n, c, H, W, [&](int l, T v) {
    lows[l] += v == low ? 1 : 0;
    highs[l] += v == high ? 1 : 0;
  });
  *n_low = *n_high = 0;
  for (int l = 0; l < kLanes; ++l) {
    *n_low += lows[l];
    *n_high += highs[l];
  }
}

// dL/dx of plane (n, c) through its group's bounds: share_low at the ties with low, share_high at
// the ties with high, 0 elsewhere; NaN everywhere when a bound has no tie (a NaN in the group).
template <typename scalar_t, typename T>
SSIMKD_INLINE void tie_gradient_row(const scalar_t* __restrict x, scalar_t* __restrict grad, int64_t W, T base, T low,
                                    T high, T share_low, T share_high) {
  for (int64_t w = 0; w < W; ++w) {
    const T v = static_cast<T>(x[w]);
    grad[w] = static_cast<scalar_t>(base + (v == low ? share_low : T(0)) + (v == high ? share_high : T(0)));
  }
}

template <typename scalar_t, typename T = AccType<scalar_t>>
SSIMKD_CPU_CLONES void write_tie_gradient(const scalar_t* x, const int64_t* x_stride, scalar_t* grad,
                                          const int64_t* grad_stride, int64_t n, int64_t c, int64_t H, int64_t W, T low,
                                          T high, T share_low, T share_high, bool no_match) {
  const T base = no_match ? std::numeric_limits<T>::quiet_NaN() : T(0);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* xr = x + n * x_stride[0] + c * x_stride[1] + h * x_stride[2];
    scalar_t* gr = grad + n * grad_stride[0] + c * grad_stride[1] + h * grad_stride[2];
    const int64_t xs = x_stride[3], gs = grad_stride[3];
    if (xs == 1 && gs == 1) {
      tie_gradient_row(xr, gr, W, base, low, high, share_low, share_high);
      continue;
    }
    for (int64_t w = 0; w < W; ++w) {
      const T v = static_cast<T>(xr[w * xs]);
      gr[w * gs] = static_cast<scalar_t>(base + (v == low ? share_low : T(0)) + (v == high ? share_high : T(0)));
    }
  }
}

// Planes of all levels of one normalisation call, flattened: plane i lies in the level l with
// first[l] <= i < first[l + 1].
struct PlaneIndex {
  std::vector<int64_t> first;
  explicit PlaneIndex(const NormLevel* levels, int count) : first(size_t(count) + 1, 0) {
    for (int l = 0; l < count; ++l) first[l + 1] = first[l] + levels[l].N * levels[l].C;
  }
  int64_t total() const { return first.back(); }
  int level_of(int64_t i) const { return int(std::upper_bound(first.begin(), first.end(), i) - first.begin()) - 1; }
};

template <typename scalar_t>
void minmax_affine_impl(const NormLevel* levels, int count, int group, double eps) {
  using T = AccType<scalar_t>;
  const PlaneIndex index(levels, count);
  std::vector<PlaneBounds<T>> bounds(size_t(index.total()));
  for_each_plane(index.total(), [&](int64_t i) {
    const NormLevel& lv = levels[index.level_of(i)];
    const int64_t plane = i - index.first[index.level_of(i)];
    bounds[i] = plane_bounds(static_cast<const scalar_t*>(lv.x), lv.x_stride, plane / lv.C, plane % lv.C, lv.H, lv.W);
  });
  // Per group: min and max over its planes (NaN if any plane holds one); then every plane's affine.
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int l = 0; l < count; ++l) {
    const NormLevel& lv = levels[l];
    const int64_t groups = group_count(group, lv.N, lv.C);
    T* out_bounds = static_cast<T*>(lv.bounds);
    std::vector<PlaneBounds<T>> per_group(static_cast<size_t>(groups));
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      const auto& b = bounds[index.first[l] + plane];
      auto& g = per_group[group_of_plane(group, plane / lv.C, plane % lv.C, lv.C)];
      g.low = b.low < g.low ? b.low : g.low;
      g.high = b.high > g.high ? b.high : g.high;
      g.nan = g.nan || b.nan;
    }
    for (int64_t g = 0; g < groups; ++g) {
      out_bounds[2 * g] = per_group[g].nan ? nan : per_group[g].low;
      out_bounds[2 * g + 1] = per_group[g].nan ? nan : per_group[g].high;
    }
    T* affine = static_cast<T*>(lv.affine);
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      const int64_t g = group_of_plane(group, plane / lv.C, plane % lv.C, lv.C);
      const T low = out_bounds[2 * g], high = out_bounds[2 * g + 1];
      affine[2 * plane] = T(1) / (high - low + T(eps));
      affine[2 * plane + 1] = low;
    }
  }
}

// dL/dx of every map from its groups' dL/dlow and dL/dhigh (g_bounds[l]: (g_low, g_high) per group),
// each split evenly among the elements equal to the bound: ties counted per plane (integers: any
// order gives the same counts), added per group, then every element's share written.
template <typename scalar_t, typename T = AccType<scalar_t>>
void split_among_ties(const NormLevel* levels, int count, int group, const std::vector<std::vector<T>>& g_bounds) {
  const PlaneIndex index(levels, count);
  std::vector<int64_t> plane_counts(size_t(2 * index.total()));
  for_each_plane(index.total(), [&](int64_t i) {
    const int l = index.level_of(i);
    const NormLevel& lv = levels[l];
    const int64_t plane = i - index.first[l], n = plane / lv.C, c = plane % lv.C;
    const T* b = static_cast<const T*>(lv.bounds) + 2 * group_of_plane(group, n, c, lv.C);
    count_ties(static_cast<const scalar_t*>(lv.x), lv.x_stride, n, c, lv.H, lv.W, b[0], b[1], &plane_counts[2 * i],
               &plane_counts[2 * i + 1]);
  });
  std::vector<std::vector<int64_t>> ties(static_cast<size_t>(count));
  for (int l = 0; l < count; ++l) {
    const NormLevel& lv = levels[l];
    ties[l].assign(size_t(2 * group_count(group, lv.N, lv.C)), 0);
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      const int64_t g = group_of_plane(group, plane / lv.C, plane % lv.C, lv.C);
      ties[l][2 * g] += plane_counts[2 * (index.first[l] + plane)];
      ties[l][2 * g + 1] += plane_counts[2 * (index.first[l] + plane) + 1];
    }
  }
  for_each_plane(index.total(), [&](int64_t i) {
    const int l = index.level_of(i);
    const NormLevel& lv = levels[l];
    const int64_t plane = i - index.first[l], n = plane / lv.C, c = plane % lv.C;
    const int64_t g = group_of_plane(group, n, c, lv.C);
    const T* b = static_cast<const T*>(lv.bounds) + 2 * g;
    const int64_t n_low = ties[l][2 * g], n_high = ties[l][2 * g + 1];
    write_tie_gradient(static_cast<const scalar_t*>(lv.x), lv.x_stride, static_cast<scalar_t*>(lv.grad), lv.grad_stride,
                       n, c, lv.H, lv.W, b[0], b[1], g_bounds[l][2 * g] / T(n_low), g_bounds[l][2 * g + 1] / T(n_high),
                       n_low == 0 || n_high == 0);
  });
}

template <typename scalar_t>
void minmax_affine_bwd_impl(const NormLevel* levels, int count, int group) {
  using T = AccType<scalar_t>;
  // dL/dlow and dL/dhigh per group, its planes in order, in double: scale = 1 / (high - low + eps)
  // gives d scale / d high = -scale^2 = -d scale / d low; offset = low.
  std::vector<std::vector<T>> g_bounds(static_cast<size_t>(count));
  for (int l = 0; l < count; ++l) {
    const NormLevel& lv = levels[l];
    std::vector<double> sums(size_t(2 * group_count(group, lv.N, lv.C)), 0.0);
    const T* affine = static_cast<const T*>(lv.affine);
    const T* g_affine = static_cast<const T*>(lv.g_affine);
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      const int64_t g = group_of_plane(group, plane / lv.C, plane % lv.C, lv.C);
      const double through_scale = double(g_affine[2 * plane]) * double(affine[2 * plane]) * double(affine[2 * plane]);
      sums[2 * g] += through_scale + double(g_affine[2 * plane + 1]);
      sums[2 * g + 1] -= through_scale;
    }
    g_bounds[l].assign(sums.begin(), sums.end());
  }
  split_among_ties<scalar_t>(levels, count, group, g_bounds);
}

// minmax_grad of one map: its per-group bounds and their gradients come as separate arrays.
template <typename scalar_t>
void minmax_grad_impl(const MinMaxGradArgs& a) {
  using T = AccType<scalar_t>;
  const int64_t groups = group_count(a.group, a.N, a.C);
  std::vector<T> bounds(size_t(2 * groups));
  std::vector<std::vector<T>> g_bounds(1, std::vector<T>(size_t(2 * groups)));
  for (int64_t g = 0; g < groups; ++g) {
    bounds[2 * g] = static_cast<const T*>(a.low)[g];
    bounds[2 * g + 1] = static_cast<const T*>(a.high)[g];
    g_bounds[0][2 * g] = static_cast<const T*>(a.g_low)[g];
    g_bounds[0][2 * g + 1] = static_cast<const T*>(a.g_high)[g];
  }
  NormLevel lv{};
  lv.x = a.x;
  std::copy(a.x_stride, a.x_stride + 4, lv.x_stride);
  lv.N = a.N;
  lv.C = a.C;
  lv.H = a.H;
  lv.W = a.W;
  lv.bounds = bounds.data();
  lv.grad = a.grad;
  std::copy(a.grad_stride, a.grad_stride + 4, lv.grad_stride);
  split_among_ties<scalar_t>(&lv, 1, a.group, g_bounds);
}

}  // namespace

void minmax_grad_cpu(const MinMaxGradArgs& args) {
  switch (args.dtype) {
    case DType::kFloat32: return minmax_grad_impl<float>(args);
    case DType::kFloat64: return minmax_grad_impl<double>(args);
    case DType::kFloat16: return minmax_grad_impl<c10::Half>(args);
    case DType::kBFloat16: return minmax_grad_impl<c10::BFloat16>(args);
  }
}

void minmax_affine_cpu(const NormLevel* levels, int count, DType dtype, int group, double eps) {
  switch (dtype) {
    case DType::kFloat32: return minmax_affine_impl<float>(levels, count, group, eps);
    case DType::kFloat64: return minmax_affine_impl<double>(levels, count, group, eps);
    case DType::kFloat16: return minmax_affine_impl<c10::Half>(levels, count, group, eps);
    case DType::kBFloat16: return minmax_affine_impl<c10::BFloat16>(levels, count, group, eps);
  }
}

void minmax_affine_bwd_cpu(const NormLevel* levels, int count, DType dtype, int group) {
  switch (dtype) {
    case DType::kFloat32: return minmax_affine_bwd_impl<float>(levels, count, group);
    case DType::kFloat64: return minmax_affine_bwd_impl<double>(levels, count, group);
    case DType::kFloat16: return minmax_affine_bwd_impl<c10::Half>(levels, count, group);
    case DType::kBFloat16: return minmax_affine_bwd_impl<c10::BFloat16>(levels, count, group);
  }
}

}  // namespace ssimkd
