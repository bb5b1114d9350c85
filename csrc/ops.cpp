// ops.cpp: the only C++ file that sees at::Tensor. Defines the `ssimkd` custom ops' schemas, checks
// their inputs (cheaply: loss.py has already validated with messages that name levels and shapes),
// allocates outputs, fills FusedArgs and calls the CPU or CUDA launcher; and their autograd, here in
// C++ (an op's Python autograd costs ~0.3 ms a call in pytree handling, as much as the small levels'
// kernels). Fake kernels are registered in Python (ssimkd_kernels/ops.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "ssim_params.h"

#ifdef SSIMKD_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace ssimkd {
namespace {

// The fused ops' scalar options, in schema order: the one list that Options, the ops' parameters, their
// schema and the autograd's saved state are generated from (Python: KernelOptions in ops.py; a test checks
// that the two schemas agree). X(C++ type, name, schema type).
#define SSIMKD_FUSED_OPTIONS(X)  \
  X(int64_t, window_size, "int") \
  X(double, sigma, "float")      \
  X(double, c1, "float")         \
  X(double, c2, "float")         \
  X(int64_t, padding, "int")     \
  X(double, alpha, "float")      \
  X(double, beta, "float")       \
  X(double, gamma, "float")      \
  X(bool, clamp, "bool")         \
  X(bool, plane_sums, "bool")

// Expansions: ", int64_t window_size, double sigma, ..." (parameters); ", window_size, sigma, ..."
// (arguments); ", o.window_size, o.sigma, ..." (an Options o's fields as arguments); ", int64_t, double,
// ..." (a signature's types); "window_size, sigma, ...," (Options's initialiser); ", int window_size,
// float sigma, ..." (the schema).
#define SSIMKD_OPTION_PARAM(type, name, schema) , type name
#define SSIMKD_OPTION_ARG(type, name, schema) , name
#define SSIMKD_OPTION_MEMBER(type, name, schema) , o.name
#define SSIMKD_OPTION_TYPE(type, name, schema) , type
#define SSIMKD_OPTION_INIT(type, name, schema) name,
#define SSIMKD_OPTION_SCHEMA(type, name, schema) ", " schema " " #name

struct Options {
#define SSIMKD_OPTION_FIELD(type, name, schema) type name;
  SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_FIELD)
#undef SSIMKD_OPTION_FIELD
};

#define SSIMKD_OPTION_ONE(type, name, schema) +1
constexpr int kOptionCount = 0 SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_ONE);
#undef SSIMKD_OPTION_ONE

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "ssimkd: inputs must be float16, bfloat16, float32 or float64, got ", t);
  }
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t output_size(int64_t n, const Options& o) {
  return output_extent(n, int(o.window_size / 2), int(o.padding));
}

void check_inputs(at::TensorList xs, at::TensorList ys, at::TensorList x_affines, at::TensorList y_affines,
                  at::TensorList weights, at::ArrayRef<double> level_exponents, const Options& o) {
  TORCH_CHECK(!xs.empty(), "ssimkd: at least one level is required");
  TORCH_CHECK(xs.size() == ys.size(), "ssimkd: ", xs.size(), " student levels vs ", ys.size(), " teacher levels");
  TORCH_CHECK(o.window_size % 2 == 1 && o.window_size >= kMinWindow && o.window_size <= kMaxWindow,
              "ssimkd: window_size must be odd and in [", kMinWindow, ", ", kMaxWindow, "], got ", o.window_size);
  TORCH_CHECK(o.padding >= kReflect && o.padding <= kValid, "ssimkd: unknown padding code ", o.padding);
  TORCH_CHECK(o.sigma > 0, "ssimkd: sigma must be > 0, got ", o.sigma);
  const auto dtype = xs[0].scalar_type();
  const auto acc = accumulation_type(dtype);
  to_dtype(dtype);
  for (size_t l = 0; l < xs.size(); ++l) {
    const auto& x = xs[l];
    const auto& y = ys[l];
    TORCH_CHECK(x.dim() == 4 && y.dim() == 4, "ssimkd: level ", l, ": inputs must be (N, C, H, W), got ", x.sizes(),
                " and ", y.sizes());
    TORCH_CHECK(x.sizes() == y.sizes(), "ssimkd: level ", l, ": student ", x.sizes(), " vs teacher ", y.sizes());
    TORCH_CHECK(x.scalar_type() == dtype && y.scalar_type() == dtype, "ssimkd: level ", l,
                ": every level must have dtype ", dtype, ", got ", x.scalar_type(), " and ", y.scalar_type());
    TORCH_CHECK(x.device() == xs[0].device() && y.device() == xs[0].device(), "ssimkd: level ", l,
                ": every tensor must be on ", xs[0].device());
    if (o.padding == kValid) {
      TORCH_CHECK(x.size(2) >= o.window_size && x.size(3) >= o.window_size, "ssimkd: level ", l,
                  ": padding 'valid' needs planes of at least ", o.window_size, "x", o.window_size, ", got ", x.size(2),
                  "x", x.size(3));
    }
  }
  for (auto* affines : {&x_affines, &y_affines}) {
    if (affines->empty()) continue;
    TORCH_CHECK(affines->size() == xs.size(), "ssimkd: one affine per level is required");
    for (size_t l = 0; l < xs.size(); ++l) {
      const auto& af = (*affines)[l];
      TORCH_CHECK(af.dim() == 3 && af.size(0) == xs[l].size(0) && af.size(1) == xs[l].size(1) && af.size(2) == 2 &&
                      af.scalar_type() == acc && af.device() == xs[l].device(),
                  "ssimkd: level ", l, ": affine must be an (N, C, 2) ", acc, " tensor, got ", af.sizes(), " ",
                  af.scalar_type());
    }
  }
  TORCH_CHECK(level_exponents.empty() || level_exponents.size() == 3 * xs.size(),
              "ssimkd: level_exponents must be empty or (alpha, beta, gamma) per level: ", 3 * xs.size(),
              " values, got ", level_exponents.size());
  TORCH_CHECK(weights.empty() || weights.size() == xs.size(), "ssimkd: weights must be empty or one per level, got ",
              weights.size(), " for ", xs.size(), " levels");
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& w = weights[l];
    const auto& x = xs[l];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(0) && w.size(1) == x.size(1) &&
                    w.size(2) == output_size(x.size(2), o) && w.size(3) == output_size(x.size(3), o) &&
                    w.scalar_type() == acc && w.device() == x.device(),
                "ssimkd: level ", l, ": weights must be an ", acc, " tensor of the SSIM map's shape (", x.size(0), ", ",
                x.size(1), ", ", output_size(x.size(2), o), ", ", output_size(x.size(3), o), "), any strides, got ",
                w.sizes(), " ", w.scalar_type());
  }
}

void check_scales(at::ArrayRef<double> level_scales, at::ArrayRef<double> level_l1_scales, size_t levels) {
  TORCH_CHECK(level_scales.size() == levels, "ssimkd: one level scale per level is required: ", levels, " values, got ",
              level_scales.size());
  TORCH_CHECK(level_l1_scales.empty() || level_l1_scales.size() == levels,
              "ssimkd: level_l1_scales must be empty or one per level: ", levels, " values, got ",
              level_l1_scales.size());
}

// Where each level's losses start in level_losses, and their count at the end: one per level, or one
// per plane (n, c) of each level with plane_sums.
std::vector<int64_t> loss_offsets(at::TensorList xs, const Options& o) {
  std::vector<int64_t> offsets{0};
  for (const auto& x : xs) offsets.push_back(offsets.back() + (o.plane_sums ? x.size(0) * x.size(1) : 1));
  return offsets;
}

void copy_strides(const at::Tensor& t, int64_t* out) {
  for (int d = 0; d < 4; ++d) out[d] = t.stride(d);
}

void* ptr_or_null(const std::vector<at::Tensor>& v, size_t i) {
  return v.empty() ? nullptr : v[i].data_ptr();
}

// Fill the launch-wide fields and the tile geometry of levels [begin, end).
FusedArgs make_args(at::TensorList xs, at::TensorList ys, at::TensorList x_affines, at::TensorList y_affines,
                    at::TensorList weights, at::ArrayRef<double> level_exponents, const Options& o, size_t begin,
                    size_t end, TileShape tile) {
  FusedArgs a{};
  a.num_levels = int(end - begin);
  a.dtype = to_dtype(xs[0].scalar_type());
  a.window = int(o.window_size);
  a.radius = int(o.window_size / 2);
  a.padding = int(o.padding);
  a.tile_h = tile.h;
  a.tile_w = tile.w;
  gaussian_taps(a.window, o.sigma, a.taps);
  a.c1 = o.c1;
  a.c2 = o.c2;
  a.clamp = o.clamp;
  a.plane_sums = o.plane_sums;
  const std::vector<int64_t> offsets = loss_offsets(xs, o);
  int64_t tiles = 0;
  for (size_t l = begin; l < end; ++l) {
    LevelDesc& lv = a.levels[l - begin];
    const at::Tensor& x = xs[l];
    lv.x = x.data_ptr();
    lv.y = ys[l].data_ptr();
    copy_strides(x, lv.x_stride);
    copy_strides(ys[l], lv.y_stride);
    if (!x_affines.empty()) {
      lv.x_affine = x_affines[l].data_ptr();
      for (int d = 0; d < 3; ++d) lv.x_affine_stride[d] = x_affines[l].stride(d);
    }
    if (!y_affines.empty()) {
      lv.y_affine = y_affines[l].data_ptr();
      for (int d = 0; d < 3; ++d) lv.y_affine_stride[d] = y_affines[l].stride(d);
    }
    if (!weights.empty()) {
      lv.weight = weights[l].data_ptr();
      copy_strides(weights[l], lv.weight_stride);
    }
    lv.N = x.size(0);
    lv.C = x.size(1);
    lv.H = x.size(2);
    lv.W = x.size(3);
    lv.tiles_h = (lv.H + tile.h - 1) / tile.h;
    lv.tiles_w = (lv.W + tile.w - 1) / tile.w;
    lv.tile_begin = tiles;
    tiles += lv.N * lv.C * lv.tiles_h * lv.tiles_w;
    lv.loss_begin = offsets[l] - offsets[begin];  // within the launch's part of level_losses
    const bool own = !level_exponents.empty();    // else every level takes the options' exponents
    lv.alpha = own ? level_exponents[3 * l] : o.alpha;
    lv.beta = own ? level_exponents[3 * l + 1] : o.beta;
    lv.gamma = own ? level_exponents[3 * l + 2] : o.gamma;
  }
  a.total_tiles = tiles;
  return a;
}

// Which implementation a call runs: the tensors' own device's kernels, or (tests only) the CUDA
// kernels' code emulated on the host for CPU tensors.
enum class Target { kNative, kCudaEmulated };

TileShape tile_shape(const at::Tensor& x, Target target, bool backward) {
  const DType dtype = to_dtype(x.scalar_type());
  if (target == Target::kCudaEmulated) {
    TORCH_CHECK(x.is_cpu(), "ssimkd: the emulated CUDA kernels run on CPU tensors");
    return cuda_emulated_tile_shape(dtype);
  }
#ifdef SSIMKD_WITH_CUDA
  if (x.is_cuda()) return cuda_tile_shape(dtype);
#endif
  TORCH_CHECK(x.is_cpu(), "ssimkd: this build has no kernel for device ", x.device());
  return cpu_tile_shape(backward);
}

// A tensor as the CUDA emulation's bounds checks see it; `role` names it as the kernels do.
TensorExtent extent_of(const at::Tensor& t, const char* role, int64_t level = -1) {
  TORCH_CHECK(t.dim() <= 4, "ssimkd: emulated launches take tensors of at most 4 dims, got ", role, " ", t.sizes());
  TensorExtent e{};
  e.data = t.numel() == 0 ? nullptr : t.data_ptr();
  e.dim = int(t.dim());
  for (int d = 0; d < e.dim; ++d) {
    e.sizes[d] = t.size(d);
    e.strides[d] = t.stride(d);
  }
  e.element_size = int(t.element_size());
  e.role = role;
  e.level = level;
  return e;
}

// The inputs of levels [begin, end): x, y, their affines and the weights of m.
std::vector<TensorExtent> input_extents(at::TensorList xs, at::TensorList ys, at::TensorList x_affines,
                                        at::TensorList y_affines, at::TensorList weights, size_t begin, size_t end) {
  std::vector<TensorExtent> out;
  for (size_t l = begin; l < end; ++l) {
    out.push_back(extent_of(xs[l], "x", int64_t(l)));
    out.push_back(extent_of(ys[l], "y", int64_t(l)));
    if (!x_affines.empty()) out.push_back(extent_of(x_affines[l], "x_affine", int64_t(l)));
    if (!y_affines.empty()) out.push_back(extent_of(y_affines[l], "y_affine", int64_t(l)));
    if (!weights.empty()) out.push_back(extent_of(weights[l], "weight", int64_t(l)));
  }
  return out;
}

void launch(const FusedArgs& args, const at::Tensor& like, bool backward) {
#ifdef SSIMKD_WITH_CUDA
  if (like.is_cuda()) {
    void* stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
    backward ? ssim_bwd_cuda(args, stream) : ssim_fwd_cuda(args, stream);
    return;
  }
#endif
  backward ? ssim_bwd_cpu(args) : ssim_fwd_cpu(args);
}

template <Target target>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_ssim_fwd(
    at::TensorList xs, at::TensorList ys, at::TensorList x_affines, at::TensorList y_affines, at::TensorList weights,
    at::ArrayRef<double> level_scales, at::ArrayRef<double> level_l1_scales,
    at::ArrayRef<double> level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_PARAM), bool write_map) {
  const Options o{SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_INIT)};
  check_inputs(xs, ys, x_affines, y_affines, weights, level_exponents, o);
  check_scales(level_scales, level_l1_scales, xs.size());
  const c10::OptionalDeviceGuard guard(xs[0].device());
  const auto acc_opts = xs[0].options().dtype(accumulation_type(xs[0].scalar_type()));
  const std::vector<int64_t> offsets = loss_offsets(xs, o);
  at::Tensor losses = at::zeros({offsets.back()}, acc_opts);
  std::vector<at::Tensor> maps;
  if (write_map) {
    for (const auto& x : xs)
      maps.push_back(at::empty({x.size(0), x.size(1), output_size(x.size(2), o), output_size(x.size(3), o)}, acc_opts));
  }
  const TileShape tile = tile_shape(xs[0], target, false);
  for (size_t begin = 0; begin < xs.size(); begin += kMaxLevelsPerLaunch) {
    const size_t end = std::min(xs.size(), begin + kMaxLevelsPerLaunch);
    FusedArgs args = make_args(xs, ys, x_affines, y_affines, weights, level_exponents, o, begin, end, tile);
    for (size_t l = begin; l < end; ++l) {
      args.levels[l - begin].map = write_map ? maps[l].data_ptr() : nullptr;
      args.levels[l - begin].loss_scale = level_scales[l];
      args.levels[l - begin].l1_scale = level_l1_scales.empty() ? 0.0 : level_l1_scales[l];
    }
    at::Tensor partials = at::empty({args.total_tiles, 2}, acc_opts);
    args.tile_partials = partials.data_ptr();
    args.level_losses = static_cast<char*>(losses.data_ptr()) + offsets[begin] * losses.element_size();
    if constexpr (target == Target::kCudaEmulated) {
      std::vector<TensorExtent> tensors = input_extents(xs, ys, x_affines, y_affines, weights, begin, end);
      for (size_t l = begin; l < end && write_map; ++l) tensors.push_back(extent_of(maps[l], "map", int64_t(l)));
      tensors.push_back(extent_of(partials, "tile_partials"));
      tensors.push_back(extent_of(losses.narrow(0, offsets[begin], offsets[end] - offsets[begin]), "level_losses"));
      ssim_fwd_cuda_emulated(args, tensors);
    } else {
      launch(args, xs[0], false);
    }
  }
  return {losses, maps};
}

template <Target target>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
fused_ssim_bwd(const at::Tensor& grad_losses, at::TensorList grad_maps, at::TensorList xs, at::TensorList ys,
               at::TensorList x_affines, at::TensorList y_affines, at::TensorList weights,
               at::ArrayRef<double> level_scales, at::ArrayRef<double> level_l1_scales,
               at::ArrayRef<double> level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_PARAM), bool x_needs_grad,
               bool y_needs_grad) {
  const Options o{SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_INIT)};
  check_inputs(xs, ys, x_affines, y_affines, weights, level_exponents, o);
  check_scales(level_scales, level_l1_scales, xs.size());
  const auto acc = accumulation_type(xs[0].scalar_type());
  const std::vector<int64_t> offsets = loss_offsets(xs, o);
  TORCH_CHECK(grad_losses.dim() == 1 && grad_losses.size(0) == offsets.back() && grad_losses.scalar_type() == acc &&
                  grad_losses.device() == xs[0].device(),
              "ssimkd: grad_losses must be a (", offsets.back(), ",) ", acc, " tensor, got ", grad_losses.sizes());
  TORCH_CHECK(grad_maps.empty() || grad_maps.size() == xs.size(), "ssimkd: grad_maps must be empty or one per level");
  for (size_t l = 0; l < grad_maps.size(); ++l) {
    const auto& g = grad_maps[l];
    TORCH_CHECK(g.is_contiguous() && g.scalar_type() == acc && g.dim() == 4 && g.size(0) == xs[l].size(0) &&
                    g.size(1) == xs[l].size(1) && g.size(2) == output_size(xs[l].size(2), o) &&
                    g.size(3) == output_size(xs[l].size(3), o),
                "ssimkd: level ", l, ": grad_map must be a contiguous ", acc, " map of the SSIM map's shape, got ",
                g.sizes());
  }
  const c10::OptionalDeviceGuard guard(xs[0].device());
  const auto acc_opts = xs[0].options().dtype(acc);
  std::vector<at::Tensor> gxs, gys, gxa, gya;
  for (size_t l = 0; l < xs.size(); ++l) {
    if (x_needs_grad) gxs.push_back(at::empty_like(xs[l]));
    if (y_needs_grad) gys.push_back(at::empty_like(ys[l]));
    if (x_needs_grad && !x_affines.empty()) gxa.push_back(at::empty(x_affines[l].sizes(), acc_opts));
    if (y_needs_grad && !y_affines.empty()) gya.push_back(at::empty(y_affines[l].sizes(), acc_opts));
  }
  const TileShape tile = tile_shape(xs[0], target, true);
  const at::Tensor grad_losses_c = grad_losses.contiguous();
  for (size_t begin = 0; begin < xs.size(); begin += kMaxLevelsPerLaunch) {
    const size_t end = std::min(xs.size(), begin + kMaxLevelsPerLaunch);
    FusedArgs args = make_args(xs, ys, x_affines, y_affines, weights, level_exponents, o, begin, end, tile);
    for (size_t l = begin; l < end; ++l) {
      LevelDesc& lv = args.levels[l - begin];
      lv.grad_loss = static_cast<const char*>(grad_losses_c.data_ptr()) + offsets[l] * grad_losses_c.element_size();
      lv.loss_scale = level_scales[l];
      lv.l1_scale = level_l1_scales.empty() ? 0.0 : level_l1_scales[l];
      lv.grad_map = grad_maps.empty() ? nullptr : grad_maps[l].data_ptr();
      lv.gx = x_needs_grad ? gxs[l].data_ptr() : nullptr;
      lv.gy = y_needs_grad ? gys[l].data_ptr() : nullptr;
      if (x_needs_grad) copy_strides(gxs[l], lv.gx_stride);
      if (y_needs_grad) copy_strides(gys[l], lv.gy_stride);
      lv.g_x_affine = ptr_or_null(gxa, l);
      lv.g_y_affine = ptr_or_null(gya, l);
    }
    at::Tensor partials = at::empty({args.total_tiles, 4}, acc_opts);
    args.tile_partials = partials.data_ptr();
    if constexpr (target == Target::kCudaEmulated) {
      std::vector<TensorExtent> tensors = input_extents(xs, ys, x_affines, y_affines, weights, begin, end);
      for (size_t l = begin; l < end; ++l) {
        const auto level = int64_t(l);
        tensors.push_back(
            extent_of(grad_losses_c.narrow(0, offsets[l], offsets[l + 1] - offsets[l]), "grad_loss", level));
        if (!grad_maps.empty()) tensors.push_back(extent_of(grad_maps[l], "grad_map", level));
        if (x_needs_grad) tensors.push_back(extent_of(gxs[l], "gx", level));
        if (y_needs_grad) tensors.push_back(extent_of(gys[l], "gy", level));
        if (!gxa.empty()) tensors.push_back(extent_of(gxa[l], "g_x_affine", level));
        if (!gya.empty()) tensors.push_back(extent_of(gya[l], "g_y_affine", level));
      }
      tensors.push_back(extent_of(partials, "tile_partials"));
      ssim_bwd_cuda_emulated(args, tensors);
    } else {
      launch(args, xs[0], true);
    }
  }
  return {gxs, gys, gxa, gya};
}

template <Target target>
at::Tensor minmax_grad(const at::Tensor& x, const at::Tensor& low, const at::Tensor& high, const at::Tensor& g_low,
                       const at::Tensor& g_high, int64_t group) {
  TORCH_CHECK(x.dim() == 4, "ssimkd: minmax_grad: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(group >= kGroupSample && group <= kGroupPlane, "ssimkd: minmax_grad: unknown group ", group);
  const auto acc = accumulation_type(x.scalar_type());
  const int64_t groups = group_count(int(group), x.size(0), x.size(1));
  for (const at::Tensor* t : {&low, &high, &g_low, &g_high}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == groups && t->scalar_type() == acc && t->is_contiguous() &&
                    t->device() == x.device(),
                "ssimkd: minmax_grad: per-group tensors must be contiguous (", groups, ",) ", acc, ", got ", t->sizes(),
                " ", t->scalar_type());
  }
  const c10::OptionalDeviceGuard guard(x.device());
  at::Tensor grad = at::empty_like(x);
  at::Tensor counts = at::zeros({groups, 2}, x.options().dtype(at::kLong));
  MinMaxGradArgs a{};
  a.x = x.data_ptr();
  copy_strides(x, a.x_stride);
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.group = int(group);
  a.dtype = to_dtype(x.scalar_type());
  a.low = low.data_ptr();
  a.high = high.data_ptr();
  a.g_low = g_low.data_ptr();
  a.g_high = g_high.data_ptr();
  a.counts = counts.data_ptr();
  a.grad = grad.data_ptr();
  copy_strides(grad, a.grad_stride);
  if constexpr (target == Target::kCudaEmulated) {
    TORCH_CHECK(x.is_cpu(), "ssimkd: the emulated CUDA kernels run on CPU tensors");
    minmax_grad_cuda_emulated(
        a, {extent_of(x, "x"), extent_of(low, "low"), extent_of(high, "high"), extent_of(g_low, "g_low"),
            extent_of(g_high, "g_high"), extent_of(counts, "counts"), extent_of(grad, "grad")});
    return grad;
  }
#ifdef SSIMKD_WITH_CUDA
  if (x.is_cuda()) {
    minmax_grad_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    return grad;
  }
#endif
  TORCH_CHECK(x.is_cpu(), "ssimkd: minmax_grad: no kernel for device ", x.device());
  minmax_grad_cpu(a);
  return grad;
}

// A feature map, its (N, C, 2) affine and (groups, 2) bounds, as the normalisation kernels take them.
NormLevel norm_level(const at::Tensor& x, const at::Tensor& affine, const at::Tensor& bounds) {
  NormLevel lv{};
  lv.x = x.data_ptr();
  copy_strides(x, lv.x_stride);
  lv.N = x.size(0);
  lv.C = x.size(1);
  lv.H = x.size(2);
  lv.W = x.size(3);
  lv.affine = affine.data_ptr();
  lv.bounds = bounds.data_ptr();
  return lv;
}

// The min-max normalisation's per-plane affine for every feature map of a call in one pass (CPU):
// returns per map the (N, C, 2) affine (scale, offset) and the (groups, 2) bounds (min, max) that its
// backward needs. All maps share one dtype (loss.py promotes them first).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> minmax_affine(at::TensorList feats, int64_t group,
                                                                           double eps) {
  TORCH_CHECK(!feats.empty(), "ssimkd: minmax_affine: at least one feature map is required");
  TORCH_CHECK(group >= kGroupSample && group <= kGroupPlane, "ssimkd: minmax_affine: unknown group ", group);
  const auto dtype = feats[0].scalar_type();
  const auto acc_opts = feats[0].options().dtype(accumulation_type(dtype));
  std::vector<at::Tensor> affines, bounds;
  std::vector<NormLevel> levels(feats.size());
  for (size_t l = 0; l < feats.size(); ++l) {
    const at::Tensor& x = feats[l];
    TORCH_CHECK(x.dim() == 4 && x.scalar_type() == dtype && x.is_cpu(), "ssimkd: minmax_affine: map ", l,
                " must be a CPU (N, C, H, W) tensor of dtype ", dtype, ", got ", x.sizes(), " ", x.scalar_type());
    const int64_t groups = group_count(int(group), x.size(0), x.size(1));
    affines.push_back(at::empty({x.size(0), x.size(1), 2}, acc_opts));
    bounds.push_back(at::empty({groups, 2}, acc_opts));
    levels[l] = norm_level(x, affines.back(), bounds.back());
  }
  minmax_affine_cpu(levels.data(), int(levels.size()), to_dtype(dtype), int(group), eps);
  return {affines, bounds};
}

// dL/dx of each feature map through its affine, from dL/d(scale, offset) (grad_affines), the
// forward's affines and bounds: the bounds' gradient split among their ties, as torch.amin/amax do.
std::vector<at::Tensor> minmax_affine_bwd(at::TensorList grad_affines, at::TensorList feats, at::TensorList affines,
                                          at::TensorList bounds, int64_t group) {
  TORCH_CHECK(group >= kGroupSample && group <= kGroupPlane, "ssimkd: minmax_affine_bwd: unknown group ", group);
  TORCH_CHECK(grad_affines.size() == feats.size() && affines.size() == feats.size() && bounds.size() == feats.size(),
              "ssimkd: minmax_affine_bwd: one gradient, affine and bounds per feature map");
  std::vector<at::Tensor> grads;
  std::vector<NormLevel> levels(feats.size());
  for (size_t l = 0; l < feats.size(); ++l) {
    const at::Tensor& x = feats[l];
    const auto acc = accumulation_type(x.scalar_type());
    TORCH_CHECK(x.dim() == 4 && x.is_cpu() && x.scalar_type() == feats[0].scalar_type(),
                "ssimkd: minmax_affine_bwd: map ", l, " must be a CPU (N, C, H, W) tensor of dtype ",
                feats[0].scalar_type());
    for (const at::Tensor* t : {&grad_affines[l], &affines[l]}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == x.size(0) && t->size(1) == x.size(1) && t->size(2) == 2 &&
                      t->scalar_type() == acc && t->is_contiguous(),
                  "ssimkd: minmax_affine_bwd: map ", l, ": affines must be contiguous (N, C, 2) ", acc, ", got ",
                  t->sizes());
    }
    TORCH_CHECK(
        bounds[l].dim() == 2 && bounds[l].size(1) == 2 && bounds[l].scalar_type() == acc && bounds[l].is_contiguous(),
        "ssimkd: minmax_affine_bwd: map ", l, ": bounds must be contiguous (groups, 2) ", acc);
    grads.push_back(at::empty_like(x));
    NormLevel& lv = levels[l];
    lv = norm_level(x, affines[l], bounds[l]);
    lv.g_affine = grad_affines[l].data_ptr();
    lv.grad = grads.back().data_ptr();
    copy_strides(grads.back(), lv.grad_stride);
  }
  if (!feats.empty())
    minmax_affine_bwd_cpu(levels.data(), int(levels.size()), to_dtype(feats[0].scalar_type()), int(group));
  return grads;
}

// ------------------------------------------------------------------------------------------------
// Autograd: the fused forward saves its inputs only; the backward op recomputes everything
// ------------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSignature = std::tuple<at::Tensor, std::vector<at::Tensor>>(
    at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>,
    at::ArrayRef<double>, at::ArrayRef<double> SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_TYPE), bool);
using BwdSignature =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
        const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
        at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>,
        at::ArrayRef<double> SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_TYPE), bool, bool);

// Autograd saves its inputs with save_for_backward, which refuses tensors made under
// torch.inference_mode() (a teacher's features, typically) since they have no version counter. Such
// tensors are held aside in saved_data instead, with an empty slot in the saved list: no copy.
void save_inputs(AutogradContext* ctx, const variable_list& tensors) {
  variable_list saved;
  std::vector<at::Tensor> held;
  std::vector<int64_t> held_at;
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t.is_inference()) {
      held_at.push_back(int64_t(saved.size()));
      held.push_back(t);
      saved.emplace_back();
    } else {
      saved.push_back(t);
    }
  }
  ctx->save_for_backward(saved);
  ctx->saved_data["held"] = held;
  ctx->saved_data["held_at"] = held_at;
}

variable_list saved_inputs(AutogradContext* ctx) {
  variable_list saved = ctx->get_saved_variables();
  const std::vector<at::Tensor> held = ctx->saved_data["held"].toTensorVector();
  const std::vector<int64_t> held_at = ctx->saved_data["held_at"].toIntVector();
  for (size_t k = 0; k < held.size(); ++k) saved[size_t(held_at[k])] = held[k];
  return saved;
}

// The op pair an autograd Function runs below the autograd key (so the backend's kernel, or under
// torch.compile the fake kernel, does the work).
template <Target target>
struct FusedOps {
  static c10::TypedOperatorHandle<FwdSignature> forward() {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(
                target == Target::kNative ? "ssimkd::fused_ssim_fwd" : "ssimkd::fused_ssim_fwd_cuda_emulated", "")
            .typed<FwdSignature>();
    return op;
  }
  static c10::TypedOperatorHandle<BwdSignature> backward() {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(
                target == Target::kNative ? "ssimkd::fused_ssim_bwd" : "ssimkd::fused_ssim_bwd_cuda_emulated", "")
            .typed<BwdSignature>();
    return op;
  }
};

// Non-tensor arguments of fused_ssim_fwd after the five tensor lists: level_scales, level_l1_scales,
// level_exponents, the scalar options and write_map. Their gradient slots are empty, as the weights'
// (constants of the loss).
constexpr int kFwdNonTensorArgs = 3 + kOptionCount + 1;

template <Target target>
class FusedSsimFunction : public torch::autograd::Function<FusedSsimFunction<target>> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, at::TensorList ys, at::TensorList x_affines,
                               at::TensorList y_affines, at::TensorList weights, at::ArrayRef<double> level_scales,
                               at::ArrayRef<double> level_l1_scales,
                               at::ArrayRef<double> level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_PARAM),
                               bool write_map) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [losses, maps] =
        FusedOps<target>::forward().call(xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales,
                                         level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_ARG), write_map);
    ctx->saved_data["level_scales"] = level_scales.vec();
    ctx->saved_data["level_l1_scales"] = level_l1_scales.vec();
    ctx->saved_data["level_exponents"] = level_exponents.vec();
#define SSIMKD_SAVE_OPTION(type, name, schema) ctx->saved_data[#name] = name;
    SSIMKD_FUSED_OPTIONS(SSIMKD_SAVE_OPTION)
#undef SSIMKD_SAVE_OPTION
    ctx->saved_data["counts"] = std::vector<int64_t>{int64_t(xs.size()), int64_t(x_affines.size()),
                                                     int64_t(y_affines.size()), int64_t(weights.size())};
    ctx->saved_data["write_map"] = write_map;
    variable_list saved;
    for (at::TensorList list : {xs, ys, x_affines, y_affines, weights})
      saved.insert(saved.end(), list.begin(), list.end());
    save_inputs(ctx, saved);
    variable_list out{losses};
    out.insert(out.end(), maps.begin(), maps.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
#define SSIMKD_LOAD_OPTION(type, name, schema) ctx->saved_data[#name].to<type>(),
    const Options o{SSIMKD_FUSED_OPTIONS(SSIMKD_LOAD_OPTION)};
#undef SSIMKD_LOAD_OPTION
    const auto level_scales = ctx->saved_data["level_scales"].toDoubleVector();
    const auto level_l1_scales = ctx->saved_data["level_l1_scales"].toDoubleVector();
    const auto level_exponents = ctx->saved_data["level_exponents"].toDoubleVector();
    const bool write_map = ctx->saved_data["write_map"].toBool();
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const int64_t levels = counts[0], n_xa = counts[1], n_ya = counts[2], n_w = counts[3];
    const variable_list saved = saved_inputs(ctx);
    const at::TensorList xs(saved.data(), levels), ys(saved.data() + levels, levels);
    const at::TensorList x_affines(saved.data() + 2 * levels, n_xa), y_affines(saved.data() + 2 * levels + n_xa, n_ya);
    const at::TensorList weights(saved.data() + 2 * levels + n_xa + n_ya, n_w);
    auto any_needed = [&](int64_t first, int64_t count) {
      for (int64_t i = first; i < first + count; ++i)
        if (ctx->needs_input_grad(size_t(i))) return true;
      return false;
    };
    const bool x_needs = any_needed(0, levels) || any_needed(2 * levels, n_xa);
    const bool y_needs = any_needed(levels, levels) || any_needed(2 * levels + n_xa, n_ya);
    variable_list out(size_t(2 * levels + n_xa + n_ya + n_w + kFwdNonTensorArgs));
    if (!(x_needs || y_needs)) return out;

    const auto acc = accumulation_type(xs[0].scalar_type());
    const at::Tensor grad_losses = grads[0].to(acc).contiguous();
    std::vector<at::Tensor> grad_maps;
    if (write_map) {
      for (int64_t l = 0; l < levels; ++l) grad_maps.push_back(grads[1 + l].to(acc).contiguous());
    }
    auto [gxs, gys, gxa, gya] = FusedOps<target>::backward().call(
        grad_losses, grad_maps, xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales,
        level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_MEMBER), x_needs, y_needs);
    auto place = [&](const std::vector<at::Tensor>& computed, int64_t first) {
      for (size_t i = 0; i < computed.size(); ++i) out[first + i] = computed[i];
    };
    if (x_needs) {
      place(gxs, 0);
      place(gxa, 2 * levels);
    }
    if (y_needs) {
      place(gys, levels);
      place(gya, 2 * levels + n_xa);
    }
    return out;
  }
};

template <Target target>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_ssim_fwd_autograd(
    at::TensorList xs, at::TensorList ys, at::TensorList x_affines, at::TensorList y_affines, at::TensorList weights,
    at::ArrayRef<double> level_scales, at::ArrayRef<double> level_l1_scales,
    at::ArrayRef<double> level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_PARAM), bool write_map) {
  const variable_list out =
      FusedSsimFunction<target>::apply(xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales,
                                       level_exponents SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_ARG), write_map);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

using MinMaxAffineSignature = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(at::TensorList, int64_t,
                                                                                           double);
using MinMaxAffineBwdSignature = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                                         int64_t);

// The normalisation's affines: saves the maps, the affines and the bounds (not differentiable: they
// are returned only so the backward finds the exact min and max).
class MinMaxAffineFunction : public torch::autograd::Function<MinMaxAffineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList feats, int64_t group, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("ssimkd::minmax_affine", "").typed<MinMaxAffineSignature>();
    auto [affines, bounds] = op.call(feats, group, eps);
    variable_list saved(feats.begin(), feats.end());
    saved.insert(saved.end(), affines.begin(), affines.end());
    saved.insert(saved.end(), bounds.begin(), bounds.end());
    save_inputs(ctx, saved);
    // A map without gradient (the teacher's) gets an affine without one, so the fused backward does
    // not compute that side's gradient (ssim_kd_loss normalises student and teacher in one call).
    variable_list constant(bounds.begin(), bounds.end());
    for (size_t i = 0; i < feats.size(); ++i) {
      if (!feats[i].requires_grad()) constant.push_back(affines[i]);
    }
    ctx->mark_non_differentiable(constant);
    ctx->saved_data["group"] = group;
    variable_list out(affines.begin(), affines.end());
    out.insert(out.end(), bounds.begin(), bounds.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ssimkd::minmax_affine_bwd", "")
                               .typed<MinMaxAffineBwdSignature>();
    const variable_list saved = saved_inputs(ctx);
    const size_t count = saved.size() / 3;
    std::vector<at::Tensor> g_affines, feats, affines, bounds;
    std::vector<size_t> wanted;
    for (size_t i = 0; i < count; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      wanted.push_back(i);
      g_affines.push_back(grads[i].contiguous());
      feats.push_back(saved[i]);
      affines.push_back(saved[count + i]);
      bounds.push_back(saved[2 * count + i]);
    }
    variable_list out(count + 2);  // the maps, then group and eps
    if (wanted.empty()) return out;
    const std::vector<at::Tensor> computed =
        op.call(g_affines, feats, affines, bounds, ctx->saved_data["group"].toInt());
    for (size_t k = 0; k < wanted.size(); ++k) out[wanted[k]] = computed[k];
    return out;
  }
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> minmax_affine_autograd(at::TensorList feats, int64_t group,
                                                                                    double eps) {
  const variable_list out = MinMaxAffineFunction::apply(feats, group, eps);
  const size_t count = feats.size();
  return {std::vector<at::Tensor>(out.begin(), out.begin() + count),
          std::vector<at::Tensor>(out.begin() + count, out.end())};
}

void cuda_emulated_plant_bug_op(std::string bug, std::string site, int64_t value) {
  cuda_emulated_plant_bug(bug, site, value);
}

}  // namespace

// One schema for every implementation, after the op's name.
constexpr const char* kFwdSchema =
    "(Tensor[] xs, Tensor[] ys, Tensor[] x_affines, Tensor[] y_affines, Tensor[] weights, "
    "float[] level_scales, float[] level_l1_scales, float[] level_exponents" SSIMKD_FUSED_OPTIONS(
        SSIMKD_OPTION_SCHEMA) ", bool write_map) -> (Tensor, Tensor[])";
constexpr const char* kBwdSchema =
    "(Tensor grad_losses, Tensor[] grad_maps, Tensor[] xs, Tensor[] ys, Tensor[] x_affines, Tensor[] y_affines, "
    "Tensor[] weights, float[] level_scales, float[] level_l1_scales, float[] level_exponents" SSIMKD_FUSED_OPTIONS(SSIMKD_OPTION_SCHEMA) ", bool x_needs_grad, bool y_needs_grad) "
    "-> (Tensor[], Tensor[], Tensor[], Tensor[])";

TORCH_LIBRARY(ssimkd, m) {
  m.def((std::string("fused_ssim_fwd") + kFwdSchema).c_str());
  m.def((std::string("fused_ssim_bwd") + kBwdSchema).c_str());
  m.def((std::string("fused_ssim_fwd_cuda_emulated") + kFwdSchema).c_str());
  m.def((std::string("fused_ssim_bwd_cuda_emulated") + kBwdSchema).c_str());
  m.def("minmax_grad(Tensor x, Tensor low, Tensor high, Tensor g_low, Tensor g_high, int group) -> Tensor");
  m.def(
      "minmax_grad_cuda_emulated(Tensor x, Tensor low, Tensor high, Tensor g_low, Tensor g_high, int group) -> Tensor");
  // Tests of the emulation's checks only: plant a bug in later emulated launches; the barriers met.
  m.def("cuda_emulated_plant_bug(str bug, str site, int value) -> ()", &cuda_emulated_plant_bug_op);
  m.def("cuda_emulated_barrier_sites() -> str[]", &cuda_emulated_barrier_sites);
  m.def("minmax_affine(Tensor[] feats, int group, float eps) -> (Tensor[], Tensor[])");
  m.def(
      "minmax_affine_bwd(Tensor[] grad_affines, Tensor[] feats, Tensor[] affines, Tensor[] bounds, int group) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(ssimkd, CPU, m) {
  m.impl("fused_ssim_fwd", &fused_ssim_fwd<Target::kNative>);
  m.impl("fused_ssim_bwd", &fused_ssim_bwd<Target::kNative>);
  m.impl("fused_ssim_fwd_cuda_emulated", &fused_ssim_fwd<Target::kCudaEmulated>);
  m.impl("fused_ssim_bwd_cuda_emulated", &fused_ssim_bwd<Target::kCudaEmulated>);
  m.impl("minmax_grad", &minmax_grad<Target::kNative>);
  m.impl("minmax_grad_cuda_emulated", &minmax_grad<Target::kCudaEmulated>);
  m.impl("minmax_affine", &minmax_affine);
  m.impl("minmax_affine_bwd", &minmax_affine_bwd);
}

TORCH_LIBRARY_IMPL(ssimkd, Autograd, m) {
  m.impl("fused_ssim_fwd", &fused_ssim_fwd_autograd<Target::kNative>);
  m.impl("fused_ssim_fwd_cuda_emulated", &fused_ssim_fwd_autograd<Target::kCudaEmulated>);
  m.impl("minmax_affine", &minmax_affine_autograd);
}

#ifdef SSIMKD_WITH_CUDA
TORCH_LIBRARY_IMPL(ssimkd, CUDA, m) {
  m.impl("fused_ssim_fwd", &fused_ssim_fwd<Target::kNative>);
  m.impl("fused_ssim_bwd", &fused_ssim_bwd<Target::kNative>);
  m.impl("minmax_grad", &minmax_grad<Target::kNative>);
}
#endif

}  // namespace ssimkd

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(ssimkd::cpu_isa_name());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU op uses now: avx512, avx2 or baseline (SSIMKD_CPU_ISA caps it)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import ssimkd_kernels._C` loads this library, whose static initialisers register the ops above.
// CUDA_COMPILED says whether CUDA kernels were built in, cpu_isa() which instruction set the CPU op
// uses (`ssimkd info` reports both).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef SSIMKD_WITH_CUDA
  const long cuda_compiled = 1;
#else
  const long cuda_compiled = 0;
#endif
  if (module != nullptr) PyModule_AddIntConstant(module, "CUDA_COMPILED", cuda_compiled);
  return module;
}
