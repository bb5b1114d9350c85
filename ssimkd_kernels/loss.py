"""The public losses: ssim, ssim_map, ssim_kd_loss and the SSIMKDLoss module.

Every argument is validated here, once, before any kernel runs, with messages that name the argument,
the level and the shapes. Then the call goes to the reference (plain PyTorch) or to a fused op
(ops.py), which takes the min-max normalisation psi as a per-plane affine map applied on load:

    x-hat = (x - min) / (max - min + NORM_EPS) = scale * (x - offset),
    scale = 1 / (max - min + NORM_EPS), offset = min

(the offset form rather than scale * x + shift: it keeps x-hat exact where the range is tiny), so no
normalised copy of a feature map is written; autograd carries d scale, d offset into min/max.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from ._constants import (
    DEFAULT_DATA_RANGE,
    DEFAULT_K1,
    DEFAULT_K2,
    DEFAULT_SIGMA,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    MIN_WINDOW,
    NORMALIZE_MODES,
    PADDING_CODES,
    REDUCTIONS,
    RESIZE_MODES,
)
from .normalize import plane_affines
from .ops import KernelOptions, fused_ssim, resolve_backend

__all__ = ["ssim", "ssim_map", "ssim_kd_loss", "SSIMKDLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _check_window_options(window_size, sigma, data_range, k1, k2, padding, exponents) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be an int, got {type(window_size).__name__}")
    if window_size % 2 == 0 or not MIN_WINDOW <= window_size <= MAX_WINDOW:
        raise ValueError(f"window_size must be odd and in [{MIN_WINDOW}, {MAX_WINDOW}], got {window_size}")
    for name, value, low in (("sigma", sigma, 0.0), ("data_range", data_range, 0.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("k1", k1), ("k2", k2)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if padding not in PADDING_CODES:
        raise ValueError(f"padding must be one of {tuple(PADDING_CODES)}, got {padding!r}")
    if (
        not isinstance(exponents, Sequence)
        or len(exponents) != 3
        or not all(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in exponents)
    ):
        raise ValueError(f"exponents must be three finite numbers >= 0 (alpha, beta, gamma), got {exponents!r}")


def _as_levels(feats, name: str) -> tuple[list[str], list[Tensor]]:
    """(level names, tensors) of a Tensor, a sequence of Tensors or a dict of them."""
    if isinstance(feats, Tensor):
        return ["0"], [feats]
    if isinstance(feats, Mapping):
        names, tensors = [str(k) for k in feats], list(feats.values())
    elif isinstance(feats, Sequence) and not isinstance(feats, (str, bytes)):
        names, tensors = [str(i) for i in range(len(feats))], list(feats)
    else:
        raise TypeError(f"{name} must be a Tensor, a sequence of Tensors or a dict of them, got {type(feats).__name__}")
    if not tensors:
        raise ValueError(f"{name} is empty: give at least one feature level")
    for level, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"level {level!r}: {name} must hold Tensors, got {type(t).__name__}")
    return names, tensors


def _check_levels(student_feats, teacher_feats, window_size: int, padding: str, resize: str | None = None):
    """Validate a student/teacher pair of level collections; returns (names, students, teachers).

    resize="student": a student level whose (H, W) differs from its teacher's is resized to it
    (bilinear, as mmrazor's PKD resize_stu); otherwise differing shapes are an error.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    s_names, students = _as_levels(student_feats, "student_feats")
    t_names, teachers = _as_levels(teacher_feats, "teacher_feats")
    if len(students) != len(teachers):
        raise ValueError(f"student_feats has {len(students)} levels, teacher_feats has {len(teachers)}")
    if isinstance(student_feats, Mapping) and isinstance(teacher_feats, Mapping):
        if set(s_names) != set(t_names):
            raise ValueError(f"student_feats levels {s_names} vs teacher_feats levels {t_names}")
        teachers = [teacher_feats[k] for k in student_feats]
    device = students[0].device
    if resize == "student":
        students = [
            F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
            if s.dim() == 4 and t.dim() == 4 and s.shape[:2] == t.shape[:2] and s.shape[2:] != t.shape[2:]
            else s
            for s, t in zip(students, teachers)
        ]
    for level, s, t in zip(s_names, students, teachers):
        for role, f in (("student", s), ("teacher", t)):
            if f.dim() != 4:
                raise ValueError(f"level {level!r}: {role} must be (N, C, H, W), got shape {tuple(f.shape)}")
            if f.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"level {level!r}: {role} dtype {f.dtype} is not float16, bfloat16, float32 or float64")
            if f.numel() == 0:
                raise ValueError(f"level {level!r}: {role} is empty, shape {tuple(f.shape)}")
            if f.device != device:
                raise ValueError(f"level {level!r}: {role} is on {f.device}, level {s_names[0]!r} student on {device}")
        if s.shape != t.shape:
            hint = ""
            if s.shape[:2] == t.shape[:2]:
                hint = " (resize='student' resizes the student to the teacher's size)"
            raise ValueError(f"level {level!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}{hint}")
        if padding == "valid" and (s.shape[2] < window_size or s.shape[3] < window_size):
            raise ValueError(
                f"level {level!r}: padding 'valid' needs planes of at least {window_size}x{window_size}, "
                f"got {s.shape[2]}x{s.shape[3]}"
            )
    return s_names, students, teachers


def _autograd_safe(tensors: list[Tensor]) -> list[Tensor]:
    """The reference backend's inputs, usable in autograd: a tensor made under torch.inference_mode()
    (a teacher's features, say) cannot be saved for backward, so the reference works on a copy of it.
    The fused ops need no copy: their autograd holds such inputs aside (csrc/ops.cpp, ops.py)."""
    if torch.is_inference_mode_enabled():
        return tensors
    return [t.clone() if t.is_inference() else t for t in tensors]


def _kernel_options(window_size, sigma, data_range, k1, k2, padding, exponents, clamp) -> KernelOptions:
    alpha, beta, gamma = (float(e) for e in exponents)
    return KernelOptions(
        window_size=window_size,
        sigma=float(sigma),
        c1=float((k1 * data_range) ** 2),
        c2=float((k2 * data_range) ** 2),
        padding=PADDING_CODES[padding],
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        clamp=bool(clamp),
    )


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _output_count(shape: torch.Size, window_size: int, padding: str) -> int:
    n, c, h, w = shape
    return n * c * reference.output_extent(h, window_size, padding) * reference.output_extent(w, window_size, padding)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def ssim_map(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
    data_range: float = DEFAULT_DATA_RANGE,
    k1: float = DEFAULT_K1,
    k2: float = DEFAULT_K2,
    padding: str = "reflect",
    exponents: Sequence[float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
) -> Tensor:
    """Per-pixel SSIM of x against y with a Gaussian window, differentiable in both.

    SSIM = l^alpha c^beta s^gamma (default A1 A2 / (B1 B2)), SPEC section 2.

    Args:
        x, y: (N, C, H, W) floating tensors of the same shape, device and (after promotion) dtype.
        window_size: odd Gaussian window size in [3, 15]; sigma: its standard deviation.
        data_range: value range R of the inputs; C1 = (k1 R)^2, C2 = (k2 R)^2.
        padding: "reflect", "zero" or "valid" (only windows inside the plane; the map shrinks by 2r).
        exponents: (alpha, beta, gamma) of luminance, contrast and structure.
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Shape:
        (N, C, H, W) -> (N, C, H', W'), H' = H - 2 (window_size // 2) for "valid", else H.

    Returns:
        The SSIM map in float32 (float64 for float64 inputs).

    Example:
        >>> m = ssim_map(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    """
    return _ssim(x, y, window_size, sigma, data_range, k1, k2, padding, exponents, backend, reduction=None)


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
    data_range: float = DEFAULT_DATA_RANGE,
    k1: float = DEFAULT_K1,
    k2: float = DEFAULT_K2,
    padding: str = "reflect",
    exponents: Sequence[float] = (1.0, 1.0, 1.0),
    reduction: str = "mean",
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """SSIM of x against y reduced over the map, differentiable in both. Options as ssim_map.

    Args:
        reduction: "mean" (a scalar: the mean over N, C, H', W'), "sum" (the map's sum) or "none" (one
            mean per sample, shape (N,)).
        mask: optional weights of the SSIM map, (N, 1, H, W) (shared by the channels) or (N, C, H, W);
            for padding "valid" either the input's (H, W) (cropped to the valid windows) or the map's
            (H', W'). "mean" and "none" then give the weighted mean sum(w S) / sum(w), "sum" sum(w S).

    Example:
        >>> x = torch.rand(2, 3, 64, 64)
        >>> ssim(x, x)  # tensor(1.)
        >>> ssim(x, x, reduction="none")  # tensor([1., 1.])
    """
    return _ssim(
        x, y, window_size, sigma, data_range, k1, k2, padding, exponents, backend, reduction=reduction, mask=mask
    )


def _map_weights(mask: Tensor | None, x: Tensor, window_size: int, padding: str) -> Tensor | None:
    """The mask as weights of the SSIM map, (N, 1 or C, H', W'), in the accumulation dtype; validated."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor or None, got {type(mask).__name__}")
    n, c, h, w = x.shape
    out_h, out_w = reference.output_extent(h, window_size, padding), reference.output_extent(w, window_size, padding)
    if (
        mask.dim() != 4
        or mask.shape[0] != n
        or mask.shape[1] not in (1, c)
        or tuple(mask.shape[2:]) not in ((h, w), (out_h, out_w))
    ):
        raise ValueError(
            f"mask must be (N, 1, H, W) or (N, C, H, W) of the input {tuple(x.shape)}"
            + (f" or of the SSIM map ({out_h}, {out_w})" if (out_h, out_w) != (h, w) else "")
            + f", got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device}, the inputs on {x.device}")
    if mask.is_complex() or not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a floating or bool tensor, got {mask.dtype}")
    if tuple(mask.shape[2:]) != (out_h, out_w):  # valid padding, mask of the input's size
        r = window_size // 2
        mask = mask[:, :, r : h - r, r : w - r]
    return mask.to(_accumulation_dtype(x.dtype))


def _reduce_map(smap: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """A SSIM map reduced as `reduction` says, weighted by `weights` (broadcast over channels) when given."""
    dims = (1, 2, 3) if reduction == "none" else (0, 1, 2, 3)
    if weights is None:
        return smap.sum() if reduction == "sum" else smap.mean(dim=dims)
    total = (weights * smap).sum(dim=dims)
    return total if reduction == "sum" else total / weights.expand_as(smap).sum(dim=dims)


def _ssim(
    x,
    y,
    window_size,
    sigma,
    data_range,
    k1,
    k2,
    padding,
    exponents,
    backend,
    *,
    reduction: str | None,
    mask: Tensor | None = None,
) -> Tensor:
    """ssim (reduced as `reduction` says) and ssim_map (reduction None: the map), validated, on the chosen backend."""
    _check_window_options(window_size, sigma, data_range, k1, k2, padding, exponents)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _, (x,), (y,) = _check_levels(x, y, window_size, padding)
    dtype = _common_dtype([x, y])  # every backend: x float32 with y float64 runs (and returns) float64
    x, y = x.to(dtype), y.to(dtype)
    weights = _map_weights(mask, x, window_size, padding)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        x, y = _autograd_safe([x, y])
        smap = reference.ssim_map_reference(
            x,
            y,
            window_size=window_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
            padding=padding,
            exponents=tuple(exponents),
        )
        return smap if reduction is None else _reduce_map(smap, weights, reduction)
    options = _kernel_options(window_size, sigma, data_range, k1, k2, padding, exponents, clamp=False)
    if weights is None and reduction in ("mean", "sum"):
        count = _output_count(x.shape, window_size, padding)
        mean = fused_means(chosen, [x], [y], options, [count])[0]
        return mean if reduction == "mean" else mean * count
    if weights is None and reduction == "none":  # the op's per-plane means (no map), averaged per sample
        per_plane = _output_count(x[:1, :1].shape, window_size, padding)
        return fused_means(chosen, [x], [y], options, [per_plane], per_plane=True).view(x.shape[:2]).mean(dim=1)
    if weights is not None and reduction is not None and not weights.requires_grad:
        return _masked_fused(chosen, x, y, weights, options, reduction)
    # the map itself, or a mask that wants its own gradient: the map, weighted by torch
    _, maps = fused_ssim(chosen, [x], [y], [], [], [0.0], options, write_map=True)
    return maps[0] if reduction is None else _reduce_map(maps[0], weights, reduction)


def _masked_fused(backend: str, x: Tensor, y: Tensor, weights: Tensor, options: KernelOptions, reduction: str):
    """ssim with a mask, the mask weighting m inside the fused op (no SSIM map written): the op gives
    sum(w m), m = (1 - S) / 2 (per plane for reduction "none"), so sum(w S) = sum(w) - 2 sum(w m). The
    mask is a constant of the loss (a mask that needs a gradient takes the map)."""
    weights = weights.expand(x.shape[0], x.shape[1], *weights.shape[2:])  # a view: channels share a mask
    per_plane = reduction == "none"
    options = dataclasses.replace(options, plane_sums=per_plane)
    weighted_m, _ = fused_ssim(backend, [x], [y], [], [], [1.0], options, weights=[weights])
    if per_plane:
        weighted_m = weighted_m.view(x.shape[:2]).sum(dim=1)
    total_weight = weights.sum(dim=(1, 2, 3)) if per_plane else weights.sum().reshape(1)
    weighted_ssim = total_weight - 2.0 * weighted_m
    if reduction == "sum":
        return weighted_ssim[0]
    mean = weighted_ssim / total_weight
    return mean if reduction == "none" else mean[0]


def fused_means(
    backend: str,
    xs: list[Tensor],
    ys: list[Tensor],
    options: KernelOptions,
    counts: list[int],
    *,
    per_plane: bool = False,
    level_exponents: list[tuple[float, float, float]] | None = None,
) -> Tensor:
    """Mean SSIM of each pair (xs[i], ys[i]) over its counts[i] map pixels, by the fused op with each pair
    as one of its levels: the op reduces every level to one sum and writes no map. per_plane: the mean
    of each plane (n, c) of each level instead (counts[i]: the pixels of one plane of level i), level
    by level, n-major. level_exponents: each level's (alpha, beta, gamma) instead of the options'.
    Unclamped (options.clamp False), the op's per-pixel loss is m = (1 - S) / 2, so mean S = 1 - 2 mean m."""
    if options.clamp:
        raise ValueError("fused_means needs clamp=False: a clamped loss does not give back the mean SSIM")
    options = dataclasses.replace(options, plane_sums=per_plane)
    losses, _ = fused_ssim(backend, xs, ys, [], [], [1.0 / c for c in counts], options, level_exponents=level_exponents)
    return 1.0 - 2.0 * losses


def ssim_kd_loss(
    student_feats,
    teacher_feats,
    *,
    normalize: str = "sample",
    padding: str = "reflect",
    exponents: Sequence[float] = (1.0, 1.0, 1.0),
    clamp: bool = True,
    level_weights: Sequence[float] | None = None,
    resize: str | None = None,
    backend: str = "auto",
    window_size: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
    data_range: float = DEFAULT_DATA_RANGE,
    k1: float = DEFAULT_K1,
    k2: float = DEFAULT_K2,
) -> Tensor:
    """The SSIM feature-distillation loss of de Rijk & Schneider (NeurIPS 2022):

        L = sum over levels l of w_l * mean_{n,c,h,w} (1 - SSIM(psi(F_S), psi(F_T))) / 2

    Args:
        student_feats, teacher_feats: a Tensor, a sequence of Tensors or a dict of them (FPN outputs),
            each (N, C, H, W) and of its partner's shape. Gradients flow into both where they require it.
        normalize: min-max normalisation psi over "sample" (C, H, W of one sample; the default, free of
            coupling between samples), "level" (the whole level), "plane" (per sample and channel)
            or "none".
        padding, exponents, window_size, sigma, data_range, k1, k2: as ssim_map.
        clamp: clamp the per-pixel loss to [0, 1] (gradient 0 where clamped).
        level_weights: w_l, one per level (default all 1).
        resize: None (student and teacher levels must match in shape) or "student": a student level of
            another (H, W) is resized bilinearly to its teacher's (mmrazor PKD's resize_stu).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        A scalar float32 tensor (float64 for float64 inputs).

    Example:
        >>> student = [torch.randn(2, 256, 32, 32, requires_grad=True), torch.randn(2, 256, 16, 16)]
        >>> teacher = [torch.randn(2, 256, 32, 32), torch.randn(2, 256, 16, 16)]
        >>> ssim_kd_loss(student, teacher).backward()
    """
    _check_window_options(window_size, sigma, data_range, k1, k2, padding, exponents)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {type(clamp).__name__}")
    names, students, teachers = _check_levels(student_feats, teacher_feats, window_size, padding, resize)
    if level_weights is None:
        weights = [1.0] * len(students)
    else:
        weights = [float(w) for w in level_weights]
        if len(weights) != len(students) or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"level_weights must be {len(students)} finite numbers (one per level), got {level_weights!r}"
            )

    chosen = resolve_backend(backend, students[0].device)
    if chosen == "reference":
        return reference.ssim_kd_loss_reference(
            _autograd_safe(students),
            _autograd_safe(teachers),
            normalize=normalize,
            padding=padding,
            exponents=tuple(exponents),
            clamp=clamp,
            level_weights=weights,
            window_size=window_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
        )
    dtype = _common_dtype(students + teachers)
    students = [s.to(dtype) for s in students]
    teachers = [t.to(dtype) for t in teachers]
    x_affines = y_affines = []
    if normalize != "none":
        affines = plane_affines(students + teachers, normalize)
        x_affines, y_affines = affines[: len(students)], affines[len(students) :]
    scales = [w / _output_count(s.shape, window_size, padding) for w, s in zip(weights, students)]
    options = _kernel_options(window_size, sigma, data_range, k1, k2, padding, exponents, clamp)
    losses, _ = fused_ssim(chosen, students, teachers, x_affines, y_affines, scales, options)
    return losses.sum()


class SSIMKDLoss(nn.Module):
    """SSIM feature-distillation loss as a module: loss_weight * ssim_kd_loss(phi(student), teacher).

    phi is a 1x1 convolution on the student (the paper's optional adapter), built when ``adapter=True``
    or when student and teacher channel counts differ: one adapter shared by every level when the
    channels are single ints and ``num_levels`` is not given (as RetinaNet shares its heads across FPN
    levels), else one per level.

    Args:
        loss_weight: lambda, the weight of the feature loss in the total loss.
        student_channels, teacher_channels: channels of each level, an int (same on every level) or
            one int per level; needed only for adapters.
        adapter: always put a 1x1 conv adapter on the student.
        num_levels: number of levels: with single-int channels, one adapter per level instead of a
            shared one.
        **loss_options: any keyword option of ssim_kd_loss (normalize, padding, exponents, clamp,
            level_weights, resize, backend, window_size, sigma, data_range, k1, k2).

    Shape:
        forward(student_feats, teacher_feats): Tensors, sequences or dicts of (N, C, H, W) levels -> scalar.

    Example:
        >>> criterion = SSIMKDLoss(loss_weight=1.0, student_channels=128, teacher_channels=256)  # one shared adapter
        >>> loss = criterion(student_fpn, teacher_fpn)
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        student_channels: int | Sequence[int] | None = None,
        teacher_channels: int | Sequence[int] | None = None,
        adapter: bool = False,
        num_levels: int | None = None,
        **loss_options,
    ):
        super().__init__()
        unknown = set(loss_options) - {
            "normalize",
            "padding",
            "exponents",
            "clamp",
            "level_weights",
            "resize",
            "backend",
            "window_size",
            "sigma",
            "data_range",
            "k1",
            "k2",
        }
        if unknown:
            raise TypeError(f"SSIMKDLoss got unknown options {sorted(unknown)}")
        self.loss_weight = float(loss_weight)
        self.loss_options = dict(loss_options)
        self.adapters, self.shared_adapter = self._build_adapters(
            student_channels, teacher_channels, adapter, num_levels
        )

    @staticmethod
    def _build_adapters(student_channels, teacher_channels, adapter, num_levels) -> tuple[nn.ModuleList | None, bool]:
        """The 1x1 adapters phi and whether one is shared by every level.

        Single-int channels without num_levels: one adapter shared by every level (as RetinaNet shares
        its heads across FPN levels). num_levels or per-level channel lists: one adapter per level.
        """

        def per_level(channels, name):
            if channels is None or isinstance(channels, int):
                return channels
            if isinstance(channels, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
                return [int(c) for c in channels]
            raise TypeError(f"{name} must be an int or a sequence of ints (one per level), got {channels!r}")

        s_ch = per_level(student_channels, "student_channels")
        t_ch = per_level(teacher_channels, "teacher_channels")
        lengths = {len(c) for c in (s_ch, t_ch) if isinstance(c, list)}
        if num_levels is not None:
            lengths.add(int(num_levels))
        if len(lengths) > 1:
            raise ValueError(
                f"student_channels {student_channels!r}, teacher_channels {teacher_channels!r} and num_levels "
                f"{num_levels!r} disagree on the number of levels"
            )
        differ = s_ch is not None and t_ch is not None and s_ch != t_ch
        if not (adapter or differ):
            return None, False
        if s_ch is None or t_ch is None:
            raise ValueError("adapters need student_channels and teacher_channels")
        if not lengths:  # single ints, no level count: one adapter for every level
            return nn.ModuleList([nn.Conv2d(s_ch, t_ch, kernel_size=1)]), True
        levels = lengths.pop()
        s_list = s_ch if isinstance(s_ch, list) else [s_ch] * levels
        t_list = t_ch if isinstance(t_ch, list) else [t_ch] * levels
        return nn.ModuleList(nn.Conv2d(s, t, kernel_size=1) for s, t in zip(s_list, t_list)), False

    def forward(self, student_feats, teacher_feats) -> Tensor:
        if self.adapters is not None:
            names, students = _as_levels(student_feats, "student_feats")
            if self.shared_adapter:
                adapted = [self.adapters[0](s) for s in students]
            else:
                if len(students) != len(self.adapters):
                    raise ValueError(
                        f"student_feats has {len(students)} levels, the adapters were built for {len(self.adapters)}"
                    )
                adapted = [adapter(s) for adapter, s in zip(self.adapters, students)]
            student_feats = dict(zip(names, adapted)) if isinstance(student_feats, Mapping) else adapted
        return self.loss_weight * ssim_kd_loss(student_feats, teacher_feats, **self.loss_options)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, " + ", ".join(f"{k}={v!r}" for k, v in self.loss_options.items())
