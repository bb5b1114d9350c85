"""Triton kernels of the fused SSIM-KD forward and backward (SPEC section 4), and their launchers.

Design: rolling rows. A program owns up to MAX_SLOTS *slots* in lockstep, each a strip of consecutive
columns of one plane of one level (one lane, one thread, per column; a strip carries a halo of window
centres when a plane has several strips), and walks down all the rows of its planes:

- Forward (lanes = output columns). Per output row p: the vertical 2r+1-tap pass of the five maps
  x', y', x'^2, y'^2, x'y' at each lane's own column, from 2r+1 loads of the column (the next rows
  read the same lines again from L1); the five column sums go to a per-program scratch row (double
  buffered: one barrier per row) and come back by 2r+1 shifted loads, weighted per lane by the padded
  blur along the row (a host table: reflect folds, zero padding's share, 0 off the plane); then the
  SSIM terms, m, the map row and a running per-lane sum.
- Backward (lanes = window-centre columns). The same statistics per centre row p; the coefficient rows
  a, b, c (SPEC section 2) through the scratch row again, weighted by the true transpose of the padded
  blur along the row (M_w); the transposed vertical pass runs as 2r open sums per map in registers
  (Triton tuples; weights M_h are taps or, near a reflect border, from the table), so centre row p
  completes gradient row p - r: dL/dx-hat = W^T a + 2 x' W^T b + y' W^T c.
- Rows whose windows cross the top or bottom edge run in their own loops through the padding's index
  map; interior rows (most of them) take plain offsets.

Every slot's sums are reduced per (plane, strip) pair, then in a fixed order per level (loss) and per
plane (the affine's gradient), in float64 rounded once, as on every backend (csrc/ssim_params.h, "second
stage"): no float atomics, so results are bitwise deterministic run to run, and per-plane sums come for
free.

Why this design. Static figures from bench/kernel_report.py (no GPU; sm_90, triton 3.8, float32,
default options, SPEC's retinanet levels; per element of one input; FMA counts FFMA plus tensor-core
MACs one for one; SPEC's direct separable blur needs ~290 per element fwd+bwd):

    design (sm_90, fp32, defaults)             regs      stack B        FMA/element     instr/element  est. us
                                               fwd/bwd   fwd/bwd        fwd / bwd       fwd / bwd      fwd+bwd
    band product 64x64, ieee, 4 warps (prev.)  32/32     16,248/26,144  1,548 / 3,600   5,882 / 17,530  18,679
    band product 32x32, tf32x3, 4 warps        255/255   176/272        4,503 / 21,673  1,445 / 14,045   5,310
    rolling rows, horizontal first, rings      128/-     0/-            124 / -         376 / -            -
    rolling rows, vertical first (this file)   128/216   0/0            163 / 248       646 / 1,020        571

(FMA for tf32x3 is its MMA MACs, 3 products each, plus FFMA; est. us: bench/kernel_report.py's
estimated lower bound for SPEC's retinanet workload on an H100 SXM, not a measurement; SPEC's floor
is ~99 us. The backward is the student-gradient one; with the teacher gradient too: 255 registers,
no spills, 300 FMA per element; every configuration of the report, window 15 with both gradients
included, compiles without local memory on sm_80 and sm_90.) The "horizontal
first" variant pushes the five horizontally blurred rows into tuple rings of 2r+1 registers and
needs no scratch row nor barrier in the forward; its forward issues 0.58x the instructions of this
one, but its backward (coefficient rows through the scratch, a second ring for the transposed
vertical pass) does not compile yet (a loop-carried tuple whose type changes in a branch), so this
file keeps the vertical-first forward and backward, which share their statistics code.

The band products (previous design) spend K = BLOCK MACs per output where the blur needs 2r+1 and
keep ~10 fp32 tiles per program live, so both tile shapes measured spill; on tensor cores (tf32x3,
3 MMAs per product) the MAC count grows further. The rolling rows keep per lane only the moments of
the current row, its 2r+1 weights along the row and (backward) 2r open sums per map, so nothing
spills; each blur tap is one FMA. The register caps that keep ptxas from spilling are MAX_REGISTERS below.

Numerics follow csrc/ssim_math.h: the statistics are moments of x' = x-hat minus a centre per slot
(the mean of x-hat over the slot's first output row's windows), exact for any shift, which keeps
float32 variances from cancelling; the backward forms x' with the very same rounding as the forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._constants import EPS_SIGMA, MAX_LEVELS_PER_LAUNCH, PADDING_CODES
from .reference import gaussian_window_1d, output_extent, reflect_index

# Padding codes (the Padding enum of csrc/ssim_math.h), as the kernels' PADDING constexpr.
REFLECT = tl.constexpr(PADDING_CODES["reflect"])
ZERO = tl.constexpr(PADDING_CODES["zero"])
VALID = tl.constexpr(PADDING_CODES["valid"])

# How _power raises a term to an exponent (chosen on the host by _exponent_kind).
EXPONENT_ABSENT = tl.constexpr(0)  # e = 0: the factor is 1
EXPONENT_ONE = tl.constexpr(1)  # e = 1: the term itself, exactly
EXPONENT_INTEGER = tl.constexpr(2)  # integer e >= 2: defined for negative terms (sign by parity)
EXPONENT_GENERAL = tl.constexpr(3)  # any other e: NaN for negative terms, as std::pow
EXPONENT_PER_LEVEL = tl.constexpr(4)  # the levels of a launch differ: each of the above, chosen at run time

# Lanes of one program: one thread each (8 warps), the most a slot can span. A level's planes are cut
# into strips and packed into slots so that few lanes idle (level_plan); a program holds at most
# MAX_SLOTS slots, so its per-slot sums stay a small reduction (16 values per thread: 32 would cost the
# forward 46 more registers, half its occupancy).
LANES = 256
NUM_WARPS = 8
MAX_SLOTS = 16
# Register caps (ptxas .maxnreg) per kernel. Left to itself under Triton's .reqntid, ptxas holds the
# forward at 128 registers and spills 16-48 bytes (zero padding, window 15); given an explicit cap it
# allocates what it needs below it without spilling: the default forward 118-126 (2 programs, 16 warps
# per SM), valid padding or window 15 up to 153. A cap of 128 spills those; 168 does not. The backward
# needs more (window 15 with the teacher gradient: all 255) and gets the architecture's maximum.
MAX_REGISTERS = {"fwd": 168, "bwd": 255}


def launch_options(kernel: str) -> dict:
    """The compile options of the forward ("fwd") or backward ("bwd") kernel, for its launches and for
    kernel_report (which compiles them for a GPU target without one)."""
    return dict(num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS[kernel])


MAX_LEVELS = tl.constexpr(MAX_LEVELS_PER_LAUNCH)

# The level table: one int64 row per level, these columns. Offsets are in elements from level 0's
# tensor of the same role, so one launch covers every level without copying any.
COL_X_OFF = tl.constexpr(0)  # x: offset and strides (n, c, h, w)
COL_XS_N = tl.constexpr(1)
COL_XS_C = tl.constexpr(2)
COL_XS_H = tl.constexpr(3)
COL_XS_W = tl.constexpr(4)
COL_Y_OFF = tl.constexpr(5)  # y: offset and strides
COL_YS_N = tl.constexpr(6)
COL_YS_C = tl.constexpr(7)
COL_YS_H = tl.constexpr(8)
COL_YS_W = tl.constexpr(9)
COL_C = tl.constexpr(10)  # channels, rows, columns of the level's planes
COL_H = tl.constexpr(11)
COL_W = tl.constexpr(12)
COL_STRIPS = tl.constexpr(13)  # strips per plane; (plane, strip) pairs are numbered plane * strips + strip
COL_STRIP_W = tl.constexpr(14)  # columns a strip owns (outputs, or gradient columns)
COL_SLOT_W = tl.constexpr(15)  # lanes of one slot: the strip plus its halo of window centres
COL_HALO = tl.constexpr(16)  # halo columns left of the strip (backward with several strips: r)
COL_SLOTS = tl.constexpr(17)  # slots per program
COL_PAIRS = tl.constexpr(18)  # (plane, strip) pairs of the level
COL_PROGRAM_BEGIN = tl.constexpr(19)  # first program of the level
COL_PAIR_BEGIN = tl.constexpr(20)  # first pair of the level in the partial sums
COL_XA_OFF = tl.constexpr(21)  # x's (N, C, 2) affine: offset, strides (n, c, k)
COL_XA_N = tl.constexpr(22)
COL_XA_C = tl.constexpr(23)
COL_XA_K = tl.constexpr(24)
COL_YA_OFF = tl.constexpr(25)  # y's affine
COL_YA_N = tl.constexpr(26)
COL_YA_C = tl.constexpr(27)
COL_YA_K = tl.constexpr(28)
COL_MAP_OFF = tl.constexpr(29)  # the SSIM map (forward), the map's gradient (backward): contiguous
COL_GX_OFF = tl.constexpr(30)  # dL/dx: offset, strides
COL_GXS_N = tl.constexpr(31)
COL_GXS_C = tl.constexpr(32)
COL_GXS_H = tl.constexpr(33)
COL_GXS_W = tl.constexpr(34)
COL_GY_OFF = tl.constexpr(35)  # dL/dy
COL_GYS_N = tl.constexpr(36)
COL_GYS_C = tl.constexpr(37)
COL_GYS_H = tl.constexpr(38)
COL_GYS_W = tl.constexpr(39)
COL_GATHER_WEIGHTS = tl.constexpr(40)  # offsets in the weights buffer: the blur along a row (W + 2r, 2r+1),
COL_COL_WEIGHTS = tl.constexpr(41)  # its true transpose along a row (W + 2r, 2r+1),
COL_ROW_WEIGHTS = tl.constexpr(42)  # and along a column (H + 2r, 2r+1)
COL_GXA_OFF = tl.constexpr(43)  # dL/d x's affine, contiguous (N, C, 2): offset (backward with affines)
COL_GYA_OFF = tl.constexpr(44)  # dL/d y's affine
COL_PW_OFF = tl.constexpr(45)  # the per-pixel weights of m (the op's `weights`, map coordinates): offset,
COL_PWS_N = tl.constexpr(46)  # strides (n, c, h, w)
COL_PWS_C = tl.constexpr(47)
COL_PWS_H = tl.constexpr(48)
COL_PWS_W = tl.constexpr(49)
COL_LOSS_BEGIN = tl.constexpr(50)  # the level's first loss output (one per level, or per plane): its index
NUM_COLUMNS = tl.constexpr(51)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


class Lanes(NamedTuple):
    """What one program owns, per lane: a column of one (plane, strip) pair of one level."""

    level: tl.tensor
    row: tl.tensor  # pointer to the level's table row
    group: tl.tensor  # the program's index among the level's programs
    H: tl.tensor
    W: tl.tensor
    slots: tl.tensor  # slots of this program
    pairs: tl.tensor  # pairs of the level
    slot_w: tl.tensor  # lanes per slot
    slot: tl.tensor  # per lane: its slot
    k: tl.tensor  # per lane: its place in the slot
    start: tl.tensor  # per lane: the first column its strip owns
    col: tl.tensor  # per lane: its column, possibly outside the plane (halo, idle lanes)
    active: tl.tensor  # per lane: a column of a real pair
    owned: tl.tensor  # per lane: active and one of the strip's own columns (not halo)
    load_col: tl.tensor  # per lane: col clamped into the plane, safe to load (idle lanes included)
    plane: tl.tensor  # per lane: n * C + c of its pair (clamped to the level's last pair)
    n: tl.tensor
    c: tl.tensor


class Affine(NamedTuple):
    """x-hat = scale * (x - offset) of one plane, per lane."""

    scale: tl.tensor
    offset: tl.tensor


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
    """Plane index read at padded position i: reflect folds, zero gives -1 (reads 0) outside the
    plane, valid clamps (only positions whose result is discarded fall outside)."""
    if PADDING == REFLECT:
        return _fold_reflect(i, n)
    elif PADDING == ZERO:
        return tl.where((i >= 0) & (i < n), i, -1)
    else:
        return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _pixel_weight_column(pixel_weight_ptr, row, lanes: Lanes, offset, WIDE: tl.constexpr):
    """The level's per-pixel weights of m: (their base pointer, per lane the offset of its column at map
    row -offset, the row stride): centre row p of a lane is at base + column + p * stride, read at
    centres only. Offsets are int32 unless WIDE (one pointer per program, not one per lane)."""
    stride_h = _row_stride(row, COL_PWS_H, WIDE)
    column = (
        lanes.n * _row_stride(row, COL_PWS_N, WIDE)
        + lanes.c * _row_stride(row, COL_PWS_C, WIDE)
        + (lanes.load_col - offset) * _row_stride(row, COL_PWS_W, WIDE)
        - offset * stride_h
    )
    return pixel_weight_ptr + tl.load(row + COL_PW_OFF), column, stride_h


@triton.jit
def _level_exponents(exponents_ptr, level):
    """(alpha, beta, gamma) of a level, from the launch's [levels, 3] table (unused, so never loaded, when
    every exponent's kind is known at compile time)."""
    at = exponents_ptr + 3 * level
    return tl.load(at), tl.load(at + 1), tl.load(at + 2)


@triton.jit
def _find_level(table_ptr, program, num_levels):
    """The level whose programs hold `program` (a launch holds at most MAX_LEVELS levels)."""
    level = 0
    for l in tl.static_range(1, MAX_LEVELS):
        begin = tl.load(table_ptr + l * NUM_COLUMNS + COL_PROGRAM_BEGIN, mask=l < num_levels, other=0)
        level += ((l < num_levels) & (program >= begin)).to(tl.int32)
    return level


@triton.jit
def _lanes(table_ptr, num_levels, LANES: tl.constexpr) -> Lanes:
    """Which level, pairs and columns this program's lanes hold (the host's plan, _level_plan)."""
    program = tl.program_id(0)
    level = _find_level(table_ptr, program, num_levels)
    row = table_ptr + level * NUM_COLUMNS
    H = tl.load(row + COL_H).to(tl.int32)
    W = tl.load(row + COL_W).to(tl.int32)
    C = tl.load(row + COL_C).to(tl.int32)
    strips = tl.load(row + COL_STRIPS).to(tl.int32)
    strip_w = tl.load(row + COL_STRIP_W).to(tl.int32)
    slot_w = tl.load(row + COL_SLOT_W).to(tl.int32)
    halo = tl.load(row + COL_HALO).to(tl.int32)
    slots = tl.load(row + COL_SLOTS).to(tl.int32)
    pairs = tl.load(row + COL_PAIRS).to(tl.int32)
    group = program - tl.load(row + COL_PROGRAM_BEGIN).to(tl.int32)

    lane = tl.arange(0, LANES)
    slot = lane // slot_w
    k = lane - slot * slot_w
    pair = group * slots + slot
    real = (slot < slots) & (pair < pairs)
    pair = tl.minimum(pair, pairs - 1)
    plane = pair // strips
    strip = pair - plane * strips
    start = strip * strip_w
    col = start - halo + k
    active = real & (col >= 0) & (col < W)
    owned = active & (col >= start) & (col < start + strip_w)
    n = plane // C
    return Lanes(
        level,
        row,
        group,
        H,
        W,
        slots,
        pairs,
        slot_w,
        slot,
        k,
        start,
        col,
        active,
        owned,
        tl.minimum(tl.maximum(col, 0), W - 1),
        plane,
        n,
        plane - n * C,
    )


@triton.jit
def _output_extent(n, R: tl.constexpr, PADDING: tl.constexpr):
    """Outputs along an axis of n positions (reference.output_extent): valid windows lie inside."""
    return n - 2 * R if PADDING == VALID else n


@triton.jit
def _plane_pointer(base_ptr, row, lanes: Lanes, OFF: tl.constexpr, S_N: tl.constexpr, S_C: tl.constexpr):
    """Per lane: the start of its plane in a tensor whose offset and strides are table columns OFF, S_N,
    S_C (int64, so tensors past 2^31 elements work)."""
    return (
        base_ptr
        + tl.load(row + OFF)
        + lanes.n.to(tl.int64) * tl.load(row + S_N)
        + lanes.c.to(tl.int64) * tl.load(row + S_C)
    )


@triton.jit
def _row_stride(row, COLUMN: tl.constexpr, WIDE: tl.constexpr):
    """A row stride from the table: int32 (cheaper offsets) unless some offset may pass 2^31 (WIDE)."""
    if WIDE:
        return tl.load(row + COLUMN)
    else:
        return tl.load(row + COLUMN).to(tl.int32)


@triton.jit
def _affine(
    aff_ptr,
    row,
    lanes: Lanes,
    OFF: tl.constexpr,
    S_N: tl.constexpr,
    S_C: tl.constexpr,
    S_K: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
) -> Affine:
    """Per lane: the (scale, offset) of its plane's affine, or the identity."""
    if HAS_AFFINE:
        base = _plane_pointer(aff_ptr, row, lanes, OFF, S_N, S_C)
        return Affine(tl.load(base), tl.load(base + tl.load(row + S_K)))
    else:
        return Affine(tl.full(lanes.col.shape, 1.0, tl.float32), tl.zeros(lanes.col.shape, tl.float32))


@triton.jit
def _power(v, e, KIND: tl.constexpr, ODD: tl.constexpr):
    """(v^e, d v^e / dv) as std::pow in csrc/ssim_math.h; KIND from the host (_exponent_kind)."""
    if KIND == EXPONENT_PER_LEVEL:  # e differs between the launch's levels (one per program): decide here
        log_v = tl.log2(tl.abs(v))
        value = tl.exp2(e * log_v)
        derivative = e * tl.exp2((e - 1.0) * log_v)
        integer = e == tl.floor(e)
        odd = integer & (e - 2.0 * tl.floor(e * 0.5) == 1.0)
        negative = v < 0.0
        signed_value = tl.where(integer, tl.where(odd, -value, value), float("nan"))  # as std::pow of v < 0
        signed_derivative = tl.where(integer, tl.where(odd, derivative, -derivative), float("nan"))
        value = tl.where(negative, signed_value, value)
        derivative = tl.where(negative, signed_derivative, derivative)
        value = tl.where(e == 0.0, 1.0, tl.where(e == 1.0, v, value))
        derivative = tl.where(e == 0.0, 0.0, tl.where(e == 1.0, 1.0, derivative))
        return value, derivative
    elif KIND == EXPONENT_ABSENT:
        return tl.full(v.shape, 1.0, tl.float32), tl.zeros(v.shape, tl.float32)
    elif KIND == EXPONENT_ONE:
        return v, tl.full(v.shape, 1.0, tl.float32)
    else:
        log_v = tl.log2(tl.abs(v))
        value = tl.exp2(e * log_v)
        derivative = e * tl.exp2((e - 1.0) * log_v)
        if KIND == EXPONENT_INTEGER:
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
def _ssim_and_partials(
    mu_x,
    mu_y,
    var_x,
    var_y,
    cov,
    c1,
    c2,
    alpha,
    beta,
    gamma,
    EPS: tl.constexpr,
    CLOSED_FORM: tl.constexpr,
    PARTIALS: tl.constexpr,
    KINDS: tl.constexpr,
    ODDS: tl.constexpr,
):
    """S and dS/d(mu_x, mu_y, var_x, var_y, cov) (csrc/ssim_math.h, ssim_partials)."""
    A1 = 2.0 * mu_x * mu_y + c1
    B1 = mu_x * mu_x + mu_y * mu_y + c1
    B2 = var_x + var_y + c2
    if CLOSED_FORM:  # beta = gamma = 1, alpha 0 or 1: S = (A1 / B1)^alpha A2 / B2 (ssim_partials_closed_form)
        A2 = 2.0 * cov + c2
        if KINDS[0] == EXPONENT_ABSENT:
            has_l = False
        elif KINDS[0] == EXPONENT_PER_LEVEL:  # MS-SSIM's launch: alpha 0 on its contrast-structure levels
            has_l = alpha != 0.0
        if KINDS[0] != EXPONENT_ONE:  # l = 1 where alpha = 0
            A1 = tl.where(has_l, A1, 1.0)
            B1 = tl.where(has_l, B1, 1.0)
        inv_B1B2 = 1.0 / (B1 * B2)
        S = A1 * A2 * inv_B1B2
        if PARTIALS:
            dS_dmu_x = 2.0 * mu_y * A2 * inv_B1B2 - 2.0 * mu_x * S / B1
            dS_dmu_y = 2.0 * mu_x * A2 * inv_B1B2 - 2.0 * mu_y * S / B1
            if KINDS[0] != EXPONENT_ONE:
                dS_dmu_x = tl.where(has_l, dS_dmu_x, 0.0)
                dS_dmu_y = tl.where(has_l, dS_dmu_y, 0.0)
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
def _slot_sums(values, lanes: Lanes, MAX_SLOTS: tl.constexpr):
    """Per slot of the program: the sum of `values` over the slot's lanes (0 past the last slot)."""
    s = tl.arange(0, MAX_SLOTS)
    return tl.sum(tl.where(lanes.slot[None, :] == s[:, None], values[None, :], 0.0), axis=1)


@triton.jit
def _pair_index(lanes: Lanes, MAX_SLOTS: tl.constexpr):
    """Index in the launch's partial sums of each slot's pair, and whether the slot holds one."""
    s = tl.arange(0, MAX_SLOTS)
    pair = lanes.group * lanes.slots + s
    return tl.load(lanes.row + COL_PAIR_BEGIN) + pair, (s < lanes.slots) & (pair < lanes.pairs)


# ------------------------------------------------------------------------------------------------
# The statistics of one output row (forward and backward)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _scratch_lanes(scratch_ptr, ROWS: tl.constexpr, ROW: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr):
    """Per lane: its place in this program's ROWS scratch rows of ROW = LANES + 2r floats (lane q at
    q + r), the r-wide end margins zeroed: a lane near either end reads them with weight 0."""
    lane = tl.arange(0, LANES)
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * (ROWS * ROW) + R + lane
    for m in tl.static_range(ROWS):
        tl.store(scratch + (m * ROW - R), tl.zeros((LANES,), tl.float32), mask=lane < R)
        tl.store(scratch + (m * ROW + LANES), tl.zeros((LANES,), tl.float32), mask=lane < R)
    return scratch


@triton.jit
def _gather_weights(weights_ptr, row, lanes: Lanes, R: tl.constexpr, KP: tl.constexpr):
    """Per lane q: ([KP, LANES] A(q, q - r + j), the blur along the row as weights of the positions it
    reads, 0 off the plane; the sum of the taps that fall off the plane, zero padding's share)."""
    K: tl.constexpr = 2 * R + 1
    k = tl.arange(0, KP)[:, None]
    table = tl.load(
        weights_ptr + tl.load(row + COL_GATHER_WEIGHTS) + (lanes.load_col[None, :] + R) * (K + 1) + k,
        mask=k <= K,
        other=0.0,
    )
    return tl.where(k < K, table, 0.0), tl.sum(tl.where(k == K, table, 0.0), axis=0)


@triton.jit
def _column_moments(
    x_col,
    xs_h,
    y_col,
    ys_h,
    p,
    H,
    x_aff: Affine,
    y_aff: Affine,
    cx,
    cy,
    g: tl.constexpr,
    R: tl.constexpr,
    PADDING: tl.constexpr,
    BORDER: tl.constexpr,
):
    """The vertical pass for output row p at each lane's own column: sum over k of g_k z(p - r + k) for
    z = x', y', x'^2, y'^2, x'y' (x' = x-hat - cx), g the taps (immediates). BORDER: some of the rows
    are off the plane, read through the padding's index map; else they are p - r .. p + r. One 1-D
    load per tap, not a [taps, lanes] block: triton 3.6 gives such blocks a layout that it converts
    through shared memory every row, and spills. Also returns the raw x and y of row p (the L1 term's;
    unused values cost nothing)."""
    shift_x = x_aff.scale * x_aff.offset + cx
    shift_y = y_aff.scale * y_aff.offset + cy
    sx = tl.zeros_like(cx)
    sy = tl.zeros_like(cx)
    sxx = tl.zeros_like(cx)
    syy = tl.zeros_like(cx)
    sxy = tl.zeros_like(cx)
    raw_x = tl.zeros_like(cx)
    raw_y = tl.zeros_like(cx)
    for k in tl.static_range(2 * R + 1):
        if BORDER:
            source = _source_index(p - R + k, H, PADDING)
            inside = source >= 0
            xr = tl.load(x_col + source * xs_h, mask=inside, other=0.0).to(tl.float32)
            yr = tl.load(y_col + source * ys_h, mask=inside, other=0.0).to(tl.float32)
            outside_x = -cx if PADDING == ZERO else 0.0
            outside_y = -cy if PADDING == ZERO else 0.0
            xv = tl.where(inside, xr * x_aff.scale - shift_x, outside_x)
            yv = tl.where(inside, yr * y_aff.scale - shift_y, outside_y)
        else:
            xr = tl.load(x_col + (p - R + k) * xs_h).to(tl.float32)
            yr = tl.load(y_col + (p - R + k) * ys_h).to(tl.float32)
            xv = xr * x_aff.scale - shift_x
            yv = yr * y_aff.scale - shift_y
        if k == R:
            raw_x = xr
            raw_y = yr
        gx = g[k] * xv
        gy = g[k] * yv
        sx += gx
        sy += gy
        sxx += gx * xv
        syy += gy * yv
        sxy += gx * yv
    return sx, sy, sxx, syy, sxy, raw_x, raw_y


@triton.jit
def _shifted_sums(scratch, weights, MAPS: tl.constexpr, R: tl.constexpr, KP: tl.constexpr, ROW: tl.constexpr):
    """Per lane q and map m < MAPS: sum over j of weights[j, q] v_m(q - r + j), v_m being scratch row m
    as the lanes wrote it before the last barrier."""
    k = tl.arange(0, KP)[:, None]
    shifted = scratch[None, :] + (k - R)
    sums = ()
    for m in tl.static_range(MAPS):
        sums = sums + (tl.sum(weights * tl.load(shifted + m * ROW, mask=k < 2 * R + 1, other=0.0), axis=0),)
    return sums


@triton.jit
def _row_moments(
    scratch,
    columns,
    weights,
    outside,
    cx,
    cy,
    R: tl.constexpr,
    KP: tl.constexpr,
    ROW: tl.constexpr,
    PADDING: tl.constexpr,
):
    """The horizontal pass: each lane's five column sums go to the scratch rows, one barrier, then each
    lane reads its neighbours' back: mu' = sum_j A(q, q - r + j) column(q - r + j), the weights A
    holding the padding's folds (and 0 off the plane). Under zero padding the taps off the plane read
    x-hat = 0, i.e. x' = -cx: their share `outside` (per lane, the sum of those taps) is added as such.
    Returns the five moments mu'_x, mu'_y, E[x'^2], E[y'^2], E[x'y'] of the lanes' window centres."""
    for m in tl.static_range(5):
        tl.store(scratch + m * ROW, columns[m])
    tl.debug_barrier()
    mu_x, mu_y, e_xx, e_yy, e_xy = _shifted_sums(scratch, weights, 5, R, KP, ROW)
    if PADDING == ZERO:
        mu_x -= outside * cx
        mu_y -= outside * cy
        e_xx += outside * cx * cx
        e_yy += outside * cy * cy
        e_xy += outside * cx * cy
    return mu_x, mu_y, e_xx, e_yy, e_xy


@triton.jit
def _slot_centres(
    x_col,
    xs_h,
    y_col,
    ys_h,
    p0,
    H,
    x_aff: Affine,
    y_aff: Affine,
    g: tl.constexpr,
    lanes: Lanes,
    R: tl.constexpr,
    KP: tl.constexpr,
    PADDING: tl.constexpr,
    MAX_SLOTS: tl.constexpr,
):
    """Per lane: the centres cx, cy of its slot, the mean of x-hat and y-hat over the first output row's
    windows (the vertical pass of rows p0 - r .. p0 + r, averaged over the slot's columns). Any centre
    is exact; one near the data keeps the float32 variances E[x'^2] - mu'^2 from cancelling."""
    zero = tl.zeros((x_col.shape[0],), tl.float32)
    columns = _column_moments(x_col, xs_h, y_col, ys_h, p0, H, x_aff, y_aff, zero, zero, g, R, PADDING, True)
    s = tl.arange(0, MAX_SLOTS)[:, None]
    member = (lanes.slot[None, :] == s) & lanes.active[None, :]
    count = tl.maximum(tl.sum(member.to(tl.float32), axis=1), 1.0)[:, None]
    mean_x = tl.sum(tl.where(member, columns[0][None, :], 0.0), axis=1)[:, None] / count
    mean_y = tl.sum(tl.where(member, columns[1][None, :], 0.0), axis=1)[:, None] / count
    mine = lanes.slot[None, :] == s
    return tl.sum(tl.where(mine, mean_x, 0.0), axis=0), tl.sum(tl.where(mine, mean_y, 0.0), axis=0)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _forward_row(
    p,
    total,
    l1_total,
    x_col,
    xs_h,
    y_col,
    ys_h,
    H,
    x_aff: Affine,
    y_aff: Affine,
    cx,
    cy,
    g: tl.constexpr,
    gather,
    outside,
    scratch,
    out_col,
    owned,
    map_row,
    out_w,
    pw_base,
    pw_col,
    pws_h,
    c1,
    c2,
    alpha,
    beta,
    gamma,
    R: tl.constexpr,
    KP: tl.constexpr,
    ROW: tl.constexpr,
    PADDING: tl.constexpr,
    BORDER: tl.constexpr,
    WRITE_MAP: tl.constexpr,
    HAS_PIXEL_WEIGHTS: tl.constexpr,
    HAS_L1: tl.constexpr,
    CLOSED_FORM: tl.constexpr,
    CLAMP: tl.constexpr,
    EPS_SIGMA: tl.constexpr,
    KINDS: tl.constexpr,
    ODDS: tl.constexpr,
):
    """Output row p: the vertical pass at the lanes' columns, the horizontal pass through `scratch` (the
    buffer of this row's parity: slower warps may still read the other one), the SSIM terms; returns
    (total + w m on the output columns, w the pixel's weight or 1; l1_total + |x-hat - y-hat| of row p on
    the strip's columns with HAS_L1) and stores S to the map when asked."""
    columns = _column_moments(x_col, xs_h, y_col, ys_h, p, H, x_aff, y_aff, cx, cy, g, R, PADDING, BORDER)
    if HAS_L1:
        l1_total = _add_l1(l1_total, columns[5], columns[6], x_aff, y_aff, owned)
    mu_x, mu_y, e_xx, e_yy, e_xy = _row_moments(scratch, columns, gather, outside, cx, cy, R, KP, ROW, PADDING)
    S, _, _, _, _, _ = _ssim_and_partials(
        mu_x + cx,
        mu_y + cy,
        e_xx - mu_x * mu_x,
        e_yy - mu_y * mu_y,
        e_xy - mu_x * mu_y,
        c1,
        c2,
        alpha,
        beta,
        gamma,
        EPS_SIGMA,
        CLOSED_FORM,
        False,
        KINDS,
        ODDS,
    )
    m = (1.0 - S) * 0.5
    if CLAMP:
        m = tl.where(m < 0.0, 0.0, tl.where(m > 1.0, 1.0, m))  # NaN stays NaN
    if WRITE_MAP:
        tl.store(map_row + p * out_w, S, mask=out_col)
    if HAS_PIXEL_WEIGHTS:
        m = m * tl.load(pw_base + (pw_col + p * pws_h), mask=out_col, other=0.0)
    return total + tl.where(out_col, m, 0.0), l1_total


@triton.jit
def _add_l1(l1_total, raw_x, raw_y, x_aff: Affine, y_aff: Affine, owned):
    """l1_total + |x-hat - y-hat| on the lanes that own their column, x-hat = scale * (x - offset) as the
    other backends form it (csrc/ssim_params.h, LevelDesc::l1_scale)."""
    d = x_aff.scale * (raw_x - x_aff.offset) - y_aff.scale * (raw_y - y_aff.offset)
    return l1_total + tl.where(owned, tl.abs(d), 0.0)


@triton.jit
def _l1_rows(l1_total, x_col, xs_h, y_col, ys_h, begin, end, x_aff: Affine, y_aff: Affine, owned):
    """The L1 term of rows [begin, end), which no output row holds (valid padding's top and bottom r rows)."""
    for u in range(begin, end):
        raw_x = tl.load(x_col + u * xs_h, mask=owned, other=0.0).to(tl.float32)
        raw_y = tl.load(y_col + u * ys_h, mask=owned, other=0.0).to(tl.float32)
        l1_total = _add_l1(l1_total, raw_x, raw_y, x_aff, y_aff, owned)
    return l1_total


@triton.jit
def _ssim_fwd_kernel(
    x_ptr,
    y_ptr,
    xa_ptr,
    ya_ptr,
    map_ptr,
    pixel_weight_ptr,
    weights_ptr,
    table_ptr,
    partials_ptr,
    scratch_ptr,
    exponents_ptr,
    num_levels,
    c1,
    c2,
    TAPS: tl.constexpr,
    R: tl.constexpr,
    PADDING: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    WRITE_MAP: tl.constexpr,
    HAS_PIXEL_WEIGHTS: tl.constexpr,
    HAS_L1: tl.constexpr,
    CLOSED_FORM: tl.constexpr,
    CLAMP: tl.constexpr,
    EPS_SIGMA: tl.constexpr,
    KINDS: tl.constexpr,
    ODDS: tl.constexpr,
    WIDE: tl.constexpr,
    LANES: tl.constexpr,
    MAX_SLOTS: tl.constexpr,
):
    # One program: slots of output columns (plus an r halo when a plane has several strips) of one level,
    # all rows. Per output row p: the vertical pass at each lane's column, the horizontal pass through a
    # scratch row, then on x' = x-hat - (the slot's centre)
    #   mu' = W x', var = W(x'^2) - mu'^2, cov = W(x'y') - mu'_x mu'_y,
    #   S = (A1 / B1)^a A2 / B2 (or l^a c^b s^g), m = (1 - S) / 2; writes each pair's sum of w m (w: the
    #   pixel's weight, or 1) and, with HAS_L1, of |x-hat - y-hat| over its pixels; the map when asked.
    K: tl.constexpr = 2 * R + 1
    KP: tl.constexpr = triton.next_power_of_2(K)
    ROW: tl.constexpr = LANES + 2 * R
    lanes = _lanes(table_ptr, num_levels, LANES)
    alpha, beta, gamma = _level_exponents(exponents_ptr, lanes.level)
    row = lanes.row
    H = lanes.H
    W = lanes.W
    x_plane = _plane_pointer(x_ptr, row, lanes, COL_X_OFF, COL_XS_N, COL_XS_C)
    y_plane = _plane_pointer(y_ptr, row, lanes, COL_Y_OFF, COL_YS_N, COL_YS_C)
    xs_w = tl.load(row + COL_XS_W)
    ys_w = tl.load(row + COL_YS_W)
    xs_h = _row_stride(row, COL_XS_H, WIDE)
    ys_h = _row_stride(row, COL_YS_H, WIDE)
    x_col = x_plane + lanes.load_col.to(tl.int64) * xs_w
    y_col = y_plane + lanes.load_col.to(tl.int64) * ys_w
    x_aff = _affine(xa_ptr, row, lanes, COL_XA_OFF, COL_XA_N, COL_XA_C, COL_XA_K, HAS_AFFINE)
    y_aff = _affine(ya_ptr, row, lanes, COL_YA_OFF, COL_YA_N, COL_YA_C, COL_YA_K, HAS_AFFINE)
    g: tl.constexpr = TAPS
    gather, outside = _gather_weights(weights_ptr, row, lanes, R, KP)
    # Output rows [p0, p_end) and columns: window centres whose window lies in the padded plane.
    p0 = R if PADDING == VALID else 0
    p_end = H - R if PADDING == VALID else H
    out_col = lanes.owned
    if PADDING == VALID:
        out_col = out_col & (lanes.col >= R) & (lanes.col < W - R)

    # ---- centring on a mean of each slot's first windows; scratch rows: 2 buffers x 5 maps
    cx, cy = _slot_centres(x_col, xs_h, y_col, ys_h, p0, H, x_aff, y_aff, g, lanes, R, KP, PADDING, MAX_SLOTS)
    scratch = _scratch_lanes(scratch_ptr, 10, ROW, R, LANES)

    offset = R if PADDING == VALID else 0
    out_w = _output_extent(W, R, PADDING)
    map_row = (
        map_ptr
        + tl.load(row + COL_MAP_OFF)
        + lanes.plane.to(tl.int64) * _output_extent(H, R, PADDING) * out_w
        + (lanes.load_col - offset)
        - offset * out_w
    )
    pw_base, pw_col, pws_h = _pixel_weight_column(pixel_weight_ptr, row, lanes, offset, WIDE)
    # ---- rows: those whose window crosses the top or bottom edge read through the padding's index map
    top = tl.minimum(R, p_end) if PADDING != VALID else p0
    bottom = tl.maximum(top, H - R) if PADDING != VALID else p_end
    total = tl.zeros((LANES,), tl.float32)
    l1_total = tl.zeros((LANES,), tl.float32)
    # three row ranges, unrolled at compile time: the top border, the interior (plain offsets), the bottom
    for segment in tl.static_range(3):
        begin = p0 if segment == 0 else (top if segment == 1 else bottom)
        end = top if segment == 0 else (bottom if segment == 1 else p_end)
        for p in range(begin, end):
            total, l1_total = _forward_row(
                p,
                total,
                l1_total,
                x_col,
                xs_h,
                y_col,
                ys_h,
                H,
                x_aff,
                y_aff,
                cx,
                cy,
                g,
                gather,
                outside,
                scratch + ((p - p0) % 2) * (5 * ROW),
                out_col,
                lanes.owned,
                map_row,
                out_w,
                pw_base,
                pw_col,
                pws_h,
                c1,
                c2,
                alpha,
                beta,
                gamma,
                R,
                KP,
                ROW,
                PADDING,
                segment != 1,
                WRITE_MAP,
                HAS_PIXEL_WEIGHTS,
                HAS_L1,
                CLOSED_FORM,
                CLAMP,
                EPS_SIGMA,
                KINDS,
                ODDS,
            )
    if HAS_L1 and PADDING == VALID:  # the rows no output row holds
        l1_total = _l1_rows(l1_total, x_col, xs_h, y_col, ys_h, 0, R, x_aff, y_aff, lanes.owned)
        l1_total = _l1_rows(l1_total, x_col, xs_h, y_col, ys_h, H - R, H, x_aff, y_aff, lanes.owned)

    # ---- reduce: each pair's sums of w m and (with HAS_L1) of |x-hat - y-hat|, partials [pairs, 2]
    index, holds = _pair_index(lanes, MAX_SLOTS)
    tl.store(partials_ptr + 2 * index, _slot_sums(total, lanes, MAX_SLOTS), mask=holds)
    if HAS_L1:
        tl.store(partials_ptr + 2 * index + 1, _slot_sums(l1_total, lanes, MAX_SLOTS), mask=holds)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _slide_transposed(
    pendings, rows, row_table, u0, TAPS: tl.constexpr, R: tl.constexpr, PADDING: tl.constexpr, BORDER: tl.constexpr
):
    """The transposed vertical pass as sliding sums, for a tuple of maps: pendings[m] holds the open sums
    of gradient rows u0 .. u0 + 2r - 1 (oldest first) before the transposed row rows[m] of centre row
    p = u0 + r arrives; row u takes it with weight M_h(u, p). That is the tap g[p - u + r] unless centre
    row p's window crosses a reflect border (BORDER: the border-row loops), where the weights come from
    the level's table (row_table[(u + r)(2r+2) + p - u + r], padded by r zero rows). Interior rows take
    the taps as immediates: no weight registers live across the row loop (with them, window 15 and both
    gradients spilled on sm_80). Returns (the completed rows u0, the new open sums); each open sum moves
    one place as it is updated, so the slide costs FMAs, no register moves."""
    K: tl.constexpr = 2 * R + 1
    # weights[j]: of gradient row u0 + j
    if PADDING == REFLECT and BORDER:
        weights = ()
        for j in tl.static_range(K):
            weights = weights + (tl.load(row_table + (u0 + R + j) * (K + 1) + 2 * R - j),)
    else:
        weights = ()
        for j in tl.static_range(K):
            weights = weights + (tl.full((), TAPS[2 * R - j], tl.float32),)
    done = ()
    moved = ()
    for m in tl.static_range(len(rows)):
        t = rows[m]
        opened = pendings[m]
        done = done + (opened[0] + weights[0] * t,)
        next_sums = ()
        for j in tl.static_range(2 * R - 1):
            next_sums = next_sums + (opened[j + 1] + weights[j + 1] * t,)
        moved = moved + (next_sums + (weights[2 * R] * t,),)
    return done, moved


@triton.jit
def _gradient_rows(
    u,
    x_col,
    xs_h,
    y_col,
    ys_h,
    gx_col,
    gxs_h,
    gy_col,
    gys_h,
    lanes: Lanes,
    x_aff: Affine,
    y_aff: Affine,
    cx,
    cy,
    done,
    sums_x,
    sums_y,
    l1_grad,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    HAS_L1: tl.constexpr,
):
    """Gradient row u (rows before 0 are skipped): dL/dx-hat = W^T a_x + 2 x' W^T b_x + y' W^T c with
    x' = x-hat - cx (+ l1_grad sign(x-hat - y-hat), the L1 term's, with HAS_L1), stored as scale * dL/dx-hat,
    and the same for y; adds each input's (sum dL/dx-hat (x - offset), sum dL/dx-hat) over the lanes
    the slot owns to its sums. `done` holds W^T c, then W^T a_x, W^T b_x, then W^T a_y, W^T b_y (those
    asked for)."""
    keep = lanes.owned & (u >= 0)
    u64 = u.to(tl.int64)
    raw_x = tl.load(x_col + u64 * xs_h, mask=keep, other=0.0).to(tl.float32)
    raw_y = tl.load(y_col + u64 * ys_h, mask=keep, other=0.0).to(tl.float32)
    x_rel = raw_x - x_aff.offset
    y_rel = raw_y - y_aff.offset
    # x' exactly as the statistics formed it (_column_moments): any other rounding of the same shift
    # biases the gradient by 2 (x' error) W^T b, which the affine's sums then add up over the plane
    x_c = raw_x * x_aff.scale - (x_aff.scale * x_aff.offset + cx)
    y_c = raw_y * y_aff.scale - (y_aff.scale * y_aff.offset + cy)
    g_l1 = 0.0
    if HAS_L1:  # sign(x-hat - y-hat), 0 where equal: compared, as a fused multiply-subtract leaves a residue
        x_hat = x_aff.scale * x_rel
        y_hat = y_aff.scale * y_rel
        g_l1 = tl.where(x_hat > y_hat, l1_grad, tl.where(x_hat < y_hat, -l1_grad, 0.0))
    if NEED_X:
        g = tl.where(keep, done[1] + 2.0 * x_c * done[2] + y_c * done[0] + g_l1, 0.0)
        tl.store(gx_col + u64 * gxs_h, (x_aff.scale * g).to(gx_col.dtype.element_ty), mask=keep)
        sums_x = (sums_x[0] + g * x_rel, sums_x[1] + g)
    if NEED_Y:
        g = tl.where(keep, done[len(done) - 2] + 2.0 * y_c * done[len(done) - 1] + x_c * done[0] - g_l1, 0.0)
        tl.store(gy_col + u64 * gys_h, (y_aff.scale * g).to(gy_col.dtype.element_ty), mask=keep)
        sums_y = (sums_y[0] + g * y_rel, sums_y[1] + g)
    return sums_x, sums_y


@triton.jit
def _backward_row(
    p,
    transposed,
    sums_x,
    sums_y,
    x_col,
    xs_h,
    y_col,
    ys_h,
    gx_col,
    gxs_h,
    gy_col,
    gys_h,
    H,
    lanes: Lanes,
    x_aff: Affine,
    y_aff: Affine,
    cx,
    cy,
    g: tl.constexpr,
    gather,
    outside,
    transpose,
    row_table,
    scratch,
    centre_col,
    grad_scale,
    l1_grad,
    gmap_row,
    out_w,
    pw_base,
    pw_col,
    pws_h,
    c1,
    c2,
    alpha,
    beta,
    gamma,
    TAPS: tl.constexpr,
    R: tl.constexpr,
    KP: tl.constexpr,
    ROW: tl.constexpr,
    NUM_MAPS: tl.constexpr,
    PADDING: tl.constexpr,
    BORDER: tl.constexpr,
    HAS_GRAD_MAP: tl.constexpr,
    HAS_PIXEL_WEIGHTS: tl.constexpr,
    HAS_L1: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    CLOSED_FORM: tl.constexpr,
    CLAMP: tl.constexpr,
    EPS_SIGMA: tl.constexpr,
    KINDS: tl.constexpr,
    ODDS: tl.constexpr,
):
    """Centre row p: its statistics, the coefficients a, b, c at its centres, their transposed horizontal
    pass; slid into the open transposed sums, which completes gradient row p - r (stored, and added to
    the affine's sums). Returns (the open sums, sums_x, sums_y)."""
    coefficients = scratch + 5 * ROW
    # ---- statistics at centre row p
    columns = _column_moments(x_col, xs_h, y_col, ys_h, p, H, x_aff, y_aff, cx, cy, g, R, PADDING, BORDER)
    mu_x, mu_y, e_xx, e_yy, e_xy = _row_moments(scratch, columns, gather, outside, cx, cy, R, KP, ROW, PADDING)
    S, dS_dmu_x, dS_dmu_y, dS_dvar_x, dS_dvar_y, dS_dcov = _ssim_and_partials(
        mu_x + cx,
        mu_y + cy,
        e_xx - mu_x * mu_x,
        e_yy - mu_y * mu_y,
        e_xy - mu_x * mu_y,
        c1,
        c2,
        alpha,
        beta,
        gamma,
        EPS_SIGMA,
        CLOSED_FORM,
        True,
        KINDS,
        ODDS,
    )
    # ---- coefficients a, b, c at the centres of row p (d = dL/dS), to the scratch
    dm_dS = -0.5
    if CLAMP:
        m = (1.0 - S) * 0.5
        dm_dS = tl.where((m >= 0.0) & (m <= 1.0), -0.5, 0.0)
    if HAS_PIXEL_WEIGHTS:
        d = grad_scale * tl.load(pw_base + (pw_col + p * pws_h), mask=centre_col, other=0.0) * dm_dS
    else:
        d = grad_scale * dm_dS
    if HAS_GRAD_MAP:
        d += tl.load(gmap_row + p * out_w, mask=centre_col, other=0.0)
    coef_c = tl.where(centre_col, d * dS_dcov, 0.0)
    tl.store(coefficients, coef_c)
    if NEED_X:
        b_x = tl.where(centre_col, d * dS_dvar_x, 0.0)
        tl.store(coefficients + ROW, tl.where(centre_col, d * dS_dmu_x, 0.0) - 2.0 * mu_x * b_x - mu_y * coef_c)
        tl.store(coefficients + 2 * ROW, b_x)
    if NEED_Y:
        b_y = tl.where(centre_col, d * dS_dvar_y, 0.0)
        tl.store(
            coefficients + (NUM_MAPS - 2) * ROW,
            tl.where(centre_col, d * dS_dmu_y, 0.0) - 2.0 * mu_y * b_y - mu_x * coef_c,
        )
        tl.store(coefficients + (NUM_MAPS - 1) * ROW, b_y)
    tl.debug_barrier()
    # ---- transposed horizontal pass (per lane q: sum over j of M_w(q, q - r + j) coefficient(q - r + j)),
    # then the transposed vertical pass completes gradient row u0 = p - r
    rows = _shifted_sums(coefficients, transpose, NUM_MAPS, R, KP, ROW)
    u0 = p - R
    done, transposed = _slide_transposed(transposed, rows, row_table, u0, TAPS, R, PADDING, BORDER)
    sums_x, sums_y = _gradient_rows(
        u0,
        x_col,
        xs_h,
        y_col,
        ys_h,
        gx_col,
        gxs_h,
        gy_col,
        gys_h,
        lanes,
        x_aff,
        y_aff,
        cx,
        cy,
        done,
        sums_x,
        sums_y,
        l1_grad,
        NEED_X,
        NEED_Y,
        HAS_L1,
    )
    return transposed, sums_x, sums_y


@triton.jit
def _ssim_bwd_kernel(
    x_ptr,
    y_ptr,
    xa_ptr,
    ya_ptr,
    gmap_ptr,
    pixel_weight_ptr,
    gx_ptr,
    gy_ptr,
    weights_ptr,
    table_ptr,
    scales_ptr,
    grad_ptr,
    partials_ptr,
    scratch_ptr,
    exponents_ptr,
    num_levels,
    c1,
    c2,
    TAPS: tl.constexpr,
    R: tl.constexpr,
    PADDING: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_GRAD_MAP: tl.constexpr,
    HAS_PIXEL_WEIGHTS: tl.constexpr,
    HAS_L1: tl.constexpr,
    PLANE_SUMS: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    CLOSED_FORM: tl.constexpr,
    CLAMP: tl.constexpr,
    EPS_SIGMA: tl.constexpr,
    KINDS: tl.constexpr,
    ODDS: tl.constexpr,
    WIDE: tl.constexpr,
    LANES: tl.constexpr,
    MAX_SLOTS: tl.constexpr,
):
    # One program: slots of gradient columns of one level (plus a 2r halo of window centres and their
    # columns when a plane has several strips), all rows. Per centre row p, the statistics as in the
    # forward, then (SPEC section 2, on x' = x-hat - the slot's centre):
    #   a_x = d (dS/dmu_x - 2 mu'_x dS/dvar_x - mu'_y dS/dcov), b_x = d dS/dvar_x, c = d dS/dcov;
    # their transposed horizontal pass (scratch rows, weights M_w), then the transposed vertical pass
    # (sliding sums, weights M_h) completes gradient row u = p - r:
    #   dL/dx-hat = W^T a_x + 2 x' W^T b_x + y' W^T c,  dL/dx = scale_x dL/dx-hat.
    # Writes each pair's sums (dL/dx-hat (x - x_offset), dL/dx-hat, the same for y) for the affine.
    K: tl.constexpr = 2 * R + 1
    KP: tl.constexpr = triton.next_power_of_2(K)
    NUM_MAPS: tl.constexpr = 1 + 2 * NEED_X + 2 * NEED_Y  # c, then a_x, b_x, then a_y, b_y
    ROW: tl.constexpr = LANES + 2 * R
    lanes = _lanes(table_ptr, num_levels, LANES)
    alpha, beta, gamma = _level_exponents(exponents_ptr, lanes.level)
    row = lanes.row
    H = lanes.H
    W = lanes.W
    x_plane = _plane_pointer(x_ptr, row, lanes, COL_X_OFF, COL_XS_N, COL_XS_C)
    y_plane = _plane_pointer(y_ptr, row, lanes, COL_Y_OFF, COL_YS_N, COL_YS_C)
    xs_w = tl.load(row + COL_XS_W)
    ys_w = tl.load(row + COL_YS_W)
    xs_h = _row_stride(row, COL_XS_H, WIDE)
    ys_h = _row_stride(row, COL_YS_H, WIDE)
    x_col = x_plane + lanes.load_col.to(tl.int64) * xs_w
    y_col = y_plane + lanes.load_col.to(tl.int64) * ys_w
    gx_col = _plane_pointer(gx_ptr, row, lanes, COL_GX_OFF, COL_GXS_N, COL_GXS_C) + lanes.load_col.to(
        tl.int64
    ) * tl.load(row + COL_GXS_W)
    gy_col = _plane_pointer(gy_ptr, row, lanes, COL_GY_OFF, COL_GYS_N, COL_GYS_C) + lanes.load_col.to(
        tl.int64
    ) * tl.load(row + COL_GYS_W)
    gxs_h = tl.load(row + COL_GXS_H)
    gys_h = tl.load(row + COL_GYS_H)
    x_aff = _affine(xa_ptr, row, lanes, COL_XA_OFF, COL_XA_N, COL_XA_C, COL_XA_K, HAS_AFFINE)
    y_aff = _affine(ya_ptr, row, lanes, COL_YA_OFF, COL_YA_N, COL_YA_C, COL_YA_K, HAS_AFFINE)
    g: tl.constexpr = TAPS
    k = tl.arange(0, KP)[:, None]
    gather, outside = _gather_weights(weights_ptr, row, lanes, R, KP)
    # M_w(q, q - r + j) for each lane's column q (zero where q - r + j is no window centre)
    transpose = tl.load(
        weights_ptr + tl.load(row + COL_COL_WEIGHTS) + (lanes.load_col[None, :] + R) * (K + 1) + k,
        mask=k < K,
        other=0.0,
    )
    row_table = weights_ptr + tl.load(row + COL_ROW_WEIGHTS)
    # dL/d the level's loss, or with PLANE_SUMS per lane dL/d its plane's, times the level's scale (and its
    # L1 term's: scales are [levels, 2])
    grad_at = grad_ptr + tl.load(row + COL_LOSS_BEGIN)
    if PLANE_SUMS:
        grad_at += lanes.plane
    grad_loss = tl.load(grad_at).to(tl.float32)
    grad_scale = grad_loss * tl.load(scales_ptr + 2 * lanes.level).to(tl.float32)
    l1_grad = grad_loss * tl.load(scales_ptr + 2 * lanes.level + 1).to(tl.float32) if HAS_L1 else grad_loss
    p0 = R if PADDING == VALID else 0
    p_end = H - R if PADDING == VALID else H
    centre_col = lanes.active
    if PADDING == VALID:
        centre_col = centre_col & (lanes.col >= R) & (lanes.col < W - R)

    # ---- centring on a mean of each slot's first windows; scratch rows (5 moments, then NUM_MAPS
    # coefficients: one buffer is enough, as each row passes two barriers)
    cx, cy = _slot_centres(x_col, xs_h, y_col, ys_h, p0, H, x_aff, y_aff, g, lanes, R, KP, PADDING, MAX_SLOTS)
    scratch = _scratch_lanes(scratch_ptr, 5 + NUM_MAPS, ROW, R, LANES)

    offset = R if PADDING == VALID else 0
    out_w = _output_extent(W, R, PADDING)
    gmap_row = (
        gmap_ptr
        + tl.load(row + COL_MAP_OFF)
        + lanes.plane.to(tl.int64) * _output_extent(H, R, PADDING) * out_w
        + (lanes.load_col - offset)
        - offset * out_w
    )
    pw_base, pw_col, pws_h = _pixel_weight_column(pixel_weight_ptr, row, lanes, offset, WIDE)
    zero = tl.zeros((LANES,), tl.float32)
    transposed = ((zero,) * (2 * R),) * NUM_MAPS  # open sums of gradient rows, per map
    sums_x = (zero, zero)
    sums_y = (zero, zero)
    # ---- centre rows (those whose window crosses the top or bottom edge read through the padding's
    # index map), each completing gradient row p - r
    top = tl.minimum(R, p_end) if PADDING != VALID else p0
    bottom = tl.maximum(top, H - R) if PADDING != VALID else p_end
    for segment in tl.static_range(3):  # top border, interior, bottom border (as the forward)
        begin = p0 if segment == 0 else (top if segment == 1 else bottom)
        end = top if segment == 0 else (bottom if segment == 1 else p_end)
        for p in range(begin, end):
            transposed, sums_x, sums_y = _backward_row(
                p,
                transposed,
                sums_x,
                sums_y,
                x_col,
                xs_h,
                y_col,
                ys_h,
                gx_col,
                gxs_h,
                gy_col,
                gys_h,
                H,
                lanes,
                x_aff,
                y_aff,
                cx,
                cy,
                g,
                gather,
                outside,
                transpose,
                row_table,
                scratch,
                centre_col,
                grad_scale,
                l1_grad,
                gmap_row,
                out_w,
                pw_base,
                pw_col,
                pws_h,
                c1,
                c2,
                alpha,
                beta,
                gamma,
                TAPS,
                R,
                KP,
                ROW,
                NUM_MAPS,
                PADDING,
                segment != 1,
                HAS_GRAD_MAP,
                HAS_PIXEL_WEIGHTS,
                HAS_L1,
                NEED_X,
                NEED_Y,
                CLOSED_FORM,
                CLAMP,
                EPS_SIGMA,
                KINDS,
                ODDS,
            )
    # ---- past the last centre row: the open sums complete without new terms
    for p in range(p_end, H + R):
        u0 = p - R
        # the rows are zeros: any finite weights do
        done, transposed = _slide_transposed(transposed, (zero,) * NUM_MAPS, row_table, u0, TAPS, R, PADDING, False)
        sums_x, sums_y = _gradient_rows(
            u0,
            x_col,
            xs_h,
            y_col,
            ys_h,
            gx_col,
            gxs_h,
            gy_col,
            gys_h,
            lanes,
            x_aff,
            y_aff,
            cx,
            cy,
            done,
            sums_x,
            sums_y,
            l1_grad,
            NEED_X,
            NEED_Y,
            HAS_L1,
        )

    # ---- reduce: each pair's four sums
    index, holds = _pair_index(lanes, MAX_SLOTS)
    out = partials_ptr + index * 4
    if NEED_X:
        tl.store(out + 0, _slot_sums(sums_x[0], lanes, MAX_SLOTS), mask=holds)
        tl.store(out + 1, _slot_sums(sums_x[1], lanes, MAX_SLOTS), mask=holds)
    if NEED_Y:
        tl.store(out + 2, _slot_sums(sums_y[0], lanes, MAX_SLOTS), mask=holds)
        tl.store(out + 3, _slot_sums(sums_y[1], lanes, MAX_SLOTS), mask=holds)


# ------------------------------------------------------------------------------------------------
# Second stage: fixed-order sums of the pairs' partial sums
# ------------------------------------------------------------------------------------------------


@triton.jit
def _level_loss(sum_m, sum_l1, scales_ptr, level, HAS_L1: tl.constexpr):
    """A loss output from its region's float64 sums of w m and of |x-hat - y-hat| and the level's two
    scales (scales [levels, 2]), rounded once to float32 (csrc/ssim_params.h, level_loss)."""
    loss = sum_m * tl.load(scales_ptr + 2 * level)
    if HAS_L1:
        loss += sum_l1 * tl.load(scales_ptr + 2 * level + 1)
    return loss.to(tl.float32)


@triton.jit
def _level_sum_kernel(partials_ptr, table_ptr, scales_ptr, out_ptr, CHUNK: tl.constexpr, HAS_L1: tl.constexpr):
    # One program per level: its loss from the sums of its pairs' partials (w m; |x-hat - y-hat| with
    # HAS_L1: partials [pairs, 2]), accumulated in float64 and rounded once (the second stage every backend
    # shares: csrc/ssim_params.h).
    level = tl.program_id(0)
    row = table_ptr + level * NUM_COLUMNS
    begin = tl.load(row + COL_PAIR_BEGIN)
    count = tl.load(row + COL_PAIRS)
    total = tl.zeros((), dtype=tl.float64)
    total_l1 = tl.zeros((), dtype=tl.float64)
    for start in range(0, count, CHUNK):
        k = start + tl.arange(0, CHUNK)
        at = partials_ptr + 2 * (begin + k)
        total += tl.sum(tl.load(at, mask=k < count, other=0.0).to(tl.float64), axis=0)
        if HAS_L1:
            total_l1 += tl.sum(tl.load(at + 1, mask=k < count, other=0.0).to(tl.float64), axis=0)
    tl.store(out_ptr + tl.load(row + COL_LOSS_BEGIN), _level_loss(total, total_l1, scales_ptr, level, HAS_L1))


@triton.jit
def _plane_block(table_ptr, BLOCK: tl.constexpr):
    """A second-stage program (level, block of BLOCK planes): (the level, its table row, its planes, which
    of them exist, the pair index of each plane's first strip, strips per plane)."""
    level = tl.program_id(0)
    row = table_ptr + level * NUM_COLUMNS
    strips = tl.load(row + COL_STRIPS)
    plane = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    holds = plane < tl.load(row + COL_PAIRS) // strips
    return level, row, plane, holds, tl.load(row + COL_PAIR_BEGIN) + plane * strips, strips


@triton.jit
def _plane_loss_kernel(partials_ptr, table_ptr, scales_ptr, out_ptr, BLOCK: tl.constexpr, HAS_L1: tl.constexpr):
    # The forward's second stage with plane_sums. Programs (level, block of BLOCK planes): each plane's
    # loss from the sums of its strips' partials in strip order, in float64 rounded once.
    level, row, plane, holds, first_pair, strips = _plane_block(table_ptr, BLOCK)
    first = partials_ptr + 2 * first_pair
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    total_l1 = tl.zeros((BLOCK,), dtype=tl.float64)
    for strip in range(0, strips):
        total += tl.load(first + 2 * strip, mask=holds, other=0.0).to(tl.float64)
        if HAS_L1:
            total_l1 += tl.load(first + 2 * strip + 1, mask=holds, other=0.0).to(tl.float64)
    out = out_ptr + tl.load(row + COL_LOSS_BEGIN) + plane
    tl.store(out, _level_loss(total, total_l1, scales_ptr, level, HAS_L1), mask=holds)


@triton.jit
def _plane_affine_grad(
    sum_centred, sum_g, aff_ptr, row, plane, holds, C, OFF: tl.constexpr, S_N: tl.constexpr, S_C: tl.constexpr, out_ptr
):
    """dL/d(scale, offset) of each plane from its two float64 sums, sum dL/dx-hat (x - offset) and
    sum dL/dx-hat: (the first, -scale * the second) in float32 (csrc/ssim_params.h, affine_gradient)."""
    n = plane // C
    scale = tl.load(
        aff_ptr + tl.load(row + OFF) + n * tl.load(row + S_N) + (plane - n * C) * tl.load(row + S_C),
        mask=holds,
        other=0.0,
    )
    tl.store(out_ptr, sum_centred.to(tl.float32), mask=holds)
    tl.store(out_ptr + 1, -scale * sum_g.to(tl.float32), mask=holds)


@triton.jit
def _plane_sums_kernel(
    partials_ptr,
    table_ptr,
    xa_ptr,
    ya_ptr,
    gxa_ptr,
    gya_ptr,
    NEED_X: tl.constexpr,
    NEED_Y: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Programs (level, block of BLOCK planes): each plane's four sums over its strips in strip order,
    # accumulated in float64 and rounded once, then the affine's gradient (the shared second stage).
    _, row, plane, holds, first_pair, strips = _plane_block(table_ptr, BLOCK)
    first = partials_ptr + 4 * first_pair
    s0 = tl.zeros((BLOCK,), dtype=tl.float64)
    s1 = tl.zeros((BLOCK,), dtype=tl.float64)
    s2 = tl.zeros((BLOCK,), dtype=tl.float64)
    s3 = tl.zeros((BLOCK,), dtype=tl.float64)
    for strip in range(0, strips):
        p = first + 4 * strip
        s0 += tl.load(p, mask=holds, other=0.0).to(tl.float64)
        s1 += tl.load(p + 1, mask=holds, other=0.0).to(tl.float64)
        s2 += tl.load(p + 2, mask=holds, other=0.0).to(tl.float64)
        s3 += tl.load(p + 3, mask=holds, other=0.0).to(tl.float64)
    c = tl.load(row + COL_C)
    if NEED_X:
        out = gxa_ptr + tl.load(row + COL_GXA_OFF) + 2 * plane
        _plane_affine_grad(s0, s1, xa_ptr, row, plane, holds, c, COL_XA_OFF, COL_XA_N, COL_XA_C, out)
    if NEED_Y:
        out = gya_ptr + tl.load(row + COL_GYA_OFF) + 2 * plane
        _plane_affine_grad(s2, s3, ya_ptr, row, plane, holds, c, COL_YA_OFF, COL_YA_N, COL_YA_C, out)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_CACHE: dict = {}
_CACHE_SIZE = 64


class LevelPlan(NamedTuple):
    """How a level's planes are cut into strips and packed into programs (table columns of the same
    names)."""

    strips: int
    strip_w: int
    slot_w: int
    halo: int
    slots: int
    programs: int


@functools.lru_cache(maxsize=256)
def level_plan(planes: int, width: int, halo: int, lanes: int = LANES, max_slots: int = MAX_SLOTS) -> LevelPlan:
    """The fewest programs that cover `planes` planes of `width` columns: each plane cut into strips
    of strip_w columns, a slot being a strip plus `halo` columns of window centres on each side (none
    when one strip spans the plane), slots packed up to `lanes` lanes and `max_slots` per program."""
    best = None
    strips = 1
    while True:
        strip_w = -(-width // strips)
        slot_w = width if strips == 1 else strip_w + 2 * halo
        if slot_w <= lanes:
            slots = min(lanes // slot_w, max_slots)
            plan = LevelPlan(strips, strip_w, slot_w, 0 if strips == 1 else halo, slots, -(-planes * strips // slots))
            if best is None or plan.programs < best.programs:
                best = plan
            if best is not None and strips >= 4 * best.strips + 8:
                break
        if strip_w == 1:
            break
        strips += 1
    if best is None:
        raise ValueError(f"ssimkd: a window halo of {halo} columns does not fit {lanes} lanes")
    return best


@functools.lru_cache(maxsize=256)
def blur_weights(n: int, taps: tuple[float, ...], padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded blur along one axis of n positions as per-position weights of the 2r+1 nearest, rows
    for positions -r .. n + r - 1 (zero outside the plane), 2r+2 columns, float32 from float64 sums:

    - gather[q + r, j]: the weight of position q - r + j in the blur at q (reflect folds add into the
      position they land on; 0 off the plane) and, in column 2r+1, the sum of the taps that fall off the
      plane under zero padding (they read the padding's 0);
    - transpose[u + r, j]: the weight of window centre p = u - r + j in the gradient of input u, the
      true transpose of the padded blur (SPEC section 2; zero where p is no window centre).

    Reflect folds always land within r of the centre, so 2r + 1 weights per position hold every term."""
    radius = len(taps) // 2
    size = 2 * radius + 1
    gather = torch.zeros(n + 2 * radius, size + 1, dtype=torch.float64)
    transpose = torch.zeros(n + 2 * radius, size + 1, dtype=torch.float64)
    fold = reflect_index(n, radius).tolist()  # source of padded position i at fold[i + r]
    valid = padding == PADDING_CODES["valid"]
    for p in range(n):
        centre = not valid or radius <= p < n - radius
        for k, g in enumerate(taps):
            position = p + k - radius
            if padding == PADDING_CODES["reflect"]:
                source = fold[position + radius]
            elif 0 <= position < n:
                source = position
            else:  # zero padding reads 0 there; valid padding has no window centre here
                gather[p + radius, size] += g
                continue
            assert abs(source - p) <= radius
            gather[p + radius, source - p + radius] += g
            if centre:
                transpose[source + radius, p - source + radius] += g
    return gather.to(torch.float32), transpose.to(torch.float32)


def _offset(t: torch.Tensor | None, base: torch.Tensor | None) -> int:
    """Element offset of t's data from base's (both of one dtype); 0 when t is None."""
    if t is None:
        return 0
    delta = t.data_ptr() - base.data_ptr()
    assert delta % base.element_size() == 0, "ssimkd: tensors are not aligned to their element size"
    return delta // base.element_size()


def _strides(t: torch.Tensor | None, count: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * count


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _cached(key, make):
    value = _CACHE.get(key)
    if value is None:
        value = make()
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
    return value


class Launch(NamedTuple):
    """One launch's level table and what the launchers need besides it."""

    table: torch.Tensor  # int64 [levels, NUM_COLUMNS]
    scales: torch.Tensor  # float64 [levels, 2]: (loss_scale, l1_scale) as C++'s LevelDesc
    weights: torch.Tensor  # float32: every level's blur_weights (table columns *_WEIGHTS)
    plans: list  # LevelPlan per level
    programs: int
    pairs: int


def _launch_table(
    xs,
    ys,
    x_affines,
    y_affines,
    pixel_weights,
    maps,
    gxs,
    gys,
    level_scales,
    taps,
    padding,
    backward: bool,
    device,
    g_x_affines=(),
    g_y_affines=(),
    plane_sums: bool = False,
    level_l1_scales=(),
) -> Launch:
    """The level table of one launch (at most MAX_LEVELS levels), cached by layout: the same layouts in
    a training loop skip the host-to-device copies; a miss copies from pinned memory, asynchronously."""
    radius = len(taps) // 2
    rows, plans, weight_parts = [], [], []
    programs = pairs = weight_size = losses = 0
    for l, (x, y) in enumerate(zip(xs, ys)):
        n, c, h, w = x.shape
        # a strip's halo: its outputs' window centres need r more columns each side; the backward's
        # centres reach r past the gradient columns, so 2r
        plan = level_plan(n * c, w, 2 * radius if backward else radius)
        row = [0] * NUM_COLUMNS.value
        row[COL_X_OFF], row[COL_Y_OFF] = _offset(x, xs[0]), _offset(y, ys[0])
        row[COL_XS_N], row[COL_XS_C], row[COL_XS_H], row[COL_XS_W] = x.stride()
        row[COL_YS_N], row[COL_YS_C], row[COL_YS_H], row[COL_YS_W] = y.stride()
        row[COL_C], row[COL_H], row[COL_W] = c, h, w
        row[COL_STRIPS], row[COL_STRIP_W], row[COL_SLOT_W] = plan.strips, plan.strip_w, plan.slot_w
        row[COL_HALO], row[COL_SLOTS], row[COL_PAIRS] = plan.halo, plan.slots, n * c * plan.strips
        row[COL_PROGRAM_BEGIN], row[COL_PAIR_BEGIN] = programs, pairs
        row[COL_LOSS_BEGIN] = losses
        losses += n * c if plane_sums else 1
        if x_affines:
            row[COL_XA_OFF] = _offset(x_affines[l], x_affines[0])
            row[COL_XA_N], row[COL_XA_C], row[COL_XA_K] = x_affines[l].stride()
            row[COL_YA_OFF] = _offset(y_affines[l], y_affines[0])
            row[COL_YA_N], row[COL_YA_C], row[COL_YA_K] = y_affines[l].stride()
        if pixel_weights:
            row[COL_PW_OFF] = _offset(pixel_weights[l], pixel_weights[0])
            row[COL_PWS_N], row[COL_PWS_C], row[COL_PWS_H], row[COL_PWS_W] = pixel_weights[l].stride()
        if maps:
            row[COL_MAP_OFF] = _offset(maps[l], maps[0])
        if g_x_affines:
            row[COL_GXA_OFF] = _offset(g_x_affines[l], g_x_affines[0])
        if g_y_affines:
            row[COL_GYA_OFF] = _offset(g_y_affines[l], g_y_affines[0])
        if gxs:
            row[COL_GX_OFF] = _offset(gxs[l], gxs[0])
            row[COL_GXS_N], row[COL_GXS_C], row[COL_GXS_H], row[COL_GXS_W] = gxs[l].stride()
        if gys:
            row[COL_GY_OFF] = _offset(gys[l], gys[0])
            row[COL_GYS_N], row[COL_GYS_C], row[COL_GYS_H], row[COL_GYS_W] = gys[l].stride()
        # weights: blur and transpose along the row (W + 2r rows each), transpose along the column (H + 2r)
        row[COL_GATHER_WEIGHTS] = weight_size
        row[COL_COL_WEIGHTS] = weight_size + (w + 2 * radius) * (len(taps) + 1)
        row[COL_ROW_WEIGHTS] = weight_size + 2 * (w + 2 * radius) * (len(taps) + 1)
        weight_parts.append((h, w))
        weight_size += (2 * w + h + 6 * radius) * (len(taps) + 1)
        rows.append(row)
        plans.append(plan)
        programs += plan.programs
        pairs += n * c * plan.strips
    scale_pairs = tuple(zip(level_scales, level_l1_scales or [0.0] * len(level_scales)))
    key = ("table", str(device), tuple(map(tuple, rows)), scale_pairs)
    table, scales = _cached(
        key,
        lambda: (
            _to_device(torch.tensor(rows, dtype=torch.int64), device),
            _to_device(torch.tensor(scale_pairs, dtype=torch.float64), device),
        ),
    )

    def make_weights():
        parts = []
        for h, w in weight_parts:
            along_row, transposed_row = blur_weights(w, taps, padding)
            parts += [along_row, transposed_row, blur_weights(h, taps, padding)[1]]
        return _to_device(torch.cat([part.reshape(-1) for part in parts]), device)

    weights = _cached(("weights", str(device), tuple(weight_parts), taps, padding), make_weights)
    return Launch(table, scales, weights, plans, programs, pairs)


def _taps(options) -> tuple[float, ...]:
    """The window's taps, rounded to float32 (the kernels' constexpr TAPS)."""
    return tuple(float(v) for v in gaussian_window_1d(options.window_size, options.sigma, dtype=torch.float32))


def _check(xs, ys):
    dtype = xs[0].dtype
    if dtype not in _SUPPORTED:
        raise TypeError(
            f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {dtype} "
            "(float64 runs on the 'reference' and 'cpu' backends)"
        )
    for x, y in zip(xs, ys):
        if x.dtype != dtype or y.dtype != dtype:
            raise TypeError("ssimkd: every level must share one dtype")


def _exponent_kind(e: float) -> int:
    """How _power treats exponent e (the EXPONENT_* constants)."""
    if e == 0.0:
        return EXPONENT_ABSENT.value
    if e == 1.0:
        return EXPONENT_ONE.value
    return EXPONENT_INTEGER.value if float(e).is_integer() else EXPONENT_GENERAL.value


def _level_exponent_triples(options, level_exponents, levels: int) -> list[tuple[float, float, float]]:
    """(alpha, beta, gamma) of each level: the op's flat level_exponents, or the options' for every level."""
    if level_exponents:
        return [tuple(level_exponents[3 * l : 3 * l + 3]) for l in range(levels)]
    return [(options.alpha, options.beta, options.gamma)] * levels


def _layout_flags(xs, ys, pixel_weights=()) -> dict:
    """WIDE: some offset within a plane, or within a level's per-pixel weights, may reach 2^31 elements
    (the kernels then use int64 offsets)."""
    wide = any(max(t.shape[2] * abs(t.stride(2)), t.shape[3] * abs(t.stride(3))) >= 2**31 for t in list(xs) + list(ys))
    wide |= any(sum(abs(s) * (n - 1) for n, s in zip(w.shape, w.stride())) >= 2**31 for w in pixel_weights)
    return dict(WIDE=wide)


def kernel_constants(options, level_exponents=()) -> dict:
    """The constexprs both kernels take from the op's options (and its per-level exponents: an exponent
    that differs between levels is of kind EXPONENT_PER_LEVEL, and the closed form is taken only when
    every level's has one: beta = gamma = 1 and alpha 0 or 1, as SSIM's and MS-SSIM's levels)."""
    triples = _level_exponent_triples(options, level_exponents, max(len(level_exponents) // 3, 1))
    columns = list(zip(*triples))  # per exponent, its value in each level
    kinds = tuple(
        _exponent_kind(values[0]) if len(set(values)) == 1 else EXPONENT_PER_LEVEL.value for values in columns
    )
    taps = _taps(options)
    return dict(
        TAPS=taps,
        R=len(taps) // 2,
        PADDING=options.padding,
        CLAMP=options.clamp,
        CLOSED_FORM=all(alpha in (0.0, 1.0) and beta == gamma == 1.0 for alpha, beta, gamma in triples),
        KINDS=kinds,
        ODDS=tuple(float(values[0]).is_integer() and int(values[0]) % 2 == 1 for values in columns),
        EPS_SIGMA=EPS_SIGMA,
        LANES=LANES,
        MAX_SLOTS=MAX_SLOTS,
    )


def _scratch_row(radius: int) -> int:
    """Floats in one scratch row of a program (ROW in the kernels): the lanes and an r-wide margin each side."""
    return LANES + 2 * radius


def _chunks(count: int):
    for start in range(0, count, MAX_LEVELS_PER_LAUNCH):
        yield slice(start, min(start + MAX_LEVELS_PER_LAUNCH, count))


def _loss_offsets(xs, plane_sums: bool) -> list[int]:
    """Where each level's losses start in level_losses (one per level, or one per plane), and their count."""
    offsets = [0]
    for x in xs:
        offsets.append(offsets[-1] + (x.shape[0] * x.shape[1] if plane_sums else 1))
    return offsets


def _losses_of(losses, offsets, part: slice):
    """The entries of level_losses (or of its gradient) that the levels of one launch own."""
    return losses[offsets[part.start] : offsets[part.stop]]


def _exponents_table(triples, device) -> torch.Tensor:
    """float32 [levels, 3]: each level's (alpha, beta, gamma), as the kernels load them (cached)."""
    key = ("exponents", str(device), tuple(triples))
    return _cached(key, lambda: _to_device(torch.tensor(triples, dtype=torch.float32), device))


def ssim_fwd_triton(
    xs, ys, x_affines, y_affines, pixel_weights, level_scales, level_l1_scales, level_exponents, options, write_map
):
    """Forward of ssimkd::fused_ssim_fwd_triton: (level_losses [L] float32, SSIM maps or [])."""
    _check(xs, ys)
    device = xs[0].device
    maps = (
        [
            torch.empty(
                x.shape[0],
                x.shape[1],
                output_extent(x.shape[2], options.window_size, options.padding),
                output_extent(x.shape[3], options.window_size, options.padding),
                dtype=torch.float32,
                device=device,
            )
            for x in xs
        ]
        if write_map
        else []
    )
    constants = kernel_constants(options, level_exponents)
    triples = _level_exponent_triples(options, level_exponents, len(xs))
    offsets = _loss_offsets(xs, options.plane_sums)
    losses = torch.empty(offsets[-1], dtype=torch.float32, device=device)
    for part in _chunks(len(xs)):
        x_aff, y_aff = x_affines[part], y_affines[part]
        launch = _launch_table(
            xs[part],
            ys[part],
            x_aff,
            y_aff,
            pixel_weights[part],
            maps[part],
            [],
            [],
            level_scales[part],
            constants["TAPS"],
            options.padding,
            False,
            device,
            plane_sums=options.plane_sums,
            level_l1_scales=level_l1_scales[part],
        )
        has_l1 = any(level_l1_scales[part])
        partials = torch.empty(launch.pairs, 2, dtype=torch.float32, device=device)
        scratch = torch.empty(launch.programs * 10 * _scratch_row(constants["R"]), dtype=torch.float32, device=device)
        _ssim_fwd_kernel[(launch.programs,)](
            x_ptr=xs[part][0],
            y_ptr=ys[part][0],
            xa_ptr=x_aff[0] if x_aff else partials,
            ya_ptr=y_aff[0] if y_aff else partials,
            map_ptr=maps[part][0] if write_map else partials,
            pixel_weight_ptr=pixel_weights[part][0] if pixel_weights else partials,
            weights_ptr=launch.weights,
            table_ptr=launch.table,
            partials_ptr=partials,
            scratch_ptr=scratch,
            exponents_ptr=_exponents_table(triples[part], device),
            num_levels=len(xs[part]),
            c1=options.c1,
            c2=options.c2,
            HAS_AFFINE=bool(x_aff),
            WRITE_MAP=write_map,
            HAS_PIXEL_WEIGHTS=bool(pixel_weights),
            HAS_L1=has_l1,
            **constants,
            **_layout_flags(xs[part], ys[part], pixel_weights[part]),
            **launch_options("fwd"),
        )
        out = _losses_of(losses, offsets, part)
        if options.plane_sums:
            _plane_loss_kernel[_plane_grid(xs[part])](
                partials_ptr=partials,
                table_ptr=launch.table,
                scales_ptr=launch.scales,
                out_ptr=out,
                BLOCK=PLANE_BLOCK,
                HAS_L1=has_l1,
            )
        else:
            _level_sum_kernel[(len(xs[part]),)](
                partials_ptr=partials,
                table_ptr=launch.table,
                scales_ptr=launch.scales,
                out_ptr=out,
                CHUNK=256,
                HAS_L1=has_l1,
            )
    return losses, maps


PLANE_BLOCK = 128  # planes per program of the per-plane second stages


def _plane_grid(xs) -> tuple[int, int]:
    """Grid of a per-plane second stage (_plane_block): a program per level and block of PLANE_BLOCK planes."""
    return (len(xs), triton.cdiv(max(x.shape[0] * x.shape[1] for x in xs), PLANE_BLOCK))


def _affine_gradient_outputs(tensors, needed: bool) -> list:
    """dL/d(scale, offset) per plane of each level, (N, C, 2) float32, written by the second stage."""
    return [t.new_empty(t.shape[0], t.shape[1], 2, dtype=torch.float32) for t in tensors] if needed else []


def _plane_sums(launch: Launch, partials, xs, x_aff, y_aff, g_x_aff, g_y_aff):
    """The backward's second stage: dL/d(scale, offset) of every plane of every level of a launch into
    g_x_aff / g_y_aff (one (N, C, 2) tensor per level, or [] where not needed), in one launch."""
    _plane_sums_kernel[_plane_grid(xs)](
        partials_ptr=partials,
        table_ptr=launch.table,
        xa_ptr=x_aff[0],
        ya_ptr=y_aff[0],
        gxa_ptr=g_x_aff[0] if g_x_aff else partials,
        gya_ptr=g_y_aff[0] if g_y_aff else partials,
        NEED_X=bool(g_x_aff),
        NEED_Y=bool(g_y_aff),
        BLOCK=PLANE_BLOCK,
    )


def ssim_bwd_triton(
    grad_losses,
    grad_maps,
    xs,
    ys,
    x_affines,
    y_affines,
    pixel_weights,
    level_scales,
    level_l1_scales,
    level_exponents,
    options,
    x_needs_grad,
    y_needs_grad,
):
    """Backward of ssimkd::fused_ssim_fwd_triton: (gxs, gys, g_x_affines, g_y_affines), [] where not needed."""
    _check(xs, ys)
    device = xs[0].device
    gxs = [torch.empty_like(x) for x in xs] if x_needs_grad else []
    gys = [torch.empty_like(y) for y in ys] if y_needs_grad else []
    constants = kernel_constants(options, level_exponents)
    triples = _level_exponent_triples(options, level_exponents, len(xs))
    num_maps = 1 + 2 * x_needs_grad + 2 * y_needs_grad
    has_affine = bool(x_affines)
    g_x_affines, g_y_affines = [], []
    offsets = _loss_offsets(xs, options.plane_sums)
    for part in _chunks(len(xs)):
        x_aff, y_aff = x_affines[part], y_affines[part]
        g_x_aff = _affine_gradient_outputs(xs[part], has_affine and x_needs_grad)
        g_y_aff = _affine_gradient_outputs(ys[part], has_affine and y_needs_grad)
        launch = _launch_table(
            xs[part],
            ys[part],
            x_aff,
            y_aff,
            pixel_weights[part],
            grad_maps[part],
            gxs[part],
            gys[part],
            level_scales[part],
            constants["TAPS"],
            options.padding,
            True,
            device,
            g_x_aff,
            g_y_aff,
            plane_sums=options.plane_sums,
            level_l1_scales=level_l1_scales[part],
        )
        partials = torch.zeros(launch.pairs, 4, dtype=torch.float32, device=device)
        scratch = torch.empty(
            launch.programs * (5 + num_maps) * _scratch_row(constants["R"]), dtype=torch.float32, device=device
        )
        _ssim_bwd_kernel[(launch.programs,)](
            x_ptr=xs[part][0],
            y_ptr=ys[part][0],
            xa_ptr=x_aff[0] if has_affine else partials,
            ya_ptr=y_aff[0] if has_affine else partials,
            gmap_ptr=grad_maps[part][0] if grad_maps else partials,
            pixel_weight_ptr=pixel_weights[part][0] if pixel_weights else partials,
            gx_ptr=gxs[part][0] if gxs else xs[part][0],
            gy_ptr=gys[part][0] if gys else ys[part][0],
            weights_ptr=launch.weights,
            table_ptr=launch.table,
            scales_ptr=launch.scales,
            grad_ptr=_losses_of(grad_losses, offsets, part),
            partials_ptr=partials,
            scratch_ptr=scratch,
            exponents_ptr=_exponents_table(triples[part], device),
            num_levels=len(xs[part]),
            c1=options.c1,
            c2=options.c2,
            HAS_AFFINE=has_affine,
            HAS_GRAD_MAP=bool(grad_maps),
            HAS_PIXEL_WEIGHTS=bool(pixel_weights),
            HAS_L1=any(level_l1_scales[part]),
            PLANE_SUMS=options.plane_sums,
            NEED_X=x_needs_grad,
            NEED_Y=y_needs_grad,
            **constants,
            **_layout_flags(xs[part], ys[part], pixel_weights[part]),
            **launch_options("bwd"),
        )
        if g_x_aff or g_y_aff:
            _plane_sums(launch, partials, xs[part], x_aff, y_aff, g_x_aff, g_y_aff)
        g_x_affines += g_x_aff
        g_y_affines += g_y_aff
    return gxs, gys, g_x_affines, g_y_affines
