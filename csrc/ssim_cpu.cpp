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
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "ssim_params.h"

namespace ssimkd {
namespace {

// Output tile of one task. 32 x 64 keeps one task's buffers (~250 KiB backward) in L2 and gives the
// row loops, which the compiler vectorises, 64 lanes of work.
constexpr int kTileH = 32;
constexpr int kTileW = 64;
constexpr int kMaps = 5;  // blurred maps: x, y, x^2, y^2, xy

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// out[j] = sum_k taps[k] * in[j + k] for j < n_out: one horizontal pass of the separable blur.
template <typename T>
inline void blur_row(const T* __restrict in, T* __restrict out, int n_out, const T* taps, int window) {
  std::fill(out, out + n_out, T(0));
  for (int k = 0; k < window; ++k) {
    const T g = taps[k];
    for (int j = 0; j < n_out; ++j) out[j] += g * in[j + k];
  }
}

// out[j] = sum_k taps[k] * rows[k * stride + j]: one output row of the vertical pass.
template <typename T>
inline void blur_column(const T* __restrict rows, int64_t stride, T* __restrict out, int n_out,
                        const T* taps, int window) {
  std::fill(out, out + n_out, T(0));
  for (int k = 0; k < window; ++k) {
    const T g = taps[k];
    const T* row = rows + k * stride;
    for (int j = 0; j < n_out; ++j) out[j] += g * row[j];
  }
}

// Per-task scratch, allocated once per parallel chunk.
template <typename T>
struct Workspace {
  std::vector<T> x, y;        // normalised input region (padding applied)
  std::vector<T> products;    // one region row of x, y, x^2, y^2, xy
  std::vector<T> horizontal;  // kMaps maps after the horizontal pass
  std::vector<T> vertical;    // kMaps rows after the vertical pass
  std::vector<T> coeffs;      // backward: a_x, b_x, c, a_y, b_y on tile + r
  std::vector<T> transposed;  // backward: coeffs after the horizontal transposed pass
  std::vector<T> grad;        // backward: one row of each blurred-back coefficient map
  std::vector<T> tap_h, tap_w;  // backward: transposed taps per tile row / column
  std::vector<int64_t> src_row, src_col;
};

// Gather region rows [row0, row0 + rows) x [col0, col0 + cols) of plane (n, c) through the padding's
// index map, apply the per-plane affine normalisation, and write it densely. Out-of-plane reads of
// zero padding are 0 in the normalised space.
template <typename scalar_t, typename T>
void load_region(const void* base, const int64_t* stride, const void* affine, int64_t n, int64_t c,
                 int64_t C, const std::vector<int64_t>& src_row, const std::vector<int64_t>& src_col,
                 int rows, int cols, T* out) {
  const scalar_t* plane = static_cast<const scalar_t*>(base) + n * stride[0] + c * stride[1];
  T scale = T(1), shift = T(0);
  if (affine != nullptr) {
    const T* a = static_cast<const T*>(affine) + (n * C + c) * 2;
    scale = a[0];
    shift = a[1];
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
      const int64_t s = src_col[j];
      dst[j] = s < 0 ? T(0) : scale * static_cast<T>(src[s * stride[3]]) + shift;
    }
  }
}

inline void source_indices(int64_t start, int count, int64_t n, int padding, std::vector<int64_t>& out) {
  out.resize(count);
  for (int i = 0; i < count; ++i) out[i] = source_index(start + i, n, padding);
}

// Horizontal pass over `rows` region rows of width `cols`: the five product maps, each blurred to
// `out_cols` columns, into ws.horizontal (map-major, rows x out_cols each).
template <typename T>
void horizontal_pass(Workspace<T>& ws, int rows, int cols, int out_cols, const T* taps, int window) {
  ws.products.resize(size_t(kMaps) * cols);
  ws.horizontal.resize(size_t(kMaps) * rows * out_cols);
  T* prod[kMaps];
  for (int m = 0; m < kMaps; ++m) prod[m] = ws.products.data() + size_t(m) * cols;
  for (int i = 0; i < rows; ++i) {
    const T* x = ws.x.data() + int64_t(i) * cols;
    const T* y = ws.y.data() + int64_t(i) * cols;
    for (int j = 0; j < cols; ++j) {
      prod[0][j] = x[j];
      prod[1][j] = y[j];
      prod[2][j] = x[j] * x[j];
      prod[3][j] = y[j] * y[j];
      prod[4][j] = x[j] * y[j];
    }
    for (int m = 0; m < kMaps; ++m) {
      T* dst = ws.horizontal.data() + (size_t(m) * rows + i) * out_cols;
      blur_row(prod[m], dst, out_cols, taps, window);
    }
  }
}

// Vertical pass for output row i (of `rows_in` horizontal rows): five rows into ws.vertical.
template <typename T>
void vertical_row(Workspace<T>& ws, int i, int rows_in, int out_cols, const T* taps, int window) {
  for (int m = 0; m < kMaps; ++m) {
    const T* src = ws.horizontal.data() + (size_t(m) * rows_in + i) * out_cols;
    blur_column(src, out_cols, ws.vertical.data() + size_t(m) * out_cols, out_cols, taps, window);
  }
}

template <typename T>
inline Moments<T> moments_at(const Workspace<T>& ws, int out_cols, int j) {
  const T* v = ws.vertical.data();
  return moments_from_blurred(v[j], v[out_cols + j], v[2 * out_cols + j], v[3 * out_cols + j],
                              v[4 * out_cols + j]);
}

// ------------------------------------------------------------------------------------------------
// Forward: one tile -> its sum of m (and its part of the SSIM map)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
typename Acc<scalar_t>::type forward_tile(const FusedArgs& a, const TileCoord& tc,
                                          Workspace<typename Acc<scalar_t>::type>& ws, const
                                          typename Acc<scalar_t>::type* taps) {
  using T = typename Acc<scalar_t>::type;
  const LevelDesc& lv = a.levels[tc.level];
  const SsimParams<T> params = make_ssim_params<T>(a);
  const int R = a.radius;
  const int64_t h0 = tc.th * a.tile_h, w0 = tc.tw * a.tile_w;
  const int oh = int(std::min<int64_t>(a.tile_h, lv.H - h0));
  const int ow = int(std::min<int64_t>(a.tile_w, lv.W - w0));
  const int rows = oh + 2 * R, cols = ow + 2 * R;

  // Stage 1: load the tile plus an r halo.
  source_indices(h0 - R, rows, lv.H, a.padding, ws.src_row);
  source_indices(w0 - R, cols, lv.W, a.padding, ws.src_col);
  ws.x.resize(size_t(rows) * cols);
  ws.y.resize(size_t(rows) * cols);
  load_region<scalar_t>(lv.x, lv.x_stride, lv.x_affine, tc.n, tc.c, lv.C, ws.src_row, ws.src_col, rows, cols, ws.x.data());
  load_region<scalar_t>(lv.y, lv.y_stride, lv.y_affine, tc.n, tc.c, lv.C, ws.src_row, ws.src_col, rows, cols, ws.y.data());

  // Stage 2: horizontal pass, then per output row the vertical pass and the SSIM terms.
  horizontal_pass(ws, rows, cols, ow, taps, a.window);
  ws.vertical.resize(size_t(kMaps) * ow);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;  // plane centre -> map index
  T* map = static_cast<T*>(lv.map);
  T tile_sum = T(0);
  for (int i = 0; i < oh; ++i) {
    const int64_t ph = h0 + i;
    if (!is_output(ph, lv.H, R, a.padding)) continue;
    vertical_row(ws, i, rows, ow, taps, a.window);
    T row_sum = T(0);
    for (int j = 0; j < ow; ++j) {
      const int64_t pw = w0 + j;
      if (!is_output(pw, lv.W, R, a.padding)) continue;
      const T S = ssim_value(moments_at(ws, ow, j), params);
      row_sum += pixel_loss(S, params.clamp);
      if (map != nullptr) map[((tc.plane * out_h) + ph - offset) * out_w + pw - offset] = S;
    }
    tile_sum += row_sum;
  }
  return tile_sum;
}

// ------------------------------------------------------------------------------------------------
// Backward: one tile of dL/dx (and dL/dy), with its per-plane affine-gradient partial sums
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
void backward_tile(const FusedArgs& a, const TileCoord& tc, Workspace<typename Acc<scalar_t>::type>& ws,
                   const typename Acc<scalar_t>::type* taps, typename Acc<scalar_t>::type* partial) {
  using T = typename Acc<scalar_t>::type;
  const LevelDesc& lv = a.levels[tc.level];
  const SsimParams<T> params = make_ssim_params<T>(a);
  const int R = a.radius, K = a.window;
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // a_x, b_x, c [, a_y, b_y]
  const int64_t h0 = tc.th * a.tile_h, w0 = tc.tw * a.tile_w;
  const int oh = int(std::min<int64_t>(a.tile_h, lv.H - h0));
  const int ow = int(std::min<int64_t>(a.tile_w, lv.W - w0));
  const int sh = oh + 2 * R, sw = ow + 2 * R;  // statistics region: centres within r of the tile
  const int lh = oh + 4 * R, lw = ow + 4 * R;  // loaded region: tile plus a 2r halo

  // Stage 1: load.
  source_indices(h0 - 2 * R, lh, lv.H, a.padding, ws.src_row);
  source_indices(w0 - 2 * R, lw, lv.W, a.padding, ws.src_col);
  ws.x.resize(size_t(lh) * lw);
  ws.y.resize(size_t(lh) * lw);
  load_region<scalar_t>(lv.x, lv.x_stride, lv.x_affine, tc.n, tc.c, lv.C, ws.src_row, ws.src_col, lh, lw, ws.x.data());
  load_region<scalar_t>(lv.y, lv.y_stride, lv.y_affine, tc.n, tc.c, lv.C, ws.src_row, ws.src_col, lh, lw, ws.y.data());

  // Stage 2: statistics on tile + r, and the coefficient maps a, b, c there (0 off the outputs).
  horizontal_pass(ws, lh, lw, sw, taps, K);
  ws.vertical.resize(size_t(kMaps) * sw);
  ws.coeffs.assign(size_t(n_coeff) * sh * sw, T(0));
  const T grad_sum = *static_cast<const T*>(lv.grad_loss) * T(lv.loss_scale);
  const T* grad_map = static_cast<const T*>(lv.grad_map);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  const size_t coeff_stride = size_t(sh) * sw;
  for (int i = 0; i < sh; ++i) {
    const int64_t ph = h0 - R + i;
    if (!is_output(ph, lv.H, R, a.padding)) continue;
    vertical_row(ws, i, lh, sw, taps, K);
    T* row = ws.coeffs.data() + size_t(i) * sw;
    for (int j = 0; j < sw; ++j) {
      const int64_t pw = w0 - R + j;
      if (!is_output(pw, lv.W, R, a.padding)) continue;
      const Moments<T> m = moments_at(ws, sw, j);
      const SsimPartials<T> g = ssim_partials(m, params);
      T d = grad_sum * pixel_loss_grad(g.S, params.clamp);
      if (grad_map != nullptr) d += grad_map[((tc.plane * out_h) + ph - offset) * out_w + pw - offset];
      const BackwardCoeffs<T> bc = backward_coeffs(m, g, d);
      row[j] = bc.a_x;
      row[coeff_stride + j] = bc.b_x;
      row[2 * coeff_stride + j] = bc.c;
      if (need_y) {
        row[3 * coeff_stride + j] = bc.a_y;
        row[4 * coeff_stride + j] = bc.b_y;
      }
    }
  }

  // Stage 3: the true transpose of the padded blur, per axis. tap_w[j * ow + q] is the weight of
  // centre w0 + q + j - R for input column w0 + q (border folds included), tap_h likewise for rows.
  ws.tap_h.resize(size_t(oh) * K);
  ws.tap_w.resize(size_t(K) * ow);
  for (int q = 0; q < oh; ++q)
    for (int j = 0; j < K; ++j)
      ws.tap_h[size_t(q) * K + j] = transposed_tap(h0 + q, h0 + q + j - R, lv.H, R, a.padding, taps);
  for (int j = 0; j < K; ++j)
    for (int q = 0; q < ow; ++q)
      ws.tap_w[size_t(j) * ow + q] = transposed_tap(w0 + q, w0 + q + j - R, lv.W, R, a.padding, taps);

  // Horizontal transposed pass: coeffs (sh x sw) -> transposed (sh x ow).
  ws.transposed.assign(size_t(n_coeff) * sh * ow, T(0));
  for (int m = 0; m < n_coeff; ++m) {
    for (int i = 0; i < sh; ++i) {
      const T* src = ws.coeffs.data() + m * coeff_stride + size_t(i) * sw;
      T* dst = ws.transposed.data() + (size_t(m) * sh + i) * ow;
      for (int j = 0; j < K; ++j) {
        const T* w = ws.tap_w.data() + size_t(j) * ow;
        for (int q = 0; q < ow; ++q) dst[q] += w[q] * src[q + j];
      }
    }
  }

  // Stage 4: vertical transposed pass per tile row, then dL/dx-hat = W^T a_x + 2 x W^T b_x + y W^T c
  // (and the mirror for y); dL/dx = scale * dL/dx-hat; per-plane sums for d scale and d shift.
  ws.grad.resize(size_t(n_coeff) * ow);
  const T x_scale = lv.x_affine ? static_cast<const T*>(lv.x_affine)[tc.plane * 2] : T(1);
  const T y_scale = lv.y_affine ? static_cast<const T*>(lv.y_affine)[tc.plane * 2] : T(1);
  const scalar_t* x_raw = static_cast<const scalar_t*>(lv.x) + tc.n * lv.x_stride[0] + tc.c * lv.x_stride[1];
  const scalar_t* y_raw = static_cast<const scalar_t*>(lv.y) + tc.n * lv.y_stride[0] + tc.c * lv.y_stride[1];
  scalar_t* gx = lv.gx ? static_cast<scalar_t*>(lv.gx) + tc.n * lv.gx_stride[0] + tc.c * lv.gx_stride[1] : nullptr;
  scalar_t* gy = lv.gy ? static_cast<scalar_t*>(lv.gy) + tc.n * lv.gy_stride[0] + tc.c * lv.gy_stride[1] : nullptr;
  T sum_gx_x = T(0), sum_gx = T(0), sum_gy_y = T(0), sum_gy = T(0);
  for (int q = 0; q < oh; ++q) {
    for (int m = 0; m < n_coeff; ++m) {
      const T* src = ws.transposed.data() + (size_t(m) * sh + q) * ow;
      T* dst = ws.grad.data() + size_t(m) * ow;
      std::fill(dst, dst + ow, T(0));
      for (int j = 0; j < K; ++j) {
        const T w = ws.tap_h[size_t(q) * K + j];
        if (w == T(0)) continue;
        const T* s = src + size_t(j) * ow;
        for (int k = 0; k < ow; ++k) dst[k] += w * s[k];
      }
    }
    const int64_t h = h0 + q;
    const T* xh = ws.x.data() + size_t(q + 2 * R) * lw + 2 * R;
    const T* yh = ws.y.data() + size_t(q + 2 * R) * lw + 2 * R;
    const T* g = ws.grad.data();
    for (int k = 0; k < ow; ++k) {
      const int64_t w = w0 + k;
      const T gx_hat = g[k] + T(2) * xh[k] * g[ow + k] + yh[k] * g[2 * ow + k];
      sum_gx_x += gx_hat * static_cast<T>(x_raw[h * lv.x_stride[2] + w * lv.x_stride[3]]);
      sum_gx += gx_hat;
      if (gx) gx[h * lv.gx_stride[2] + w * lv.gx_stride[3]] = static_cast<scalar_t>(x_scale * gx_hat);
      if (need_y) {
        const T gy_hat = g[3 * ow + k] + T(2) * yh[k] * g[4 * ow + k] + xh[k] * g[2 * ow + k];
        sum_gy_y += gy_hat * static_cast<T>(y_raw[h * lv.y_stride[2] + w * lv.y_stride[3]]);
        sum_gy += gy_hat;
        if (gy) gy[h * lv.gy_stride[2] + w * lv.gy_stride[3]] = static_cast<scalar_t>(y_scale * gy_hat);
      }
    }
  }
  partial[0] = sum_gx_x;
  partial[1] = sum_gx;
  partial[2] = sum_gy_y;
  partial[3] = sum_gy;
}

template <typename T>
void taps_as(const FusedArgs& a, T* taps) {
  for (int k = 0; k < a.window; ++k) taps[k] = T(a.taps[k]);
}

// Work per task varies from one pixel to a full tile; a grain of 1 lets the pool balance.
constexpr int64_t kGrain = 1;

template <typename scalar_t>
void forward_impl(const FusedArgs& a) {
  using T = typename Acc<scalar_t>::type;
  T taps[kMaxWindow];
  taps_as(a, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  at::parallel_for(0, a.total_tiles, kGrain, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    for (int64_t t = begin; t < end; ++t) partials[t] = forward_tile<scalar_t>(a, locate_tile(a, t), ws, taps);
  });
  // Second stage, fixed order: tiles of a level in index order, accumulated in double.
  T* losses = static_cast<T*>(a.level_losses);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t end = lv.tile_begin + lv.N * lv.C * lv.tiles_h * lv.tiles_w;
    double total = 0.0;
    for (int64_t t = lv.tile_begin; t < end; ++t) total += double(partials[t]);
    losses[l] = T(total * lv.loss_scale);
  }
}

template <typename scalar_t>
void backward_impl(const FusedArgs& a) {
  using T = typename Acc<scalar_t>::type;
  T taps[kMaxWindow];
  taps_as(a, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  at::parallel_for(0, a.total_tiles, kGrain, [&](int64_t begin, int64_t end) {
    Workspace<T> ws;
    for (int64_t t = begin; t < end; ++t) backward_tile<scalar_t>(a, locate_tile(a, t), ws, taps, partials + 4 * t);
  });
  // Second stage, fixed order: per plane, its tiles in index order.
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t per_plane = lv.tiles_h * lv.tiles_w;
    T* gxa = static_cast<T*>(lv.g_x_affine);
    T* gya = static_cast<T*>(lv.g_y_affine);
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      const T* p = partials + 4 * (lv.tile_begin + plane * per_plane);
      for (int64_t t = 0; t < per_plane; ++t)
        for (int k = 0; k < 4; ++k) s[k] += double(p[4 * t + k]);
      if (gxa) {
        gxa[2 * plane] = T(s[0]);
        gxa[2 * plane + 1] = T(s[1]);
      }
      if (gya) {
        gya[2 * plane] = T(s[2]);
        gya[2 * plane + 1] = T(s[3]);
      }
    }
  }
}

template <template <typename> class Fn>
void dispatch_dtype(const FusedArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return Fn<float>::run(a);
    case DType::kFloat64: return Fn<double>::run(a);
    case DType::kFloat16: return Fn<c10::Half>::run(a);
    case DType::kBFloat16: return Fn<c10::BFloat16>::run(a);
  }
  throw std::invalid_argument("ssimkd: unsupported dtype");
}

template <typename scalar_t>
struct ForwardFn {
  static void run(const FusedArgs& a) { forward_impl<scalar_t>(a); }
};
template <typename scalar_t>
struct BackwardFn {
  static void run(const FusedArgs& a) { backward_impl<scalar_t>(a); }
};

}  // namespace

TileShape cpu_tile_shape(int /*window*/, bool /*backward*/) { return {kTileH, kTileW}; }

void ssim_fwd_cpu(const FusedArgs& args) {
  if (args.total_tiles == 0) return;
  dispatch_dtype<ForwardFn>(args);
}

void ssim_bwd_cpu(const FusedArgs& args) {
  if (args.total_tiles == 0) return;
  dispatch_dtype<BackwardFn>(args);
}

}  // namespace ssimkd
