// ssim_cpu.cpp: the fused SSIM-KD forward and backward on the CPU, the tiled algorithm of SPEC
// section 4 over at::parallel_for. Per-pixel math comes from ssim_math.h, shared with the CUDA kernels.
//
// One task owns one tile of one plane of one level (tiles of all levels in one parallel loop):
//  forward:  load the plane rows and columns the tile's windows read, blur x, y, x^2, y^2, xy
//            separably, form SSIM per centre, and write only the tile's sum of m (and, for ssim_map,
//            the map). A fixed-order second stage adds the tile sums per level.
//  backward: the same statistics on the centres within r of the tile (a 2r halo of inputs), the
//            coefficient maps a, b, c there, blurred back onto the tile with the true transpose of the
//            padded blur; writes dL/dx (and dL/dy) and the tile's sums for the per-plane affine gradient.
// Nothing is saved between the two: the backward recomputes from the inputs.
//
// The padding is an index map per axis, never a padded copy: a tile loads each plane row and column
// it needs once, and the windows that cross a border gather through the map (forward), while the
// transpose collects the folded taps in per-target weights (backward). So a tile that spans a whole
// plane (every FPN level up to 64x64) has no halo at all, and a plane smaller than the window costs
// what its pixels cost. Both per-axis maps (AxisPlan) are built once per level, not per tile.
//
// Speed: the radius is a template constant, so each tap loop unrolls; every row loop runs over whole
// blocks of kLanes columns (one AVX-512 register of floats), computing a few unused lanes at the end
// of a row rather than a scalar tail; sums are taken per lane and added in a fixed order at the end;
// the tile functions are compiled for AVX-512, AVX2 and baseline x86-64, picked at run time.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
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
// Block<T> values never cross a call (every helper that takes one is inlined), so the ABI note GCC
// gives for 64-byte vectors in the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ssimkd {
namespace {

// Output tile of one task. 64 x 64 covers every level of an FPN up to 64x64 in one tile (no halo);
// the backward's buffers for it (~450 KiB of float) stay in L2.
constexpr int kTileH = 64;
constexpr int kTileW = 64;
constexpr int kLanes = 16;  // columns per block of every row loop
constexpr int kMaps = 5;    // blurred maps: x, y, x^2, y^2, xy

SSIMKD_INLINE int blocks_of(int64_t n) { return int((n + kLanes - 1) / kLanes); }

// ------------------------------------------------------------------------------------------------
// Row primitives, over `blocks` blocks of kLanes outputs
// ------------------------------------------------------------------------------------------------

// One block of kLanes values as a GCC vector: each clone lowers it to its own registers (one zmm of
// float on AVX-512, two ymm on AVX2, four xmm on baseline x86-64). Loads and stores are unaligned.
template <typename T>
struct BlockType {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using Block = typename BlockType<T>::type;

template <typename T>
SSIMKD_INLINE Block<T> load_block(const T* p) {
  Block<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
SSIMKD_INLINE void store_block(T* p, const Block<T>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// out[j] = sum_k w[k] * in[j + k]: the horizontal blur.
template <int R, typename T>
SSIMKD_INLINE void blur_row(const T* __restrict in, const T* __restrict w, int blocks, T* __restrict out) {
  for (int b = 0; b < blocks; ++b, in += kLanes, out += kLanes) {
    Block<T> acc = w[0] * load_block(in);
#pragma GCC unroll 16
    for (int k = 1; k <= 2 * R; ++k) acc += w[k] * load_block(in + k);
    store_block(out, acc);
  }
}

// out[j] = sum_k w[k] * rows[k][j]: the vertical blur, its rows gathered through the padding's map.
template <int R, typename T>
SSIMKD_INLINE void blur_rows(const T* const* rows, const T* __restrict w, int blocks, T* __restrict out) {
  for (int b = 0; b < blocks; ++b) {
    const int64_t o = int64_t(b) * kLanes;
    Block<T> acc = w[0] * load_block(rows[0] + o);
#pragma GCC unroll 16
    for (int k = 1; k <= 2 * R; ++k) acc += w[k] * load_block(rows[k] + o);
    store_block(out + o, acc);
  }
}

// out[j] = sum_k w[k * w_stride + j] * in[j + k]: one block of the horizontal transpose where the
// weights vary by column (folded, zero-padded or valid borders).
template <int R, typename T>
SSIMKD_INLINE void band_block(const T* __restrict in, const T* __restrict w, int64_t w_stride, T* __restrict out) {
  Block<T> acc = load_block(w) * load_block(in);
#pragma GCC unroll 16
  for (int k = 1; k <= 2 * R; ++k) acc += load_block(w + k * w_stride) * load_block(in + k);
  store_block(out, acc);
}

// Per-lane running sums, added in a fixed order at the end: the same bits on every instruction set.
template <typename T>
struct LaneSum {
  T lanes[kLanes] = {};
  // Adds v[0..n) (n <= blocks * kLanes; v must be readable up to the block end).
  SSIMKD_INLINE void add(const T* __restrict v, int n) {
    int j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += v[j + l];
    for (int l = 0; j + l < n; ++l) lanes[l] += v[j + l];
  }
  SSIMKD_INLINE T total() const {
    T t = T(0);
    for (int l = 0; l < kLanes; ++l) t += lanes[l];
    return t;
  }
};

// ------------------------------------------------------------------------------------------------
// Per-axis plans: which centres a tile computes, which plane positions they read, the transpose
// ------------------------------------------------------------------------------------------------

// One axis (rows or columns) of one tile row or column of a level.
template <typename T>
struct AxisPlan {
  int64_t t0 = 0, t1 = 0;  // the tile: forward outputs, backward gradient targets (plane coordinates)
  int64_t c0 = 0, c1 = 0;  // window centres whose statistics the tile computes (empty: c0 == c1)
  int64_t s0 = 0, s1 = 0;  // the plane positions those windows read
  bool pad = false;        // some window reads zero padding
  int blocks = 0;          // blocks over the centres
  // Plane position read at c0 - R + j, j < blocks * kLanes + 2R, or -1 for zero padding. Positions
  // past c1 + R (the last block's unused lanes) read the plane too, so every lane is a finite value.
  std::vector<int64_t> source;
  int run_begin = 0, run_end = 0;  // the longest run of consecutive plane positions in `source`
  // Backward: weight[k * target_stride + q] is the weight with which centre t0 + q + k - R feeds
  // target t0 + q (the true transpose of the padded blur, folds included; 0 off the centres).
  int target_blocks = 0;
  int64_t target_stride = 0;
  std::vector<T> weight;
  std::vector<uint8_t> plain_block;  // per target block: its weights are the plain taps
  int64_t width() const { return int64_t(blocks) * kLanes; }
};

template <typename T>
AxisPlan<T> plan_axis(int64_t t0, int64_t t1, int64_t n, int radius, int padding, bool backward, const T* taps) {
  AxisPlan<T> p;
  p.t0 = t0;
  p.t1 = t1;
  const int64_t lo = padding == kValid ? radius : 0, hi = padding == kValid ? n - radius : n;
  const int64_t reach = backward ? radius : 0;  // the backward needs every centre within r of a target
  p.c0 = std::max(lo, t0 - reach);
  p.c1 = std::max(p.c0, std::min(hi, t1 + reach));
  if (p.c1 > p.c0) {
    p.blocks = blocks_of(p.c1 - p.c0);
    const int64_t span = p.width() + 2 * radius;
    p.source.resize(span);
    p.s0 = n;
    p.s1 = 0;
    for (int64_t j = 0; j < span; ++j) {
      const int64_t pos = p.c0 - radius + j;
      int64_t src = source_index(pos, n, padding);
      if (pos < p.c1 + radius) {  // read by a window
        if (src < 0) {
          p.pad = true;
        } else {
          p.s0 = std::min(p.s0, src);
          p.s1 = std::max(p.s1, src + 1);
        }
      } else if (src < 0) {
        src = n - 1;  // an unused lane: any plane position
      }
      p.source[j] = src;
    }
    for (int64_t j = 0; j < span; ++j) {
      if (p.source[j] < 0) continue;
      int64_t e = j + 1;
      while (e < span && p.source[e] == p.source[e - 1] + 1) ++e;
      if (e - j > p.run_end - p.run_begin) {
        p.run_begin = int(j);
        p.run_end = int(e);
      }
      j = e - 1;
    }
    // s0 < s1 here: every window reads its own centre, which lies in the plane.
  }
  if (backward) {
    const int k_count = 2 * radius + 1;
    p.target_blocks = blocks_of(t1 - t0);
    p.target_stride = int64_t(p.target_blocks) * kLanes;
    p.weight.assign(size_t(k_count * p.target_stride), T(0));
    p.plain_block.assign(size_t(p.target_blocks), 1);
    for (int64_t q = 0; q < t1 - t0; ++q) {
      for (int k = 0; k < k_count; ++k) {
        const T w = transposed_tap(t0 + q, t0 + q + k - radius, n, radius, padding, taps);
        p.weight[k * p.target_stride + q] = w;
        if (w != taps[k]) p.plain_block[q / kLanes] = 0;  // g is symmetric: plain means w = g[k]
      }
    }
  }
  return p;
}

// The plans of every tile row and tile column of every level of a launch.
template <typename T>
struct LaunchPlans {
  std::vector<std::vector<AxisPlan<T>>> rows, cols;  // [level][tile row], [level][tile column]
};

template <typename T>
LaunchPlans<T> plan_launch(const FusedArgs& a, bool backward, const T* taps) {
  LaunchPlans<T> plans;
  plans.rows.resize(a.num_levels);
  plans.cols.resize(a.num_levels);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    for (int64_t t = 0; t < lv.tiles_h; ++t)
      plans.rows[l].push_back(plan_axis(t * a.tile_h, std::min<int64_t>(lv.H, (t + 1) * a.tile_h), lv.H, a.radius,
                                        a.padding, backward, taps));
    for (int64_t t = 0; t < lv.tiles_w; ++t)
      plans.cols[l].push_back(plan_axis(t * a.tile_w, std::min<int64_t>(lv.W, (t + 1) * a.tile_w), lv.W, a.radius,
                                        a.padding, backward, taps));
  }
  return plans;
}

// ------------------------------------------------------------------------------------------------
// Loading and the statistics' passes
// ------------------------------------------------------------------------------------------------

// Per-task scratch, sized once per parallel chunk for the largest tile.
template <typename T>
struct Workspace {
  std::vector<T> x, y;        // loaded plane rows (s1 - s0 of them, then the zero-padding row), gathered
  std::vector<T> products;    // one loaded row of x, y, x^2, y^2, xy
  std::vector<T> horizontal;  // kMaps maps after the horizontal pass, one row per loaded row
  std::vector<T> vertical;    // kMaps rows of statistics of one centre row
  std::vector<T> values;      // forward: m per centre of a row; backward: dL/dS of the map, a row
  std::vector<T> coeffs;      // backward: a_x, b_x, c, a_y, b_y on the centres, 0 elsewhere
  std::vector<T> transposed;  // backward: coeffs after the horizontal transposed pass
  std::vector<T> grad;        // backward: one row of each blurred-back coefficient map
  std::vector<T> scratch;     // backward: dL/dx-hat and the raw input of one target row
  std::vector<T> zeros;       // backward: rows of the transposed maps off the centres
};

// Widest row of window centres a tile computes (the backward's: the tile plus r each side), in blocks.
SSIMKD_INLINE int64_t max_centre_width(int radius) { return int64_t(blocks_of(kTileW + 2 * radius)) * kLanes; }

// Row length of the backward's coefficient maps: centre column t0 - R + u sits at u, and the centres
// start up to r into the row.
SSIMKD_INLINE int64_t coeff_width(int radius) { return max_centre_width(radius) + radius; }

template <typename T>
void reserve(Workspace<T>& ws, int radius) {
  const size_t centres = size_t(max_centre_width(radius));
  const size_t width = centres + 2 * radius;          // widest loaded row
  const size_t rows = kTileH + 4 * radius + 1;        // loaded rows + pad row
  const size_t centre_rows = kTileH + 2 * radius;
  ws.x.resize(rows * width);
  ws.y.resize(rows * width);
  ws.products.resize(kMaps * width);
  ws.horizontal.resize(kMaps * rows * centres);
  ws.vertical.resize(kMaps * centres);
  ws.values.resize(centres);
  ws.coeffs.resize(kMaps * centre_rows * size_t(coeff_width(radius)));
  ws.transposed.resize(kMaps * centre_rows * kTileW);
  ws.grad.resize(kMaps * kTileW);
  ws.scratch.resize(2 * kTileW);
  ws.zeros.assign(kTileW, T(0));  // a transposed row is at most a tile wide
}

// Centre loaded values on their mean, in place, and return the mean. Any shift keeps the math exact
// (ssim_math.h, moments_from_blurred); the tile's mean is close to every window's mean, which is what
// keeps the float32 variances from cancelling. Summed per lane in a fixed order.
template <typename T>
SSIMKD_INLINE T centre_values(T* __restrict v, int64_t count) {
  LaneSum<T> sum;
  sum.add(v, int(count));
  const T mean = sum.total() / T(count);
  for (int64_t i = 0; i < count; ++i) v[i] -= mean;
  return mean;
}

// dst[j] = scale * (src[j] - offset): a contiguous run of a plane row, normalised.
template <typename scalar_t, typename T>
SSIMKD_INLINE void normalise_run(const scalar_t* __restrict src, int n, T scale, T offset, T* __restrict dst) {
  for (int j = 0; j < n; ++j) dst[j] = scale * (static_cast<T>(src[j]) - offset);
}

// Load the plane rows [rows.s0, rows.s1) of one input, each gathered at the column plan's positions
// and normalised (scale * (x - offset)); then a row of zero padding when the rows read one (0 in the
// normalised space); then centre everything on its mean, which is returned.
template <typename scalar_t, typename T, int R>
SSIMKD_INLINE T load_input(const void* base, const int64_t* stride, T scale, T offset, const TileCoord& tc,
                           const AxisPlan<T>& rows, const AxisPlan<T>& cols, T* __restrict out) {
  const scalar_t* plane = static_cast<const scalar_t*>(base) + tc.n * stride[0] + tc.c * stride[1];
  const int width = int(cols.width()) + 2 * R;
  const int64_t* src_col = cols.source.data();
  const bool run = stride[3] == 1 && cols.run_end > cols.run_begin;
  const int64_t count = rows.s1 - rows.s0;
  for (int64_t i = 0; i < count; ++i) {
    T* dst = out + i * width;
    const scalar_t* src = plane + (rows.s0 + i) * stride[2];
    for (int j = 0; j < width; ++j) {
      if (run && j == cols.run_begin) {
        normalise_run(src + src_col[j], cols.run_end - cols.run_begin, scale, offset, dst + j);
        j = cols.run_end - 1;
        continue;
      }
      const int64_t s = src_col[j];
      dst[j] = s < 0 ? T(0) : scale * (static_cast<T>(src[s * stride[3]]) - offset);
    }
  }
  const int64_t loaded = count + (rows.pad ? 1 : 0);
  if (rows.pad) std::fill(out + count * width, out + loaded * width, T(0));
  return centre_values(out, loaded * width);
}

// A tile's per-plane normalisation (scale, offset) of x and y, and its centring shifts cx, cy.
template <typename T>
struct TileInputs {
  T x_scale, x_offset, y_scale, y_offset, cx, cy;
};

template <typename scalar_t, typename T, int R>
SSIMKD_INLINE TileInputs<T> load_tile(const LevelDesc& lv, const TileCoord& tc, const AxisPlan<T>& rows,
                                      const AxisPlan<T>& cols, Workspace<T>& ws) {
  TileInputs<T> in;
  plane_affine(lv.x_affine, lv.x_affine_stride, tc.n, tc.c, &in.x_scale, &in.x_offset);
  plane_affine(lv.y_affine, lv.y_affine_stride, tc.n, tc.c, &in.y_scale, &in.y_offset);
  in.cx = load_input<scalar_t, T, R>(lv.x, lv.x_stride, in.x_scale, in.x_offset, tc, rows, cols, ws.x.data());
  in.cy = load_input<scalar_t, T, R>(lv.y, lv.y_stride, in.y_scale, in.y_offset, tc, rows, cols, ws.y.data());
  return in;
}

// The five product rows x, y, x^2, y^2, xy of one loaded row.
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

// Horizontal pass: each loaded row's five products blurred onto the centre columns, into
// ws.horizontal (map-major: map m, loaded row i at (m * rows + i) * centres).
template <int R, typename T>
SSIMKD_INLINE void horizontal_pass(Workspace<T>& ws, int rows, const AxisPlan<T>& cols, const T* taps) {
  const int width = int(cols.width()) + 2 * R;
  const int64_t centres = cols.width();
  T* prod = ws.products.data();
  for (int i = 0; i < rows; ++i) {
    products_row(ws.x.data() + int64_t(i) * width, ws.y.data() + int64_t(i) * width, width, prod, prod + width,
                 prod + 2 * width, prod + 3 * width, prod + 4 * width);
    for (int m = 0; m < kMaps; ++m)
      blur_row<R>(prod + m * width, taps, cols.blocks, ws.horizontal.data() + (int64_t(m) * rows + i) * centres);
  }
}

// Index of the loaded row that tap k of the window centred on row p reads.
template <int R, typename T>
SSIMKD_INLINE void window_rows(const AxisPlan<T>& rows, int64_t p, int64_t* loaded_row) {
  const int64_t pad_row = rows.s1 - rows.s0;
  for (int k = 0; k <= 2 * R; ++k) {
    const int64_t s = rows.source[p - rows.c0 + k];
    loaded_row[k] = s < 0 ? pad_row : s - rows.s0;
  }
}

// Vertical pass for centre row p: the five statistics rows into ws.vertical (stride = centres).
template <int R, typename T>
SSIMKD_INLINE void vertical_pass(Workspace<T>& ws, int rows_loaded, const AxisPlan<T>& rows, int64_t p,
                                 const AxisPlan<T>& cols, const T* taps) {
  int64_t loaded_row[2 * R + 1];
  window_rows<R>(rows, p, loaded_row);
  const int64_t centres = cols.width();
  for (int m = 0; m < kMaps; ++m) {
    const T* map = ws.horizontal.data() + int64_t(m) * rows_loaded * centres;
    const T* src[2 * R + 1];
    for (int k = 0; k <= 2 * R; ++k) src[k] = map + loaded_row[k] * centres;
    blur_rows<R>(src, taps, cols.blocks, ws.vertical.data() + m * centres);
  }
}

template <typename T>
SSIMKD_INLINE Moments<T> moments_at(const T* v, int64_t stride, int64_t j, T cx, T cy) {
  return moments_from_blurred(v[j], v[stride + j], v[2 * stride + j], v[3 * stride + j], v[4 * stride + j], cx,
                              cy);
}

// SSIM at every lane of one row of statistics v (five rows of `n`).
template <bool kDefault, typename T>
SSIMKD_INLINE void ssim_row(const T* __restrict v, int64_t n, const SsimParams<T>& params, T cx, T cy,
                            T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) {
    const Moments<T> m = moments_at(v, n, j, cx, cy);
    out[j] = kDefault ? ssim_default(m, params) : ssim_partials_general(m, params).S;
  }
}

// The coefficient maps a_x, b_x, c, a_y, b_y (SPEC section 2) at every lane of one row of statistics v
// of the centred inputs, with d = grad_scale * dm/dS + g (the map's own gradient, or zeros).
template <bool kDefault, typename T>
SSIMKD_INLINE void coefficient_row(const T* __restrict v, int64_t n, const SsimParams<T>& params, T cx, T cy,
                                   T grad_scale, const T* __restrict g, T* __restrict row, int64_t stride) {
  for (int64_t j = 0; j < n; ++j) {
    const Moments<T> m = moments_at(v, n, j, cx, cy);
    const SsimPartials<T> p = kDefault ? ssim_partials_default(m, params) : ssim_partials_general(m, params);
    const T d = grad_scale * pixel_loss_grad(p.S, params.clamp) + g[j];
    const BackwardCoeffs<T> bc = backward_coeffs(p, d, v[j], v[n + j]);
    row[j] = bc.a_x;
    row[stride + j] = bc.b_x;
    row[2 * stride + j] = bc.c;
    row[3 * stride + j] = bc.a_y;
    row[4 * stride + j] = bc.b_y;
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

template <typename scalar_t>
SSIMKD_INLINE void zero_row(scalar_t* dst, int n, int64_t step) {
  for (int k = 0; k < n; ++k) dst[k * step] = scalar_t(0);
}

// *sum_g_raw += sum g * raw, *sum_g += sum g, over one row, per lane (fixed order).
template <typename T>
SSIMKD_INLINE void accumulate_affine_sums(const T* __restrict g, const T* __restrict raw, int n,
                                          LaneSum<T>& sum_g_raw, LaneSum<T>& sum_g) {
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      sum_g_raw.lanes[l] += g[j + l] * raw[j + l];
      sum_g.lanes[l] += g[j + l];
    }
  }
  for (int l = 0; j + l < n; ++l) {
    sum_g_raw.lanes[l] += g[j + l] * raw[j + l];
    sum_g.lanes[l] += g[j + l];
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: one tile -> its sum of m (and its part of the SSIM map)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int R>
SSIMKD_CPU_CLONES void forward_tile(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile,
                                    Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,
                                    AccType<scalar_t>* tile_sum) {
  using T = AccType<scalar_t>;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const AxisPlan<T>& rows = plans.rows[tc.level][tc.th];
  const AxisPlan<T>& cols = plans.cols[tc.level][tc.tw];
  *tile_sum = T(0);
  if (rows.c1 == rows.c0 || cols.c1 == cols.c0) return;  // valid padding: no window centre in this tile
  const SsimParams<T> params = make_ssim_params<T>(a);

  const TileInputs<T> in = load_tile<scalar_t, T, R>(lv, tc, rows, cols, ws);
  const int rows_loaded = int(rows.s1 - rows.s0) + (rows.pad ? 1 : 0);
  horizontal_pass<R>(ws, rows_loaded, cols, taps);

  const int64_t centres = cols.width();
  const int n_out = int(cols.c1 - cols.c0);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;  // plane centre -> map index
  T* map = static_cast<T*>(lv.map);
  T* __restrict m_row = ws.values.data();
  LaneSum<T> total;
  for (int64_t p = rows.c0; p < rows.c1; ++p) {
    vertical_pass<R>(ws, rows_loaded, rows, p, cols, taps);
    if (params.default_exponents) {
      ssim_row<true>(ws.vertical.data(), centres, params, in.cx, in.cy, m_row);
    } else {
      ssim_row<false>(ws.vertical.data(), centres, params, in.cx, in.cy, m_row);
    }
    if (map != nullptr) {
      T* dst = map + (tc.plane * out_h + p - offset) * out_w + cols.c0 - offset;
      for (int j = 0; j < n_out; ++j) dst[j] = m_row[j];
    }
    for (int j = 0; j < n_out; ++j) m_row[j] = pixel_loss(m_row[j], params.clamp);
    total.add(m_row, n_out);
  }
  *tile_sum = total.total();
}

// ------------------------------------------------------------------------------------------------
// Backward: one tile of dL/dx (and dL/dy), with its per-plane affine-gradient partial sums
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int R>
SSIMKD_CPU_CLONES void backward_tile(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile,
                                     Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,
                                     AccType<scalar_t>* partial) {
  using T = AccType<scalar_t>;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const AxisPlan<T>& rows = plans.rows[tc.level][tc.th];
  const AxisPlan<T>& cols = plans.cols[tc.level][tc.tw];
  const SsimParams<T> params = make_ssim_params<T>(a);
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // blurred back: a_x, b_x, c [, a_y, b_y]
  const int oh = int(rows.t1 - rows.t0), ow = int(cols.t1 - cols.t0);
  scalar_t* gx = lv.gx ? static_cast<scalar_t*>(lv.gx) + tc.n * lv.gx_stride[0] + tc.c * lv.gx_stride[1] : nullptr;
  scalar_t* gy = lv.gy ? static_cast<scalar_t*>(lv.gy) + tc.n * lv.gy_stride[0] + tc.c * lv.gy_stride[1] : nullptr;
  for (int k = 0; k < 4; ++k) partial[k] = T(0);
  if (rows.c1 == rows.c0 || cols.c1 == cols.c0) {  // no window reaches this tile: a zero gradient
    for (int q = 0; q < oh; ++q) {
      const int64_t h = rows.t0 + q;
      if (gx) zero_row(gx + h * lv.gx_stride[2] + cols.t0 * lv.gx_stride[3], ow, lv.gx_stride[3]);
      if (gy) zero_row(gy + h * lv.gy_stride[2] + cols.t0 * lv.gy_stride[3], ow, lv.gy_stride[3]);
    }
    return;
  }

  // Stage 1: load what the centres within r of the tile read (the tile plus a 2r halo, clipped to the
  // plane), and the statistics' horizontal pass.
  const TileInputs<T> in = load_tile<scalar_t, T, R>(lv, tc, rows, cols, ws);
  const int rows_loaded = int(rows.s1 - rows.s0) + (rows.pad ? 1 : 0);
  horizontal_pass<R>(ws, rows_loaded, cols, taps);

  // Stage 2: per centre row, the statistics and the coefficient maps. A coefficient row holds centre
  // column t0 - R + u at u; columns that are not centres hold 0.
  const int64_t centres = cols.width();
  const int n_centres = int(cols.c1 - cols.c0);
  const int64_t cw = coeff_width(R);
  const int64_t u0 = cols.c0 - (cols.t0 - R);
  const int64_t centre_rows = rows.c1 - rows.c0;
  const int64_t stride = centre_rows * cw;  // between coefficient maps
  T* __restrict coeffs = ws.coeffs.data();
  const T grad_scale = *static_cast<const T*>(lv.grad_loss) * T(lv.loss_scale);
  const T* grad_map = static_cast<const T*>(lv.grad_map);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  T* g_row = ws.values.data();
  if (grad_map == nullptr) std::fill(g_row, g_row + centres, T(0));
  for (int64_t i = 0; i < centre_rows; ++i) {
    const int64_t p = rows.c0 + i;
    vertical_pass<R>(ws, rows_loaded, rows, p, cols, taps);
    if (grad_map != nullptr) {
      const T* g = grad_map + (tc.plane * out_h + p - offset) * out_w + cols.c0 - offset;
      std::copy(g, g + n_centres, g_row);
      std::fill(g_row + n_centres, g_row + centres, T(0));
    }
    T* row = coeffs + i * cw;
    if (params.default_exponents) {
      coefficient_row<true>(ws.vertical.data(), centres, params, in.cx, in.cy, grad_scale, g_row, row + u0, stride);
    } else {
      coefficient_row<false>(ws.vertical.data(), centres, params, in.cx, in.cy, grad_scale, g_row, row + u0, stride);
    }
    for (int m = 0; m < kMaps; ++m) {
      T* r = row + m * stride;
      std::fill(r, r + u0, T(0));
      std::fill(r + u0 + n_centres, r + cw, T(0));
    }
  }

  // Stage 3: the horizontal transposed pass, coefficient rows -> target columns. Blocks whose
  // targets see only unfolded, unmasked windows use the taps (g is symmetric); border blocks use the
  // plan's per-target weights.
  const int64_t ts = cols.target_stride;
  T* transposed = ws.transposed.data();
  for (int m = 0; m < n_coeff; ++m) {
    for (int64_t i = 0; i < centre_rows; ++i) {
      const T* src = coeffs + m * stride + i * cw;
      T* dst = transposed + (m * centre_rows + i) * ts;
      for (int b = 0; b < cols.target_blocks; ++b) {
        if (cols.plain_block[b]) {
          blur_row<R>(src + b * kLanes, taps, 1, dst + b * kLanes);
        } else {
          band_block<R>(src + b * kLanes, cols.weight.data() + b * kLanes, ts, dst + b * kLanes);
        }
      }
    }
  }

  // Stage 4: per target row, the vertical transposed pass (the plan's weights of that row), then
  // dL/dx-hat = W^T a_x + 2 x W^T b_x + y W^T c (and the mirror for y); dL/dx = scale * dL/dx-hat;
  // per-plane sums for d scale and d offset.
  const scalar_t* x_raw = static_cast<const scalar_t*>(lv.x) + tc.n * lv.x_stride[0] + tc.c * lv.x_stride[1];
  const scalar_t* y_raw = static_cast<const scalar_t*>(lv.y) + tc.n * lv.y_stride[0] + tc.c * lv.y_stride[1];
  const int width = int(cols.width()) + 2 * R;
  const int64_t first_col = cols.t0 - (cols.c0 - R);  // loaded column of target column t0
  T* g = ws.grad.data();  // rows of W^T a_x, W^T b_x, W^T c, W^T a_y, W^T b_y
  T* grad_hat = ws.scratch.data();
  T* raw = grad_hat + kTileW;
  LaneSum<T> sums[4];  // gx_hat * x, gx_hat, gy_hat * y, gy_hat
  for (int q = 0; q < oh; ++q) {
    const int64_t h = rows.t0 + q;
    T w[2 * R + 1];
    int64_t centre_row[2 * R + 1];
    for (int k = 0; k <= 2 * R; ++k) {
      w[k] = rows.weight[k * rows.target_stride + q];
      const int64_t p = h + k - R;
      centre_row[k] = (p >= rows.c0 && p < rows.c1) ? p - rows.c0 : -1;
    }
    for (int m = 0; m < n_coeff; ++m) {
      const T* src[2 * R + 1];
      for (int k = 0; k <= 2 * R; ++k)
        src[k] = centre_row[k] < 0 ? ws.zeros.data() : transposed + (m * centre_rows + centre_row[k]) * ts;
      blur_rows<R>(src, w, cols.target_blocks, g + m * kTileW);
    }
    const int64_t loaded = (h - rows.s0) * width + first_col;
    const T* xh = ws.x.data() + loaded;
    const T* yh = ws.y.data() + loaded;
    input_grad_row(g, g + kTileW, g + 2 * kTileW, xh, yh, ow, grad_hat);
    read_row(x_raw + h * lv.x_stride[2] + cols.t0 * lv.x_stride[3], lv.x_stride[3], ow, in.x_offset, raw);
    accumulate_affine_sums(grad_hat, raw, ow, sums[0], sums[1]);
    if (gx) write_row(grad_hat, in.x_scale, ow, gx + h * lv.gx_stride[2] + cols.t0 * lv.gx_stride[3], lv.gx_stride[3]);
    if (need_y) {
      input_grad_row(g + 3 * kTileW, g + 4 * kTileW, g + 2 * kTileW, yh, xh, ow, grad_hat);
      read_row(y_raw + h * lv.y_stride[2] + cols.t0 * lv.y_stride[3], lv.y_stride[3], ow, in.y_offset, raw);
      accumulate_affine_sums(grad_hat, raw, ow, sums[2], sums[3]);
      if (gy) write_row(grad_hat, in.y_scale, ow, gy + h * lv.gy_stride[2] + cols.t0 * lv.gy_stride[3], lv.gy_stride[3]);
    }
  }
  for (int k = 0; k < 4; ++k) partial[k] = sums[k].total();
}

// ------------------------------------------------------------------------------------------------
// Launch over all tiles, then the fixed-order second stage
// ------------------------------------------------------------------------------------------------

// Run body(item, state) for items 0 .. count - 1 on every thread, each thread with its own state.
// Items differ in cost by 1000x (a 4x4 plane vs a full tile), and levels are laid out large to
// small, so a static split would leave one thread with all the large items: each thread takes the
// next item from a shared counter instead. Every item writes only its own outputs, so the result does
// not depend on which thread ran it.
template <typename State, typename Init, typename Body>
void for_each_item(int64_t count, const Init& init, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    State state;
    init(state);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
           i = next.fetch_add(1, std::memory_order_relaxed))
        body(i, state);
    }
  });
}

// Run body(tile, workspace) for every tile of a launch.
template <typename T, typename Body>
void for_each_tile(const FusedArgs& a, int radius, const Body& body) {
  for_each_item<Workspace<T>>(a.total_tiles, [&](Workspace<T>& ws) { reserve(ws, radius); }, body);
}

struct NoState {};
// Run body(plane) for every plane of a normalisation call, the large planes first.
template <typename Body>
void for_each_plane(int64_t planes, const Body& body) {
  for_each_item<NoState>(planes, [](NoState&) {}, [&](int64_t i, NoState&) { body(i); });
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
  const LaunchPlans<T> plans = plan_launch(a, false, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  for_each_tile<T>(a, R, [&](int64_t t, Workspace<T>& ws) {
    forward_tile<scalar_t, R>(a, plans, t, ws, taps, partials + t);
  });
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
  const LaunchPlans<T> plans = plan_launch(a, true, taps);
  T* partials = static_cast<T*>(a.tile_partials);
  for_each_tile<T>(a, R, [&](int64_t t, Workspace<T>& ws) {
    backward_tile<scalar_t, R>(a, plans, t, ws, taps, partials + 4 * t);
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

// ------------------------------------------------------------------------------------------------
// The min-max normalisation's statistics: per-group bounds, the affine, and their gradient
// ------------------------------------------------------------------------------------------------

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
SSIMKD_CPU_CLONES PlaneBounds<T> plane_bounds(const scalar_t* x, const int64_t* stride, int64_t n, int64_t c,
                                              int64_t H, int64_t W) {
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
SSIMKD_CPU_CLONES void count_ties(const scalar_t* x, const int64_t* stride, int64_t n, int64_t c, int64_t H,
                                  int64_t W, T low, T high, int64_t* n_low, int64_t* n_high) {
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
SSIMKD_INLINE void tie_gradient_row(const scalar_t* __restrict x, scalar_t* __restrict grad, int64_t W, T base,
                                    T low, T high, T share_low, T share_high) {
  for (int64_t w = 0; w < W; ++w) {
    const T v = static_cast<T>(x[w]);
    grad[w] = static_cast<scalar_t>(base + (v == low ? share_low : T(0)) + (v == high ? share_high : T(0)));
  }
}

template <typename scalar_t, typename T = AccType<scalar_t>>
SSIMKD_CPU_CLONES void write_tie_gradient(const scalar_t* x, const int64_t* x_stride, scalar_t* grad,
                                          const int64_t* grad_stride, int64_t n, int64_t c, int64_t H, int64_t W,
                                          T low, T high, T share_low, T share_high, bool no_match) {
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
    write_tie_gradient(static_cast<const scalar_t*>(lv.x), lv.x_stride, static_cast<scalar_t*>(lv.grad),
                       lv.grad_stride, n, c, lv.H, lv.W, b[0], b[1], g_bounds[l][2 * g] / T(n_low),
                       g_bounds[l][2 * g + 1] / T(n_high), n_low == 0 || n_high == 0);
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

TileShape cpu_tile_shape(bool) { return {kTileH, kTileW}; }

void ssim_fwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<ForwardFn>(args);
}

void ssim_bwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<BackwardFn>(args);
}

}  // namespace ssimkd
