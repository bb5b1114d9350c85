"""The min-max normalisation's statistics: GroupMinMax and its fused gradient (csrc: minmax_grad).

Its backward must equal autograd through torch.amin / torch.amax exactly in float64 (ties split
evenly, a constant group sending both shares to every element), for every mode, layout and dtype.
"""

import pytest
import torch

from ssimkd_kernels.ops import GroupMinMax, _minmax_grad_eager

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
    torch.testing.assert_close(_minmax_grad_eager(x.detach(), low, high, g_low, g_high, mode), grad, rtol=1e-15,
                               atol=0)


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
