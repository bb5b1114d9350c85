// ssim_cpu.cpp: the fused SSIM-KD forward and backward on the CPU, the tiled algorithm of SPEC
// section 4 over at::parallel_for. Per-pixel math comes from ssim_math.h, shared with the CUDA kernels.
//
// One task owns one tile of one plane of one level (tiles of all levels in one parallel loop):
//  forward:  load the tile plus an r-pixel halo through the padding index map, blur x, y, x^2, y^2,
//            xy separably, form SSIM per centre, and write only the tile's sum of m (and, for
//            ssim_map, the map). A fixed-order second stage adds the tile sums per level.
//  backward: load the tile plus a 2r halo, recompute the statistics on tile + r, form a, b, c there,
//            blur them back onto the tile with the true transpose of the padded blur, write dL/dx
//            (and dL/dy), and the tile's sums for the per-plane affine gradient.
// Nothing is saved between the two: the backward recomputes from the inputs.
//
// Speed: the radius is a template constant, so each tap loop unrolls and the row loops vectorise;
// every row loop is free of reductions (sums are taken afterwards, in a fixed order), and the tile
// functions are compiled for AVX-512, AVX2 and baseline x86-64, picked at run time.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>
#include <vector>

#include "ssim_params.h"

// The tile functions are cloned per instruction set; their helpers are forced inline so that each
// clone compiles them for its own instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SSIMKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSIMKD_CPU_CLONES
#endif
#define SSIMKD_INLINE inline __attribute__((always_inline))

namespace ssimkd {
namespace {

// Output tile of one task (rows x columns). Wide rows feed the vectorised row loops; the backward's
// 2r halo costs less on taller tiles, and its buffers (~450 KiB at 64 x 64) still fit in L2.
constexpr int kTileW = 64;
constexpr int kForwardTileH = 32;
constexpr int kBackwardTileH = 64;
constexpr int kMaps = 5;  // blurred maps: x, y, x^2, y^2, xy

// out[j] = sum_k taps[k] * in[j + k * step] for j < n: one pass of the separable blur, horizontal
// (step 1) or vertical (step = row length).
template <int R, typename T>
SSIMKD_INLINE void blur_line(const T* __restrict in, int64_t step, T* __restrict out, int n, const T* __restrict taps) {
  for (int j = 0; j < n; ++j) {
    T acc = T(0);
#pragma GCC unroll 16
    for (int k = 0; k <= 2 * R; ++k) acc += taps[k] * in[j + k * step];
    out[j] = acc;
  }
}

// Per-task scratch, sized once per parallel chunk.
template <typename T>
struct Workspace {
  std::vector<T> x, y;        // normalised input region (padding applied)
  std::vector<T> products;    // one region row of x, y, x^2, y^2, xy
  std::vector<T> horizontal;  // kMaps maps after the horizontal pass
  std::vector<T> vertical;    // kMaps rows after the vertical pass
  std::vector<T> values;      // forward: m per centre of a row; backward: dL/dx-hat, dL/dy-hat of a row
  std::vector<T> coeffs;      // backward: a_x, b_x, c, a_y, b_y on tile + r
  std::vector<T> transposed;  // backward: coeffs after the horizontal transposed pass
  std::vector<T> grad;        // backward: one row of each blurred-back coefficient map
  std::vector<T> tap_h, tap_w;  // backward: transposed taps per tile row / column
  std::vector<T> zeros;       // backward: stands in for an absent grad_map row
  std::vector<int64_t> src_row, src_col;
};

// [begin, end) of the positions start .. start + count - 1 that are window centres with an output.
struct Range {
  int begin, end;
};
SSIMKD_INLINE Range output_range(int64_t start, int count, int64_t n, int radius, int padding) {
  const int64_t lo = padding == kValid ? radius : 0;
  const int64_t hi = padding == kValid ? n - radius : n;
  const int64_t b = std::clamp<int64_t>(lo - start, 0, count);
  const int64_t e = std::clamp<int64_t>(hi - start, 0, count);
  return {int(b), int(std::max(b, e))};
}

SSIMKD_INLINE void source_indices(int64_t start, int count, int64_t n, int padding, std::vector<int64_t>& out) {
  out.resize(count);
  for (int i = 0; i < count; ++i) out[i] = source_index(start + i, n, padding);
}

// A tile's per-plane normalisation (scale, offset) of x and y, and its centring shifts cx, cy.
template <typename T>
struct TileInputs {
  T x_scale, x_offset, y_scale, y_offset, cx, cy;
};

template <typename T>
SSIMKD_INLINE TileInputs<T> plane_inputs(const LevelDesc& lv, const TileCoord& tc) {
  TileInputs<T> in;
  plane_affine(lv.x_affine, lv.x_affine_stride, tc.n, tc.c, &in.x_scale, &in.x_offset);
  plane_affine(lv.y_affine, lv.y_affine_stride, tc.n, tc.c, &in.y_scale, &in.y_offset);
  in.cx = in.cy = T(0);
  return in;
}

// Centre a loaded region on its mean, in place, and return the mean. Any shift keeps the math exact
// (ssim_math.h, moments_from_blurred); the region's mean, padding included, is close to every
// window's mean, which is what keeps the float32 variances from cancelling. The sum runs in a fixed
// order (eight interleaved partial sums, added in sequence): every instruction set gives the same bits.
template <typename T>
SSIMKD_INLINE T centre_region(T* __restrict v, int64_t count) {
  constexpr int kLanes = 8;
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += v[k + l];
  for (; k < count; ++k) lanes[0] += v[k];
  T total = T(0);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  const T mean = total / T(count);
  for (int64_t i = 0; i < count; ++i) v[i] -= mean;
  return mean;
}

// dst[j] = scale * (src[j] - offset): a contiguous run of a plane row, normalised. (GCC trusts
// __restrict only on parameters, so each vectorised row loop is a function of its own.)
template <typename scalar_t, typename T>
SSIMKD_INLINE void normalise_run(const scalar_t* __restrict src, int n, T scale, T offset, T* __restrict dst) {
  for (int j = 0; j < n; ++j) dst[j] = scale * (static_cast<T>(src[j]) - offset);
}

// Gather a region of plane (n, c) through the padding's index map, normalise it (scale * (x - offset)),
// centre it on its mean, and write it densely (rows x cols); returns the mean. Out-of-plane reads of
// zero padding are 0 in the normalised space. The columns that read a contiguous run of the plane
// (all but the folded or zero-padded border columns) take the vectorised path.
template <typename scalar_t, typename T>
SSIMKD_INLINE T load_region(const void* base, const int64_t* stride, T scale, T offset, const TileCoord& tc,
                            const std::vector<int64_t>& src_row, const std::vector<int64_t>& src_col, int rows,
                            int cols, T* __restrict out) {
  const scalar_t* plane = static_cast<const scalar_t*>(base) + tc.n * stride[0] + tc.c * stride[1];
  // [run_begin, run_end): columns j with src_col[j] = src_col[run_begin] + (j - run_begin), in plane.
  int run_begin = 0, run_end = 0;
  if (stride[3] == 1) {
    for (int j = 0; j < cols; ++j) {
      if (src_col[j] < 0) continue;
      int e = j + 1;
      while (e < cols && src_col[e] == src_col[e - 1] + 1) ++e;
      if (e - j > run_end - run_begin) {
        run_begin = j;
        run_end = e;
      }
      j = e - 1;
    }
  }
  for (int i = 0; i < rows; ++i) {
    T* dst = out + int64_t(i) * cols;
    const int64_t r = src_row[i];
    if (r < 0) {
      std::fill(dst, dst + cols, T(0));
      continue;
    }
    const scalar_t* src = plane + r * stride[2];
    for (int j = 0; j < cols; ++j) {
      if (j == run_begin && run_end > run_begin) {
        normalise_run(src + src_col[j], run_end - run_begin, scale, offset, dst + j);
        j = run_end - 1;
        continue;
      }
      const int64_t s = src_col[j];
      dst[j] = s < 0 ? T(0) : scale * (static_cast<T>(src[s * stride[3]]) - offset);
    }
  }
  return centre_region(out, int64_t(rows) * cols);
}

// Load the rows x cols region of x and y from (row0, col0) of the tile's plane into ws.x / ws.y,
// normalised and centred; returns the plane's normalisation and the centring shifts.
template <typename scalar_t, typename T>
SSIMKD_INLINE TileInputs<T> load_tile(const LevelDesc& lv, const TileCoord& tc, int padding, int64_t row0,
                                      int64_t col0, int rows, int cols, Workspace<T>& ws) {
  source_indices(row0, rows, lv.H, padding, ws.src_row);
  source_indices(col0, cols, lv.W, padding, ws.src_col);
  TileInputs<T> in = plane_inputs<T>(lv, tc);
  in.cx = load_region<scalar_t>(lv.x, lv.x_stride, in.x_scale, in.x_offset, tc, ws.src_row, ws.src_col, rows, cols,
                                ws.x.data());
  in.cy = load_region<scalar_t>(lv.y, lv.y_stride, in.y_scale, in.y_offset, tc, ws.src_row, ws.src_col, rows, cols,
                                ws.y.data());
  return in;
}

// The five product rows x, y, x^2, y^2, xy of one region row.
template <typename T>
SSIMKD_INLINE void products_row(const T* __restrict x, const T* __restrict y, int n, T* __restrict px,
                                T* __restrict py, T* __restrict pxx, T* __restrict pyy, T* __restrict pxy) {
  for (int j = 0; j < n; ++j) {
    px[j] = x[j];
    py[j] = y[j];
    pxx[j] = x[j] * x[j];
    pyy[j] = y[j] * y[j];
    pxy[j] = x[j] * y[j];
  }
}

// Horizontal pass over `rows` region rows of width `cols`: the five product maps, each blurred to
// cols - 2R columns, into ws.horizontal (map-major, rows x (cols - 2R) each).
template <int R, typename T>
SSIMKD_INLINE void horizontal_pass(Workspace<T>& ws, int rows, int cols, const T* taps) {
  const int out_cols = cols - 2 * R;
  T* prod = ws.products.data();
  for (int i = 0; i < rows; ++i) {
    products_row(ws.x.data() + int64_t(i) * cols, ws.y.data() + int64_t(i) * cols, cols, prod, prod + cols,
                 prod + 2 * cols, prod + 3 * cols, prod + 4 * cols);
    for (int m = 0; m < kMaps; ++m)
      blur_line<R>(prod + m * cols, 1, ws.horizontal.data() + (int64_t(m) * rows + i) * out_cols, out_cols, taps);
  }
}

// Vertical pass for output row i of the horizontal maps (rows_in rows of `cols`): five rows into
// ws.vertical, columns [begin, end) only.
template <int R, typename T>
SSIMKD_INLINE void vertical_row(Workspace<T>& ws, int i, int rows_in, int cols, Range cr, const T* taps) {
  for (int m = 0; m < kMaps; ++m) {
    const T* src = ws.horizontal.data() + (int64_t(m) * rows_in + i) * cols + cr.begin;
    blur_line<R>(src, cols, ws.vertical.data() + int64_t(m) * cols + cr.begin, cr.end - cr.begin, taps);
  }
}

template <typename T>
SSIMKD_INLINE Moments<T> moments_at(const T* v, int cols, int j, T cx, T cy) {
  return moments_from_blurred(v[j], v[cols + j], v[2 * cols + j], v[3 * cols + j], v[4 * cols + j], cx, cy);
}

// SSIM at the centres [begin, end) of one row of statistics v (five rows of `cols`).
template <bool kDefault, typename T>
SSIMKD_INLINE void ssim_row(const T* __restrict v, int cols, Range cr, const SsimParams<T>& params, T cx, T cy,
                            T* __restrict out) {
  for (int j = cr.begin; j < cr.end; ++j) {
    const Moments<T> m = moments_at(v, cols, j, cx, cy);
    out[j] = kDefault ? ssim_default(m, params) : ssim_partials_general(m, params).S;
  }
}

// out[q] = sum_j w[j * n + q] * in[q + j]: the horizontal transposed pass of a border tile, whose
// weights vary by column (reflect folds, zero and valid masks). Interior tiles use blur_line.
template <int R, typename T>
SSIMKD_INLINE void band_row(const T* __restrict in, const T* __restrict w, int64_t n, T* __restrict out) {
  for (int64_t q = 0; q < n; ++q) {
    T acc = T(0);
#pragma GCC unroll 16
    for (int64_t j = 0; j <= 2 * R; ++j) acc += w[j * n + q] * in[q + j];
    out[q] = acc;
  }
}

// One row of dL/d(normalised input): W^T a + 2 self W^T b + other W^T c.
template <typename T>
SSIMKD_INLINE void input_grad_row(const T* __restrict ga, const T* __restrict gb, const T* __restrict gc,
                                  const T* __restrict self, const T* __restrict other, int n, T* __restrict out) {
  for (int k = 0; k < n; ++k) out[k] = ga[k] + T(2) * self[k] * gb[k] + other[k] * gc[k];
}

// A row of the raw input minus the plane's offset, in the accumulation type.
template <typename scalar_t, typename T>
SSIMKD_INLINE void read_row(const scalar_t* __restrict src, int64_t step, int n, T offset, T* __restrict dst) {
  if (step == 1) {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]) - offset;
  } else {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k * step]) - offset;
  }
}

// dst[k * step] = scale * g[k], in the input dtype.
template <typename scalar_t, typename T>
SSIMKD_INLINE void write_row(const T* __restrict g, T scale, int n, scalar_t* __restrict dst, int64_t step) {
  if (step == 1) {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(scale * g[k]);
  } else {
    for (int k = 0; k < n; ++k) dst[k * step] = static_cast<scalar_t>(scale * g[k]);
  }
}

// *sum_g_raw += sum g * raw, *sum_g += sum g, over one row, in a fixed order: eight interleaved
// partial sums added in sequence, so every instruction set gives the same bits.
template <typename T>
SSIMKD_INLINE void accumulate_affine_sums(const T* __restrict g, const T* __restrict raw, int n, T* sum_g_raw,
                                          T* sum_g) {
  constexpr int kLanes = 8;
  T a[kLanes] = {}, b[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      a[l] += g[k + l] * raw[k + l];
      b[l] += g[k + l];
    }
  }
  for (; k < n; ++k) {
    a[0] += g[k] * raw[k];
    b[0] += g[k];
  }
  for (int l = 0; l < kLanes; ++l) {
    *sum_g_raw += a[l];
    *sum_g += b[l];
  }
}

// The coefficient maps a_x, b_x, c, a_y, b_y (SPEC section 2) for the centres [begin, end) of one
// row of statistics v of the centred inputs, with d = grad_scale * dm/dS + g (the map's own
// gradient, or zeros).
template <bool kDefault, typename T>
SSIMKD_INLINE void coefficient_row(const T* __restrict v, int cols, Range cr, const SsimParams<T>& params,
                                   T cx, T cy, T grad_scale, const T* __restrict g, T* __restrict row,
                                   int64_t stride) {
  for (int j = cr.begin; j < cr.end; ++j) {
    const Moments<T> m = moments_at(v, cols, j, cx, cy);
    const SsimPartials<T> p = kDefault ? ssim_partials_default(m, params) : ssim_partials_general(m, params);
    const T d = grad_scale * pixel_loss_grad(p.S, params.clamp) + g[j];
    const BackwardCoeffs<T> bc = backward_coeffs(p, d, v[j], v[cols + j]);
    row[j] = bc.a_x;
    row[stride + j] = bc.b_x;
    row[2 * stride + j] = bc.c;
    row[3 * stride + j] = bc.a_y;
    row[4 * stride + j] = bc.b_y;
  }
}

template <typename T>
void reserve(Workspace<T>& ws, int radius, int tile_h, int tile_w) {
  const size_t lh = tile_h + 4 * radius, lw = tile_w + 4 * radius;
  const size_t sh = tile_h + 2 * radius, sw = tile_w + 2 * radius;
  ws.x.resize(lh * lw);
  ws.y.resize(lh * lw);
  ws.products.resize(kMaps * lw);
  ws.horizontal.resize(kMaps * lh * sw);
  ws.vertical.resize(kMaps * sw);
  ws.values.resize(std::max(sw, size_t(2 * tile_w)));
  ws.zeros.assign(sw, T(0));
  ws.coeffs.resize(kMaps * sh * sw);
  ws.transposed.resize(kMaps * sh * tile_w);
  ws.grad.resize(kMaps * tile_w);
  ws.tap_h.resize(tile_h * (2 * radius + 1));
  ws.tap_w.resize((2 * radius + 1) * tile_w);
}

// ------------------------------------------------------------------------------------------------
// Forward: one tile -> its sum of m (and its part of the SSIM map)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int R>
SSIMKD_CPU_CLONES void forward_tile(const FusedArgs& a, int64_t tile, Workspace<AccType<scalar_t>>& ws,
                                    const AccType<scalar_t>* taps,
                                    AccType<scalar_t>* tile_sum) {
  using T = AccType<scalar_t>;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const SsimParams<T> params = make_ssim_params<T>(a);
  const int64_t h0 = tc.th * a.tile_h, w0 = tc.tw * a.tile_w;
  const int oh = int(std::min<int64_t>(a.tile_h, lv.H - h0));
  const int ow = int(std::min<int64_t>(a.tile_w, lv.W - w0));
  const int rows = oh + 2 * R, cols = ow + 2 * R;

  // Stage 1: load the tile plus an r halo.
  const TileInputs<T> in = load_tile<scalar_t>(lv, tc, a.padding, h0 - R, w0 - R, rows, cols, ws);

  // Stage 2: horizontal pass.
  horizontal_pass<R>(ws, rows, cols, taps);

  // Stage 3: per output row, the vertical pass, SSIM and m; m summed in column order.
  const Range rr = output_range(h0, oh, lv.H, R, a.padding);
  const Range cr = output_range(w0, ow, lv.W, R, a.padding);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;  // plane centre -> map index
  T* map = static_cast<T*>(lv.map);
  T* __restrict m_row = ws.values.data();
  T total = T(0);
  for (int i = rr.begin; i < rr.end; ++i) {
    vertical_row<R>(ws, i, rows, ow, cr, taps);
    if (params.default_exponents) {
      ssim_row<true>(ws.vertical.data(), ow, cr, params, in.cx, in.cy, m_row);
    } else {
      ssim_row<false>(ws.vertical.data(), ow, cr, params, in.cx, in.cy, m_row);
    }
    if (map != nullptr) {
      T* dst = map + (tc.plane * out_h + h0 + i - offset) * out_w + w0 - offset;
      for (int j = cr.begin; j < cr.end; ++j) dst[j] = m_row[j];
    }
    for (int j = cr.begin; j < cr.end; ++j) m_row[j] = pixel_loss(m_row[j], params.clamp);
    for (int j = cr.begin; j < cr.end; ++j) total += m_row[j];
  }
  *tile_sum = total;
}

// ------------------------------------------------------------------------------------------------
// Backward: one tile of dL/dx (and dL/dy), with its per-plane affine-gradient partial sums
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int R>
SSIMKD_CPU_CLONES void backward_tile(const FusedArgs& a, int64_t tile, Workspace<AccType<scalar_t>>& ws,
                                     const AccType<scalar_t>* taps,
                                     AccType<scalar_t>* partial) {
  using T = AccType<scalar_t>;
  constexpr int K = 2 * R + 1;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const SsimParams<T> params = make_ssim_params<T>(a);
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // blurred back: a_x, b_x, c [, a_y, b_y]
  const int64_t h0 = tc.th * a.tile_h, w0 = tc.tw * a.tile_w;
  const int oh = int(std::min<int64_t>(a.tile_h, lv.H - h0));
  const int ow = int(std::min<int64_t>(a.tile_w, lv.W - w0));
  const int sh = oh + 2 * R, sw = ow + 2 * R;  // statistics region: centres within r of the tile
  const int lh = oh + 4 * R, lw = ow + 4 * R;  // loaded region: tile plus a 2r halo

  // Stage 1: load the tile plus a 2r halo.
  const TileInputs<T> in = load_tile<scalar_t>(lv, tc, a.padding, h0 - 2 * R, w0 - 2 * R, lh, lw, ws);

  // Stage 2: statistics on tile + r, and the coefficient maps a, b, c there (0 off the outputs).
  horizontal_pass<R>(ws, lh, lw, taps);
  const int64_t stride = int64_t(sh) * sw;
  T* __restrict coeffs = ws.coeffs.data();
  std::fill(coeffs, coeffs + kMaps * stride, T(0));
  const T grad_scale = *static_cast<const T*>(lv.grad_loss) * T(lv.loss_scale);
  const T* grad_map = static_cast<const T*>(lv.grad_map);
  const Range rr = output_range(h0 - R, sh, lv.H, R, a.padding);
  const Range cr = output_range(w0 - R, sw, lv.W, R, a.padding);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  for (int i = rr.begin; i < rr.end; ++i) {
    vertical_row<R>(ws, i, lh, sw, cr, taps);
    const T* g = grad_map ? grad_map + (tc.plane * out_h + h0 - R + i - offset) * out_w + w0 - R - offset
                          : ws.zeros.data();
    T* row = coeffs + int64_t(i) * sw;
    if (params.default_exponents) {
      coefficient_row<true>(ws.vertical.data(), sw, cr, params, in.cx, in.cy, grad_scale, g, row, stride);
    } else {
      coefficient_row<false>(ws.vertical.data(), sw, cr, params, in.cx, in.cy, grad_scale, g, row, stride);
    }
  }

  // Stage 3: the true transpose of the padded blur, per axis. tap_w[j * ow + q] is the weight of
  // centre w0 + q + j - R for input column w0 + q (border folds included), tap_h likewise for rows.
  T* tap_h = ws.tap_h.data();
  T* tap_w = ws.tap_w.data();
  for (int q = 0; q < oh; ++q)
    for (int j = 0; j < K; ++j) tap_h[q * K + j] = transposed_tap(h0 + q, h0 + q + j - R, lv.H, R, a.padding, taps);
  bool interior_w = true;  // every column's weights are the plain taps: no fold, no mask
  for (int j = 0; j < K; ++j) {
    for (int q = 0; q < ow; ++q) {
      tap_w[j * ow + q] = transposed_tap(w0 + q, w0 + q + j - R, lv.W, R, a.padding, taps);
      interior_w = interior_w && tap_w[j * ow + q] == taps[j];
    }
  }

  // Horizontal transposed pass: coeffs (sh x sw) -> transposed (sh x ow), rows of outputs only.
  T* transposed = ws.transposed.data();
  for (int m = 0; m < n_coeff; ++m) {
    for (int i = 0; i < sh; ++i) {
      T* dst = transposed + (int64_t(m) * sh + i) * ow;
      if (i < rr.begin || i >= rr.end) {
        std::fill(dst, dst + ow, T(0));
      } else {
        const T* src = coeffs + m * stride + int64_t(i) * sw;
        if (interior_w) {
          blur_line<R>(src, 1, dst, ow, taps);  // g is symmetric: the transpose of an interior blur is itself
        } else {
          band_row<R>(src, tap_w, ow, dst);
        }
      }
    }
  }

  // Stage 4: vertical transposed pass per tile row, then dL/dx-hat = W^T a_x + 2 x W^T b_x + y W^T c
  // (and the mirror for y); dL/dx = scale * dL/dx-hat; per-plane sums for d scale and d offset.
  const scalar_t* x_raw = static_cast<const scalar_t*>(lv.x) + tc.n * lv.x_stride[0] + tc.c * lv.x_stride[1];
  const scalar_t* y_raw = static_cast<const scalar_t*>(lv.y) + tc.n * lv.y_stride[0] + tc.c * lv.y_stride[1];
  scalar_t* gx = lv.gx ? static_cast<scalar_t*>(lv.gx) + tc.n * lv.gx_stride[0] + tc.c * lv.gx_stride[1] : nullptr;
  scalar_t* gy = lv.gy ? static_cast<scalar_t*>(lv.gy) + tc.n * lv.gy_stride[0] + tc.c * lv.gy_stride[1] : nullptr;
  T* g = ws.grad.data();  // rows of W^T a_x, W^T b_x, W^T c, W^T a_y, W^T b_y
  T* grad_hat = ws.values.data();
  T* raw = grad_hat + ow;
  T sums[4] = {T(0), T(0), T(0), T(0)};  // gx_hat * x, gx_hat, gy_hat * y, gy_hat
  for (int q = 0; q < oh; ++q) {
    for (int m = 0; m < n_coeff; ++m)
      blur_line<R>(transposed + (int64_t(m) * sh + q) * ow, ow, g + m * ow, ow, tap_h + q * K);
    const int64_t h = h0 + q;
    const T* xh = ws.x.data() + int64_t(q + 2 * R) * lw + 2 * R;
    const T* yh = ws.y.data() + int64_t(q + 2 * R) * lw + 2 * R;
    input_grad_row(g, g + ow, g + 2 * ow, xh, yh, ow, grad_hat);
    read_row(x_raw + h * lv.x_stride[2] + w0 * lv.x_stride[3], lv.x_stride[3], ow, in.x_offset, raw);
    accumulate_affine_sums(grad_hat, raw, ow, &sums[0], &sums[1]);
    if (gx) write_row(grad_hat, in.x_scale, ow, gx + h * lv.gx_stride[2] + w0 * lv.gx_stride[3], lv.gx_stride[3]);
    if (need_y) {
      input_grad_row(g + 3 * ow, g + 4 * ow, g + 2 * ow, yh, xh, ow, grad_hat);
      read_row(y_raw + h * lv.y_stride[2] + w0 * lv.y_stride[3], lv.y_stride[3], ow, in.y_offset, raw);
      accumulate_affine_sums(grad_hat, raw, ow, &sums[2], &sums[3]);
      if (gy) write_row(grad_hat, in.y_scale, ow, gy + h * lv.gy_stride[2] + w0 * lv.gy_stride[3], lv.gy_stride[3]);
    }
  }
  for (int k = 0; k < 4; ++k) partial[k] = sums[k];
}

// ------------------------------------------------------------------------------------------------
// Launch over all tiles, then the fixed-order second stage
// ------------------------------------------------------------------------------------------------

// Run body(tile, workspace) for every tile. Tiles differ in cost by 1000x (a 4x4 plane vs a full
// tile), and levels are laid out large to small, so a static split would leave one thread with all the
// large tiles: each thread takes the next tile from a shared counter instead. Every tile writes only
// its own outputs, so the result does not depend on which thread ran it.
template <typename T, typename Body>
void for_each_tile(const FusedArgs& a, int radius, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), a.total_tiles);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    reserve(ws, radius, a.tile_h, a.tile_w);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < a.total_tiles;
           t = next.fetch_add(1, std::memory_order_relaxed))
        body(t, ws);
    }
  });
}

template <typename T>
void taps_as(const FusedArgs& a, T* taps) {
  for (int k = 0; k < a.window; ++k) taps[k] = T(a.taps[k]);
}

template <typename scalar_t, int R>
void forward_impl(const FusedArgs& a) {
  using T = AccType<scalar_t>;
  T taps[kMaxWindow];
  taps_as(a, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  for_each_tile<T>(a, R, [&](int64_t t, Workspace<T>& ws) { forward_tile<scalar_t, R>(a, t, ws, taps, partials + t); });
  // Tiles of a level in index order, accumulated in double.
  T* losses = static_cast<T*>(a.level_losses);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t end = lv.tile_begin + lv.N * lv.C * lv.tiles_h * lv.tiles_w;
    double total = 0.0;
    for (int64_t t = lv.tile_begin; t < end; ++t) total += double(partials[t]);
    losses[l] = T(total * lv.loss_scale);
  }
}

template <typename scalar_t, int R>
void backward_impl(const FusedArgs& a) {
  using T = AccType<scalar_t>;
  T taps[kMaxWindow];
  taps_as(a, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  for_each_tile<T>(a, R, [&](int64_t t, Workspace<T>& ws) {
    backward_tile<scalar_t, R>(a, t, ws, taps, partials + 4 * t);
  });
  // Per plane, its tiles in index order, accumulated in double; then dL/d(scale, offset).
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t per_plane = lv.tiles_h * lv.tiles_w;
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      const T* p = partials + 4 * (lv.tile_begin + plane * per_plane);
      for (int64_t t = 0; t < per_plane; ++t)
        for (int k = 0; k < 4; ++k) s[k] += double(p[4 * t + k]);
      const int64_t n = plane / lv.C, c = plane % lv.C;
      T scale, offset;
      if (lv.g_x_affine) {
        plane_affine(lv.x_affine, lv.x_affine_stride, n, c, &scale, &offset);
        affine_gradient(scale, T(s[0]), T(s[1]), static_cast<T*>(lv.g_x_affine) + 2 * plane);
      }
      if (lv.g_y_affine) {
        plane_affine(lv.y_affine, lv.y_affine_stride, n, c, &scale, &offset);
        affine_gradient(scale, T(s[2]), T(s[3]), static_cast<T*>(lv.g_y_affine) + 2 * plane);
      }
    }
  }
}

// Runtime (dtype, radius) -> template instance.
template <template <typename, int> class Fn, typename scalar_t>
void dispatch_radius(const FusedArgs& a) {
  switch (a.radius) {
    case 1: return Fn<scalar_t, 1>::run(a);
    case 2: return Fn<scalar_t, 2>::run(a);
    case 3: return Fn<scalar_t, 3>::run(a);
    case 4: return Fn<scalar_t, 4>::run(a);
    case 5: return Fn<scalar_t, 5>::run(a);
    case 6: return Fn<scalar_t, 6>::run(a);
    case 7: return Fn<scalar_t, 7>::run(a);
  }
  throw std::invalid_argument("ssimkd: window radius out of range");
}

template <template <typename, int> class Fn>
void dispatch(const FusedArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_radius<Fn, float>(a);
    case DType::kFloat64: return dispatch_radius<Fn, double>(a);
    case DType::kFloat16: return dispatch_radius<Fn, c10::Half>(a);
    case DType::kBFloat16: return dispatch_radius<Fn, c10::BFloat16>(a);
  }
  throw std::invalid_argument("ssimkd: unsupported dtype");
}

template <typename scalar_t, int R>
struct ForwardFn {
  static void run(const FusedArgs& a) { forward_impl<scalar_t, R>(a); }
};
template <typename scalar_t, int R>
struct BackwardFn {
  static void run(const FusedArgs& a) { backward_impl<scalar_t, R>(a); }
};

template <typename scalar_t>
void minmax_grad_impl(const MinMaxGradArgs& a) {
  using T = AccType<scalar_t>;
  const T* low = static_cast<const T*>(a.low);
  const T* high = static_cast<const T*>(a.high);
  const T* g_low = static_cast<const T*>(a.g_low);
  const T* g_high = static_cast<const T*>(a.g_high);
  const int64_t planes = a.N * a.C;
  auto plane_ptr = [&](int64_t plane, auto* base, const int64_t* stride) {
    return base + (plane / a.C) * stride[0] + (plane % a.C) * stride[1];
  };
  // Pass 1: ties per plane (integers: any order gives the same counts), then per group.
  std::vector<int64_t> plane_counts(size_t(2 * planes), 0);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t g = group_of_plane(a.group, plane / a.C, plane % a.C, a.C);
      const scalar_t* x = plane_ptr(plane, static_cast<const scalar_t*>(a.x), a.x_stride);
      int64_t n_low = 0, n_high = 0;
      for (int64_t h = 0; h < a.H; ++h)
        for (int64_t w = 0; w < a.W; ++w) {
          const T v = static_cast<T>(x[h * a.x_stride[2] + w * a.x_stride[3]]);
          n_low += v == low[g];
          n_high += v == high[g];
        }
      plane_counts[2 * plane] = n_low;
      plane_counts[2 * plane + 1] = n_high;
    }
  });
  int64_t* counts = static_cast<int64_t*>(a.counts);
  const int64_t groups = a.group == kGroupSample ? a.N : (a.group == kGroupLevel ? 1 : planes);
  std::fill(counts, counts + 2 * groups, int64_t(0));
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t g = group_of_plane(a.group, plane / a.C, plane % a.C, a.C);
    counts[2 * g] += plane_counts[2 * plane];
    counts[2 * g + 1] += plane_counts[2 * plane + 1];
  }
  // Pass 2: the gradient, with each group's share per tie.
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t g = group_of_plane(a.group, plane / a.C, plane % a.C, a.C);
      const T lo = low[g], hi = high[g];
      const T share_low = g_low[g] / T(counts[2 * g]), share_high = g_high[g] / T(counts[2 * g + 1]);
      const bool no_match = counts[2 * g] == 0 || counts[2 * g + 1] == 0;  // a NaN in the group
      const scalar_t* x = plane_ptr(plane, static_cast<const scalar_t*>(a.x), a.x_stride);
      scalar_t* grad = plane_ptr(plane, static_cast<scalar_t*>(a.grad), a.grad_stride);
      for (int64_t h = 0; h < a.H; ++h)
        for (int64_t w = 0; w < a.W; ++w) {
          const T v = static_cast<T>(x[h * a.x_stride[2] + w * a.x_stride[3]]);
          T out = no_match ? std::numeric_limits<T>::quiet_NaN() : T(0);
          if (v == lo) out += share_low;
          if (v == hi) out += share_high;
          grad[h * a.grad_stride[2] + w * a.grad_stride[3]] = static_cast<scalar_t>(out);
        }
    }
  });
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

TileShape cpu_tile_shape(bool backward) { return {backward ? kBackwardTileH : kForwardTileH, kTileW}; }

void ssim_fwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<ForwardFn>(args);
}

void ssim_bwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<BackwardFn>(args);
}

}  // namespace ssimkd
