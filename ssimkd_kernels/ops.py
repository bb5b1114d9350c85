"""The fused SSIM-KD ops: registration, fake kernels, autograd, and the choice of backend.

Two pairs of torch.library custom ops share one schema:

    ssimkd::fused_ssim_fwd(xs, ys, x_affines, y_affines, level_scales, <options>, write_map)
        -> (level_losses, maps)
    ssimkd::fused_ssim_bwd(grad_losses, grad_maps, xs, ys, x_affines, y_affines, level_scales, <options>,
                           x_needs_grad, y_needs_grad) -> (gxs, gys, g_x_affines, g_y_affines)

defined in C++ (csrc/ops.cpp: CPU, and CUDA when compiled) and, with the suffix ``_triton``, here
(kernels in triton_kernels.py). ``level_losses[l]`` is ``level_scales[l]`` times the sum over level l
of the per-pixel loss m = (1 - S) / 2 (clamped when asked): with 1 / (N C H' W') it is the level's
mean, so no host-side tensor of weights is ever copied to the device. ``maps`` are the SSIM maps,
written only when ``write_map``.
``x_affines[l]`` is an (N, C, 2) tensor of (scale, offset), any strides (broadcast views welcome):
x-hat = scale * (x - offset) per plane (empty list: identity). The backward takes dL/d level_losses
and dL/d maps and recomputes everything from the inputs: nothing but the inputs is saved.

Autograd: the C++ ops register theirs in C++ (csrc/ops.cpp), the Triton pair here; fake kernels of
all of them are here. The min-max normalisation's statistics are ssimkd::minmax_affine on the CPU
(one op for every map; autograd in C++) and GroupMinMax elsewhere (see plane_affines).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ._constants import BACKENDS, NORM_EPS, NORMALIZE_DIMS, PADDING_CODES

EMULATED_CUDA = "cuda_emulated"

try:
    from . import _C  # noqa: F401  (loading it registers the C++ ops)

    CUDA_COMPILED = bool(_C.CUDA_COMPILED)
    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # a source checkout without a build: the reference still works
    _C = None
    CUDA_COMPILED = False
    EXTENSION_ERROR = error


def cpu_isa() -> str | None:
    """The instruction set the cpu backend's kernels use now: "avx512", "avx2" or "baseline" (None
    without the extension). The environment variable SSIMKD_CPU_ISA caps it, read at every launch."""
    return None if _C is None else _C.cpu_isa()


@dataclass(frozen=True)
class KernelOptions:
    """Scalar options of one fused call, in the order of the op schema."""

    window_size: int
    sigma: float
    c1: float
    c2: float
    padding: int  # PADDING_CODES
    alpha: float
    beta: float
    gamma: float
    clamp: bool

    def as_args(self) -> tuple:
        return (
            self.window_size,
            self.sigma,
            self.c1,
            self.c2,
            self.padding,
            self.alpha,
            self.beta,
            self.gamma,
            self.clamp,
        )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_extent(n, window_size: int, padding: int):
    return n - 2 * (window_size // 2) if padding == PADDING_CODES["valid"] else n


# ------------------------------------------------------------------------------------------------
# Triton ops (the C++ ops are defined by csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("ssimkd::fused_ssim_fwd_triton", mutates_args=())
def _fused_ssim_fwd_triton(
    xs: list[Tensor],
    ys: list[Tensor],
    x_affines: list[Tensor],
    y_affines: list[Tensor],
    level_scales: list[float],
    window_size: int,
    sigma: float,
    c1: float,
    c2: float,
    padding: int,
    alpha: float,
    beta: float,
    gamma: float,
    clamp: bool,
    write_map: bool,
) -> tuple[Tensor, list[Tensor]]:
    from .triton_kernels import ssim_fwd_triton

    options = KernelOptions(window_size, sigma, c1, c2, padding, alpha, beta, gamma, clamp)
    return ssim_fwd_triton(xs, ys, x_affines, y_affines, level_scales, options, write_map)


@torch.library.custom_op("ssimkd::fused_ssim_bwd_triton", mutates_args=())
def _fused_ssim_bwd_triton(
    grad_losses: Tensor,
    grad_maps: list[Tensor],
    xs: list[Tensor],
    ys: list[Tensor],
    x_affines: list[Tensor],
    y_affines: list[Tensor],
    level_scales: list[float],
    window_size: int,
    sigma: float,
    c1: float,
    c2: float,
    padding: int,
    alpha: float,
    beta: float,
    gamma: float,
    clamp: bool,
    x_needs_grad: bool,
    y_needs_grad: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    from .triton_kernels import ssim_bwd_triton

    options = KernelOptions(window_size, sigma, c1, c2, padding, alpha, beta, gamma, clamp)
    return ssim_bwd_triton(
        grad_losses, grad_maps, xs, ys, x_affines, y_affines, level_scales, options, x_needs_grad, y_needs_grad
    )


# ------------------------------------------------------------------------------------------------
# Fake kernels: exactly what the kernels return
# ------------------------------------------------------------------------------------------------


def _fwd_fake(xs, ys, x_affines, y_affines, level_scales, window_size, sigma, c1, c2, padding, alpha, beta, gamma, clamp, write_map):
    torch._check(len(xs) > 0 and len(xs) == len(ys), lambda: "ssimkd: one teacher level per student level")
    acc = _accumulation_dtype(xs[0].dtype)
    losses = xs[0].new_empty((len(xs),), dtype=acc)
    maps = []
    if write_map:
        for x in xs:
            h = _output_extent(x.shape[2], window_size, padding)
            w = _output_extent(x.shape[3], window_size, padding)
            maps.append(x.new_empty((x.shape[0], x.shape[1], h, w), dtype=acc))
    return losses, maps


def _bwd_fake(grad_losses, grad_maps, xs, ys, x_affines, y_affines, level_scales, window_size, sigma, c1, c2, padding, alpha, beta,
              gamma, clamp, x_needs_grad, y_needs_grad):
    gxs = [torch.empty_like(x) for x in xs] if x_needs_grad else []
    gys = [torch.empty_like(y) for y in ys] if y_needs_grad else []
    gxa = [a.new_empty(a.shape) for a in x_affines] if x_needs_grad else []
    gya = [a.new_empty(a.shape) for a in y_affines] if y_needs_grad else []
    return gxs, gys, gxa, gya


_OP_PAIRS = {"triton": ("ssimkd::fused_ssim_fwd_triton", "ssimkd::fused_ssim_bwd_triton")}
if _C is not None:
    _OP_PAIRS["cpu"] = _OP_PAIRS["cuda"] = ("ssimkd::fused_ssim_fwd", "ssimkd::fused_ssim_bwd")
    # Test-only: the CUDA kernels' block code compiled for the host and run on CPU tensors, one block
    # and one thread at a time (csrc/ssim_cuda_emulated.cpp). Not a user backend: it is slow.
    _OP_PAIRS[EMULATED_CUDA] = ("ssimkd::fused_ssim_fwd_cuda_emulated", "ssimkd::fused_ssim_bwd_cuda_emulated")


def _op(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


# ------------------------------------------------------------------------------------------------
# Autograd of the Triton ops (the C++ ops have theirs in csrc/ops.cpp): save the inputs only, recompute
# in the backward op
# ------------------------------------------------------------------------------------------------


def _make_autograd(bwd_name: str):
    def setup_context(ctx, inputs, output):
        xs, ys, x_affines, y_affines, level_scales = inputs[:5]
        ctx.level_scales = level_scales
        ctx.options = inputs[5:14]
        ctx.write_map = inputs[14]
        ctx.counts = (len(xs), len(x_affines), len(y_affines))
        ctx.save_for_backward(*xs, *ys, *x_affines, *y_affines)

    def backward(ctx, grad_losses, grad_maps):
        levels, n_xa, n_ya = ctx.counts
        saved = ctx.saved_tensors
        xs, ys = list(saved[:levels]), list(saved[levels : 2 * levels])
        x_affines = list(saved[2 * levels : 2 * levels + n_xa])
        y_affines = list(saved[2 * levels + n_xa :])
        needs = ctx.needs_input_grad
        x_needs = any(needs[0]) or any(needs[2])
        y_needs = any(needs[1]) or any(needs[3])
        none = (None,) * 11  # level_scales, the scalar options and write_map
        if not (x_needs or y_needs):
            return ([None] * levels, [None] * levels, [None] * n_xa, [None] * n_ya) + none

        acc = _accumulation_dtype(xs[0].dtype)
        if grad_losses is None:
            grad_losses = xs[0].new_zeros((levels,), dtype=acc)
        grad_maps = list(grad_maps) if ctx.write_map else []
        if all(g is None for g in grad_maps):
            grad_maps = []
        else:
            grad_maps = [
                torch.zeros(_map_shape(x, ctx.options), dtype=acc, device=x.device)
                if g is None
                else g.to(acc).contiguous()
                for g, x in zip(grad_maps, xs)
            ]
        gxs, gys, gxa, gya = _op(bwd_name)(
            grad_losses.to(acc).contiguous(),
            grad_maps,
            xs,
            ys,
            x_affines,
            y_affines,
            ctx.level_scales,
            *ctx.options,
            x_needs,
            y_needs,
        )

        def per_input(grads, count, needed):
            return list(grads) if needed else [None] * count

        return (
            per_input(gxs, levels, x_needs),
            per_input(gys, levels, y_needs),
            per_input(gxa, n_xa, x_needs),
            per_input(gya, n_ya, y_needs),
        ) + none

    return setup_context, backward


def _map_shape(x: Tensor, options: tuple) -> tuple[int, int, int, int]:
    """Shape of the SSIM map of level x under the schema's scalar options."""
    window_size, padding = options[0], options[4]
    return (x.shape[0], x.shape[1], _output_extent(x.shape[2], window_size, padding),
            _output_extent(x.shape[3], window_size, padding))


for _fwd_name, _bwd_name in set(_OP_PAIRS.values()):
    torch.library.register_fake(_fwd_name)(_fwd_fake)
    torch.library.register_fake(_bwd_name)(_bwd_fake)
# The C++ ops' autograd is registered in C++ (csrc/ops.cpp); the Triton pair's here.
_setup, _backward = _make_autograd(_OP_PAIRS["triton"][1])
torch.library.register_autograd(_OP_PAIRS["triton"][0], _backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# The min-max normalisation's statistics, with a fused gradient
# ------------------------------------------------------------------------------------------------

_GROUP_CODES = {"sample": 0, "level": 1, "plane": 2}  # Group in csrc/ssim_params.h


def _group_minmax(feat: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-group min and max of a feature map, flattened to (groups,), in the accumulation dtype.

    Groups: one per sample ("sample"), one for the level ("level"), one per plane ("plane"). On GPUs,
    one aminmax pass where the group is a contiguous run of memory; elsewhere amin and amax (torch's
    CPU aminmax over a dim is not vectorised: ~25x slower than the two passes).
    """
    acc = _accumulation_dtype(feat.dtype)
    dims = NORMALIZE_DIMS[mode]
    if feat.is_contiguous() and feat.device.type == "cuda":
        groups = math.prod(s for d, s in enumerate(feat.shape) if d not in dims)
        low, high = torch.aminmax(feat.reshape(groups, -1), dim=1)
    else:
        low, high = feat.amin(dim=dims).reshape(-1), feat.amax(dim=dims).reshape(-1)
    return low.to(acc), high.to(acc)


@torch.library.register_fake("ssimkd::minmax_grad")
def _minmax_grad_fake(x, low, high, g_low, g_high, group):
    return torch.empty_like(x)


def _minmax_grad_eager(x, low, high, g_low, g_high, mode) -> Tensor:
    """minmax_grad in plain PyTorch, for devices the extension was not built for."""
    dims = NORMALIZE_DIMS[mode]
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]  # the bounds, broadcast against x
    grad = 0.0
    for bound, g in ((low, g_low), (high, g_high)):
        ties = x.to(bound.dtype) == bound.view(shape)
        grad = grad + ties * (g.view(shape) / ties.sum(dim=dims, keepdim=True))
    return grad.to(x.dtype)


class GroupMinMax(torch.autograd.Function):
    """(low, high) = per-group min and max of a feature map; backward splits dL/dlow and dL/dhigh
    evenly among the ties, as torch.amin/amax do, in one fused op (csrc: minmax_grad) instead of the
    ~8 elementwise passes of autograd through amin and amax."""

    @staticmethod
    def forward(ctx, feat: Tensor, mode: str):
        low, high = _group_minmax(feat, mode)
        ctx.save_for_backward(feat, low, high)
        ctx.mode = mode
        return low, high

    @staticmethod
    def backward(ctx, g_low, g_high):
        feat, low, high = ctx.saved_tensors
        g_low = torch.zeros_like(low) if g_low is None else g_low.to(low.dtype).contiguous()
        g_high = torch.zeros_like(high) if g_high is None else g_high.to(high.dtype).contiguous()
        native = _C is not None and (feat.device.type == "cpu" or (feat.device.type == "cuda" and CUDA_COMPILED))
        if native:
            grad = torch.ops.ssimkd.minmax_grad(feat, low, high, g_low, g_high, _GROUP_CODES[ctx.mode])
        else:
            grad = _minmax_grad_eager(feat, low, high, g_low, g_high, ctx.mode)
        return grad, None


def plane_affines(feats: list[Tensor], mode: str) -> list[Tensor]:
    """Per-plane (scale, offset) of the min-max normalisation of each feature map, (N, C, 2) each,
    differentiable: x-hat = scale * (x - offset), scale = 1 / (max - min + NORM_EPS), offset = min,
    min and max over the group of planes `mode` names ("sample", "level" or "plane").

    On the CPU one op does every map (ssimkd::minmax_affine: one pass, one autograd node, one fused
    backward). Elsewhere: one min/max pass per map (GroupMinMax, whose backward is one fused op) and
    the formula once over all maps together; each result is a broadcast view, which the fused ops read
    in place.
    """
    if _C is not None and feats[0].device.type == "cpu":
        affines, _ = torch.ops.ssimkd.minmax_affine(feats, _GROUP_CODES[mode], NORM_EPS)
        return list(affines)
    lows, highs = zip(*(GroupMinMax.apply(f, mode) for f in feats))
    low, high = torch.cat(lows), torch.cat(highs)
    scale = 1.0 / (high - low + NORM_EPS)
    packed = torch.stack([scale, low], dim=-1)
    keep = {"sample": lambda n, c: (n, 1), "level": lambda n, c: (1, 1), "plane": lambda n, c: (n, c)}[mode]
    sizes = [math.prod(keep(*f.shape[:2])) for f in feats]
    return [
        part.view(*keep(*f.shape[:2]), 2).expand(f.shape[0], f.shape[1], 2)
        for part, f in zip(packed.split(sizes), feats)
    ]


def _group_count(code: int, n: int, c: int) -> int:
    return {_GROUP_CODES["sample"]: n, _GROUP_CODES["level"]: 1, _GROUP_CODES["plane"]: n * c}[code]


if _C is not None:

    @torch.library.register_fake("ssimkd::minmax_affine")
    def _minmax_affine_fake(feats, group, eps):
        acc = _accumulation_dtype(feats[0].dtype)
        affines = [f.new_empty((f.shape[0], f.shape[1], 2), dtype=acc) for f in feats]
        bounds = [f.new_empty((_group_count(group, f.shape[0], f.shape[1]), 2), dtype=acc) for f in feats]
        return affines, bounds

    @torch.library.register_fake("ssimkd::minmax_affine_bwd")
    def _minmax_affine_bwd_fake(grad_affines, feats, affines, bounds, group):
        return [torch.empty_like(f) for f in feats]


# ------------------------------------------------------------------------------------------------
# Backend choice
# ------------------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends that can run here, of "reference", "cpu", "triton", "cuda".

    "cpu" needs the compiled extension; "cuda" an extension built with CUDA kernels and a GPU;
    "triton" the triton package and a GPU (or TRITON_INTERPRET=1, which runs it on CPU tensors).
    """
    found = ["reference"]
    if _C is not None:
        found.append("cpu")
    if _triton_importable() and (torch.cuda.is_available() or _triton_interpreted()):
        found.append("triton")
    if CUDA_COMPILED and torch.cuda.is_available():
        found.append("cuda")
    return found


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`; raises when `backend` cannot run there.

    "auto": the SSIMKD_BACKEND environment variable when set, else cuda -> triton on GPU tensors and
    cpu -> reference on CPU tensors, by what is available.
    """
    if backend == "auto":
        forced = os.environ.get("SSIMKD_BACKEND", "")
        if forced and forced != "auto":
            backend = forced
        else:
            available = available_backends()
            order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
            return next((b for b in order if b in available), "reference")
    if backend == EMULATED_CUDA and EMULATED_CUDA in _OP_PAIRS:
        if device.type != "cpu":
            raise ValueError(f"backend {EMULATED_CUDA!r} (tests only) runs on CPU tensors, got tensors on {device}")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend not in available_backends():
        reason = {
            "cpu": f"the C++ extension did not load ({EXTENSION_ERROR})",
            "cuda": "it needs an extension built with CUDA kernels and a CUDA device",
            "triton": "it needs triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)",
        }[backend]
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError(f"backend 'triton' runs on CUDA tensors (or with TRITON_INTERPRET=1), got tensors on {device}")
    return backend


def fused_ssim(
    backend: str,
    xs: list[Tensor],
    ys: list[Tensor],
    x_affines: list[Tensor],
    y_affines: list[Tensor],
    level_scales: list[float],
    options: KernelOptions,
    write_map: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Run the fused forward of `backend` ("cpu", "cuda" or "triton"), differentiable.

    Returns (level_losses, maps): level_scales[l] times the sum of m over level l, and the SSIM
    maps when write_map.
    """
    fwd_name, _ = _OP_PAIRS[backend]
    return _op(fwd_name)(xs, ys, x_affines, y_affines, level_scales, *options.as_args(), write_map)
