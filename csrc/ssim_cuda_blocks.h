// ssim_cuda_blocks.h: the fused SSIM-KD forward and backward as CUDA block code (SPEC section 4), with
// their shared-memory layouts; compiled by the kernels (ssim_cuda.cu) and by their host emulation
// (ssim_cuda_emulated.cpp), which runs every thread of every block and checks each access
// (cuda_device.h). Every per-pixel formula comes from ssim_math.h, shared with the CPU op.
//
// One block owns one TILE x TILE tile of one plane of one level; the grid covers the tiles of every
// level (FusedArgs' level table), so one launch serves all levels. The tile and its halo sit in
// shared memory; the separable passes run there, each thread sliding along a short strip so that a
// loaded value serves several outputs. Per-tile partial sums, then a fixed-order second stage: no
// float atomics, bitwise deterministic. Nothing but the inputs is read by the backward.
//
// Every stage is a loop over work items strided by the block's thread count, and stages meet at
// SSIMKD_SYNC() where one stage's shared writes feed another's reads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda_device.h"
#include "ssim_params.h"

namespace ssimkd {
namespace cuda_detail {

constexpr int kStrip = 4;  // outputs per work item along a pass: each loaded value serves several

// Output tile side: 32, or 16 for float64, whose backward buffers would not fit at 32 (R = 7).
template <typename T>
constexpr int tile_side() {
  return sizeof(T) == 8 ? 16 : 32;
}

inline int tile_side_for(DType dtype) {
  return dtype == DType::kFloat64 ? tile_side<double>() : tile_side<float>();
}

// Sum of `values[k]` over the block's threads, for k < K, into out[k] (written by thread 0). A tree
// over shared memory: a fixed pairing of partial sums, so the same launch configuration gives the
// same bits. `out` is shared, global or the thread's own array.
template <typename T, int K, typename Out>
SSIMKD_DEVICE void block_sum(const Thread& th, const T (&values)[K], Shared<T> scratch, Out out) {
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

// A tile's inputs: planes, normalisation, and the geometry of its region.
template <typename scalar_t, typename T>
struct TilePlane {
  const LevelDesc* lv;
  TileCoord tc;
  GlobalPlane<const scalar_t> x, y;        // plane (n, c) of x and y
  T x_scale, x_offset, y_scale, y_offset;  // x-hat = x_scale * (x - x_offset)
  int64_t h0, w0;                          // first pixel of the tile
};

template <typename scalar_t, typename T>
SSIMKD_DEVICE TilePlane<scalar_t, T> tile_plane(const FusedArgs& a, int64_t tile, int side) {
  TilePlane<scalar_t, T> p;
  p.tc = locate_tile(a, tile);
  p.lv = &a.levels[p.tc.level];
  const LevelDesc& lv = *p.lv;
  p.x = strided_plane<const scalar_t>(lv.x, lv.x_stride, p.tc.n, p.tc.c);
  p.y = strided_plane<const scalar_t>(lv.y, lv.y_stride, p.tc.n, p.tc.c);
  plane_affine_at(global_array<const T>(lv.x_affine), lv.x_affine_stride, p.tc.n, p.tc.c, &p.x_scale, &p.x_offset);
  plane_affine_at(global_array<const T>(lv.y_affine), lv.y_affine_stride, p.tc.n, p.tc.c, &p.y_scale, &p.y_offset);
  p.h0 = p.tc.th * side;
  p.w0 = p.tc.tw * side;
  return p;
}

// The L x L region whose top-left pixel is (row0, col0), normalised, through the padding's index map,
// into xs / ys; then both are centred on their means (cx, cy returned through `means`). Any shift
// keeps the math exact (ssim_math.h, moments_from_blurred); the region mean is near every window's
// mean, which keeps float32 variances from cancelling. With `l1` (the forward's L1 term), returns the
// thread's sum of |x-hat - y-hat| over the tile's own pixels: region rows and columns [halo, halo + side)
// inside the plane, so that the tiles of a plane count each pixel once, whatever the padding (else 0).
template <typename scalar_t, typename T>
SSIMKD_DEVICE T load_centred_region(const Thread& th, const FusedArgs& a, const TilePlane<scalar_t, T>& p, int64_t row0,
                                    int64_t col0, int L, Shared<T> xs, Shared<T> ys, Shared<T> scratch, Shared<T> means,
                                    bool l1 = false, int halo = 0, int side = 0) {
  const LevelDesc& lv = *p.lv;
  const int rows = L + SSIMKD_PLANTED(kHaloRows);  // L (a test of the emulation plants an off-by-one here)
  T sums[2] = {T(0), T(0)};
  T l1_sum = T(0);
  for (int idx = th.tid; idx < rows * L; idx += th.nthreads) {
    const int i = idx / L, j = idx - (idx / L) * L;
    const int64_t r = source_index(row0 + i, lv.H, a.padding);
    const int64_t c = source_index(col0 + j, lv.W, a.padding);
    T xv = T(0), yv = T(0);  // zero padding: 0 in the normalised space
    if (r >= 0 && c >= 0) {
      xv = p.x_scale * (static_cast<T>(p.x(r, c)) - p.x_offset);
      yv = p.y_scale * (static_cast<T>(p.y(r, c)) - p.y_offset);
      const bool own = i >= halo && i < halo + side && row0 + i < lv.H && j >= halo && j < halo + side &&
                       col0 + j < lv.W;  // row0 + halo, col0 + halo: the tile's first pixel, in the plane
      if (l1 && own) {
        const T d = xv - yv;
        l1_sum += d < T(0) ? -d : d;
      }
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
  return l1_sum;
}

// For rows [0, rows) of the centred region (row length L), the five blurred maps x, y, x^2, y^2, xy
// at output columns [0, out_cols), into maps (map-major, rows x out_cols each). Each work item is a
// strip of kStrip outputs of one row: it loads kStrip + 2R inputs.
template <typename T, int R>
SSIMKD_DEVICE void horizontal_pass(const Thread& th, Shared<const T> xs, Shared<const T> ys, int L, int rows,
                                   int out_cols, const T* taps, Shared<T> maps) {
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

// The vertical pass of one map for a strip of kStrip output rows from row i0, column j (map: rows_in
// x cols): out[s] = sum_k g[k] map[(i0 + s + k) * cols + j].
template <typename T, int R>
SSIMKD_DEVICE void vertical_strip(Shared<const T> map, int rows_in, int cols, int i0, int j, const T* taps,
                                  T (&out)[kStrip]) {
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
  static constexpr int kMeans = kScratch + 2 * kThreads, kSize = kMeans + 2;

  Shared<T> xs, ys;   // the centred region
  Shared<T> maps;     // horizontal pass: 5 maps of L rows x TILE columns
  Shared<T> scratch;  // block_sum: 2 x kThreads (the load's two sums, the tile's two)
  Shared<T> means;    // the centring shift (cx, cy)
  SSIMKD_DEVICE explicit ForwardSmem(SharedMemory<T> smem)
      : xs(carve(smem, kX, kY, "xs")),
        ys(carve(smem, kY, kMaps, "ys")),
        maps(carve(smem, kMaps, kScratch, "maps")),
        scratch(carve(smem, kScratch, kMeans, "scratch")),
        means(carve(smem, kMeans, kSize, "means")) {}
};

template <typename scalar_t, int R>
SSIMKD_DEVICE void forward_block(const Thread& th, const FusedArgs& a, int64_t tile,
                                 SharedMemory<AccType<scalar_t>> smem) {
  using T = AccType<scalar_t>;
  constexpr int TILE = tile_side<T>();
  using S = ForwardSmem<T, R, TILE>;
  const S sm(smem);
  const TilePlane<scalar_t, T> p = tile_plane<scalar_t, T>(a, tile, TILE);
  const LevelDesc& lv = *p.lv;
  const SsimParams<T> params = make_ssim_params<T>(a, lv);
  T taps[2 * R + 1];
  for (int k = 0; k <= 2 * R; ++k) taps[k] = T(a.taps[k]);

  SSIMKD_STAGE("load");            // the tile plus an r halo, centred; the L1 term of the tile's pixels
  T thread_sum[2] = {T(0), T(0)};  // the thread's sums of w m and of |x-hat - y-hat|
  thread_sum[1] = load_centred_region<scalar_t, T>(th, a, p, p.h0 - R, p.w0 - R, S::L, sm.xs, sm.ys, sm.scratch,
                                                   sm.means, lv.l1_scale != 0.0, R, TILE);
  const T cx = sm.means[0], cy = sm.means[1];

  SSIMKD_STAGE("horizontal pass");  // all L region rows, TILE output columns
  horizontal_pass<T, R>(th, sm.xs, sm.ys, S::L, S::L, TILE, taps, sm.maps);
  SSIMKD_SYNC();

  SSIMKD_STAGE("vertical pass");  // strips of kStrip rows of one column; SSIM, m, the thread's sum
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  const GlobalPlane<T> map = contiguous_plane<T>(lv.map, p.tc.plane, out_h, out_w);
  const GlobalPlane<const T> weight = strided_plane<const T>(lv.weight, lv.weight_stride, p.tc.n, p.tc.c);
  constexpr int strips = TILE / kStrip;
  for (int item = th.tid; item < strips * TILE; item += th.nthreads) {
    const int i0 = (item / TILE) * kStrip, j = item - (item / TILE) * TILE;
    const int64_t pw = p.w0 + j;
    if (!is_output(pw, lv.W, R, a.padding)) continue;
    T blurred[5][kStrip];
    for (int q = 0; q < 5; ++q) vertical_strip<T, R>(sm.maps + q * S::L * TILE, S::L, TILE, i0, j, taps, blurred[q]);
    // unrolled: blurred[.][s] must stay in registers (a rolled loop puts it on the stack)
    SSIMKD_UNROLL
    for (int s = 0; s < kStrip; ++s) {
      const int64_t ph = p.h0 + i0 + s;
      if (!is_output(ph, lv.H, R, a.padding)) continue;
      const Moments<T> m =
          moments_from_blurred(blurred[0][s], blurred[1][s], blurred[2][s], blurred[3][s], blurred[4][s], cx, cy);
      const T value = ssim_value(m, params);
      const T loss = pixel_loss(value, params.clamp);
      thread_sum[0] += weight ? weight(ph - offset, pw - offset) * loss : loss;
      if (map) map(ph - offset, pw - offset) = value;
    }
  }

  SSIMKD_STAGE("reduce");  // the tile's two sums
  block_sum(th, thread_sum, sm.scratch, global_array<T>(a.tile_partials) + 2 * tile);
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

  Shared<T> xs, ys;        // the centred region
  Shared<T> maps;          // horizontal pass: 5 maps of LL rows x LS columns
  Shared<T> transposed;    // the same memory, later: blur back horizontally, 5 x LS x TILE
  Shared<T> coeffs;        // the coefficient maps a_x, b_x, c [, a_y, b_y] on the LS x LS centres
  Shared<T> tap_h, tap_w;  // transposed taps of the tile's rows and columns
  Shared<T> scratch;       // block_sum: 4 x kThreads (the tile's four sums)
  Shared<T> means;         // the centring shift (cx, cy)
  SSIMKD_DEVICE explicit BackwardSmem(SharedMemory<T> smem)
      : xs(carve(smem, kX, kY, "xs")),
        ys(carve(smem, kY, kMaps, "ys")),
        maps(carve(smem, kMaps, kCoeffs, "maps")),
        transposed(carve(smem, kMaps, kMaps + 5 * LS * TILE, "transposed")),
        coeffs(carve(smem, kCoeffs, kTapH, "coeffs")),
        tap_h(carve(smem, kTapH, kTapW, "tap_h")),
        tap_w(carve(smem, kTapW, kScratch, "tap_w")),
        scratch(carve(smem, kScratch, kMeans, "scratch")),
        means(carve(smem, kMeans, kSize, "means")) {}
};

template <typename scalar_t, int R>
SSIMKD_DEVICE void backward_block(const Thread& th, const FusedArgs& a, int64_t tile,
                                  SharedMemory<AccType<scalar_t>> smem) {
  using T = AccType<scalar_t>;
  constexpr int TILE = tile_side<T>();
  using S = BackwardSmem<T, R, TILE>;
  constexpr int K = S::K;
  const S sm(smem);
  const TilePlane<scalar_t, T> p = tile_plane<scalar_t, T>(a, tile, TILE);
  const LevelDesc& lv = *p.lv;
  const SsimParams<T> params = make_ssim_params<T>(a, lv);
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // blurred back: a_x, b_x, c [, a_y, b_y]
  T taps[K];
  for (int k = 0; k < K; ++k) taps[k] = T(a.taps[k]);

  SSIMKD_STAGE("load");  // the tile plus a 2r halo, centred; the tile's transposed taps
  load_centred_region<scalar_t, T>(th, a, p, p.h0 - 2 * R, p.w0 - 2 * R, S::LL, sm.xs, sm.ys, sm.scratch, sm.means);
  const T cx = sm.means[0], cy = sm.means[1];
  for (int idx = th.tid; idx < TILE * K; idx += th.nthreads) {
    const int q = idx / K, j = idx - (idx / K) * K;  // tap_h[q][j]: centre h0 + q + j - R -> row h0 + q
    sm.tap_h[idx] = transposed_tap<T>(p.h0 + q, p.h0 + q + j - R, lv.H, R, a.padding, a.taps);
    sm.tap_w[j * TILE + q] = transposed_tap<T>(p.w0 + q, p.w0 + q + j - R, lv.W, R, a.padding, a.taps);
  }

  SSIMKD_STAGE("horizontal pass");  // all LL rows, LS output columns (centres w0 - R ...)
  horizontal_pass<T, R>(th, sm.xs, sm.ys, S::LL, S::LL, S::LS, taps, sm.maps);
  SSIMKD_SYNC();

  SSIMKD_STAGE("vertical pass");  // statistics on the LS x LS centres, the coefficient maps there
  const T grad_loss = global_array<const T>(lv.grad_loss)[a.plane_sums ? p.tc.plane : 0];
  const T grad_scale = grad_loss * T(lv.loss_scale);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  const GlobalPlane<const T> grad_map = contiguous_plane<const T>(lv.grad_map, p.tc.plane, out_h, out_w);
  const GlobalPlane<const T> weight = strided_plane<const T>(lv.weight, lv.weight_stride, p.tc.n, p.tc.c);
  constexpr int plane_s = S::LS * S::LS;
  constexpr int strips = (S::LS + kStrip - 1) / kStrip;
  for (int item = th.tid; item < strips * S::LS; item += th.nthreads) {
    const int i0 = (item / S::LS) * kStrip, j = item - (item / S::LS) * S::LS;
    const int64_t pw = p.w0 - R + j;
    T blurred[5][kStrip];
    for (int q = 0; q < 5; ++q)
      vertical_strip<T, R>(sm.maps + q * S::LL * S::LS, S::LL, S::LS, i0, j, taps, blurred[q]);
    SSIMKD_UNROLL
    for (int s = 0; s < kStrip; ++s) {
      if (i0 + s >= S::LS) break;
      const int64_t ph = p.h0 - R + i0 + s;
      BackwardCoeffs<T> bc = {T(0), T(0), T(0), T(0), T(0)};
      if (is_output(ph, lv.H, R, a.padding) && is_output(pw, lv.W, R, a.padding)) {
        const Moments<T> m =
            moments_from_blurred(blurred[0][s], blurred[1][s], blurred[2][s], blurred[3][s], blurred[4][s], cx, cy);
        const SsimPartials<T> g = ssim_partials(m, params);
        const T scale = weight ? grad_scale * weight(ph - offset, pw - offset) : grad_scale;
        T d = scale * pixel_loss_grad(g.S, params.clamp);
        if (grad_map) d += grad_map(ph - offset, pw - offset);
        bc = backward_coeffs(g, d, blurred[0][s], blurred[1][s]);
      }
      const int at = (i0 + s) * S::LS + j;
      sm.coeffs[at] = bc.a_x;
      sm.coeffs[plane_s + at] = bc.b_x;
      sm.coeffs[2 * plane_s + at] = bc.c;
      if (need_y) {
        sm.coeffs[3 * plane_s + at] = bc.a_y;
        sm.coeffs[4 * plane_s + at] = bc.b_y;
      }
    }
  }
  SSIMKD_SYNC();

  // transposed[m][i][v] = sum_j tap_w[j][v] coeffs[m][i][v + j], in the (now free) horizontal-map memory
  SSIMKD_STAGE("blur back horizontally");
  constexpr int v_strips = TILE / kStrip;
  for (int item = th.tid; item < n_coeff * S::LS * v_strips; item += th.nthreads) {
    const int m = item / (S::LS * v_strips), rest = item - m * (S::LS * v_strips);
    const int i = rest / v_strips, v0 = (rest - (rest / v_strips) * v_strips) * kStrip;
    const Shared<const T> src = sm.coeffs + (m * plane_s + i * S::LS + v0);
    T row[kStrip + 2 * R];
    for (int k = 0; k < kStrip + 2 * R; ++k) row[k] = src[k];
    for (int s = 0; s < kStrip; ++s) {
      T acc = T(0);
      for (int j = 0; j < K; ++j) acc += sm.tap_w[j * TILE + v0 + s] * row[s + j];
      sm.transposed[(m * S::LS + i) * TILE + v0 + s] = acc;
    }
  }
  SSIMKD_SYNC();

  // dL/dx-hat = W^T a_x + 2 x' W^T b_x + y' W^T c (and the mirror for y), dL/dx = scale dL/dx-hat;
  // per-thread sums for d scale, d offset of both inputs
  SSIMKD_STAGE("blur back vertically");
  const bool l1 = lv.l1_scale != 0.0;
  const T l1_grad = grad_loss * T(lv.l1_scale);  // the L1 term's dL/dx-hat per unit of sign(x-hat - y-hat)
  const GlobalPlane<scalar_t> gx = strided_plane<scalar_t>(lv.gx, lv.gx_stride, p.tc.n, p.tc.c);
  const GlobalPlane<scalar_t> gy = strided_plane<scalar_t>(lv.gy, lv.gy_stride, p.tc.n, p.tc.c);
  // W (a test of the emulation plants an off-by-one here)
  const int64_t last_w = lv.W + SSIMKD_PLANTED(kLastColumn);
  T sums[4] = {T(0), T(0), T(0), T(0)};  // gx_hat * (x - x_offset), gx_hat, gy_hat * (y - y_offset), gy_hat
  constexpr int u_strips = TILE / kStrip;
  for (int item = th.tid; item < u_strips * TILE; item += th.nthreads) {
    const int u0 = (item / TILE) * kStrip, v = item - (item / TILE) * TILE;
    const int64_t w = p.w0 + v;
    if (w >= last_w) continue;
    T back[5][kStrip];
    SSIMKD_UNROLL
    for (int m = 0; m < 5; ++m) {
      if (m >= n_coeff) break;
      T col[kStrip + 2 * R];
      for (int k = 0; k < kStrip + 2 * R; ++k) col[k] = sm.transposed[(m * S::LS + u0 + k) * TILE + v];
      for (int s = 0; s < kStrip; ++s) {
        T acc = T(0);
        for (int j = 0; j < K; ++j) acc += sm.tap_h[(u0 + s) * K + j] * col[s + j];
        back[m][s] = acc;
      }
    }
    for (int s = 0; s < kStrip; ++s) {
      const int64_t h = p.h0 + u0 + s;
      if (h >= lv.H) break;
      const T x_rel = static_cast<T>(p.x(h, w)) - p.x_offset;
      const T y_rel = static_cast<T>(p.y(h, w)) - p.y_offset;
      const T xc = p.x_scale * x_rel - cx;
      const T yc = p.y_scale * y_rel - cy;
      const T g_l1 = l1 ? l1_grad * l1_sign(p.x_scale * x_rel, p.y_scale * y_rel) : T(0);
      const T gx_hat = back[0][s] + T(2) * xc * back[1][s] + yc * back[2][s] + g_l1;
      sums[0] += gx_hat * x_rel;
      sums[1] += gx_hat;
      if (gx) gx(h, w) = static_cast<scalar_t>(p.x_scale * gx_hat);
      if (need_y) {
        const T gy_hat = back[3][s] + T(2) * yc * back[4][s] + xc * back[2][s] - g_l1;
        sums[2] += gy_hat * y_rel;
        sums[3] += gy_hat;
        if (gy) gy(h, w) = static_cast<scalar_t>(p.y_scale * gy_hat);
      }
    }
  }

  SSIMKD_STAGE("reduce");  // the tile's four sums
  block_sum(th, sums, sm.scratch, global_array<T>(a.tile_partials) + 4 * tile);
}

// ================================================================================================
// Second stage: fixed-order sums of the tile partials
// ================================================================================================

// One block per level: level_loss of the sums of the level's tile sums, in SecondStageSum (ssim_params.h);
// with plane_sums, one thread per plane: level_loss of its tiles' sums in order. scratch: 2 x nthreads.
template <typename T>
SSIMKD_DEVICE void level_sum_block(const Thread& th, const FusedArgs& a, int level, Shared<SecondStageSum> scratch) {
  SSIMKD_STAGE("level sum");
  const LevelDesc& lv = a.levels[level];
  const GlobalArray<const T> partials = global_array<const T>(a.tile_partials);
  const GlobalArray<T> losses = global_array<T>(a.level_losses);
  const int64_t per_plane = lv.tiles_h * lv.tiles_w, planes = lv.N * lv.C;
  if (a.plane_sums) {
    for (int64_t plane = th.tid; plane < planes; plane += th.nthreads) {
      SecondStageSum sum[2] = {0.0, 0.0};
      for (int64_t t = lv.tile_begin + plane * per_plane; t < lv.tile_begin + (plane + 1) * per_plane; ++t)
        for (int k = 0; k < 2; ++k) sum[k] += SecondStageSum(partials[2 * t + k]);
      losses[lv.loss_begin + plane] = T(level_loss(lv, sum[0], sum[1]));
    }
    return;
  }
  const int64_t end = lv.tile_begin + planes * per_plane;
  SecondStageSum sum[2] = {0.0, 0.0};
  for (int64_t t = lv.tile_begin + th.tid; t < end; t += th.nthreads)
    for (int k = 0; k < 2; ++k) sum[k] += SecondStageSum(partials[2 * t + k]);
  SecondStageSum total[2];
  block_sum(th, sum, scratch, total);
  if (th.tid == 0) losses[lv.loss_begin] = T(level_loss(lv, total[0], total[1]));
}

// One thread per plane of a level: its tiles' four sums in order, in SecondStageSum (ssim_params.h)
// -> d scale, d offset of x and y.
template <typename T>
SSIMKD_DEVICE void plane_sums(const FusedArgs& a, int level, int64_t plane) {
  const LevelDesc& lv = a.levels[level];
  const int64_t per_plane = lv.tiles_h * lv.tiles_w;
  const GlobalArray<const T> partials =
      global_array<const T>(a.tile_partials) + 4 * (lv.tile_begin + plane * per_plane);
  SecondStageSum s[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t t = 0; t < per_plane; ++t)
    for (int k = 0; k < 4; ++k) s[k] += SecondStageSum(partials[4 * t + k]);
  const int64_t n = plane / lv.C, c = plane % lv.C;
  T scale, offset;
  if (lv.g_x_affine) {
    plane_affine_at(global_array<const T>(lv.x_affine), lv.x_affine_stride, n, c, &scale, &offset);
    affine_gradient(scale, T(s[0]), T(s[1]), global_array<T>(lv.g_x_affine) + 2 * plane);
  }
  if (lv.g_y_affine) {
    plane_affine_at(global_array<const T>(lv.y_affine), lv.y_affine_stride, n, c, &scale, &offset);
    affine_gradient(scale, T(s[2]), T(s[3]), global_array<T>(lv.g_y_affine) + 2 * plane);
  }
}

// The plane-sum kernel's thread: planes [block * nthreads, (block + 1) * nthreads) of a level.
template <typename T>
SSIMKD_DEVICE void plane_sum_thread(const Thread& th, const FusedArgs& a, int level, int64_t block) {
  SSIMKD_STAGE("plane sums");
  const int64_t plane = block * th.nthreads + th.tid;
  if (plane < a.levels[level].N * a.levels[level].C) plane_sums<T>(a, level, plane);
}

inline int64_t plane_sum_blocks(const LevelDesc& lv) {
  return (lv.N * lv.C + kThreads - 1) / kThreads;
}

// Dynamic shared memory of the tile kernels, in bytes.
template <typename T, int R>
int64_t tile_smem_bytes(bool backward) {
  constexpr int TILE = tile_side<T>();
  return int64_t(backward ? BackwardSmem<T, R, TILE>::kSize : ForwardSmem<T, R, TILE>::kSize) * int64_t(sizeof(T));
}

}  // namespace cuda_detail
}  // namespace ssimkd
