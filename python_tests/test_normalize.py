"""The min-max normalisation's statistics: GroupMinMax and its fused gradient (csrc: minmax_grad).

Its backward must equal autograd through torch.amin / torch.amax exactly in float64 (ties split
evenly, a constant group sending both shares to every element), for every mode, layout and dtype.
"""

import pytest
import torch

from ssimkd_kernels.normalize import GroupMinMax, _minmax_grad_eager

MODES = ["sample", "level", "plane"]
DIMS = {"sample": (1, 2, 3), "level": (0, 1, 2, 3), "plane": (2, 3)}


def _with_ties(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64)
    x = (x * 2).round() / 2  # many equal values: ties at the min and max
    x[-1, -1] = 0.25  # a constant plane: min == max
    return x.to(dtype)


def _autograd_truth(x, mode, g_low, g_high):
    x = x.detach().requires_grad_()
    low, high = x.amin(dim=DIMS[mode]).reshape(-1), x.amax(dim=DIMS[mode]).reshape(-1)
    torch.autograd.backward([low, high], [g_low.to(low.dtype), g_high.to(high.dtype)])
    return x.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_minmax_and_gradient_equal_amin_amax(mode, layout):
    x = _with_ties((3, 4, 5, 6), torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[..., ::2]
    x.requires_grad_()
    low, high = GroupMinMax.apply(x, mode)
    assert torch.equal(low, x.detach().amin(dim=DIMS[mode]).reshape(-1))
    assert torch.equal(high, x.detach().amax(dim=DIMS[mode]).reshape(-1))
    g_low, g_high = torch.randn_like(low), torch.randn_like(high)
    (grad,) = torch.autograd.grad([low, high], [x], [g_low, g_high])
    torch.testing.assert_close(grad, _autograd_truth(x, mode, g_low, g_high), rtol=1e-15, atol=0)
    torch.testing.assert_close(_minmax_grad_eager(x.detach(), low, high, g_low, g_high, mode), grad, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x = _with_ties((2, 3, 4, 4), dtype).requires_grad_()
    low, high = GroupMinMax.apply(x, "sample")
    assert low.dtype == torch.float32
    g_low, g_high = torch.randn_like(low), torch.randn_like(high)
    (grad,) = torch.autograd.grad([low, high], [x], [g_low, g_high])
    assert grad.dtype == dtype
    truth = _autograd_truth(x.detach().double(), "sample", g_low.double(), g_high.double())
    torch.testing.assert_close(grad.double(), truth, rtol=torch.finfo(dtype).eps, atol=0)


def test_nan_input_gives_nan_gradient():
    x = torch.rand(2, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        x[0, 1, 1, 1] = float("nan")
    low, high = GroupMinMax.apply(x, "sample")
    (grad,) = torch.autograd.grad([low, high], [x], [torch.ones_like(low), torch.ones_like(high)])
    assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all()


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # no ties: differentiable
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda t, m=mode: GroupMinMax.apply(t, m), (x,))


# ssimkd::minmax_affine: the CPU op behind the normalisation of every map of a call at once.
CODES = {"sample": 0, "level": 1, "plane": 2}


def _affine_truth(x, mode):
    """(N, C, 2) (scale, offset) by the formula, autograd through amin / amax."""
    dims = DIMS[mode]
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    scale = (1.0 / (high - low + 1e-6)).expand(x.shape[0], x.shape[1], 1, 1)
    offset = low.expand(x.shape[0], x.shape[1], 1, 1)
    return torch.stack([scale[..., 0, 0], offset[..., 0, 0]], dim=-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_minmax_affine_equals_the_formula_through_amin_amax(mode, layout):
    feats = [
        _with_ties((3, 4, 5, 6), torch.float64),
        torch.randn(3, 4, 1, 1, dtype=torch.float64),
        torch.randn(3, 4, 70, 9, dtype=torch.float64),
    ]
    if layout == "channels_last":
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    elif layout == "sliced":
        feats = [torch.cat([f, f], dim=3)[..., ::2] for f in feats]
    feats = [f.requires_grad_() for f in feats]
    affines, bounds = torch.ops.ssimkd.minmax_affine(feats, CODES[mode], 1e-6)
    truths = [_affine_truth(f, mode) for f in feats]
    for a, t in zip(affines, truths):
        torch.testing.assert_close(a, t, rtol=1e-15, atol=0)
    upstream = [torch.randn_like(a) for a in affines]
    got = torch.autograd.grad(affines, feats, upstream)
    want = torch.autograd.grad(truths, feats, upstream)
    for g, w in zip(got, want):
        assert g.stride() == w.stride() or not g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_minmax_affine_low_precision(dtype):
    x = _with_ties((2, 3, 4, 4), dtype).requires_grad_()
    (affine,), _ = torch.ops.ssimkd.minmax_affine([x], 0, 1e-6)
    assert affine.dtype == torch.float32
    upstream = torch.randn_like(affine)
    (grad,) = torch.autograd.grad([affine], [x], [upstream])
    assert grad.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    (truth,) = torch.autograd.grad([_affine_truth(x64, "sample")], [x64], [upstream.double()])
    torch.testing.assert_close(grad.double(), truth, rtol=4 * torch.finfo(dtype).eps, atol=1e-6)


def test_minmax_affine_gradient_only_where_needed():
    student = torch.randn(2, 3, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5)
    affines, _ = torch.ops.ssimkd.minmax_affine([student, teacher], 0, 1e-6)
    (grad,) = torch.autograd.grad(affines[0].sum() + affines[1].sum(), [student])
    (truth,) = torch.autograd.grad(_affine_truth(student, "sample").sum(), [student])
    torch.testing.assert_close(grad, truth)


def test_minmax_affine_nan_gives_nan():
    x = torch.rand(2, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        x[0, 1, 1, 1] = float("nan")
    (affine,), (bounds,) = torch.ops.ssimkd.minmax_affine([x], 0, 1e-6)
    assert torch.isnan(affine[0]).all() and torch.isnan(bounds[0]).all() and torch.isfinite(affine[1]).all()
    (grad,) = torch.autograd.grad([affine], [x], [torch.ones_like(affine)])
    assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all()


def test_minmax_affine_gradcheck_and_opcheck():
    feats = [
        torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, 2, 7, dtype=torch.float64, requires_grad=True),
    ]  # no ties: differentiable
    for mode in MODES:
        assert torch.autograd.gradcheck(
            lambda *f, m=mode: torch.ops.ssimkd.minmax_affine(list(f), CODES[m], 1e-6)[0], tuple(feats)
        )
        torch.library.opcheck(torch.ops.ssimkd.minmax_affine.default, (feats, CODES[mode], 1e-6))
