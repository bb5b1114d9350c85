"""Every fused backend against the reference: values and gradients, every option, shape, layout, dtype.

Truth is the reference run in float64 on the same inputs. Bounds are norm-wise relative errors
(see utils.assert_close_verbose): 1e-6 for float64 inputs; for float32, 1e-5 or 8x the error of the
float32 reference on the same inputs, whichever is larger. The second bound matters only at
ill-conditioned points: a 1x1 plane under zero padding has perfectly correlated windows, where the
structure term's gradient is a difference of nearly equal numbers; there every float32 computation,
the reference's included (9e-6), is off by 1e-5 to 6e-5 (worst seen here: 5.6e-5, triton). For float16 and
bfloat16, the flash-attention rule: the fused error may be at most twice the error of the reference
fed the same low-precision inputs, plus 4 roundings in that dtype at the scale of the largest term
summed into the gradient. (The fused path returns scale * dL/dx-hat in the input dtype and autograd
adds the min/max normalisation's gradient to it there; where the two cancel, e.g. at the extreme
pixel of a 1x1 plane, the rounding of the terms shows. The reference upcasts and sums in float32.)
Elsewhere the fused float32 kernels are 10-20x closer to the truth than the float32 reference, as they
centre each tile: worst seen on test_dtypes (x86-64 CPU, cpu and interpreted triton) 1.2e-6 vs 2.5e-5.
"""

import math

import pytest
import torch
from conftest import TINY_PLANES, case_size, device_of, sample_levels
from utils import assert_close_verbose, grads

import ssimkd_kernels as sk

RTOL = {torch.float64: 1e-6, torch.float32: 1e-5}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _loss_and_grads(students, teachers, **options):
    loss = sk.ssim_kd_loss(students, teachers, **options)
    return loss, grads(loss, students + teachers)


def _truth(students, teachers, **options):
    """The reference in float64 on exactly the given inputs."""
    s64 = [s.detach().double().requires_grad_(s.requires_grad) for s in students]
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in teachers]
    return _loss_and_grads(s64, t64, backend="reference", **options)


def check_against_reference(backend, students, teachers, **options):
    dtype = students[0].dtype
    loss, got = _loss_and_grads(students, teachers, backend=backend, **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    true_loss, want = _truth(students, teachers, **options)
    pairs = [(g, w) for g, w in zip(got, want) if w is not None]
    for g, _ in pairs:
        assert g.dtype == dtype
    if dtype == torch.float64:
        # The loss sums 1 - S: where S is 1 to 11 digits (a 1x1 plane, perfectly matched windows) every
        # float64 computation of it, the reference's included, is off by ~100 ulps of 1, so 1e-12 absolute.
        assert_close_verbose(loss, true_loss, rtol=RTOL[dtype], atol=1e-12, name="loss")
        assert_close_verbose([g for g, _ in pairs], [w for _, w in pairs], rtol=RTOL[dtype], atol=1e-12, name="grad")
        return
    if dtype == torch.float32:
        ref_loss, ref = _loss_and_grads(students, teachers, backend="reference", **options)
        ref_grads = [r for r, w in zip(ref, want) if w is not None]
        # The rounding floor: 4 float32 roundings at the scale of the terms the result is summed from.
        # For the loss (a sum of means of 1 - S, S in [-1, 1]) that scale is 1; for a gradient, the
        # fused op's scale * dL/dx-hat, which autograd adds to the min/max gradient (they cancel where
        # the truth is 0 up to rounding, as on a 1x1 plane under the structure term alone).
        term_scale = max(
            [float(t.abs().max()) for t in _kernel_gradient_terms(students, teachers, **options)]
            + [_gradient_unit(students, **options)]
        )
        for name, got_, want_, ref_, floor in [
            ("loss", [loss], [true_loss], [ref_loss], 1.0),
            ("grad", [g for g, _ in pairs], [w for _, w in pairs], ref_grads, term_scale),
        ]:
            scale = max(float(w.detach().abs().max()) for w in want_)
            ref_err = max(float((r.detach().double() - w.detach()).abs().max()) for r, w in zip(ref_, want_))
            atol = max(RTOL[dtype] * scale, 8 * ref_err, 4 * torch.finfo(dtype).eps * floor)
            assert_close_verbose(got_, want_, rtol=0.0, atol=atol, name=name)
        return
    # Low precision: at most twice the reference's own error in that dtype, plus the rounding of terms.
    ref_loss, ref = _loss_and_grads(students, teachers, backend="reference", **options)
    ref_pairs = [r for r, w in zip(ref, want) if w is not None]
    terms = _kernel_gradient_terms(students, teachers, **options)
    eps = torch.finfo(dtype).eps
    # The roundings are counted at the scale of the largest term of any gradient (norm-wise over all
    # inputs, as for float32): a level whose gradient is 0 up to rounding (a 1x1 plane under the
    # structure term alone) is judged against the gradient it is part of, not against its own noise.
    grad_scale = max(
        [max(float(w.detach().abs().max()), float(t.detach().abs().max())) for (_, w), t in zip(pairs, terms)]
        + [_gradient_unit(students, **options)]
    )
    for name, fused, lowp, truth, scale in [("loss", loss, ref_loss, true_loss, float(true_loss.detach().abs()))] + [
        (f"grad {i}", g, r, w, grad_scale) for i, ((g, w), r) in enumerate(zip(pairs, ref_pairs))
    ]:
        ref_err = float((lowp.detach().double() - truth.detach()).abs().max())
        atol = 2 * ref_err + 4 * eps * scale
        if name == "loss":  # computed in float32 from 1 - S, which rounds at the scale of 1
            atol += 4 * torch.finfo(torch.float32).eps
        assert_close_verbose(fused, truth, rtol=0.0, atol=atol, name=name)


def _gradient_unit(students, window_size=11, padding="reflect", level_weights=None, **_):
    """|dL/dS| at one output pixel of the level where it is largest, w / (2 N C H' W'): a factor of every
    term of the gradient, so the scale of their roundings even where they cancel to exactly 0 (at the
    optimum, or where the normalisation makes x-hat constant)."""
    weights = level_weights or [1.0] * len(students)
    shrink = 2 * (window_size // 2) if padding == "valid" else 0
    return max(
        abs(w) / (2 * s.shape[0] * s.shape[1] * (s.shape[2] - shrink) * (s.shape[3] - shrink))
        for w, s in zip(weights, students)
    )


def _kernel_gradient_terms(students, teachers, normalize="sample", **options):
    """scale * dL/dx-hat per input, in float64, with the normalisation held fixed: the largest terms
    that the fused path rounds to the input dtype before autograd adds the min/max gradient."""
    from ssimkd_kernels.normalize import plane_affines

    s64 = [s.detach().double().requires_grad_(s.requires_grad) for s in students]
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in teachers]
    if normalize == "none":
        inputs = s64 + t64
        scales = [1.0] * len(inputs)
    else:
        affines = [a.detach() for a in plane_affines([x.detach() for x in s64 + t64], normalize)]
        inputs = [
            ((x.detach() - a[..., 1:, None]) * a[..., :1, None]).requires_grad_(x.requires_grad)
            for x, a in zip(s64 + t64, affines)
        ]
        scales = [a[..., :1, None] for a in affines]
    loss = sk.ssim_kd_loss(inputs[: len(s64)], inputs[len(s64) :], backend="reference", normalize="none", **options)
    return [scale * g for g, scale in zip(grads(loss, inputs), scales) if g is not None]


def _float_dtype(backend):
    return torch.float64 if backend in ("cpu", "cuda_emulated") else torch.float32


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
@pytest.mark.parametrize("exponents", [(1, 1, 1), (0, 0, 1), (0, 1, 1), (0.5, 1.0, 2.0)])
@pytest.mark.parametrize("normalize", ["sample", "level", "plane", "none"])
def test_options(backend, padding, exponents, normalize):
    planes = TINY_PLANES + [(13, 21)] if padding != "valid" else [(11, 11), (12, 17), (13, 21)]
    students, teachers = sample_levels(
        planes, dtype=_float_dtype(backend), device=device_of(backend), signed=normalize != "none", **case_size(backend)
    )
    check_against_reference(backend, students, teachers, padding=padding, exponents=exponents, normalize=normalize)


@pytest.mark.parametrize("window_size, sigma", [(3, 0.8), (7, 1.0), (15, 2.5)])
@pytest.mark.parametrize("padding", ["reflect", "valid"])
def test_window_sizes(backend, window_size, sigma, padding):
    planes = [(2, 3), (9, 5), (17, 20)] if padding == "reflect" else [(15, 15), (17, 20)]
    students, teachers = sample_levels(
        planes, dtype=_float_dtype(backend), device=device_of(backend), **case_size(backend)
    )
    check_against_reference(backend, students, teachers, window_size=window_size, sigma=sigma, padding=padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend takes float16, bfloat16 and float32")
    students, teachers = sample_levels(
        [(1, 1), (5, 7), (19, 33), (40, 70)], dtype=dtype, device=device_of(backend), **case_size(backend)
    )
    check_against_reference(backend, students, teachers)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(backend, layout):
    students, teachers = sample_levels(
        [(3, 4), (9, 13), (20, 70)],
        dtype=_float_dtype(backend),
        device=device_of(backend),
        layout=layout,
        **case_size(backend),
    )
    check_against_reference(backend, students, teachers)


def test_teacher_gradient_only_when_asked(backend):
    students, teachers = sample_levels(
        [(6, 9), (13, 21)], dtype=_float_dtype(backend), device=device_of(backend), **case_size(backend)
    )
    for t in teachers:
        t.requires_grad_(False)
    check_against_reference(backend, students, teachers)
    # and with a gradient into the teacher only
    for s, t in zip(students, teachers):
        s.requires_grad_(False)
        t.requires_grad_(True)
    check_against_reference(backend, students, teachers)


@pytest.mark.parametrize("clamp", [True, False])
def test_clamp_and_level_weights(backend, clamp):
    students, teachers = sample_levels(
        [(5, 7), (13, 21)], dtype=_float_dtype(backend), device=device_of(backend), signed=False, **case_size(backend)
    )
    # teacher = 1 - student: strongly anti-correlated planes, SSIM near -1, m near 1 (the clamp's edge)
    teachers = [(1 - s.detach()).requires_grad_() for s in students]
    check_against_reference(backend, students, teachers, clamp=clamp, normalize="none", level_weights=[0.3, 2.0])


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
def test_ssim_and_ssim_map(backend, padding):
    device, dtype = device_of(backend), _float_dtype(backend)
    (x,), (y,) = sample_levels([(12, 19)], dtype=dtype, device=device, signed=False)
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()

    value = sk.ssim(x, y, padding=padding, backend=backend)
    truth = sk.ssim(xr, yr, padding=padding, backend="reference")
    assert_close_verbose(value, truth, rtol=RTOL[dtype], name="ssim")
    assert_close_verbose(grads(value, [x, y]), grads(truth, [xr, yr]), rtol=RTOL[dtype], name="ssim grad")

    smap = sk.ssim_map(x, y, padding=padding, backend=backend)
    truth_map = sk.ssim_map(xr, yr, padding=padding, backend="reference")
    assert_close_verbose(smap, truth_map, rtol=RTOL[dtype], name="ssim_map")
    cotangent = torch.randn(truth_map.shape, dtype=torch.float64)
    got = torch.autograd.grad(smap, [x, y], cotangent.to(device=device, dtype=smap.dtype))
    want = torch.autograd.grad(truth_map, [xr, yr], cotangent)
    assert_close_verbose(list(got), list(want), rtol=RTOL[dtype], name="ssim_map grad")


def test_bitwise_deterministic(backend):
    students, teachers = sample_levels([(3, 4), (33, 70), (50, 84)], device=device_of(backend), **case_size(backend))
    runs = [_loss_and_grads(students, teachers, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("normalize", ["sample", "none"])
def test_nan_and_inf_give_nan_loss(backend, value, normalize):
    students, teachers = sample_levels(
        [(5, 7), (9, 9)], device=device_of(backend), requires_grad=False, **case_size(backend)
    )
    students[1][0, 1, 4, 4] = value
    loss = sk.ssim_kd_loss(students, teachers, normalize=normalize, backend=backend)
    assert torch.isnan(loss)


def test_many_levels_span_several_launches(backend):
    # More levels than one launch holds (MAX_LEVELS_PER_LAUNCH) still reduce to one loss.
    planes = [(1 + i % 5, 2 + (3 * i) % 7) for i in range(14)]
    students, teachers = sample_levels(
        planes, batch=1, channels=2, dtype=_float_dtype(backend), device=device_of(backend)
    )
    check_against_reference(backend, students, teachers)
