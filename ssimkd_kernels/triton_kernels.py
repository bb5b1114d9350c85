"""Triton kernels of the fused SSIM-KD forward and backward (SPEC section 4), and their launchers.

One program owns one tile of one plane of one level; a level table (one int64 row per level) lets a
single launch cover every level. Inputs are addressed as (base pointer of level 0) + (element offset of
level l), so any strides work and no level is copied.

The blur. Triton has no explicit shared memory, so a program cannot run the separable 11-tap passes
over a tile in place the way the CUDA kernel does. The passes are instead banded matrix products on
tensor cores: with the tile's BLOCK x BLOCK region X, the horizontal pass is X @ G and the vertical
pass is G^T @ (X @ G), where G[a, b] = g[a - b] for 0 <= a - b <= 2r. The backward's true transpose
of the padded blur is the same with the transposed band M (whose border rows collect reflect folds):
W^T K = A_h @ K @ M_w. Two other designs were weighed: rolling rows (a ring of 2r + 1 horizontally
blurred rows carried through a row loop: Triton cannot index a register ring, so every step would
select over the whole ring) and direct shifted loads (121 taps per output instead of 22, served from
L1). The banded product does ~4x the multiply-adds of a direct blur, all on tensor cores. This module
was written and tested without a GPU (in Triton's interpreter); which design is fastest on an H100 is
still to be measured, and DOT_PRECISION ("ieee" exact fp32 by default; "tf32x3" is the tensor-core
fp32 emulation) is one switch of that study: set SSIMKD_TRITON_DOT.

Numerics follow csrc/ssim_math.h: each tile centres x and y on the mean of its loaded region before
forming moments (exact for any shift; it keeps float32 variances from cancelling).
Reductions are per-tile sums then a fixed-order second stage: no float atomics, bitwise deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._constants import EPS_SIGMA, PADDING_CODES
from .reference import gaussian_window_1d

REFLECT, ZERO, VALID = PADDING_CODES["reflect"], PADDING_CODES["zero"], PADDING_CODES["valid"]
# Region of one program, rows x columns. The forward's output tile is BLOCK - 2r square, the
# backward's BLOCK - 4r (its region carries a 2r halo).
BLOCK = 64
DOT_PRECISION = os.environ.get("SSIMKD_TRITON_DOT", "ieee")

# Columns of the level table, one int64 row per level: element offsets from level 0's tensors, strides,
# sizes, tile grid. Constexprs, so the kernels can name them.
_FIELD_NAMES = (
    "F_X_OFF", "F_Y_OFF", "F_XS_N", "F_XS_C", "F_XS_H", "F_XS_W", "F_YS_N", "F_YS_C", "F_YS_H", "F_YS_W",
    "F_N", "F_C", "F_H", "F_W", "F_TILES_H", "F_TILES_W", "F_TILE_BEGIN", "F_PLANE_BEGIN",
    "F_XA_OFF", "F_XA_N", "F_XA_C", "F_XA_K", "F_YA_OFF", "F_YA_N", "F_YA_C", "F_YA_K",
    "F_MAP_OFF", "F_GMAP_OFF",
    "F_GX_OFF", "F_GXS_N", "F_GXS_C", "F_GXS_H", "F_GXS_W", "F_GY_OFF", "F_GYS_N", "F_GYS_C", "F_GYS_H", "F_GYS_W",
)
for _index, _name in enumerate(_FIELD_NAMES):
    globals()[_name] = tl.constexpr(_index)
NUM_FIELDS = len(_FIELD_NAMES)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fold_reflect(i, n):
    """Reflect padding as an index map, for any i and n >= 1 (SPEC section 2)."""
    period = tl.maximum(2 * (n - 1), 1)
    a = tl.abs(i) % period
    folded = tl.where(a < n, a, period - a)
    folded = tl.where(n == 1, 0, folded)
    return tl.where((i >= 0) & (i < n), i, folded)


@triton.jit
def _source_index(i, n, PADDING: tl.constexpr):
    """Plane index read at position i, or -1 where the padded value is 0."""
    if PADDING == 0:
        return _fold_reflect(i, n)
    else:
        return tl.where((i >= 0) & (i < n), i, -1)


@triton.jit
def _is_output(p, n, R: tl.constexpr, PADDING: tl.constexpr):
    """Whether window centre p produces an output."""
    if PADDING == 2:
        return (p >= R) & (p < n - R)
    else:
        return (p >= 0) & (p < n)


@triton.jit
def _find_level(table_ptr, tile, num_levels, COLUMN: tl.constexpr, FIELDS: tl.constexpr):
    """The level whose range of tiles (or planes: COLUMN) holds `tile`; levels are few, so scan."""
    level = 0
    for l in range(1, num_levels):
        level += (tile >= tl.load(table_ptr + l * FIELDS + COLUMN)).to(tl.int32)
    return level


@triton.jit
def _plane_affine(aff_ptr, off, s_n, s_c, s_k, n, c, HAS_AFFINE: tl.constexpr):
    """(scale, offset) of plane (n, c) of a level's (N, C, 2) affine, x-hat = scale * (x - offset);
    identity without one."""
    if HAS_AFFINE:
        base = aff_ptr + off + n * s_n + c * s_c
        return tl.load(base), tl.load(base + s_k)
    else:
        return 1.0, 0.0


@triton.jit
def _load_region(ptr, rows, cols, H, W, s_h, s_w, scale, offset, PADDING: tl.constexpr, BLOCK: tl.constexpr):
    """The normalised region scale * (x - offset) at plane rows x cols, read through the padding's index
    map (zero padding reads 0 in the normalised space), centred on its mean; returns (region, mean).
    Any shift keeps the math exact; the region's mean is close to every window's, which keeps the
    float32 variances from cancelling (csrc/ssim_math.h, moments_from_blurred)."""
    r = _source_index(rows, H, PADDING)
    c = _source_index(cols, W, PADDING)
    inside = (r[:, None] >= 0) & (c[None, :] >= 0)
    raw = tl.load(ptr + r[:, None] * s_h + c[None, :] * s_w, mask=inside, other=0.0).to(tl.float32)
    region = tl.where(inside, scale * (raw - offset), 0.0)
    mean = tl.sum(tl.sum(region, axis=1), axis=0) / (BLOCK * BLOCK)
    return region - mean, mean


@triton.jit
def _band(taps_ptr, R: tl.constexpr, BLOCK: tl.constexpr):
    """G[a, b] = g[a - b] for 0 <= a - b <= 2r: X @ G blurs the rows of X (output b reads a = b .. b + 2r)."""
    d = tl.arange(0, BLOCK)[:, None] - tl.arange(0, BLOCK)[None, :]
    return tl.load(taps_ptr + d, mask=(d >= 0) & (d <= 2 * R), other=0.0)


@triton.jit
def _transposed_band(p0, q0, n, taps_ptr, R: tl.constexpr, PADDING: tl.constexpr, BLOCK: tl.constexpr):
    """M[a, b]: weight of window centre p0 + a in the blur read of input q0 + b, i.e. the true transpose
    of the padded blur along one axis (SPEC section 2): sum of g[k] over taps k whose (folded) source
    is q. Away from reflect borders this is the plain band g[q - p + r]."""
    p = p0 + tl.arange(0, BLOCK)[:, None]
    q = q0 + tl.arange(0, BLOCK)[None, :]
    d = q - p
    weights = tl.load(taps_ptr + d + R, mask=(d >= -R) & (d <= R), other=0.0)
    if PADDING == 0:
        if (p0 - R < 0) | (p0 + BLOCK - 1 + R >= n):  # some window of this tile crosses a border
            weights = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k in tl.static_range(2 * R + 1):
                source = _fold_reflect(p + (k - R), n)
                weights += tl.where(source == q, tl.load(taps_ptr + k), 0.0)
    return weights


@triton.jit
def _blur(a, band, band_t, DOT_PRECISION: tl.constexpr):
    """G^T @ (a @ G): the separable 2-D blur of a region, valid in its top-left BLOCK - 2r square."""
    return tl.dot(band_t, tl.dot(a, band, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)


@triton.jit
def _power(v, e, KIND: tl.constexpr, ODD: tl.constexpr):
    """(v^e, d v^e / dv) as std::pow in csrc/ssim_math.h; KIND (from the host, see _exponent_kind):
    0 for e = 0 ("factor absent"), 1 for e = 1 (exact), 2 for an integer e >= 2 (ODD: e odd),
    3 otherwise (NaN for v < 0)."""
    if KIND == 0:
        return tl.full(v.shape, 1.0, tl.float32), tl.zeros(v.shape, tl.float32)
    elif KIND == 1:
        return v, tl.full(v.shape, 1.0, tl.float32)
    else:
        log_v = tl.log2(tl.abs(v))
        value = tl.exp2(e * log_v)
        derivative = e * tl.exp2((e - 1.0) * log_v)
        if KIND == 2:
            negative = v < 0.0
            if ODD:
                value = tl.where(negative, -value, value)
            else:
                derivative = tl.where(negative, -derivative, derivative)
        else:
            value = tl.where(v < 0.0, float("nan"), value)
            derivative = tl.where(v < 0.0, float("nan"), derivative)
        return value, derivative


@triton.jit
def _ssim_and_partials(mu_x, mu_y, var_x, var_y, cov, c1, c2, alpha, beta, gamma, EPS: tl.constexpr,
                       DEFAULT: tl.constexpr, PARTIALS: tl.constexpr, KINDS: tl.constexpr, ODDS: tl.constexpr):
    """S and dS/d(mu_x, mu_y, var_x, var_y, cov) (csrc/ssim_math.h, ssim_partials)."""
    A1 = 2.0 * mu_x * mu_y + c1
    B1 = mu_x * mu_x + mu_y * mu_y + c1
    B2 = var_x + var_y + c2
    if DEFAULT:
        A2 = 2.0 * cov + c2
        inv_B1B2 = 1.0 / (B1 * B2)
        S = A1 * A2 * inv_B1B2
        if PARTIALS:
            dS_dmu_x = 2.0 * mu_y * A2 * inv_B1B2 - 2.0 * mu_x * S / B1
            dS_dmu_y = 2.0 * mu_x * A2 * inv_B1B2 - 2.0 * mu_y * S / B1
            dS_dvar_x = -S / B2
            return S, dS_dmu_x, dS_dmu_y, dS_dvar_x, dS_dvar_x, 2.0 * A1 * inv_B1B2
        else:
            return S, S, S, S, S, S
    else:
        c3 = c2 / 2.0
        sigma_x = tl.sqrt(tl.maximum(var_x, 0.0) + EPS)
        sigma_y = tl.sqrt(tl.maximum(var_y, 0.0) + EPS)
        dsigma_x = tl.where(var_x >= 0.0, 0.5 / sigma_x, 0.0)
        dsigma_y = tl.where(var_y >= 0.0, 0.5 / sigma_y, 0.0)
        sxy = sigma_x * sigma_y
        l = A1 / B1
        c = (2.0 * sxy + c2) / B2
        s = (cov + c3) / (sxy + c3)
        L, dL = _power(l, alpha, KINDS[0], ODDS[0])
        Cc, dC = _power(c, beta, KINDS[1], ODDS[1])
        Ss, dSs = _power(s, gamma, KINDS[2], ODDS[2])
        S = L * Cc * Ss
        if PARTIALS:
            dl_dmu_x = (2.0 * mu_y - 2.0 * mu_x * l) / B1
            dl_dmu_y = (2.0 * mu_x - 2.0 * mu_y * l) / B1
            dc_dvar_x = (2.0 * sigma_y * dsigma_x - c) / B2
            dc_dvar_y = (2.0 * sigma_x * dsigma_y - c) / B2
            ds_dvar_x = -s * sigma_y * dsigma_x / (sxy + c3)
            ds_dvar_y = -s * sigma_x * dsigma_y / (sxy + c3)
            return (
                S,
                dL * dl_dmu_x * Cc * Ss,
                dL * dl_dmu_y * Cc * Ss,
                L * (dC * dc_dvar_x * Ss + Cc * dSs * ds_dvar_x),
                L * (dC * dc_dvar_y * Ss + Cc * dSs * ds_dvar_y),
                L * Cc * dSs / (sxy + c3),
            )
        else:
            return S, S, S, S, S, S


@triton.jit
def _pixel_loss(S, CLAMP: tl.constexpr):
    """m = (1 - S) / 2, clamped to [0, 1] when asked; NaN stays NaN."""
    m = (1.0 - S) * 0.5
    if CLAMP:
        m = tl.where(m < 0.0, 0.0, tl.where(m > 1.0, 1.0, m))
    return m


@triton.jit
def _tile_setup(table_ptr, tile, num_levels, x_ptr, y_ptr, xa_ptr, ya_ptr, TILE: tl.constexpr,
                HAS_AFFINE: tl.constexpr, FIELDS: tl.constexpr):
    """Where a tile lies and what its plane needs: level, n, c, tile origin, plane pointers, affines."""
    level = _find_level(table_ptr, tile, num_levels, F_TILE_BEGIN, FIELDS)
    row = table_ptr + level * FIELDS
    C = tl.load(row + F_C)
    tiles_w = tl.load(row + F_TILES_W)
    per_plane = tl.load(row + F_TILES_H) * tiles_w
    local = tile - tl.load(row + F_TILE_BEGIN)
    plane = local // per_plane
    t = local - plane * per_plane
    n = plane // C
    c = plane - n * C
    h0 = (t // tiles_w) * TILE
    w0 = (t - (t // tiles_w) * tiles_w) * TILE
    x_plane = x_ptr + tl.load(row + F_X_OFF) + n * tl.load(row + F_XS_N) + c * tl.load(row + F_XS_C)
    y_plane = y_ptr + tl.load(row + F_Y_OFF) + n * tl.load(row + F_YS_N) + c * tl.load(row + F_YS_C)
    x_scale, x_offset = _plane_affine(xa_ptr, tl.load(row + F_XA_OFF), tl.load(row + F_XA_N), tl.load(row + F_XA_C),
                                     tl.load(row + F_XA_K), n, c, HAS_AFFINE)
    y_scale, y_offset = _plane_affine(ya_ptr, tl.load(row + F_YA_OFF), tl.load(row + F_YA_N), tl.load(row + F_YA_C),
                                     tl.load(row + F_YA_K), n, c, HAS_AFFINE)
    return level, row, plane, n, c, h0, w0, x_plane, y_plane, x_scale, x_offset, y_scale, y_offset


@triton.jit
def _region_statistics(row, x_plane, y_plane, h0, w0, HALO, x_scale, x_offset, y_scale, y_offset, taps_ptr,
                       R: tl.constexpr, PADDING: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Load the BLOCK x BLOCK region from (h0 - HALO, w0 - HALO), centre it, and blur: the centred
    moments mu'_x, mu'_y, var_x, var_y, cov at window centres (h0 - HALO + r + i, w0 - HALO + r + j),
    valid for i, j < BLOCK - 2r; plus the centring shifts cx, cy and the plane's H, W."""
    H = tl.load(row + F_H)
    W = tl.load(row + F_W)
    rows = h0 - HALO + tl.arange(0, BLOCK)
    cols = w0 - HALO + tl.arange(0, BLOCK)
    xr, cx = _load_region(x_plane, rows, cols, H, W, tl.load(row + F_XS_H), tl.load(row + F_XS_W), x_scale, x_offset,
                          PADDING, BLOCK)
    yr, cy = _load_region(y_plane, rows, cols, H, W, tl.load(row + F_YS_H), tl.load(row + F_YS_W), y_scale, y_offset,
                          PADDING, BLOCK)
    band = _band(taps_ptr, R, BLOCK)
    band_t = tl.trans(band)
    mu_x = _blur(xr, band, band_t, DOT_PRECISION)
    mu_y = _blur(yr, band, band_t, DOT_PRECISION)
    var_x = _blur(xr * xr, band, band_t, DOT_PRECISION) - mu_x * mu_x
    var_y = _blur(yr * yr, band, band_t, DOT_PRECISION) - mu_y * mu_y
    cov = _blur(xr * yr, band, band_t, DOT_PRECISION) - mu_x * mu_y
    return mu_x, mu_y, var_x, var_y, cov, cx, cy, H, W


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _ssim_fwd_kernel(
    x_ptr, y_ptr, xa_ptr, ya_ptr, map_ptr, taps_ptr, table_ptr, partials_ptr,
    num_levels, c1, c2, alpha, beta, gamma,
    R: tl.constexpr, PADDING: tl.constexpr, HAS_AFFINE: tl.constexpr, WRITE_MAP: tl.constexpr,
    DEFAULT_EXPONENTS: tl.constexpr, CLAMP: tl.constexpr, EPS_SIGMA: tl.constexpr, BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FIELDS: tl.constexpr, KINDS: tl.constexpr, ODDS: tl.constexpr,
):
    # One program: one TILE x TILE tile of window centres of one plane of one level, TILE = BLOCK - 2r,
    # read with an r halo. mu = W x', var = W(x'^2) - mu'^2, cov = W(x'y') - mu'_x mu'_y on the centred
    # x' = x-hat - cx; S = A1 A2 / (B1 B2) (or l^a c^b s^g); writes the tile's sum of m (and the map).
    TILE: tl.constexpr = BLOCK - 2 * R
    tile = tl.program_id(0)
    level, row, plane, n, c, h0, w0, x_plane, y_plane, x_scale, x_offset, y_scale, y_offset = _tile_setup(
        table_ptr, tile, num_levels, x_ptr, y_ptr, xa_ptr, ya_ptr, TILE, HAS_AFFINE, FIELDS)
    # ---- load the tile plus an r halo, centre it, blur: horizontal then vertical banded products
    mu_x, mu_y, var_x, var_y, cov, cx, cy, H, W = _region_statistics(
        row, x_plane, y_plane, h0, w0, R, x_scale, x_offset, y_scale, y_offset, taps_ptr, R, PADDING, BLOCK,
        DOT_PRECISION)

    # ---- terms: SSIM per centre, m, the tile's sum
    S, _, _, _, _, _ = _ssim_and_partials(mu_x + cx, mu_y + cy, var_x, var_y, cov, c1, c2, alpha, beta, gamma,
                                          EPS_SIGMA, DEFAULT_EXPONENTS, False, KINDS, ODDS)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    valid = (i < TILE) & (j < TILE) & _is_output(h0 + i, H, R, PADDING) & _is_output(w0 + j, W, R, PADDING)
    tl.store(partials_ptr + tile, tl.sum(tl.sum(tl.where(valid, _pixel_loss(S, CLAMP), 0.0), axis=1), axis=0))
    if WRITE_MAP:
        offset = R if PADDING == 2 else 0
        out_h = H - 2 * offset
        out_w = W - 2 * offset
        index = (plane * out_h + h0 + i - offset) * out_w + (w0 + j - offset)
        tl.store(map_ptr + tl.load(row + F_MAP_OFF) + index, S, mask=valid)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _ssim_bwd_kernel(
    x_ptr, y_ptr, xa_ptr, ya_ptr, gmap_ptr, gx_ptr, gy_ptr, taps_ptr, table_ptr, scales_ptr, grad_ptr,
    partials_ptr, num_levels, c1, c2, alpha, beta, gamma,
    R: tl.constexpr, PADDING: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_GRAD_MAP: tl.constexpr,
    NEED_X: tl.constexpr, NEED_Y: tl.constexpr, DEFAULT_EXPONENTS: tl.constexpr, CLAMP: tl.constexpr,
    EPS_SIGMA: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, FIELDS: tl.constexpr,
    KINDS: tl.constexpr, ODDS: tl.constexpr,
):
    # One program: one TILE x TILE tile of dL/dx (and dL/dy), TILE = BLOCK - 4r, read with a 2r halo.
    # Recompute the statistics on tile + r, form a, b, c there (SPEC section 2, centred):
    #   a_x = d (dS/dmu_x - 2 mu'_x dS/dvar_x - mu'_y dS/dcov), b_x = d dS/dvar_x, c = d dS/dcov,
    # blur them back with the true transpose W^T = A_h (.) M_w, and
    #   dL/dx-hat = W^T a_x + 2 x' W^T b_x + y' W^T c,  dL/dx = scale_x dL/dx-hat.
    # Writes the tile's sums of (dL/dx-hat * (x - x_offset), dL/dx-hat, and the same for y) for the affine.
    TILE: tl.constexpr = BLOCK - 4 * R
    tile = tl.program_id(0)
    level, row, plane, n, c, h0, w0, x_plane, y_plane, x_scale, x_offset, y_scale, y_offset = _tile_setup(
        table_ptr, tile, num_levels, x_ptr, y_ptr, xa_ptr, ya_ptr, TILE, HAS_AFFINE, FIELDS)
    # ---- load the tile plus a 2r halo, centre it; statistics on centres (h0 - r + i, w0 - r + j)
    mu_x, mu_y, var_x, var_y, cov, cx, cy, H, W = _region_statistics(
        row, x_plane, y_plane, h0, w0, 2 * R, x_scale, x_offset, y_scale, y_offset, taps_ptr, R, PADDING, BLOCK,
        DOT_PRECISION)
    S, dS_dmu_x, dS_dmu_y, dS_dvar_x, dS_dvar_y, dS_dcov = _ssim_and_partials(
        mu_x + cx, mu_y + cy, var_x, var_y, cov, c1, c2, alpha, beta, gamma, EPS_SIGMA, DEFAULT_EXPONENTS, True,
        KINDS, ODDS)

    # ---- terms: d = dL/dS, and the coefficient maps (zero off the outputs)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    ph = h0 - R + i
    pw = w0 - R + j
    outputs = (i < BLOCK - 2 * R) & (j < BLOCK - 2 * R) & _is_output(ph, H, R, PADDING) & _is_output(pw, W, R, PADDING)
    grad_scale = tl.load(grad_ptr + level).to(tl.float32) * tl.load(scales_ptr + level)
    m = (1.0 - S) * 0.5
    dm_dS = -0.5
    if CLAMP:
        dm_dS = tl.where((m >= 0.0) & (m <= 1.0), -0.5, 0.0)
    d = grad_scale * dm_dS
    if HAS_GRAD_MAP:
        offset = R if PADDING == 2 else 0
        out_h = H - 2 * offset
        out_w = W - 2 * offset
        index = (plane * out_h + ph - offset) * out_w + (pw - offset)
        d += tl.load(gmap_ptr + tl.load(row + F_GMAP_OFF) + index, mask=outputs, other=0.0)
    coef_c = tl.where(outputs, d * dS_dcov, 0.0)
    b_x = tl.where(outputs, d * dS_dvar_x, 0.0)
    a_x = tl.where(outputs, d * dS_dmu_x, 0.0) - 2.0 * mu_x * b_x - mu_y * coef_c

    # ---- blur back: W^T K = A_h @ K @ M_w, on input rows/cols (h0 + u, w0 + v)
    m_w = _transposed_band(w0 - R, w0, W, taps_ptr, R, PADDING, BLOCK)
    a_h = tl.trans(_transposed_band(h0 - R, h0, H, taps_ptr, R, PADDING, BLOCK))
    g_c = tl.dot(a_h, tl.dot(coef_c, m_w, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)

    # ---- per input pixel of the tile: x', y' and the gradients
    u = h0 + tl.arange(0, BLOCK)
    v = w0 + tl.arange(0, BLOCK)
    inside = (tl.arange(0, BLOCK)[:, None] < TILE) & (tl.arange(0, BLOCK)[None, :] < TILE) & (u[:, None] < H) & (v[None, :] < W)
    x_ptrs = x_plane + u[:, None] * tl.load(row + F_XS_H) + v[None, :] * tl.load(row + F_XS_W)
    y_ptrs = y_plane + u[:, None] * tl.load(row + F_YS_H) + v[None, :] * tl.load(row + F_YS_W)
    x_rel = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32) - x_offset
    y_rel = tl.load(y_ptrs, mask=inside, other=0.0).to(tl.float32) - y_offset
    x_c = x_scale * x_rel - cx
    y_c = y_scale * y_rel - cy
    sums_ptr = partials_ptr + tile * 4
    if NEED_X:
        g_a = tl.dot(a_h, tl.dot(a_x, m_w, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
        g_b = tl.dot(a_h, tl.dot(b_x, m_w, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
        gx_hat = tl.where(inside, g_a + 2.0 * x_c * g_b + y_c * g_c, 0.0)
        gx_row = table_ptr + level * FIELDS
        gx_plane = gx_ptr + tl.load(gx_row + F_GX_OFF) + n * tl.load(gx_row + F_GXS_N) + c * tl.load(gx_row + F_GXS_C)
        gx_ptrs = gx_plane + u[:, None] * tl.load(gx_row + F_GXS_H) + v[None, :] * tl.load(gx_row + F_GXS_W)
        tl.store(gx_ptrs, (x_scale * gx_hat).to(gx_ptr.dtype.element_ty), mask=inside)
        tl.store(sums_ptr + 0, tl.sum(tl.sum(gx_hat * x_rel, axis=1), axis=0))
        tl.store(sums_ptr + 1, tl.sum(tl.sum(gx_hat, axis=1), axis=0))
    if NEED_Y:
        b_y = tl.where(outputs, d * dS_dvar_y, 0.0)
        a_y = tl.where(outputs, d * dS_dmu_y, 0.0) - 2.0 * mu_y * b_y - mu_x * coef_c
        g_a = tl.dot(a_h, tl.dot(a_y, m_w, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
        g_b = tl.dot(a_h, tl.dot(b_y, m_w, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
        gy_hat = tl.where(inside, g_a + 2.0 * y_c * g_b + x_c * g_c, 0.0)
        gy_row = table_ptr + level * FIELDS
        gy_plane = gy_ptr + tl.load(gy_row + F_GY_OFF) + n * tl.load(gy_row + F_GYS_N) + c * tl.load(gy_row + F_GYS_C)
        gy_ptrs = gy_plane + u[:, None] * tl.load(gy_row + F_GYS_H) + v[None, :] * tl.load(gy_row + F_GYS_W)
        tl.store(gy_ptrs, (y_scale * gy_hat).to(gy_ptr.dtype.element_ty), mask=inside)
        tl.store(sums_ptr + 2, tl.sum(tl.sum(gy_hat * y_rel, axis=1), axis=0))
        tl.store(sums_ptr + 3, tl.sum(tl.sum(gy_hat, axis=1), axis=0))


# ------------------------------------------------------------------------------------------------
# Second stage: fixed-order sums of the tile partials
# ------------------------------------------------------------------------------------------------


@triton.jit
def _level_sum_kernel(partials_ptr, table_ptr, scales_ptr, out_ptr, CHUNK: tl.constexpr, FIELDS: tl.constexpr):
    # One program per level: level_scale * (sum of its tiles' partials), in tile order.
    level = tl.program_id(0)
    row = table_ptr + level * FIELDS
    begin = tl.load(row + F_TILE_BEGIN)
    count = tl.load(row + F_N) * tl.load(row + F_C) * tl.load(row + F_TILES_H) * tl.load(row + F_TILES_W)
    total = 0.0
    for start in range(0, count, CHUNK):
        k = start + tl.arange(0, CHUNK)
        total += tl.sum(tl.load(partials_ptr + begin + k, mask=k < count, other=0.0), axis=0)
    tl.store(out_ptr + level, total * tl.load(scales_ptr + level))


@triton.jit
def _plane_sum_kernel(partials_ptr, table_ptr, out_ptr, num_levels, CHUNK: tl.constexpr, FIELDS: tl.constexpr):
    # One program per plane (all levels): the 4 affine-gradient sums over the plane's tiles, in order.
    plane = tl.program_id(0)
    level = _find_level(table_ptr, plane, num_levels, F_PLANE_BEGIN, FIELDS)
    row = table_ptr + level * FIELDS
    per_plane = tl.load(row + F_TILES_H) * tl.load(row + F_TILES_W)
    begin = tl.load(row + F_TILE_BEGIN) + (plane - tl.load(row + F_PLANE_BEGIN)) * per_plane
    k4 = tl.arange(0, 4)
    total = tl.zeros((4,), dtype=tl.float32)
    for start in range(0, per_plane, CHUNK):
        t = start + tl.arange(0, CHUNK)
        block = tl.load(partials_ptr + (begin + t[:, None]) * 4 + k4[None, :], mask=t[:, None] < per_plane, other=0.0)
        total += tl.sum(block, axis=0)
    tl.store(out_ptr + plane * 4 + k4, total)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 64


def _offset(t: torch.Tensor | None, base: torch.Tensor) -> int:
    """Element offset of t's data from base's (both of one dtype); 0 when t is None."""
    if t is None:
        return 0
    delta = t.data_ptr() - base.data_ptr()
    assert delta % base.element_size() == 0, "ssimkd: tensors are not aligned to their element size"
    return delta // base.element_size()


def _strides(t: torch.Tensor | None, count: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * count


def _level_table(xs, ys, x_affines, y_affines, maps, grad_maps, gxs, gys, tile: int, level_scales, device):
    """The int64 level table and the float32 level scales on `device`, the tile and plane counts.

    Rows hold element offsets from level 0's tensors, so the same layouts in a training loop hit a
    small cache and skip the host-to-device copy; a miss copies from pinned memory, asynchronously.
    """
    rows, tiles, planes = [], 0, 0
    for l, (x, y) in enumerate(zip(xs, ys)):
        n, c, h, w = x.shape
        tiles_h, tiles_w = -(-h // tile), -(-w // tile)
        xa = x_affines[l] if x_affines else None
        ya = y_affines[l] if y_affines else None
        gx = gxs[l] if gxs else None
        gy = gys[l] if gys else None
        row = [_offset(x, xs[0]), _offset(y, ys[0]), *x.stride(), *y.stride(), n, c, h, w, tiles_h, tiles_w,
               tiles, planes,
               _offset(xa, x_affines[0]) if xa is not None else 0, *_strides(xa, 3),
               _offset(ya, y_affines[0]) if ya is not None else 0, *_strides(ya, 3),
               _offset(maps[l], maps[0]) if maps else 0,
               _offset(grad_maps[l], grad_maps[0]) if grad_maps else 0,
               _offset(gx, gxs[0]) if gx is not None else 0, *_strides(gx, 4),
               _offset(gy, gys[0]) if gy is not None else 0, *_strides(gy, 4)]
        assert len(row) == NUM_FIELDS
        rows.append(row)
        tiles += n * c * tiles_h * tiles_w
        planes += n * c
    key = (str(device), tuple(map(tuple, rows)), tuple(level_scales))
    cached = _TABLE_CACHE.get(key)
    if cached is None:
        cached = (_to_device(torch.tensor(rows, dtype=torch.int64), device),
                  _to_device(torch.tensor(level_scales, dtype=torch.float32), device))
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = cached
    return cached[0], cached[1], tiles, planes


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _taps(options, device) -> torch.Tensor:
    key = ("taps", options.window_size, options.sigma, str(device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = _to_device(gaussian_window_1d(options.window_size, options.sigma, dtype=torch.float32),
                                       device)
    return _TABLE_CACHE[key]


def _check(xs, ys):
    dtype = xs[0].dtype
    if dtype not in _SUPPORTED:
        raise TypeError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {dtype} "
                        "(float64 runs on the 'reference' and 'cpu' backends)")
    for x, y in zip(xs, ys):
        if x.dtype != dtype or y.dtype != dtype:
            raise TypeError("ssimkd: every level must share one dtype")


def _exponent_kind(e: float) -> int:
    """How _power treats exponent e: 0 absent, 1 exact, 2 integer, 3 general."""
    if e == 0.0:
        return 0
    if e == 1.0:
        return 1
    return 2 if float(e).is_integer() else 3


def _scalars(options):
    exponents = (options.alpha, options.beta, options.gamma)
    return dict(c1=options.c1, c2=options.c2, alpha=options.alpha, beta=options.beta, gamma=options.gamma,
                R=options.window_size // 2, PADDING=options.padding, CLAMP=options.clamp,
                DEFAULT_EXPONENTS=exponents == (1.0, 1.0, 1.0),
                KINDS=tuple(_exponent_kind(e) for e in exponents),
                ODDS=tuple(float(e).is_integer() and int(e) % 2 == 1 for e in exponents),
                EPS_SIGMA=EPS_SIGMA, BLOCK=BLOCK, DOT_PRECISION=DOT_PRECISION, FIELDS=NUM_FIELDS)


def ssim_fwd_triton(xs, ys, x_affines, y_affines, level_scales, options, write_map):
    """Forward of ssimkd::fused_ssim_fwd_triton: (level_losses [L] float32, SSIM maps or [])."""
    _check(xs, ys)
    device = xs[0].device
    radius = options.window_size // 2
    offset = radius if options.padding == VALID else 0
    maps = ([torch.empty(x.shape[0], x.shape[1], x.shape[2] - 2 * offset, x.shape[3] - 2 * offset,
                         dtype=torch.float32, device=device) for x in xs] if write_map else [])
    table, scales, tiles, _ = _level_table(xs, ys, x_affines, y_affines, maps, [], [], [], BLOCK - 2 * radius,
                                           level_scales, device)
    partials = torch.empty(tiles, dtype=torch.float32, device=device)
    has_affine = bool(x_affines)
    _ssim_fwd_kernel[(tiles,)](
        x_ptr=xs[0], y_ptr=ys[0],
        xa_ptr=x_affines[0] if has_affine else partials, ya_ptr=y_affines[0] if has_affine else partials,
        map_ptr=maps[0] if write_map else partials, taps_ptr=_taps(options, device), table_ptr=table,
        partials_ptr=partials, num_levels=len(xs), HAS_AFFINE=has_affine, WRITE_MAP=write_map,
        **_scalars(options),
    )
    losses = torch.empty(len(xs), dtype=torch.float32, device=device)
    _level_sum_kernel[(len(xs),)](partials_ptr=partials, table_ptr=table,
                                  scales_ptr=scales, out_ptr=losses, CHUNK=256,
                                  FIELDS=NUM_FIELDS)
    return losses, maps


def ssim_bwd_triton(grad_losses, grad_maps, xs, ys, x_affines, y_affines, level_scales, options, x_needs_grad,
                    y_needs_grad):
    """Backward of ssimkd::fused_ssim_fwd_triton: (gxs, gys, g_x_affines, g_y_affines), [] where not needed."""
    _check(xs, ys)
    device = xs[0].device
    radius = options.window_size // 2
    gxs = [torch.empty_like(x) for x in xs] if x_needs_grad else []
    gys = [torch.empty_like(y) for y in ys] if y_needs_grad else []
    table, scales, tiles, planes = _level_table(xs, ys, x_affines, y_affines, [], grad_maps, gxs, gys,
                                                BLOCK - 4 * radius, level_scales, device)
    partials = torch.zeros(tiles, 4, dtype=torch.float32, device=device)
    has_affine = bool(x_affines)
    _ssim_bwd_kernel[(tiles,)](
        x_ptr=xs[0], y_ptr=ys[0],
        xa_ptr=x_affines[0] if has_affine else partials, ya_ptr=y_affines[0] if has_affine else partials,
        gmap_ptr=grad_maps[0] if grad_maps else partials,
        gx_ptr=gxs[0] if gxs else xs[0], gy_ptr=gys[0] if gys else ys[0],
        taps_ptr=_taps(options, device), table_ptr=table, scales_ptr=scales,
        grad_ptr=grad_losses, partials_ptr=partials, num_levels=len(xs),
        HAS_AFFINE=has_affine, HAS_GRAD_MAP=bool(grad_maps), NEED_X=x_needs_grad, NEED_Y=y_needs_grad,
        **_scalars(options),
    )
    g_x_affines, g_y_affines = [], []
    if has_affine and (x_needs_grad or y_needs_grad):
        sums = torch.empty(planes, 4, dtype=torch.float32, device=device)
        _plane_sum_kernel[(planes,)](partials_ptr=partials, table_ptr=table, out_ptr=sums, num_levels=len(xs),
                                     CHUNK=64, FIELDS=NUM_FIELDS)
        start = 0
        for l, x in enumerate(xs):
            count = x.shape[0] * x.shape[1]
            block = sums[start : start + count].view(x.shape[0], x.shape[1], 4)
            # dL/d(scale, offset) = (sum dL/dx-hat (x - offset), -scale sum dL/dx-hat)
            if x_needs_grad:
                g_x_affines.append(torch.stack([block[..., 0], -x_affines[l][..., 0] * block[..., 1]], dim=-1))
            if y_needs_grad:
                g_y_affines.append(torch.stack([block[..., 2], -y_affines[l][..., 0] * block[..., 3]], dim=-1))
            start += count
    return gxs, gys, g_x_affines, g_y_affines
