"""Plain-PyTorch SSIM and SSIM-KD: the ground truth every fused backend is tested against.

Nothing here is fused or clever. The blur pads by gathering with an index map and runs one grouped
convolution per axis, so autograd through it gives the true transpose of the padded blur for free
(the gather's backward is the scatter-add that folds the padding back). SPEC section 2 is the contract:

    mu_x = W x, sigma_x^2 = W(x^2) - mu_x^2, sigma_xy = W(xy) - mu_x mu_y
    SSIM = l^alpha c^beta s^gamma,  default (1, 1, 1): A1 A2 / (B1 B2)
    m = (1 - SSIM) / 2, optionally clamped to [0, 1]; level loss = mean of m
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._constants import EPS_SIGMA, NORM_EPS, NORMALIZE_DIMS, PADDING_CODES

__all__ = [
    "gaussian_window_1d",
    "reflect_index",
    "output_extent",
    "blur",
    "ssim_map_reference",
    "cs_map_reference",
    "msssim_pyramid",
    "ms_ssim_reference",
    "normalize_reference",
    "ssim_kd_loss_reference",
]


def gaussian_window_1d(window_size: int, sigma: float, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D Gaussian taps g, offsets -r..r, normalised to sum 1 (computed in float64)."""
    offsets = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def reflect_index(n: int, radius: int, device=None) -> torch.Tensor:
    """Source index of every padded position -radius..n+radius-1 under reflect padding.

    fold(i, n) = 0 if n = 1, else with p = 2(n - 1): i = |i| mod p, then i if i < n else p - i.
    Equals torch's reflect padding where that exists and extends it to planes smaller than the window.
    """
    i = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i < n, i, period - i)


def output_extent(n: int, window_size: int, padding: str | int) -> int:
    """Size of the SSIM map along an axis of n pixels: n, or n - 2r for padding "valid" (only windows
    inside the plane). `padding` is the name or its code (PADDING_CODES). The C++ twin: output_extent in
    csrc/ssim_params.h."""
    return n - 2 * (window_size // 2) if padding in ("valid", PADDING_CODES["valid"]) else n


def _pad_axis(x: torch.Tensor, radius: int, dim: int, padding: str) -> torch.Tensor:
    if padding == "reflect":
        return x.index_select(dim, reflect_index(x.shape[dim], radius, device=x.device))
    if padding == "zero":
        pad = [0, 0, 0, 0]
        pad[(3 - dim) * 2 : (3 - dim) * 2 + 2] = [radius, radius]
        return F.pad(x, pad)
    return x  # valid: no padding, the output shrinks by 2r


def blur(x: torch.Tensor, window_1d: torch.Tensor, padding: str) -> torch.Tensor:
    """Separable Gaussian blur W of every (N, C) plane of x, padded as `padding` says.

    Shape: (N, C, H, W) -> (N, C, H, W), or (N, C, H - 2r, W - 2r) for padding "valid".
    """
    channels = x.shape[1]
    size = window_1d.numel()
    radius = size // 2
    taps = window_1d.to(x.dtype)
    x = _pad_axis(x, radius, 2, padding)
    x = F.conv2d(x, taps.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    x = _pad_axis(x, radius, 3, padding)
    return F.conv2d(x, taps.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _power(v: torch.Tensor, exponent: float) -> torch.Tensor | None:
    """v ** exponent, with exponent 0 meaning "factor absent" (None) and exponent 1 exact."""
    if exponent == 0.0:
        return None
    if exponent == 1.0:
        return v
    return v.pow(exponent)


def _blurred_moments(x, y, window_size, sigma, padding):
    """(mu_x, mu_y, var_x, var_y, cov_xy) of every window, in the accumulation dtype."""
    acc = _accumulation_dtype(x.dtype)
    x = x.to(acc)
    y = y.to(acc)
    window = gaussian_window_1d(window_size, sigma, dtype=acc, device=x.device)
    channels = x.shape[1]
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mu_x, mu_y, e_xx, e_yy, e_xy = blur(stacked, window, padding).split(channels, dim=1)
    return mu_x, mu_y, e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y


def ssim_map_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "reflect",
    exponents: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Per-pixel SSIM of x against y, each (N, C, H, W); computed and returned in float32 (float64 stays)."""
    mu_x, mu_y, var_x, var_y, cov_xy = _blurred_moments(x, y, window_size, sigma, padding)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    A1 = 2 * mu_x * mu_y + c1
    B1 = mu_x * mu_x + mu_y * mu_y + c1
    if tuple(float(e) for e in exponents) == (1.0, 1.0, 1.0):
        A2 = 2 * cov_xy + c2
        B2 = var_x + var_y + c2
        return (A1 * A2) / (B1 * B2)

    alpha, beta, gamma = (float(e) for e in exponents)
    c3 = c2 / 2
    sigma_x = torch.sqrt(var_x.clamp(min=0) + EPS_SIGMA)
    sigma_y = torch.sqrt(var_y.clamp(min=0) + EPS_SIGMA)
    luminance = A1 / B1
    contrast = (2 * sigma_x * sigma_y + c2) / (var_x + var_y + c2)
    structure = (cov_xy + c3) / (sigma_x * sigma_y + c3)
    result = torch.ones_like(mu_x)
    for term, exponent in ((luminance, alpha), (contrast, beta), (structure, gamma)):
        factor = _power(term, exponent)
        if factor is not None:
            result = result * factor
    return result


def cs_map_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k2: float = 0.03,
    padding: str = "reflect",
) -> torch.Tensor:
    """Per-pixel contrast-structure term c s = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2) (C3 = C2 / 2),
    the factor MS-SSIM takes at every scale but the coarsest."""
    _, _, var_x, var_y, cov_xy = _blurred_moments(x, y, window_size, sigma, padding)
    c2 = (k2 * data_range) ** 2
    return (2 * cov_xy + c2) / (var_x + var_y + c2)


def msssim_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The MS-SSIM scales of x: x, then levels - 1 times a 2x2 average pool (an odd side padded by one zero
    row or column, counted in the average), as pytorch-msssim does."""
    scales = [x]
    for _ in range(levels - 1):
        x = F.avg_pool2d(x, kernel_size=2, padding=[s % 2 for s in x.shape[2:]])
        scales.append(x)
    return scales


def positive_power(v: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """relu(v) ** exponent with a finite gradient: 0 (value and gradient) where v <= 0, where
    relu(v) ** w would give 0 * inf = NaN in the backward for w < 1."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)) ** exponent, torch.zeros_like(v))


def ms_ssim_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    weights: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Multi-scale SSIM per sample, (N,), as pytorch-msssim defines it: valid windows; at every scale but
    the coarsest the channel mean of c s, at the coarsest the channel mean of SSIM; each relu'd, raised to
    its weight and multiplied over the scales, then averaged over the channels."""
    options = dict(window_size=window_size, sigma=sigma, data_range=data_range, k2=k2, padding="valid")
    acc = _accumulation_dtype(x.dtype)
    w = torch.tensor(weights, dtype=acc, device=x.device)
    xs, ys = msssim_pyramid(x.to(acc), len(weights)), msssim_pyramid(y.to(acc), len(weights))
    terms = [cs_map_reference(a, b, **options).mean(dim=(2, 3)) for a, b in zip(xs[:-1], ys[:-1])]
    terms.append(ssim_map_reference(xs[-1], ys[-1], k1=k1, **options).mean(dim=(2, 3)))
    per_channel = torch.stack([positive_power(t, w[i]) for i, t in enumerate(terms)]).prod(dim=0)
    return per_channel.mean(dim=1)


def normalize_reference(feat: torch.Tensor, mode: str) -> torch.Tensor:
    """Min-max normalisation psi: (x - min) / (max - min + NORM_EPS), min/max taken as `mode` says."""
    feat = feat.to(_accumulation_dtype(feat.dtype))
    if mode == "none":
        return feat
    dims = NORMALIZE_DIMS[mode]
    low = feat.amin(dim=dims, keepdim=True)
    high = feat.amax(dim=dims, keepdim=True)
    return (feat - low) / (high - low + NORM_EPS)


def ssim_kd_loss_reference(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    normalize: str = "sample",
    padding: str = "reflect",
    exponents: tuple[float, float, float] = (1.0, 1.0, 1.0),
    clamp: bool = True,
    level_weights: list[float] | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """sum over levels of w_l * mean((1 - SSIM(psi(F_S), psi(F_T))) / 2), per level over N*C*H'*W'."""
    weights = level_weights if level_weights is not None else [1.0] * len(student_feats)
    total = None
    for student, teacher, weight in zip(student_feats, teacher_feats, weights):
        ssim = ssim_map_reference(
            normalize_reference(student, normalize),
            normalize_reference(teacher, normalize),
            window_size=window_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
            padding=padding,
            exponents=exponents,
        )
        per_pixel = (1 - ssim) / 2
        if clamp:
            per_pixel = per_pixel.clamp(0.0, 1.0)
        term = weight * per_pixel.mean()
        total = term if total is None else total + term
    return total
