"""The fused SSIM-KD ops: registration, fake kernels, autograd, and the choice of backend.

Two pairs of torch.library custom ops share one schema:

    ssimkd::fused_ssim_fwd(xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales,
                           level_exponents, <options>, write_map) -> (level_losses, maps)
    ssimkd::fused_ssim_bwd(grad_losses, grad_maps, xs, ys, x_affines, y_affines, weights, level_scales,
                           level_l1_scales, level_exponents, <options>, x_needs_grad, y_needs_grad)
        -> (gxs, gys, g_x_affines, g_y_affines)

defined in C++ (csrc/ops.cpp: CPU, and CUDA when compiled) and, with the suffix ``_triton``, here
(kernels in triton_kernels.py). ``level_losses[l]`` is ``level_scales[l]`` times the sum over level l
(or, with the option ``plane_sums``, one entry per plane (n, c) of each level, levels in order) of
w m, m = (1 - S) / 2 the per-pixel loss (clamped when asked) and w the pixel's weight: weights[l]
(N, C, H', W') in the accumulation dtype, any strides (a mask expanded over channels is a view), or
1 everywhere when ``weights`` is empty. With 1 / (N C H' W') and no weights it is the level's mean, so
no host-side tensor of weights is ever copied to the device. The weights are constants (no gradient).
``level_l1_scales`` (empty: none) adds an L1 term in the same pass: level_l1_scales[l] times the sum of
|x-hat - y-hat| over every pixel of the level (or plane), whatever the padding (l1_ssim_loss).
``level_exponents``: (alpha, beta, gamma) of each level, flat (MS-SSIM's c s scales take (0, 1, 1), its
coarsest (1, 1, 1)); empty: every level takes the options' alpha, beta, gamma. ``maps`` are the SSIM
maps, written only when ``write_map``.
``x_affines[l]`` is an (N, C, 2) tensor of (scale, offset), any strides (broadcast views welcome):
x-hat = scale * (x - offset) per plane (empty list: identity). The backward takes dL/d level_losses
and dL/d maps and recomputes everything from the inputs: nothing but the inputs is saved.

Autograd: the C++ ops register theirs in C++ (csrc/ops.cpp), the Triton pair here; fake kernels of
all of them are here. The min-max normalisation's ops live in normalize.py.
"""

# No `from __future__ import annotations`: torch 2.4's custom_op reads the annotations as objects.
import os
import re
import sys
import warnings
from dataclasses import dataclass, fields
from typing import List, Tuple  # noqa: UP035 (torch 2.4, see the Triton ops)

import torch
from torch import Tensor

from . import _extension
from ._constants import BACKENDS, MIN_TRITON_VERSION
from .reference import output_extent

EMULATED_CUDA = "cuda_emulated"


def cpu_isa() -> str | None:
    """The instruction set the cpu backend's kernels use now: "avx512", "avx2" or "baseline" (None while
    no extension is loaded; this never compiles one). SSIMKD_CPU_ISA caps it, read at every launch."""
    ext = _native_extension(build=False)
    return None if ext is None else ext.module.cpu_isa()


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
    plane_sums: bool = False  # one loss per plane (n, c) of each level, not one per level

    def as_args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


# Where the options sit among the ops' arguments: fwd (xs, ys, x_affines, y_affines, weights,
# level_scales, level_l1_scales, level_exponents, <options>, write_map); bwd (grad_losses, grad_maps,
# <the same>, x_needs_grad, y_needs_grad).
_OPTION_COUNT = len(fields(KernelOptions))
_FWD_OPTIONS = slice(8, 8 + _OPTION_COUNT)
# level_scales, _l1_scales and _exponents, the options, write_map: no gradients
_FWD_NON_TENSOR_ARGS = 3 + _OPTION_COUNT + 1


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Triton ops (the C++ ops are defined by csrc/ops.cpp). typing's List and Tuple: torch 2.4's schema
# inference does not know list[...] and tuple[...].
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("ssimkd::fused_ssim_fwd_triton", mutates_args=())
def _fused_ssim_fwd_triton(
    xs: List[Tensor],
    ys: List[Tensor],
    x_affines: List[Tensor],
    y_affines: List[Tensor],
    weights: List[Tensor],
    level_scales: List[float],
    level_l1_scales: List[float],
    level_exponents: List[float],
    window_size: int,
    sigma: float,
    c1: float,
    c2: float,
    padding: int,
    alpha: float,
    beta: float,
    gamma: float,
    clamp: bool,
    plane_sums: bool,
    write_map: bool,
) -> Tuple[Tensor, List[Tensor]]:
    from .triton_kernels import ssim_fwd_triton

    options = KernelOptions(window_size, sigma, c1, c2, padding, alpha, beta, gamma, clamp, plane_sums)
    return ssim_fwd_triton(
        xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales, level_exponents, options, write_map
    )


@torch.library.custom_op("ssimkd::fused_ssim_bwd_triton", mutates_args=())
def _fused_ssim_bwd_triton(
    grad_losses: Tensor,
    grad_maps: List[Tensor],
    xs: List[Tensor],
    ys: List[Tensor],
    x_affines: List[Tensor],
    y_affines: List[Tensor],
    weights: List[Tensor],
    level_scales: List[float],
    level_l1_scales: List[float],
    level_exponents: List[float],
    window_size: int,
    sigma: float,
    c1: float,
    c2: float,
    padding: int,
    alpha: float,
    beta: float,
    gamma: float,
    clamp: bool,
    plane_sums: bool,
    x_needs_grad: bool,
    y_needs_grad: bool,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    from .triton_kernels import ssim_bwd_triton

    options = KernelOptions(window_size, sigma, c1, c2, padding, alpha, beta, gamma, clamp, plane_sums)
    return ssim_bwd_triton(
        grad_losses,
        grad_maps,
        xs,
        ys,
        x_affines,
        y_affines,
        weights,
        level_scales,
        level_l1_scales,
        level_exponents,
        options,
        x_needs_grad,
        y_needs_grad,
    )


# ------------------------------------------------------------------------------------------------
# Fake kernels: exactly what the kernels return
# ------------------------------------------------------------------------------------------------


# Both take the op's arguments in schema order; the scalar options (KernelOptions) sit after level_exponents.
def _fwd_fake(
    xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales, level_exponents, *options_and_write_map
):
    options, write_map = KernelOptions(*options_and_write_map[:_OPTION_COUNT]), options_and_write_map[_OPTION_COUNT]
    torch._check(len(xs) > 0 and len(xs) == len(ys), lambda: "ssimkd: one teacher level per student level")
    acc = _accumulation_dtype(xs[0].dtype)
    losses = xs[0].new_empty((_loss_count(xs, options),), dtype=acc)
    maps = []
    if write_map:
        for x in xs:
            h = output_extent(x.shape[2], options.window_size, options.padding)
            w = output_extent(x.shape[3], options.window_size, options.padding)
            maps.append(x.new_empty((x.shape[0], x.shape[1], h, w), dtype=acc))
    return losses, maps


def _loss_count(xs, options: KernelOptions) -> int:
    """Entries of level_losses: one per level, or one per plane of each level with plane_sums."""
    return sum(x.shape[0] * x.shape[1] for x in xs) if options.plane_sums else len(xs)


def _bwd_fake(
    grad_losses,
    grad_maps,
    xs,
    ys,
    x_affines,
    y_affines,
    weights,
    level_scales,
    level_l1_scales,
    level_exponents,
    *options_and_needs,
):
    x_needs_grad, y_needs_grad = options_and_needs[_OPTION_COUNT:]
    gxs = [torch.empty_like(x) for x in xs] if x_needs_grad else []
    gys = [torch.empty_like(y) for y in ys] if y_needs_grad else []
    gxa = [a.new_empty(a.shape) for a in x_affines] if x_needs_grad else []
    gya = [a.new_empty(a.shape) for a in y_affines] if y_needs_grad else []
    return gxs, gys, gxa, gya


_OP_PAIRS = {
    "triton": ("ssimkd::fused_ssim_fwd_triton", "ssimkd::fused_ssim_bwd_triton"),
    # Defined by the C++ extension: they exist once it is loaded (_native_extension).
    "cpu": ("ssimkd::fused_ssim_fwd", "ssimkd::fused_ssim_bwd"),
    "cuda": ("ssimkd::fused_ssim_fwd", "ssimkd::fused_ssim_bwd"),
    # Test-only: the CUDA kernels' block code compiled for the host and run on CPU tensors, every thread
    # of every block, with race, bounds, initialisation and barrier checks (csrc/ssim_cuda_emulated.cpp).
    # Not a user backend: it is slow.
    EMULATED_CUDA: ("ssimkd::fused_ssim_fwd_cuda_emulated", "ssimkd::fused_ssim_bwd_cuda_emulated"),
}


def save_inputs(ctx, tensors: list[Tensor]) -> None:
    """ctx.save_for_backward, except for tensors made under torch.inference_mode() (a teacher's
    features, typically), which it refuses: those are held on ctx as they are (no copy); an inference
    tensor cannot be modified in place outside inference mode, so it needs no version check."""
    ctx.held = {i: t for i, t in enumerate(tensors) if t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.held else t for i, t in enumerate(tensors)))


def saved_inputs(ctx) -> list[Tensor]:
    """The tensors given to save_inputs, in order."""
    return [ctx.held.get(i, t) for i, t in enumerate(ctx.saved_tensors)]


def _op(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


# ------------------------------------------------------------------------------------------------
# Autograd of the Triton ops (the C++ ops have theirs in csrc/ops.cpp): save the inputs only, recompute
# in the backward op
# ------------------------------------------------------------------------------------------------


def _make_autograd(bwd_name: str):
    def setup_context(ctx, inputs, output):
        xs, ys, x_affines, y_affines, weights, level_scales, level_l1_scales, level_exponents = inputs[:8]
        ctx.level_scales = level_scales
        ctx.level_l1_scales = level_l1_scales
        ctx.level_exponents = level_exponents
        ctx.options = inputs[_FWD_OPTIONS]
        ctx.write_map = inputs[_FWD_OPTIONS.stop]
        ctx.counts = (len(xs), len(x_affines), len(y_affines), len(weights))
        save_inputs(ctx, [*xs, *ys, *x_affines, *y_affines, *weights])

    def backward(ctx, grad_losses, grad_maps):
        levels, n_xa, n_ya, n_w = ctx.counts
        saved = saved_inputs(ctx)
        xs, ys = list(saved[:levels]), list(saved[levels : 2 * levels])
        x_affines = list(saved[2 * levels : 2 * levels + n_xa])
        y_affines = list(saved[2 * levels + n_xa : 2 * levels + n_xa + n_ya])
        weights = list(saved[2 * levels + n_xa + n_ya :])
        needs = ctx.needs_input_grad
        x_needs = any(needs[0]) or any(needs[2])
        y_needs = any(needs[1]) or any(needs[3])

        # No gradients for the weights (constants) and the non-tensor arguments; autograd wants an empty
        # float list (level_l1_scales, level_exponents when not given) answered by an empty list, a
        # non-empty one by None.
        def empty_or_none(values):
            return [] if not values else None

        none = (
            [None] * n_w,
            None,
            empty_or_none(ctx.level_l1_scales),
            empty_or_none(ctx.level_exponents),
        ) + (None,) * (_FWD_NON_TENSOR_ARGS - 3)
        if not (x_needs or y_needs):
            return ([None] * levels, [None] * levels, [None] * n_xa, [None] * n_ya) + none

        acc = _accumulation_dtype(xs[0].dtype)
        if grad_losses is None:
            grad_losses = xs[0].new_zeros((_loss_count(xs, KernelOptions(*ctx.options)),), dtype=acc)
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
            weights,
            ctx.level_scales,
            ctx.level_l1_scales,
            ctx.level_exponents,
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
    return (
        x.shape[0],
        x.shape[1],
        output_extent(x.shape[2], window_size, padding),
        output_extent(x.shape[3], window_size, padding),
    )


torch.library.register_fake(_OP_PAIRS["triton"][0])(_fwd_fake)
torch.library.register_fake(_OP_PAIRS["triton"][1])(_bwd_fake)
# The C++ ops' autograd is registered in C++ (csrc/ops.cpp); the Triton pair's here.
_setup, _backward = _make_autograd(_OP_PAIRS["triton"][1])
torch.library.register_autograd(_OP_PAIRS["triton"][0], _backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# The C++ extension: loaded (or compiled) on first need, its ops' fakes registered then
# ------------------------------------------------------------------------------------------------

# The fake kernels of the extension's ops, registered when the library loads (the ops exist only then).
_NATIVE_FAKES = {
    _OP_PAIRS["cpu"][0]: _fwd_fake,
    _OP_PAIRS["cpu"][1]: _bwd_fake,
    _OP_PAIRS[EMULATED_CUDA][0]: _fwd_fake,
    _OP_PAIRS[EMULATED_CUDA][1]: _bwd_fake,
}
_native_fakes_registered = False


def native_fake(*names: str):
    """Decorator: `fn` is the fake kernel of the extension's ops `names` (other modules' ops, e.g. the
    min-max normalisation's, keep their fakes beside them and register them through this)."""

    def register(fn):
        for name in names:
            _NATIVE_FAKES[name] = fn
            if _native_fakes_registered:
                torch.library.register_fake(name)(fn)
        return fn

    return register


def _caller_stacklevel() -> int:
    """The warnings stacklevel, seen from the caller of this function, of the first frame outside this
    package and torch: the user's line that asked for a backend."""
    package = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((package, torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


def _native_extension(build: bool = True) -> _extension.Extension | None:
    """The C++ extension, loaded on first call (compiled first when build and none fits this torch),
    with the fake kernels of its ops registered; None when there is none (a failed build warns once)."""
    global _native_fakes_registered
    ext = _extension.loaded()
    if ext is not None and _native_fakes_registered:
        return ext
    ext = _extension.load(build=build)
    if ext is None:
        notice = _extension.take_notice()
        if notice:
            remaining = [b for b in BACKENDS if b not in ("cpu", "cuda") and _unavailable(b) is None]
            warnings.warn(
                f"ssimkd_kernels: {notice}. Backends that remain: {', '.join(remaining)}",
                _extension.ExtensionWarning,
                stacklevel=_caller_stacklevel(),
            )
        return None
    if not _native_fakes_registered:
        _native_fakes_registered = True
        for name, fake in _NATIVE_FAKES.items():  # the ops exist only now that the library is loaded
            torch.library.register_fake(name)(fake)
    return ext


# ------------------------------------------------------------------------------------------------
# Backend choice
# ------------------------------------------------------------------------------------------------


def _triton_version() -> tuple[int, ...] | None:
    """The installed triton's (major, minor), or None without triton."""
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])


@torch.compiler.assume_constant_result  # torch 2.4's dynamo cannot trace os.environ.get of a missing name
def _environment(name: str) -> str:
    return os.environ.get(name, "")


def _triton_interpreted() -> bool:
    return _environment("TRITON_INTERPRET") == "1"


# _has_extension and _why_unavailable are run, not traced, by torch.compile, their answers constants of the
# graph: they may load or compile the extension (file and import work that dynamo cannot trace), and
# their answers do not change once given.
@torch.compiler.assume_constant_result
def _has_extension() -> bool:
    return _native_extension() is not None


def _unavailable(backend: str, build: bool = True) -> str | None:
    """Why `backend` cannot run here, or None when it can. build=False: report without compiling the
    extension (`ssimkd info`)."""
    return _why_unavailable(backend, build)


@torch.compiler.assume_constant_result  # (no default arguments: torch 2.4's dynamo binds them wrongly)
def _why_unavailable(backend: str, build: bool) -> str | None:
    if backend in ("reference", "auto"):
        return None
    if backend == "triton":
        version = _triton_version()
        if version is None:
            return "the triton package is not installed"
        if version < MIN_TRITON_VERSION:
            have, need = ".".join(map(str, version)), ".".join(map(str, MIN_TRITON_VERSION))
            return f"triton {have} is older than the kernels need (>= {need})"
        if not (torch.cuda.is_available() or _triton_interpreted()):
            return "it needs a CUDA device (or TRITON_INTERPRET=1, which runs it on CPU tensors)"
        return None
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    # ROCm's torch reports its GPUs as "cuda"; first-use builds compile no HIP kernels, so only an
    # extension built ahead there can have them: do not compile one just to find that out.
    ext = _native_extension(build=build and not (backend == "cuda" and torch.version.hip))
    if ext is None:
        return f"the C++ extension is not available: {_extension.reason()}"
    if backend == EMULATED_CUDA or backend == "cpu":
        return None
    if not ext.gpu_kernels:
        return f"the C++ extension ({ext.path}) was built without GPU kernels"
    arch_list = (ext.record or {}).get("cuda_arch_list")
    if torch.version.cuda and arch_list:
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            if not _extension.covers(arch_list, capability):
                return (
                    f"the extension's CUDA kernels are built for {arch_list}, and GPU {index} has compute "
                    f"capability {capability[0]}.{capability[1]} (rebuild with TORCH_CUDA_ARCH_LIST set)"
                )
    return None


def available_backends() -> list[str]:
    """The backends that can run here, of "reference", "cpu", "triton", "cuda".

    "cpu" needs the C++ extension (compiled on the first call here when none was built for this torch,
    unless SSIMKD_NO_JIT=1); "cuda" an extension with GPU kernels for the GPUs here; "triton" the triton
    package and a GPU (or TRITON_INTERPRET=1, which runs it on CPU tensors).
    """
    return [b for b in BACKENDS if _unavailable(b) is None]


def backend_report(build: bool = False) -> dict[str, dict]:
    """{backend: {"available": bool, "reason": why not or None}} for every backend (`ssimkd info`)."""
    report = {}
    for backend in BACKENDS:
        why = _unavailable(backend, build=build)
        report[backend] = {"available": why is None, "reason": why}
    return report


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`; raises when `backend` cannot run there.

    "auto": the SSIMKD_BACKEND environment variable when set, else cuda -> triton on GPU tensors (ROCm's
    too), cpu -> reference on CPU tensors, and the reference on any other device (mps, xpu, ...).
    """
    if backend == "auto":
        forced = _environment("SSIMKD_BACKEND")
        if forced and forced != "auto":
            backend = forced
        else:
            order = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
            for candidate in order:  # a loop, not next(generator, default): torch 2.4's dynamo lacks that
                if _unavailable(candidate) is None:
                    return candidate
            return "reference"
    if backend == EMULATED_CUDA:
        why = _unavailable(EMULATED_CUDA)
        if why is not None:
            raise RuntimeError(f"backend {EMULATED_CUDA!r} is not available: {why}")
        if device.type != "cpu":
            raise ValueError(f"backend {EMULATED_CUDA!r} (tests only) runs on CPU tensors, got tensors on {device}")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    why = _unavailable(backend)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
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
    weights: list[Tensor] | None = None,
    level_exponents: list[tuple[float, float, float]] | None = None,
    level_l1_scales: list[float] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run the fused forward of `backend` ("cpu", "cuda" or "triton"), differentiable in xs, ys and the
    affines.

    Returns (level_losses, maps): level_scales[l] times the sum of w m over level l (or over each of its
    planes with options.plane_sums; w: weights[l], the SSIM map's per-pixel weights, constants; 1
    without weights), plus level_l1_scales[l] times the sum of |x-hat - y-hat| over every pixel of the
    level (or of each plane) when given, and the SSIM maps when write_map. level_exponents: (alpha, beta, gamma)
    per level, instead of the options' for all.
    """
    fwd_name, _ = _OP_PAIRS[backend]
    exponents = [float(e) for triple in level_exponents or () for e in triple]
    l1_scales = [float(s) for s in level_l1_scales or ()]
    return _op(fwd_name)(
        xs, ys, x_affines, y_affines, weights or [], level_scales, l1_scales, exponents, *options.as_args(), write_map
    )
