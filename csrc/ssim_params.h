// ssim_params.h: the plain structs that carry one fused launch from ops.cpp (the only file that sees
// at::Tensor) to the kernels, and the launchers' declarations. Kernels never see a tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ssim_math.h"

namespace ssimkd {

// Levels in one launch; ops.cpp runs more levels in several launches (MAX_LEVELS_PER_LAUNCH in
// _constants.py). Bounded so that FusedArgs (~330 B a level) fits in the classic 4 KiB of CUDA kernel
// parameters.
constexpr int kMaxLevelsPerLaunch = 8;

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The accumulation type of an input type: float, or double for double inputs.
template <typename scalar_t>
struct Accumulation {
  using type = float;
};
template <>
struct Accumulation<double> {
  using type = double;
};
template <typename scalar_t>
using AccType = typename Accumulation<scalar_t>::type;

// One FPN level: a batch of N * C planes of H x W. Pointers are raw; strides are in elements, so
// channels_last and sliced inputs are read in place. "acc" = the accumulation type (float, or double
// for float64 inputs); outputs are written as the declared dtype.
struct LevelDesc {
  const void* x;               // [N, C, H, W] student, input dtype
  const void* y;               // [N, C, H, W] teacher, input dtype
  int64_t x_stride[4];         // element strides of x (n, c, h, w)
  int64_t y_stride[4];         // element strides of y
  const void* x_affine;        // [N, C, 2] (scale, offset) of x-hat = scale * (x - offset), acc; null = identity
  const void* y_affine;        // [N, C, 2] likewise for y
  int64_t x_affine_stride[3];  // element strides of x_affine (n, c, k): broadcast views need no copy
  int64_t y_affine_stride[3];
  double loss_scale;          // a loss output = loss_scale * (sum of w m over the level, or over one of its
                              // planes with plane_sums), e.g. 1 / (N C Ho Wo), + the L1 term below
  double l1_scale;            // ... + l1_scale * (the same region's sum of |x-hat - y-hat| over every pixel,
                              // whatever the padding); 0 = no L1 term (l1_ssim_loss: (1 - w) / (N C H W))
  int64_t loss_begin;         // the level's first entry of level_losses: its sum's, or its plane 0's
  double alpha, beta, gamma;  // the level's exponents of l, c, s (MS-SSIM: (0, 1, 1) but at the coarsest)
  const void* weight;         // [N, C, Ho, Wo] per-pixel weight w of m (a mask), acc; null = 1 everywhere
  int64_t weight_stride[4];   // element strides of weight (a mask broadcast over channels has stride 0 there)
  const void* grad_loss;      // backward: dL / d the level's losses, acc: [1], or [N * C] with plane_sums
  const void* grad_map;       // backward: [N, C, Ho, Wo] contiguous dL / dS, acc; null = none
  void* map;                  // forward: [N, C, Ho, Wo] contiguous SSIM map, acc; null = not written
  void* gx;                   // backward: [N, C, H, W] dL/dx, input dtype; null = not needed
  void* gy;                   // backward: [N, C, H, W] dL/dy, input dtype; null = not needed
  int64_t gx_stride[4];       // element strides of gx
  int64_t gy_stride[4];       // element strides of gy
  void* g_x_affine;           // backward: [N, C, 2] dL / d(scale, offset) of x, acc; null = not needed
  void* g_y_affine;           // backward: [N, C, 2] likewise for y
  int64_t N, C, H, W;         // sizes
  int64_t tiles_h, tiles_w;   // tile grid over one plane
  int64_t tile_begin;         // global index of this level's first tile; a level's tiles are consecutive,
                              // plane-major: tile_begin + plane * tiles_h * tiles_w + th * tiles_w + tw
};

// Everything one launch (all its levels, one direction) needs.
struct FusedArgs {
  LevelDesc levels[kMaxLevelsPerLaunch];
  int num_levels;
  int64_t total_tiles;      // sum over levels of N * C * tiles_h * tiles_w
  DType dtype;              // input dtype of every x and y
  int window;               // odd, kMinWindow..kMaxWindow
  int radius;               // window / 2
  int padding;              // Padding
  int tile_h, tile_w;       // output tile of one program / block (chosen by the backend)
  double taps[kMaxWindow];  // Gaussian taps g[0..window-1], gaussian_taps()
  double c1, c2;            // SsimParams::c1, c2
  bool clamp;
  bool plane_sums;      // one loss per plane (n, c) of each level instead of one per level
  void* tile_partials;  // scratch, acc: forward [total_tiles, 2] sums of (w m, |x-hat - y-hat|) per tile;
                        // backward [total_tiles, 4] sums of (gx_hat * (x - x_offset), gx_hat,
                        // gy_hat * (y - y_offset), gy_hat) per tile
  void* level_losses;   // forward output, acc: per level (at its loss_begin) loss_scale * its sum of w m
                        // + l1_scale * its sum of |x-hat - y-hat|, or with plane_sums the same per plane
};

// The second stage, the same on every backend (CPU, CUDA, Triton): a level's loss is the sum of its
// tile partials, and a plane's four affine-gradient sums the sums over its tiles, each accumulated in
// double (SecondStageSum) and rounded once to the accumulation type: the loss after the scales in double
// (level_loss, below), the affine gradient before affine_gradient. Order, fixed per backend: a
// plane's tiles in index order; a level's on the CPU in index order, with CUDA block-strided then a
// tree, with Triton by chunks of 256 (tl.sum) added in order. In double the order can change the
// rounded result only when a sum lies within double rounding error of a rounding boundary.
using SecondStageSum = double;

// A loss output from its region's two double sums (of w m, of |x-hat - y-hat|), rounded once. Without an
// L1 term it is loss_scale * the first, bit for bit.
SSIMKD_HD double level_loss(const LevelDesc& lv, SecondStageSum sum_m, SecondStageSum sum_l1) {
  return lv.l1_scale == 0.0 ? sum_m * lv.loss_scale : sum_m * lv.loss_scale + sum_l1 * lv.l1_scale;
}

// The sign of x-hat - y-hat, 0 where they are equal (as torch's abs' gradient): the L1 term's gradient
// in x-hat per unit of l1_scale * dL/d(loss), -1 times that in y-hat. Compared, not subtracted: a
// compiler may fuse scale * x - scale * y into one FMA, which leaves a rounding residue where the
// two are equal.
template <typename T>
SSIMKD_HD T l1_sign(T x_hat, T y_hat) {
  return T(x_hat > y_hat) - T(x_hat < y_hat);
}

// Whether a level's SSIM has a closed form (ssim_math.h): beta = gamma = 1 and alpha 0 or 1, as the
// default (1, 1, 1) and MS-SSIM's (0, 1, 1). Chosen per level.
SSIMKD_HD bool closed_form(const LevelDesc& lv) {
  return lv.beta == 1.0 && lv.gamma == 1.0 && (lv.alpha == 0.0 || lv.alpha == 1.0);
}

template <typename T>
SSIMKD_HD SsimParams<T> make_ssim_params(const FusedArgs& a, const LevelDesc& lv) {
  SsimParams<T> p;
  p.c1 = T(a.c1);
  p.c2 = T(a.c2);
  p.alpha = T(lv.alpha);
  p.beta = T(lv.beta);
  p.gamma = T(lv.gamma);
  p.closed_form = closed_form(lv);
  p.luminance = lv.alpha != 0.0;
  p.clamp = a.clamp;
  p.eps_sigma = T(kEpsSigma);
  return p;
}

// (scale, offset) of plane (n, c) of a [N, C, 2] affine with element strides `stride`; identity for
// null. The normalisation is x-hat = scale * (x - offset): subtracting first keeps x-hat exact near the
// offset (the min), where scale * x + shift would cancel two large roundings when the range is tiny.
// plane_affine_at takes any pointer-like `affine` (the CUDA emulation's are checked).
template <typename T, typename Ptr>
SSIMKD_HD void plane_affine_at(const Ptr& affine, const int64_t* stride, int64_t n, int64_t c, T* scale, T* offset) {
  if (!affine) {
    *scale = T(1);
    *offset = T(0);
    return;
  }
  const int64_t at = n * stride[0] + c * stride[1];
  *scale = affine[at];
  *offset = affine[at + stride[2]];
}

template <typename T>
SSIMKD_HD void plane_affine(const void* affine, const int64_t* stride, int64_t n, int64_t c, T* scale, T* offset) {
  plane_affine_at(static_cast<const T*>(affine), stride, n, c, scale, offset);
}

// dL/d(scale, offset) of one plane from its sums (dL/dx-hat * (x - offset), dL/dx-hat), into g[0..1]
// (a pointer, or a pointer-like checked one).
template <typename T, typename Out>
SSIMKD_HD void affine_gradient(T scale, T sum_g_centred, T sum_g, const Out& g) {
  g[0] = sum_g_centred;
  g[1] = -scale * sum_g;
}

// The gradient of a feature map's per-group minimum and maximum (the min-max normalisation psi),
// split evenly among ties as torch.amin/amax do: grad = g_low / n_low [x == low] + g_high / n_high
// [x == high], per group of planes; NaN for a group with no match (a NaN input).
enum Group : int { kGroupSample = 0, kGroupLevel = 1, kGroupPlane = 2 };  // normalize "sample", "level", "plane"

struct MinMaxGradArgs {
  const void* x;  // [N, C, H, W] input dtype, any strides
  int64_t x_stride[4];
  int64_t N, C, H, W;
  int group;  // Group
  DType dtype;
  const void* low;  // [groups] acc: the group's min, max, and dL/dmin, dL/dmax
  const void* high;
  const void* g_low;
  const void* g_high;
  void* counts;  // scratch [groups, 2] int64: ties with min and with max
  void* grad;    // [N, C, H, W] input dtype, strides grad_stride
  int64_t grad_stride[4];
};

SSIMKD_HD int64_t group_of_plane(int group, int64_t n, int64_t c, int64_t C) {
  return group == kGroupSample ? n : (group == kGroupLevel ? 0 : n * C + c);
}

// How many groups an (N, C, ...) map has.
SSIMKD_HD int64_t group_count(int group, int64_t N, int64_t C) {
  return group == kGroupSample ? N : (group == kGroupLevel ? 1 : N * C);
}

void minmax_grad_cpu(const MinMaxGradArgs& args);

// One feature map of a fused min-max normalisation call (CPU): the per-group bounds, the per-plane
// affine x-hat = scale * (x - offset), scale = 1 / (max - min + eps), offset = min, and its gradient.
struct NormLevel {
  const void* x;  // [N, C, H, W] input dtype, any strides
  int64_t x_stride[4];
  int64_t N, C, H, W;
  void* affine;          // [N, C, 2] contiguous acc: (scale, offset) per plane; forward output
  void* bounds;          // [groups, 2] contiguous acc: (min, max) per group; forward output
  const void* g_affine;  // backward: [N, C, 2] contiguous acc, dL/d(scale, offset)
  void* grad;            // backward: [N, C, H, W] input dtype, dL/dx, strides grad_stride
  int64_t grad_stride[4];
};

void minmax_affine_cpu(const NormLevel* levels, int count, DType dtype, int group, double eps);
void minmax_affine_bwd_cpu(const NormLevel* levels, int count, DType dtype, int group);
#ifdef SSIMKD_WITH_CUDA
void minmax_grad_cuda(const MinMaxGradArgs& args, void* stream);
#endif

struct TileShape {
  int h, w;
};

// Where global tile `tile` lies: its level, plane (n, c) and tile row / column. Levels hold few
// entries, so a linear scan beats a search.
struct TileCoord {
  int level;
  int64_t plane, n, c, th, tw;
};

SSIMKD_HD TileCoord locate_tile(const FusedArgs& args, int64_t tile) {
  int level = 0;
  while (level + 1 < args.num_levels && tile >= args.levels[level + 1].tile_begin) ++level;
  const LevelDesc& lv = args.levels[level];
  const int64_t per_plane = lv.tiles_h * lv.tiles_w;
  const int64_t local = tile - lv.tile_begin;
  const int64_t plane = local / per_plane;
  const int64_t t = local - plane * per_plane;
  return {level, plane, plane / lv.C, plane % lv.C, t / lv.tiles_w, t % lv.tiles_w};
}

// Size of the output map along an axis of n: n, or n - 2r for valid padding.
SSIMKD_HD int64_t output_extent(int64_t n, int radius, int padding) {
  return padding == kValid ? n - 2 * radius : n;
}

// Tile shape of each backend, so ops.cpp can size the scratch before it launches.
TileShape cpu_tile_shape(bool backward);
// The instruction set the CPU op's tile functions use now: "avx512", "avx2" or "baseline" (x86-64
// without AVX2, and every other architecture); SSIMKD_CPU_ISA caps it.
const char* cpu_isa_name();
void ssim_fwd_cpu(const FusedArgs& args);
void ssim_bwd_cpu(const FusedArgs& args);

// The CUDA kernels' block code run on the host with every thread of each block, checked for races,
// out-of-bounds accesses, uninitialised shared reads and barrier divergence (ssim_cuda_emulated.cpp,
// cuda_emulator.h): how machines without a GPU test the CUDA kernels. Tests only.
//
// Each launcher takes the extents of every tensor the launch reads or writes, so the emulation can
// report an access outside its tensor by name.
struct TensorExtent {
  const void* data;
  int dim;                       // at most 4
  int64_t sizes[4], strides[4];  // strides in elements
  int element_size;              // bytes
  const char* role;              // what the kernels call it: "x", "gx", "tile_partials", ...
  int64_t level;                 // the level it belongs to, or -1
};
TileShape cuda_emulated_tile_shape(DType dtype);
void ssim_fwd_cuda_emulated(const FusedArgs& args, const std::vector<TensorExtent>& tensors);
void ssim_bwd_cuda_emulated(const FusedArgs& args, const std::vector<TensorExtent>& tensors);
void minmax_grad_cuda_emulated(const MinMaxGradArgs& args, const std::vector<TensorExtent>& tensors);
// Plant a bug in later emulated launches ("none", "drop_barrier", "extra_barrier", "halo_rows",
// "last_column"; cuda_emulator.h, PlantedBug), to show the checks find it. `site`: the barrier to
// drop, as cuda_emulated_barrier_sites() names it, or "*" for all.
void cuda_emulated_plant_bug(const std::string& bug, const std::string& site, int64_t value);
// The barrier statements (file:line) the emulation has met, in the order first met.
std::vector<std::string> cuda_emulated_barrier_sites();

#ifdef SSIMKD_WITH_CUDA
TileShape cuda_tile_shape(DType dtype);
// stream: the cudaStream_t to launch on, passed as void* so this header needs no CUDA include.
void ssim_fwd_cuda(const FusedArgs& args, void* stream);
void ssim_bwd_cuda(const FusedArgs& args, void* stream);
#endif

}  // namespace ssimkd
