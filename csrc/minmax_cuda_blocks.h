// minmax_cuda_blocks.h: the gradient of the normalisation's per-group min and max (MinMaxGradArgs in
// ssim_params.h) as CUDA thread code, compiled by its kernels (minmax_cuda.cu) and by their host
// emulation (ssim_cuda_emulated.cpp). Two kernels: count the ties of each group with its min and max
// (integer atomics), then write every element's share of dL/dmin and dL/dmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda_device.h"
#include "ssim_params.h"

namespace ssimkd {
namespace cuda_detail {

// The count kernel's grid: `chunks` blocks per plane (x), one plane per row of blocks (y, at most
// 65535 a launch); a plane's pixels are strided over its chunks' threads.
inline int64_t minmax_count_chunks(const MinMaxGradArgs& a) {
  return std::min<int64_t>((a.H * a.W + kThreads - 1) / kThreads, 64);
}
constexpr int64_t kMaxGridRows = 65535;

// The write kernel's grid: blocks striding over every element.
inline int64_t minmax_write_blocks(const MinMaxGradArgs& a) {
  return std::min<int64_t>((a.N * a.C * a.H * a.W + kThreads - 1) / kThreads, kMaxGridRows * 8);
}

// Block `chunk` of plane `plane`: the ties of its pixels with the group's min and max, added to counts.
template <typename scalar_t>
SSIMKD_DEVICE void minmax_count_thread(const Thread& th, const MinMaxGradArgs& a, int64_t plane, int64_t chunk,
                                       int64_t chunks) {
  using T = AccType<scalar_t>;
  SSIMKD_STAGE("count ties");
  const int64_t n = plane / a.C, c = plane % a.C, g = group_of_plane(a.group, n, c, a.C);
  const GlobalPlane<const scalar_t> x = strided_plane<const scalar_t>(a.x, a.x_stride, n, c);
  const T lo = global_array<const T>(a.low)[g], hi = global_array<const T>(a.high)[g];
  unsigned long long n_low = 0, n_high = 0;
  for (int64_t i = chunk * th.nthreads + th.tid; i < a.H * a.W; i += chunks * th.nthreads) {
    const T v = static_cast<T>(x(i / a.W, i % a.W));
    n_low += v == lo;
    n_high += v == hi;
  }
  const GlobalArray<unsigned long long> counts = global_array<unsigned long long>(a.counts);
  if (n_low) atomic_add(counts + 2 * g, n_low);
  if (n_high) atomic_add(counts + 2 * g + 1, n_high);
}

// Block `block` of `blocks`: grad = g_low / n_low [x == low] + g_high / n_high [x == high] (NaN for a
// group with no match: a NaN in it).
template <typename scalar_t>
SSIMKD_DEVICE void minmax_write_thread(const Thread& th, const MinMaxGradArgs& a, int64_t block, int64_t blocks) {
  using T = AccType<scalar_t>;
  SSIMKD_STAGE("write gradient");
  const int64_t total = a.N * a.C * a.H * a.W;
  const GlobalArray<const int64_t> counts = global_array<const int64_t>(a.counts);
  const GlobalArray<const T> low = global_array<const T>(a.low), high = global_array<const T>(a.high);
  const GlobalArray<const T> g_low = global_array<const T>(a.g_low), g_high = global_array<const T>(a.g_high);
  for (int64_t i = block * th.nthreads + th.tid; i < total; i += blocks * th.nthreads) {
    const int64_t w = i % a.W, h = (i / a.W) % a.H, c = (i / (a.W * a.H)) % a.C, n = i / (a.W * a.H * a.C);
    const int64_t g = group_of_plane(a.group, n, c, a.C);
    const T v = static_cast<T>(strided_plane<const scalar_t>(a.x, a.x_stride, n, c)(h, w));
    const int64_t n_low = counts[2 * g], n_high = counts[2 * g + 1];
    T out = (n_low == 0 || n_high == 0) ? T(NAN) : T(0);
    if (v == low[g]) out += g_low[g] / T(n_low);
    if (v == high[g]) out += g_high[g] / T(n_high);
    strided_plane<scalar_t>(a.grad, a.grad_stride, n, c)(h, w) = static_cast<scalar_t>(out);
  }
}

}  // namespace cuda_detail
}  // namespace ssimkd
