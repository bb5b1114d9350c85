"""Image losses on the fused SSIM ops, as their users call them elsewhere.

    fused_ssim(img1, img2, padding="same", train=True)    fused-ssim's call and numbers (3DGS trainers)
    l1_ssim_loss(x, y, ssim_weight=0.2)                   (1 - w) mean|x - y| + w (1 - SSIM), the 3DGS loss
    ms_ssim(x, y, data_range=1.0, weights=None)           pytorch-msssim's MS-SSIM
    MSSSIMLoss(...)                                       1 - ms_ssim, as a module

Every one runs on every backend ("auto": the fused op of the tensors' device), with gradients for both
images, any strides, float16/bfloat16/float32 (and float64 on reference and cpu) inputs and float32
statistics. Conventions that differ between the packages (padding names, data_range defaults) are
listed in the README ("Coming from ...").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import reference
from ._constants import DEFAULT_K1, DEFAULT_K2, DEFAULT_SIGMA, DEFAULT_WINDOW, MS_SSIM_WEIGHTS, REDUCTIONS
from .loss import (
    _check_levels,
    _check_window_options,
    _common_dtype,
    _kernel_options,
    _output_count,
    fused_means,
    ssim,
    ssim_map,
)
from .ops import fused_ssim as fused_ssim_op
from .ops import resolve_backend

__all__ = ["fused_ssim", "l1_ssim_loss", "ms_ssim", "MSSSIMLoss"]

# fused-ssim's padding names: "same" keeps the image size with zero padding, "valid" only windows inside.
_FUSED_SSIM_PADDING = {"same": "zero", "valid": "valid"}


def fused_ssim(
    img1: Tensor, img2: Tensor, padding: str = "same", train: bool = True, *, backend: str = "auto"
) -> Tensor:
    """Mean SSIM of img1 against img2 with fused-ssim's call and numbers: an 11x11 Gaussian window of
    sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 (data range 1), padding "same" (zeros outside the image) or
    "valid" (only windows inside it).

    Unlike fused-ssim, gradients flow into both images, and every backend runs it.

    Args:
        img1, img2: (N, C, H, W) images of the same shape.
        padding: "same" or "valid".
        train: False runs without autograd (nothing is saved for a backward).
        backend: as ssim.

    Returns:
        A scalar float32 tensor (float64 for float64 inputs).

    Example:
        >>> loss = 1.0 - fused_ssim(rendered[None], gt[None], padding="valid")
    """
    if padding not in _FUSED_SSIM_PADDING:
        raise ValueError(f"padding must be one of {tuple(_FUSED_SSIM_PADDING)}, got {padding!r}")
    if train:
        return ssim(img1, img2, padding=_FUSED_SSIM_PADDING[padding], backend=backend)
    with torch.no_grad():
        return ssim(img1, img2, padding=_FUSED_SSIM_PADDING[padding], backend=backend)


def l1_ssim_loss(
    x: Tensor,
    y: Tensor,
    ssim_weight: float = 0.2,
    *,
    padding: str = "zero",
    window_size: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
    data_range: float = 1.0,
    k1: float = DEFAULT_K1,
    k2: float = DEFAULT_K2,
    backend: str = "auto",
) -> Tensor:
    """The photometric loss of 3D Gaussian Splatting: (1 - w) mean|x - y| + w (1 - SSIM(x, y)).

    On a fused backend both terms come out of one pass of the op (the tiles that hold x and y for the
    SSIM add |x - y| of their pixels; the backward adds its sign): no second read of either image.

    Args:
        x, y: (N, C, H, W) images of the same shape (e.g. the render and the ground truth).
        ssim_weight: w in [0, 1] (3DGS: lambda_dssim = 0.2).
        padding: of the SSIM window, "zero" by default (3DGS's and fused-ssim's "same"); "reflect" or
            "valid" as ssim. The L1 term is over every pixel.
        window_size, sigma, data_range, k1, k2, backend: as ssim.

    Returns:
        A scalar float32 tensor (float64 for float64 inputs).

    Example:
        >>> loss = l1_ssim_loss(render[None], gt[None], ssim_weight=0.2)
    """
    if isinstance(ssim_weight, bool) or not isinstance(ssim_weight, (int, float)) or not 0.0 <= ssim_weight <= 1.0:
        raise ValueError(f"ssim_weight must be a number in [0, 1], got {ssim_weight!r}")
    _check_window_options(window_size, sigma, data_range, k1, k2, padding, (1.0, 1.0, 1.0))
    _check_levels(x, y, window_size, padding)
    dtype = _common_dtype([x, y])
    x, y = x.to(dtype), y.to(dtype)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        value = ssim(
            x,
            y,
            padding=padding,
            window_size=window_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
            backend=chosen,
        )
        l1 = (x.to(value.dtype) - y.to(value.dtype)).abs().mean()
        return (1.0 - ssim_weight) * l1 + ssim_weight * (1.0 - value)
    # One fused pass: the op's loss is scale * sum(m) + l1_scale * sum|x - y|, m = (1 - S) / 2, so
    # w (1 - mean S) = 2 w mean(m) and (1 - w) mean|x - y| come out of the same tiles.
    options = _kernel_options(window_size, sigma, data_range, k1, k2, padding, (1.0, 1.0, 1.0), clamp=False)
    count = _output_count(x.shape, window_size, padding)
    loss, _ = fused_ssim_op(
        chosen,
        [x],
        [y],
        [],
        [],
        [2.0 * ssim_weight / count],
        options,
        level_l1_scales=[(1.0 - ssim_weight) / x.numel()],
    )
    return loss[0]


def _ms_ssim_weights(weights) -> tuple[float, ...]:
    if weights is None:
        return MS_SSIM_WEIGHTS
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    if (
        not isinstance(weights, Sequence)
        or not weights
        or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
    ):
        raise ValueError(
            f"weights must be a non-empty sequence of finite numbers >= 0 (one per scale), got {weights!r}"
        )
    return tuple(float(w) for w in weights)


def ms_ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    weights: Sequence[float] | None = None,
    *,
    window_size: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
    k1: float = DEFAULT_K1,
    k2: float = DEFAULT_K2,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Multi-scale SSIM as pytorch-msssim computes it (Wang, Simoncelli & Bovik 2003).

    Scales: x, then 2x2 average pools (an odd side padded by a zero row or column); valid windows. Per
    sample and channel, the mean contrast-structure term c s at every scale but the coarsest and the mean
    SSIM at the coarsest, each relu'd and raised to its weight, multiplied over the scales; then the mean
    over channels. The gradient is finite everywhere (0 where a term is <= 0).

    Args:
        x, y: (N, C, H, W) images of the same shape; the smaller side must exceed
            (window_size - 1) * 2^(scales - 1) (160 for the defaults) so every scale holds a window.
        data_range: value range R of the inputs (pytorch-msssim's default is 255, ours 1).
        weights: one per scale (default MS_SSIM_WEIGHTS, five scales).
        window_size, sigma, k1, k2: the window and stabilisers, as ssim.
        reduction: "mean" (a scalar) or "none" (one value per sample, (N,)).
        backend: as ssim.

    Returns:
        float32 (float64 for float64 inputs): a scalar, or (N,) for reduction "none".

    Example:
        >>> value = ms_ssim(x, y, data_range=1.0)
    """
    weights = _ms_ssim_weights(weights)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    _check_window_options(window_size, sigma, data_range, k1, k2, "valid", (1.0, 1.0, 1.0))
    _check_levels(x, y, window_size, "zero")
    minimum = (window_size - 1) * 2 ** (len(weights) - 1)
    if min(x.shape[2:]) <= minimum:
        raise ValueError(
            f"ms_ssim with {len(weights)} scales and window_size {window_size} needs images whose smaller side "
            f"exceeds {minimum} (each of the {len(weights) - 1} 2x downsamplings must leave room for a window), "
            f"got {tuple(x.shape[2:])}"
        )
    pyramids = reference.msssim_pyramid(x, len(weights)), reference.msssim_pyramid(y, len(weights))
    terms = _scale_terms(*pyramids, window_size, sigma, data_range, k1, k2, backend)
    w = torch.tensor(weights, dtype=terms[0].dtype, device=x.device)
    per_channel = torch.stack([reference.positive_power(t, w[i]) for i, t in enumerate(terms)]).prod(dim=0)
    per_sample = per_channel.mean(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample


def _scale_terms(xs, ys, window_size, sigma, data_range, k1, k2, backend) -> list[Tensor]:
    """Per scale, the (N, C) means of c s (exponents (0, 1, 1): l^0 c s, which is exactly c s since c s =
    A2 / B2 whatever sigma_x sigma_y is) and, at the coarsest scale, of SSIM; valid windows.

    On a fused backend every scale is one level of the op, with its own exponents (level_exponents), and
    the op reduces each plane to a sum (plane_sums): the pyramid in one call, one launch for up to
    MAX_LEVELS_PER_LAUNCH scales; no SSIM map is written."""
    chosen = resolve_backend(backend, xs[0].device)
    if chosen == "reference":
        options = dict(
            window_size=window_size, sigma=sigma, data_range=data_range, k1=k1, k2=k2, padding="valid", backend=chosen
        )
        terms = [
            ssim_map(a, b, exponents=(0.0, 1.0, 1.0), **options).mean(dim=(2, 3)) for a, b in zip(xs[:-1], ys[:-1])
        ]
        return terms + [ssim_map(xs[-1], ys[-1], **options).mean(dim=(2, 3))]

    n, c = xs[0].shape[:2]
    dtype = _common_dtype([xs[0], ys[0]])
    counts = [
        reference.output_extent(a.shape[2], window_size, "valid")
        * reference.output_extent(a.shape[3], window_size, "valid")
        for a in xs
    ]
    options = _kernel_options(window_size, sigma, data_range, k1, k2, "valid", (1.0, 1.0, 1.0), clamp=False)
    exponents = [(0.0, 1.0, 1.0)] * (len(xs) - 1) + [(1.0, 1.0, 1.0)]
    means = fused_means(
        chosen,
        [a.to(dtype) for a in xs],
        [b.to(dtype) for b in ys],
        options,
        counts,
        per_plane=True,
        level_exponents=exponents,
    )
    return list(means.view(len(xs), n, c).unbind(0))


class MSSSIMLoss(nn.Module):
    """1 - ms_ssim(x, y) as a module (the MS-SSIM loss of image restoration and compression).

    Args:
        data_range, weights, **options: as ms_ssim (window_size, sigma, k1, k2, reduction, backend).

    Example:
        >>> criterion = MSSSIMLoss(data_range=1.0)
        >>> loss = criterion(restored, clean)
    """

    def __init__(self, data_range: float = 1.0, weights: Sequence[float] | None = None, **options):
        super().__init__()
        unknown = set(options) - {"window_size", "sigma", "k1", "k2", "reduction", "backend"}
        if unknown:
            raise TypeError(f"MSSSIMLoss got unknown options {sorted(unknown)}")
        if options.get("reduction", "mean") not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'none', got {options['reduction']!r}")
        self.data_range = float(data_range)
        self.weights = _ms_ssim_weights(weights)
        self.options = options

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return 1.0 - ms_ssim(x, y, self.data_range, self.weights, **self.options)

    def extra_repr(self) -> str:
        return f"data_range={self.data_range}, weights={self.weights}" + "".join(
            f", {k}={v!r}" for k, v in self.options.items()
        )
