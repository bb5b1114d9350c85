"""The reference itself: its window, padding and SSIM against outside truths, and its gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_verbose

import ssimkd_kernels as sk
from ssimkd_kernels import reference


def test_gaussian_window_is_normalised_and_symmetric():
    g = reference.gaussian_window_1d(11, 1.5)
    assert g.shape == (11,)
    assert abs(float(g.sum()) - 1.0) < 1e-15
    assert torch.equal(g, g.flip(0))
    assert int(g.argmax()) == 5


@pytest.mark.parametrize("n", [6, 7, 12, 30])
def test_reflect_index_equals_torch_reflect_pad(n):
    r = 5
    x = torch.arange(float(n)).view(1, 1, n)
    padded = F.pad(x, (r, r), mode="reflect").view(-1)
    assert torch.equal(padded, x.view(-1)[reference.reflect_index(n, r)])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_reflect_index_folds_planes_smaller_than_the_window(n):
    def mirrored(p):  # reflect at the borders again and again until inside: d c b | a b c d | c b a ...
        if n == 1:
            return 0
        while not 0 <= p < n:
            p = -p if p < 0 else 2 * (n - 1) - p
        return p

    idx = reference.reflect_index(n, 5)
    assert idx.tolist() == [mirrored(p) for p in range(-5, n + 5)]


def test_blur_zero_padding_equals_one_2d_convolution():
    x = torch.rand(2, 3, 9, 13, dtype=torch.float64)
    g = reference.gaussian_window_1d(11, 1.5)
    window = torch.outer(g, g).expand(3, 1, 11, 11)
    expected = F.conv2d(x, window, padding=5, groups=3)
    assert_close_verbose(reference.blur(x, g, "zero"), expected, rtol=1e-14)


def test_ssim_of_identical_inputs_is_one():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    for padding in ("reflect", "zero", "valid"):
        assert torch.allclose(reference.ssim_map_reference(x, x, padding=padding), torch.ones(1, dtype=torch.float64))


def test_valid_padding_matches_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x = torch.rand(2, 3, 32, 40, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    ours = sk.ssim(x, y, padding="valid", backend="reference")
    theirs = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5, K=(0.01, 0.03))
    # pytorch_msssim builds its window in float32: agreement to float32 rounding of the taps.
    assert_close_verbose(ours, theirs, rtol=1e-6)


def test_valid_padding_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.rand(1, 1, 40, 33, dtype=torch.float64)
    y = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    ours = sk.ssim(x, y, padding="valid", backend="reference")
    theirs = metrics.structural_similarity(
        x[0, 0].numpy(),
        y[0, 0].numpy(),
        win_size=11,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert abs(float(ours) - theirs) < 1e-12


def test_general_exponents_at_one_equal_the_closed_form():
    x = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    y = 0.7 * x + 0.3 * torch.rand(1, 2, 12, 12, dtype=torch.float64)  # correlated: s > 0 in every window
    closed = reference.ssim_map_reference(x, y, exponents=(1, 1, 1))
    # The next float after 1 is not 1, so this takes the general path (square roots, powers), whose
    # s^gamma is NaN where s < 0 for a non-integer gamma: hence the correlated inputs.
    general = reference.ssim_map_reference(x, y, exponents=(1.0, 1.0, math.nextafter(1.0, 2.0)))
    assert_close_verbose(general, closed, rtol=1e-6)


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
@pytest.mark.parametrize("plane", [(3, 4), (5, 7), (7, 11)])
@pytest.mark.parametrize("exponents", [(1, 1, 1), (0, 0, 1), (0.5, 1.0, 2.0)])
def test_reference_gradcheck(padding, plane, exponents):
    window = 3 if padding == "valid" else 11  # valid needs the window inside the plane
    x = torch.rand(1, 2, *plane, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, *plane, dtype=torch.float64, requires_grad=True)

    def loss(a, b):
        return sk.ssim_kd_loss(a, b, padding=padding, exponents=exponents, window_size=window, backend="reference")

    assert torch.autograd.gradcheck(loss, (x, y))
