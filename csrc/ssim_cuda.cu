// ssim_cuda.cu: the fused SSIM-KD forward and backward on CUDA (SPEC section 4), sharing every
// per-pixel formula with the CPU op through ssim_math.h.
//
// One block owns one TILE x TILE tile of one plane of one level; the grid covers the tiles of every
// level (FusedArgs' level table), so one launch serves all levels. The tile and its halo sit in
// shared memory; the separable passes run there, each thread sliding along a short strip so that a
// loaded value serves several outputs. Per-tile partial sums, then a fixed-order second stage: no
// float atomics, bitwise deterministic. Nothing but the inputs is read by the backward.
//
// The block functions below take their thread's place (tid, nthreads) explicitly and synchronise
// through SSIMKD_SYNC(), and every stage is a loop over work items strided by nthreads. Compiled as
// host C++ with SSIMKD_CUDA_EMULATION (csrc/ssim_cuda_emulated.cpp), the same code runs one block at a
// time with one thread, which is how CI, without a GPU, tests this file's indexing, halos, folds and
// reductions against the reference (the races that one thread cannot show are compute-sanitizer's).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "ssim_params.h"

#ifdef SSIMKD_CUDA_EMULATION
#define SSIMKD_DEVICE inline
#define SSIMKD_SYNC() ((void)0)
#define SSIMKD_UNROLL
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#define SSIMKD_DEVICE __device__ __forceinline__
#define SSIMKD_SYNC() __syncthreads()
#define SSIMKD_UNROLL _Pragma("unroll")  // constant indices keep small arrays in registers
#endif

namespace ssimkd {
namespace cuda_detail {

constexpr int kThreads = 256;  // threads per block (a power of two: the tree reductions need it)
constexpr int kStrip = 4;      // outputs per work item along a pass: each loaded value serves several

// Output tile side: 32, or 16 for float64, whose backward buffers would not fit at 32 (R = 7).
template <typename T>
constexpr int tile_side() {
  return sizeof(T) == 8 ? 16 : 32;
}

// The calling thread's place in its block.
struct Thread {
  int tid, nthreads;
};

// Sum of `values[k]` over the block's threads, for k < K, into out[k] (valid in thread 0). A tree over
// shared memory: a fixed pairing of partial sums, so the same launch configuration gives the same bits.
template <typename T, int K>
SSIMKD_DEVICE void block_sum(const Thread& th, const T (&values)[K], T* scratch, T* out) {
  for (int k = 0; k < K; ++k) scratch[k * th.nthreads + th.tid] = values[k];
  SSIMKD_SYNC();
  for (int stride = th.nthreads / 2; stride > 0; stride /= 2) {
    if (th.tid < stride)
      for (int k = 0; k < K; ++k) scratch[k * th.nthreads + th.tid] += scratch[k * th.nthreads + th.tid + stride];
    SSIMKD_SYNC();
  }
  if (th.tid == 0)
    for (int k = 0; k < K; ++k) out[k] = scratch[k * th.nthreads];
}

// A tile's inputs: plane pointers, normalisation, and the geometry of its region.
template <typename scalar_t, typename T>
struct TilePlane {
  const LevelDesc* lv;
  TileCoord tc;
  const scalar_t* x;  // plane (n, c) of x
  const scalar_t* y;
  T x_scale, x_offset, y_scale, y_offset;  // x-hat = x_scale * (x - x_offset)
  int64_t h0, w0;     // first pixel of the tile
};

template <typename scalar_t, typename T>
SSIMKD_DEVICE TilePlane<scalar_t, T> tile_plane(const FusedArgs& a, int64_t tile, int side) {
  TilePlane<scalar_t, T> p;
  p.tc = locate_tile(a, tile);
  p.lv = &a.levels[p.tc.level];
  const LevelDesc& lv = *p.lv;
  p.x = static_cast<const scalar_t*>(lv.x) + p.tc.n * lv.x_stride[0] + p.tc.c * lv.x_stride[1];
  p.y = static_cast<const scalar_t*>(lv.y) + p.tc.n * lv.y_stride[0] + p.tc.c * lv.y_stride[1];
  plane_affine(lv.x_affine, lv.x_affine_stride, p.tc.n, p.tc.c, &p.x_scale, &p.x_offset);
  plane_affine(lv.y_affine, lv.y_affine_stride, p.tc.n, p.tc.c, &p.y_scale, &p.y_offset);
  p.h0 = p.tc.th * side;
  p.w0 = p.tc.tw * side;
  return p;
}

// Stage "load": the L x L region whose top-left pixel is (row0, col0), normalised, through the
// padding's index map, into xs / ys; then both are centred on their means (cx, cy returned through
// shared memory). Any shift keeps the math exact (ssim_math.h, moments_from_blurred); the region mean
// is near every window's mean, which keeps float32 variances from cancelling.
template <typename scalar_t, typename T>
SSIMKD_DEVICE void load_centred_region(const Thread& th, const FusedArgs& a, const TilePlane<scalar_t, T>& p,
                                       int64_t row0, int64_t col0, int L, T* xs, T* ys, T* scratch, T* means) {
  const LevelDesc& lv = *p.lv;
  T sums[2] = {T(0), T(0)};
  for (int idx = th.tid; idx < L * L; idx += th.nthreads) {
    const int i = idx / L, j = idx - (idx / L) * L;
    const int64_t r = source_index(row0 + i, lv.H, a.padding);
    const int64_t c = source_index(col0 + j, lv.W, a.padding);
    T xv = T(0), yv = T(0);  // zero padding: 0 in the normalised space
    if (r >= 0 && c >= 0) {
      xv = p.x_scale * (static_cast<T>(p.x[r * lv.x_stride[2] + c * lv.x_stride[3]]) - p.x_offset);
      yv = p.y_scale * (static_cast<T>(p.y[r * lv.y_stride[2] + c * lv.y_stride[3]]) - p.y_offset);
    }
    xs[idx] = xv;
    ys[idx] = yv;
    sums[0] += xv;
    sums[1] += yv;
  }
  block_sum(th, sums, scratch, means);  // syncs before and after the tree
  SSIMKD_SYNC();
  const T cx = means[0] / T(L * L), cy = means[1] / T(L * L);
  for (int idx = th.tid; idx < L * L; idx += th.nthreads) {
    xs[idx] -= cx;
    ys[idx] -= cy;
  }
  SSIMKD_SYNC();
  if (th.tid == 0) {
    means[0] = cx;
    means[1] = cy;
  }
  SSIMKD_SYNC();
}

// Stage "horizontal pass": for rows [0, rows) of the centred region (row length L), the five
// blurred maps x, y, x^2, y^2, xy at output columns [0, out_cols), into maps (map-major, rows x
// out_cols each). Each work item is a strip of kStrip outputs of one row: it loads kStrip + 2R inputs.
template <typename T, int R>
SSIMKD_DEVICE void horizontal_pass(const Thread& th, const T* xs, const T* ys, int L, int rows, int out_cols,
                                   const T* taps, T* maps) {
  const int strips = (out_cols + kStrip - 1) / kStrip;
  const int plane = rows * out_cols;
  for (int item = th.tid; item < rows * strips; item += th.nthreads) {
    const int i = item / strips, j0 = (item - (item / strips) * strips) * kStrip;
    T xv[kStrip + 2 * R], yv[kStrip + 2 * R];
    for (int k = 0; k < kStrip + 2 * R; ++k) {
      const int j = std::min(j0 + k, L - 1);  // clamped reads feed only the masked tail of the last strip
      xv[k] = xs[i * L + j];
      yv[k] = ys[i * L + j];
    }
    for (int s = 0; s < kStrip; ++s) {
      T m[5] = {T(0), T(0), T(0), T(0), T(0)};
      for (int k = 0; k <= 2 * R; ++k) {
        const T g = taps[k], xk = xv[s + k], yk = yv[s + k];
        m[0] += g * xk;
        m[1] += g * yk;
        m[2] += g * xk * xk;
        m[3] += g * yk * yk;
        m[4] += g * xk * yk;
      }
      if (j0 + s < out_cols)
        for (int q = 0; q < 5; ++q) maps[q * plane + i * out_cols + j0 + s] = m[q];
    }
  }
}

// The vertical pass of map q for a strip of kStrip output rows from row i0, column j (maps: rows_in x
// cols each): out[s] = sum_k g[k] maps[(i0 + s + k) * cols + j].
template <typename T, int R>
SSIMKD_DEVICE void vertical_strip(const T* map, int rows_in, int cols, int i0, int j, const T* taps, T (&out)[kStrip]) {
  T col[kStrip + 2 * R];
  for (int k = 0; k < kStrip + 2 * R; ++k) col[k] = map[std::min(i0 + k, rows_in - 1) * cols + j];
  for (int s = 0; s < kStrip; ++s) {
    T acc = T(0);
    for (int k = 0; k <= 2 * R; ++k) acc += taps[k] * col[s + k];
    out[s] = acc;
  }
}

// ================================================================================================
// Forward: one tile -> its sum of m (and its part of the SSIM map)
// ================================================================================================

template <typename T, int R, int TILE>
struct ForwardSmem {
  static constexpr int L = TILE + 2 * R;  // region side: the tile plus an r halo
  static constexpr int kX = 0, kY = L * L, kMaps = 2 * L * L, kScratch = kMaps + 5 * L * TILE;
  static constexpr int kMeans = kScratch + kThreads, kSize = kMeans + 2;
};

template <typename scalar_t, int R>
SSIMKD_DEVICE void forward_block(const Thread& th, const FusedArgs& a, int64_t tile,
                                 AccType<scalar_t>* smem) {
  using T = AccType<scalar_t>;
  constexpr int TILE = tile_side<T>();
  using S = ForwardSmem<T, R, TILE>;
  const TilePlane<scalar_t, T> p = tile_plane<scalar_t, T>(a, tile, TILE);
  const LevelDesc& lv = *p.lv;
  const SsimParams<T> params = make_ssim_params<T>(a);
  T taps[2 * R + 1];
  for (int k = 0; k <= 2 * R; ++k) taps[k] = T(a.taps[k]);

  // ---- load: the tile plus an r halo, centred
  load_centred_region<scalar_t, T>(th, a, p, p.h0 - R, p.w0 - R, S::L, smem + S::kX, smem + S::kY,
                                   smem + S::kScratch, smem + S::kMeans);
  const T cx = smem[S::kMeans], cy = smem[S::kMeans + 1];

  // ---- horizontal pass: all L region rows, TILE output columns
  horizontal_pass<T, R>(th, smem + S::kX, smem + S::kY, S::L, S::L, TILE, taps, smem + S::kMaps);
  SSIMKD_SYNC();

  // ---- vertical pass and terms: strips of kStrip rows of one column; SSIM, m, the thread's sum
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  T* map = static_cast<T*>(lv.map);
  T thread_sum[1] = {T(0)};
  constexpr int strips = TILE / kStrip;
  for (int item = th.tid; item < strips * TILE; item += th.nthreads) {
    const int i0 = (item / TILE) * kStrip, j = item - (item / TILE) * TILE;
    const int64_t pw = p.w0 + j;
    if (!is_output(pw, lv.W, R, a.padding)) continue;
    T blurred[5][kStrip];
    for (int q = 0; q < 5; ++q) vertical_strip<T, R>(smem + S::kMaps + q * S::L * TILE, S::L, TILE, i0, j, taps, blurred[q]);
    for (int s = 0; s < kStrip; ++s) {
      const int64_t ph = p.h0 + i0 + s;
      if (!is_output(ph, lv.H, R, a.padding)) continue;
      const Moments<T> m = moments_from_blurred(blurred[0][s], blurred[1][s], blurred[2][s], blurred[3][s],
                                                blurred[4][s], cx, cy);
      const T value = ssim_value(m, params);
      thread_sum[0] += pixel_loss(value, params.clamp);
      if (map != nullptr) map[(p.tc.plane * out_h + ph - offset) * out_w + pw - offset] = value;
    }
  }

  // ---- reduce: the tile's sum
  block_sum(th, thread_sum, smem + S::kScratch, static_cast<T*>(a.tile_partials) + tile);
}

// ================================================================================================
// Backward: one tile of dL/dx (and dL/dy), with its per-plane affine-gradient partial sums
// ================================================================================================

template <typename T, int R, int TILE>
struct BackwardSmem {
  static constexpr int K = 2 * R + 1;
  static constexpr int LL = TILE + 4 * R;  // loaded region side: the tile plus a 2r halo
  static constexpr int LS = TILE + 2 * R;  // statistics side: window centres within r of the tile
  static constexpr int kX = 0, kY = LL * LL;
  static constexpr int kMaps = 2 * LL * LL;            // horizontal maps: 5 x LL x LS; later the transposed
  static constexpr int kCoeffs = kMaps + 5 * LL * LS;  //   horizontal pass, 5 x LS x TILE. coeffs: 5 x LS x LS
  static constexpr int kTapH = kCoeffs + 5 * LS * LS;  // transposed taps of the tile's rows: TILE x K
  static constexpr int kTapW = kTapH + TILE * K;       // ... of its columns: K x TILE
  static constexpr int kScratch = kTapW + K * TILE;    // reductions: 4 x kThreads
  static constexpr int kMeans = kScratch + 4 * kThreads, kSize = kMeans + 4;
};

template <typename scalar_t, int R>
SSIMKD_DEVICE void backward_block(const Thread& th, const FusedArgs& a, int64_t tile,
                                  AccType<scalar_t>* smem) {
  using T = AccType<scalar_t>;
  constexpr int TILE = tile_side<T>();
  using S = BackwardSmem<T, R, TILE>;
  constexpr int K = S::K;
  const TilePlane<scalar_t, T> p = tile_plane<scalar_t, T>(a, tile, TILE);
  const LevelDesc& lv = *p.lv;
  const SsimParams<T> params = make_ssim_params<T>(a);
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // blurred back: a_x, b_x, c [, a_y, b_y]
  T taps[K];
  for (int k = 0; k < K; ++k) taps[k] = T(a.taps[k]);

  // ---- load: the tile plus a 2r halo, centred; the tile's transposed taps
  load_centred_region<scalar_t, T>(th, a, p, p.h0 - 2 * R, p.w0 - 2 * R, S::LL, smem + S::kX, smem + S::kY,
                                   smem + S::kScratch, smem + S::kMeans);
  const T cx = smem[S::kMeans], cy = smem[S::kMeans + 1];
  for (int idx = th.tid; idx < TILE * K; idx += th.nthreads) {
    const int q = idx / K, j = idx - (idx / K) * K;  // tap_h[q][j]: centre h0 + q + j - R -> row h0 + q
    smem[S::kTapH + idx] = transposed_tap(p.h0 + q, p.h0 + q + j - R, lv.H, R, a.padding, taps);
    smem[S::kTapW + j * TILE + q] = transposed_tap(p.w0 + q, p.w0 + q + j - R, lv.W, R, a.padding, taps);
  }

  // ---- horizontal pass: all LL rows, LS output columns (centres w0 - R ...)
  horizontal_pass<T, R>(th, smem + S::kX, smem + S::kY, S::LL, S::LL, S::LS, taps, smem + S::kMaps);
  SSIMKD_SYNC();

  // ---- vertical pass and terms: statistics on the LS x LS centres, the coefficient maps there
  const T grad_scale = *static_cast<const T*>(lv.grad_loss) * T(lv.loss_scale);
  const T* grad_map = static_cast<const T*>(lv.grad_map);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  T* coeffs = smem + S::kCoeffs;
  constexpr int plane_s = S::LS * S::LS;
  constexpr int strips = (S::LS + kStrip - 1) / kStrip;
  for (int item = th.tid; item < strips * S::LS; item += th.nthreads) {
    const int i0 = (item / S::LS) * kStrip, j = item - (item / S::LS) * S::LS;
    const int64_t pw = p.w0 - R + j;
    T blurred[5][kStrip];
    for (int q = 0; q < 5; ++q) vertical_strip<T, R>(smem + S::kMaps + q * S::LL * S::LS, S::LL, S::LS, i0, j, taps, blurred[q]);
    for (int s = 0; s < kStrip && i0 + s < S::LS; ++s) {
      const int64_t ph = p.h0 - R + i0 + s;
      BackwardCoeffs<T> bc = {T(0), T(0), T(0), T(0), T(0)};
      if (is_output(ph, lv.H, R, a.padding) && is_output(pw, lv.W, R, a.padding)) {
        const Moments<T> m = moments_from_blurred(blurred[0][s], blurred[1][s], blurred[2][s], blurred[3][s],
                                                  blurred[4][s], cx, cy);
        const SsimPartials<T> g = ssim_partials(m, params);
        T d = grad_scale * pixel_loss_grad(g.S, params.clamp);
        if (grad_map != nullptr) d += grad_map[(p.tc.plane * out_h + ph - offset) * out_w + pw - offset];
        bc = backward_coeffs(g, d, blurred[0][s], blurred[1][s]);
      }
      const int at = (i0 + s) * S::LS + j;
      coeffs[at] = bc.a_x;
      coeffs[plane_s + at] = bc.b_x;
      coeffs[2 * plane_s + at] = bc.c;
      if (need_y) {
        coeffs[3 * plane_s + at] = bc.a_y;
        coeffs[4 * plane_s + at] = bc.b_y;
      }
    }
  }
  SSIMKD_SYNC();

  // ---- blur back, horizontally: transposed[m][i][v] = sum_j tap_w[j][v] coeffs[m][i][v + j], in the
  // (now free) horizontal-map buffer
  T* transposed = smem + S::kMaps;
  const T* tap_w = smem + S::kTapW;
  constexpr int v_strips = TILE / kStrip;
  for (int item = th.tid; item < n_coeff * S::LS * v_strips; item += th.nthreads) {
    const int m = item / (S::LS * v_strips), rest = item - m * (S::LS * v_strips);
    const int i = rest / v_strips, v0 = (rest - (rest / v_strips) * v_strips) * kStrip;
    const T* src = coeffs + m * plane_s + i * S::LS + v0;
    T row[kStrip + 2 * R];
    for (int k = 0; k < kStrip + 2 * R; ++k) row[k] = src[k];
    for (int s = 0; s < kStrip; ++s) {
      T acc = T(0);
      for (int j = 0; j < K; ++j) acc += tap_w[j * TILE + v0 + s] * row[s + j];
      transposed[(m * S::LS + i) * TILE + v0 + s] = acc;
    }
  }
  SSIMKD_SYNC();

  // ---- blur back, vertically, and finish: dL/dx-hat = W^T a_x + 2 x' W^T b_x + y' W^T c (and the
  // mirror for y), dL/dx = scale dL/dx-hat; per-thread sums for d scale, d offset of both inputs
  const T* tap_h = smem + S::kTapH;
  scalar_t* gx = lv.gx ? static_cast<scalar_t*>(lv.gx) + p.tc.n * lv.gx_stride[0] + p.tc.c * lv.gx_stride[1] : nullptr;
  scalar_t* gy = lv.gy ? static_cast<scalar_t*>(lv.gy) + p.tc.n * lv.gy_stride[0] + p.tc.c * lv.gy_stride[1] : nullptr;
  T sums[4] = {T(0), T(0), T(0), T(0)};  // gx_hat * (x - x_offset), gx_hat, gy_hat * (y - y_offset), gy_hat
  constexpr int u_strips = TILE / kStrip;
  for (int item = th.tid; item < u_strips * TILE; item += th.nthreads) {
    const int u0 = (item / TILE) * kStrip, v = item - (item / TILE) * TILE;
    const int64_t w = p.w0 + v;
    if (w >= lv.W) continue;
    T back[5][kStrip];
    SSIMKD_UNROLL
    for (int m = 0; m < 5; ++m) {
      if (m >= n_coeff) break;
      T col[kStrip + 2 * R];
      for (int k = 0; k < kStrip + 2 * R; ++k) col[k] = transposed[(m * S::LS + u0 + k) * TILE + v];
      for (int s = 0; s < kStrip; ++s) {
        T acc = T(0);
        for (int j = 0; j < K; ++j) acc += tap_h[(u0 + s) * K + j] * col[s + j];
        back[m][s] = acc;
      }
    }
    for (int s = 0; s < kStrip; ++s) {
      const int64_t h = p.h0 + u0 + s;
      if (h >= lv.H) break;
      const T x_rel = static_cast<T>(p.x[h * lv.x_stride[2] + w * lv.x_stride[3]]) - p.x_offset;
      const T y_rel = static_cast<T>(p.y[h * lv.y_stride[2] + w * lv.y_stride[3]]) - p.y_offset;
      const T xc = p.x_scale * x_rel - cx;
      const T yc = p.y_scale * y_rel - cy;
      const T gx_hat = back[0][s] + T(2) * xc * back[1][s] + yc * back[2][s];
      sums[0] += gx_hat * x_rel;
      sums[1] += gx_hat;
      if (gx) gx[h * lv.gx_stride[2] + w * lv.gx_stride[3]] = static_cast<scalar_t>(p.x_scale * gx_hat);
      if (need_y) {
        const T gy_hat = back[3][s] + T(2) * yc * back[4][s] + xc * back[2][s];
        sums[2] += gy_hat * y_rel;
        sums[3] += gy_hat;
        if (gy) gy[h * lv.gy_stride[2] + w * lv.gy_stride[3]] = static_cast<scalar_t>(p.y_scale * gy_hat);
      }
    }
  }

  // ---- reduce: the tile's four sums
  block_sum(th, sums, smem + S::kScratch, static_cast<T*>(a.tile_partials) + 4 * tile);
}

// ================================================================================================
// Second stage: fixed-order sums of the tile partials
// ================================================================================================

// One block per level: loss_scale * (sum of the level's tile sums).
template <typename T>
SSIMKD_DEVICE void level_sum_block(const Thread& th, const FusedArgs& a, int level, T* scratch) {
  const LevelDesc& lv = a.levels[level];
  const T* partials = static_cast<const T*>(a.tile_partials);
  const int64_t end = lv.tile_begin + lv.N * lv.C * lv.tiles_h * lv.tiles_w;
  T sum[1] = {T(0)};
  for (int64_t t = lv.tile_begin + th.tid; t < end; t += th.nthreads) sum[0] += partials[t];
  T total[1];
  block_sum(th, sum, scratch, total);
  if (th.tid == 0) static_cast<T*>(a.level_losses)[level] = total[0] * T(lv.loss_scale);
}

// One thread per plane of a level: its tiles' four sums in order -> d scale, d offset of x and y.
template <typename T>
SSIMKD_DEVICE void plane_sums(const FusedArgs& a, int level, int64_t plane) {
  const LevelDesc& lv = a.levels[level];
  const int64_t per_plane = lv.tiles_h * lv.tiles_w;
  const T* partials = static_cast<const T*>(a.tile_partials) + 4 * (lv.tile_begin + plane * per_plane);
  T s[4] = {T(0), T(0), T(0), T(0)};
  for (int64_t t = 0; t < per_plane; ++t)
    for (int k = 0; k < 4; ++k) s[k] += partials[4 * t + k];
  const int64_t n = plane / lv.C, c = plane % lv.C;
  T scale, offset;
  if (lv.g_x_affine) {
    plane_affine(lv.x_affine, lv.x_affine_stride, n, c, &scale, &offset);
    affine_gradient(scale, s[0], s[1], static_cast<T*>(lv.g_x_affine) + 2 * plane);
  }
  if (lv.g_y_affine) {
    plane_affine(lv.y_affine, lv.y_affine_stride, n, c, &scale, &offset);
    affine_gradient(scale, s[2], s[3], static_cast<T*>(lv.g_y_affine) + 2 * plane);
  }
}

// ================================================================================================
// Kernels and launchers
// ================================================================================================

// Runtime (dtype, radius) -> a call of fn.template operator()<scalar_t, R>().
template <typename Fn>
void dispatch(const FusedArgs& a, Fn&& fn) {
  auto with_radius = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    switch (a.radius) {
      case 1: return fn.template operator()<scalar_t, 1>();
      case 2: return fn.template operator()<scalar_t, 2>();
      case 3: return fn.template operator()<scalar_t, 3>();
      case 4: return fn.template operator()<scalar_t, 4>();
      case 5: return fn.template operator()<scalar_t, 5>();
      case 6: return fn.template operator()<scalar_t, 6>();
      case 7: return fn.template operator()<scalar_t, 7>();
    }
  };
  switch (a.dtype) {
    case DType::kFloat32: return with_radius(float{});
    case DType::kFloat64: return with_radius(double{});
    case DType::kFloat16: return with_radius(c10::Half{});
    case DType::kBFloat16: return with_radius(c10::BFloat16{});
  }
}

template <typename T>
int64_t smem_bytes(int radius, bool backward) {
  // Sized for the largest radius of the dtype's tile; the kernels' layouts are fixed per R.
  auto size = [&](auto r) -> int64_t {
    constexpr int R = decltype(r)::value;
    constexpr int TILE = tile_side<T>();
    return int64_t(backward ? BackwardSmem<T, R, TILE>::kSize : ForwardSmem<T, R, TILE>::kSize) * sizeof(T);
  };
  switch (radius) {
    case 1: return size(std::integral_constant<int, 1>{});
    case 2: return size(std::integral_constant<int, 2>{});
    case 3: return size(std::integral_constant<int, 3>{});
    case 4: return size(std::integral_constant<int, 4>{});
    case 5: return size(std::integral_constant<int, 5>{});
    case 6: return size(std::integral_constant<int, 6>{});
    default: return size(std::integral_constant<int, 7>{});
  }
}

inline int tile_side_for(DType dtype) { return dtype == DType::kFloat64 ? tile_side<double>() : tile_side<float>(); }

}  // namespace cuda_detail

#ifdef SSIMKD_CUDA_EMULATION
// ------------------------------------------------------------------------------------------------
// Host emulation: every block in turn, one thread each (see the header comment).
// ------------------------------------------------------------------------------------------------
namespace {

template <typename T>
void run_blocks(int64_t blocks, int64_t smem_size, const std::function<void(int64_t, T*)>& body) {
  std::vector<T> smem(size_t(smem_size / int64_t(sizeof(T))) + 1);
  for (int64_t b = 0; b < blocks; ++b) body(b, smem.data());
}
}  // namespace

TileShape cuda_emulated_tile_shape(DType dtype) {
  const int side = cuda_detail::tile_side_for(dtype);
  return {side, side};
}

void ssim_fwd_cuda_emulated(const FusedArgs& args) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  dispatch(args, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    const Thread one{0, 1};
    run_blocks<T>(args.total_tiles, smem_bytes<T>(R, false),
                  [&](int64_t tile, T* smem) { forward_block<scalar_t, R>(one, args, tile, smem); });
    run_blocks<T>(args.num_levels, int64_t(sizeof(T)) * 4,
                  [&](int64_t level, T* smem) { level_sum_block<T>(one, args, int(level), smem); });
  });
}

void ssim_bwd_cuda_emulated(const FusedArgs& args) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  dispatch(args, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    const Thread one{0, 1};
    run_blocks<T>(args.total_tiles, smem_bytes<T>(R, true),
                  [&](int64_t tile, T* smem) { backward_block<scalar_t, R>(one, args, tile, smem); });
    for (int l = 0; l < args.num_levels; ++l)
      for (int64_t plane = 0; plane < args.levels[l].N * args.levels[l].C; ++plane) plane_sums<T>(args, l, plane);
  });
}

#else
// ------------------------------------------------------------------------------------------------
// CUDA kernels and launchers
// ------------------------------------------------------------------------------------------------
namespace cuda_detail {

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads) ssim_fwd_kernel(const __grid_constant__ FusedArgs args) {
  extern __shared__ unsigned char smem_raw[];
  using T = AccType<scalar_t>;
  forward_block<scalar_t, R>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int64_t(blockIdx.x),
                             reinterpret_cast<T*>(smem_raw));
}

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads) ssim_bwd_kernel(const __grid_constant__ FusedArgs args) {
  extern __shared__ unsigned char smem_raw[];
  using T = AccType<scalar_t>;
  backward_block<scalar_t, R>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int64_t(blockIdx.x),
                              reinterpret_cast<T*>(smem_raw));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) level_sum_kernel(const __grid_constant__ FusedArgs args) {
  __shared__ T scratch[kThreads];
  level_sum_block<T>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int(blockIdx.x), scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) plane_sum_kernel(const __grid_constant__ FusedArgs args, int level) {
  const int64_t plane = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane < args.levels[level].N * args.levels[level].C) plane_sums<T>(args, level, plane);
}

// ---- the min/max gradient of the normalisation (MinMaxGradArgs): count ties, then write
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) minmax_count_kernel(const MinMaxGradArgs a, int64_t first_plane) {
  using T = AccType<scalar_t>;
  const int64_t plane = first_plane + blockIdx.y;
  const int64_t n = plane / a.C, c = plane % a.C, g = group_of_plane(a.group, n, c, a.C);
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + n * a.x_stride[0] + c * a.x_stride[1];
  const T lo = static_cast<const T*>(a.low)[g], hi = static_cast<const T*>(a.high)[g];
  unsigned long long n_low = 0, n_high = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.H * a.W; i += int64_t(gridDim.x) * blockDim.x) {
    const T v = static_cast<T>(x[(i / a.W) * a.x_stride[2] + (i % a.W) * a.x_stride[3]]);
    n_low += v == lo;
    n_high += v == hi;
  }
  // Integer atomics: exact, so the counts do not depend on the order of arrival.
  unsigned long long* counts = static_cast<unsigned long long*>(a.counts);
  if (n_low) atomicAdd(counts + 2 * g, n_low);
  if (n_high) atomicAdd(counts + 2 * g + 1, n_high);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) minmax_write_kernel(const MinMaxGradArgs a) {
  using T = AccType<scalar_t>;
  const int64_t total = a.N * a.C * a.H * a.W;
  const int64_t* counts = static_cast<const int64_t*>(a.counts);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = i % a.W, h = (i / a.W) % a.H, c = (i / (a.W * a.H)) % a.C, n = i / (a.W * a.H * a.C);
    const int64_t g = group_of_plane(a.group, n, c, a.C);
    const T v = static_cast<T>(static_cast<const scalar_t*>(a.x)[n * a.x_stride[0] + c * a.x_stride[1] +
                                                                h * a.x_stride[2] + w * a.x_stride[3]]);
    const int64_t n_low = counts[2 * g], n_high = counts[2 * g + 1];
    T out = (n_low == 0 || n_high == 0) ? T(NAN) : T(0);  // a NaN in the group
    if (v == static_cast<const T*>(a.low)[g]) out += static_cast<const T*>(a.g_low)[g] / T(n_low);
    if (v == static_cast<const T*>(a.high)[g]) out += static_cast<const T*>(a.g_high)[g] / T(n_high);
    static_cast<scalar_t*>(a.grad)[n * a.grad_stride[0] + c * a.grad_stride[1] + h * a.grad_stride[2] +
                                   w * a.grad_stride[3]] = static_cast<scalar_t>(out);
  }
}

template <typename Kernel>
void launch_tiles(Kernel kernel, const FusedArgs& args, int64_t smem, cudaStream_t stream) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (H100: up to 227 KiB a block).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(args.total_tiles), kThreads, size_t(smem), stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail

TileShape cuda_tile_shape(DType dtype) {
  const int side = cuda_detail::tile_side_for(dtype);
  return {side, side};
}

void ssim_fwd_cuda(const FusedArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(args, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    launch_tiles(ssim_fwd_kernel<scalar_t, R>, args, smem_bytes<T>(R, false), stream);
    level_sum_kernel<T><<<unsigned(args.num_levels), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void minmax_grad_cuda(const MinMaxGradArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  const int64_t total = args.N * args.C * args.H * args.W;
  if (total == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  auto run = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    // counts were zeroed by the caller; y of the count grid walks the planes (at most 65535 a launch)
    const int64_t planes = args.N * args.C;
    const unsigned chunks = unsigned(std::min<int64_t>((args.H * args.W + kThreads - 1) / kThreads, 64));
    for (int64_t first = 0; first < planes; first += 65535) {
      const unsigned rows = unsigned(std::min<int64_t>(65535, planes - first));
      minmax_count_kernel<scalar_t><<<dim3(chunks, rows), kThreads, 0, stream>>>(args, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned blocks = unsigned(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
    minmax_write_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (args.dtype) {
    case DType::kFloat32: return run(float{});
    case DType::kFloat64: return run(double{});
    case DType::kFloat16: return run(c10::Half{});
    case DType::kBFloat16: return run(c10::BFloat16{});
  }
}

void ssim_bwd_cuda(const FusedArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(args, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    launch_tiles(ssim_bwd_kernel<scalar_t, R>, args, smem_bytes<T>(R, true), stream);
    for (int l = 0; l < args.num_levels; ++l) {
      const LevelDesc& lv = args.levels[l];
      if (lv.g_x_affine == nullptr && lv.g_y_affine == nullptr) continue;
      const int64_t planes = lv.N * lv.C;
      plane_sum_kernel<T><<<unsigned((planes + kThreads - 1) / kThreads), kThreads, 0, stream>>>(args, l);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}
#endif

}  // namespace ssimkd
