"""The min-max normalisation of feature maps (SPEC: normalize="sample" | "level" | "plane"), as per-plane
affines that the fused SSIM ops apply on the fly: x-hat = scale * (x - offset).

    plane_affines(feats, mode)   (N, C, 2) (scale, offset) per map, differentiable
    GroupMinMax                  per-group min and max with a fused tie-splitting backward

Ops of the C++ extension (csrc: the minmax kernels): ssimkd::minmax_affine / minmax_affine_bwd (the CPU:
every map in one pass, autograd in C++) and ssimkd::minmax_grad (GroupMinMax's backward on CPU and
CUDA). Their fake kernels are here, beside their callers.
"""

import math

import torch
from torch import Tensor

from . import _extension
from ._constants import NORM_EPS, NORMALIZE_DIMS
from .ops import _accumulation_dtype, _has_extension, native_fake, save_inputs, saved_inputs

__all__ = ["plane_affines", "GroupMinMax"]


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


@native_fake("ssimkd::minmax_grad", "ssimkd::minmax_grad_cuda_emulated")  # the latter: its CUDA kernels emulated
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
        save_inputs(ctx, [feat, low, high])
        ctx.mode = mode
        return low, high

    @staticmethod
    def backward(ctx, g_low, g_high):
        feat, low, high = saved_inputs(ctx)
        g_low = torch.zeros_like(low) if g_low is None else g_low.to(low.dtype).contiguous()
        g_high = torch.zeros_like(high) if g_high is None else g_high.to(high.dtype).contiguous()
        ext = _extension.loaded()  # the forward resolved the backend: loaded by then if it can be
        if ext is not None and (feat.device.type == "cpu" or (feat.device.type == "cuda" and ext.gpu_kernels)):
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
    if feats[0].device.type == "cpu" and _has_extension():
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


@native_fake("ssimkd::minmax_affine")
def _minmax_affine_fake(feats, group, eps):
    acc = _accumulation_dtype(feats[0].dtype)
    affines = [f.new_empty((f.shape[0], f.shape[1], 2), dtype=acc) for f in feats]
    bounds = [f.new_empty((_group_count(group, f.shape[0], f.shape[1]), 2), dtype=acc) for f in feats]
    return affines, bounds


@native_fake("ssimkd::minmax_affine_bwd")
def _minmax_affine_bwd_fake(grad_affines, feats, affines, bounds, group):
    return [torch.empty_like(f) for f in feats]
