"""The image-loss drop-ins (fused_ssim, l1_ssim_loss, ms_ssim, MSSSIMLoss), ssim's reductions and mask,
checked against an independent float64 formula written here with conv2d, and against pytorch-msssim."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_available, case_size, device_of
from utils import assert_close_verbose

import ssimkd_kernels as sk

BACKENDS_AND_REFERENCE = ("reference", "cpu", "triton", "cuda", "cuda_emulated")


@pytest.fixture(params=BACKENDS_AND_REFERENCE)
def any_backend(request):
    from conftest import backend_available

    if request.param != "reference" and not backend_available(request.param):
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param


# ------------------------------------------------------------------------------------------------
# An independent SSIM: the 2-D window as one 11x11 conv2d (not separable), in float64
# ------------------------------------------------------------------------------------------------


def gaussian_2d(size=11, sigma=1.5):
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_and_cs_maps(x, y, *, padding, size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    """(SSIM map, c s map) in float64: zero padding ("same") or only windows inside ("valid")."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    window = gaussian_2d(size, sigma).to(x.device).expand(c, 1, size, size)
    pad = size // 2 if padding in ("same", "zero") else 0

    def blur(t):
        return F.conv2d(t, window, padding=pad, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs, cs


def images(shape, *, device="cpu", dtype=torch.float32, correlated=True):
    """Two related images in [0, 1], requiring grad."""
    x = torch.rand(shape, dtype=torch.float64)
    y = (
        (0.7 * x + 0.3 * torch.rand(shape, dtype=torch.float64))
        if correlated
        else torch.rand(shape, dtype=torch.float64)
    )
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (x, y)]


def check_against(actual_fn, expected_fn, inputs, *, rtol, name):
    """Values and both gradients of actual_fn(*inputs) against expected_fn on float64 copies."""
    actual = actual_fn(*inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = expected_fn(*ref_inputs)
    assert_close_verbose(actual, expected, rtol=rtol, name=name)
    cotangent = torch.randn(actual.shape, dtype=torch.float64)
    got = torch.autograd.grad(actual, inputs, cotangent.to(actual.dtype))
    want = torch.autograd.grad(expected, ref_inputs, cotangent)
    assert_close_verbose(list(got), list(want), rtol=rtol * 10, name=f"{name} gradients")


def image_shape(backend, h=21, w=18):
    size = case_size(backend)
    return (size["batch"], size["channels"], h, w)


# ------------------------------------------------------------------------------------------------
# fused_ssim
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fused_ssim_matches_the_formula_with_both_gradients(any_backend, padding):
    device = device_of(any_backend)
    x, y = images(image_shape(any_backend), device=device)
    check_against(
        lambda a, b: sk.fused_ssim(a, b, padding=padding, backend=any_backend),
        lambda a, b: ssim_and_cs_maps(a, b, padding=padding)[0].mean(),
        (x, y),
        rtol=2e-6,
        name=f"fused_ssim {padding}",
    )


def test_fused_ssim_eval_mode_saves_nothing_and_rejects_unknown_padding():
    x, y = images((1, 3, 16, 16))
    value = sk.fused_ssim(x, y, train=False)
    assert not value.requires_grad
    assert_close_verbose(value, sk.fused_ssim(x, y), rtol=0)
    with pytest.raises(ValueError, match="padding must be one of"):
        sk.fused_ssim(x, y, padding="reflect")


# ------------------------------------------------------------------------------------------------
# ssim: reductions and mask
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_ssim_reductions_and_mask(any_backend, reduction, masked):
    device = device_of(any_backend)
    x, y = images(image_shape(any_backend, 17, 19), device=device)
    mask = torch.rand(x.shape[0], 1, 17, 19, dtype=torch.float64).to(device) if masked else None

    def expected(a, b):
        smap, _ = ssim_and_cs_maps(a, b, padding="zero")
        w = torch.ones_like(smap) if mask is None else mask.double().expand_as(smap)
        dims = (1, 2, 3) if reduction == "none" else (0, 1, 2, 3)
        total = (w * smap).sum(dim=dims)
        return total if reduction == "sum" else total / w.sum(dim=dims)

    check_against(
        lambda a, b: sk.ssim(a, b, padding="zero", reduction=reduction, mask=mask, backend=any_backend),
        expected,
        (x, y),
        rtol=2e-6,
        name=f"ssim {reduction} mask={masked}",
    )


def test_ssim_mask_of_the_input_size_is_cropped_for_valid_padding():
    x, y = images((2, 3, 20, 24))
    mask = torch.rand(2, 1, 20, 24)
    full = sk.ssim(x, y, padding="valid", mask=mask, backend="reference")
    cropped = sk.ssim(x, y, padding="valid", mask=mask[:, :, 5:-5, 5:-5], backend="reference")
    assert_close_verbose(full, cropped, rtol=0)
    with pytest.raises(ValueError, match=r"mask must be \(N, 1, H, W\)"):
        sk.ssim(x, y, mask=torch.rand(2, 1, 20, 23))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sk.ssim(x, y, reduction="max")


def test_ssim_agrees_with_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x, y = images((2, 3, 40, 37), dtype=torch.float64)
    for data_range in (1.0, 255.0):
        ours = sk.ssim(x * data_range, y * data_range, padding="valid", data_range=data_range, reduction="none")
        theirs = pytorch_msssim.ssim(x * data_range, y * data_range, data_range=data_range, size_average=False)
        assert_close_verbose(ours, theirs, rtol=1e-6)  # pytorch-msssim builds its window in float32


# ------------------------------------------------------------------------------------------------
# l1_ssim_loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["zero", "valid"])
def test_l1_ssim_loss_matches_the_3dgs_formula(any_backend, padding):
    device = device_of(any_backend)
    x, y = images(image_shape(any_backend), device=device)
    w = 0.2
    check_against(
        lambda a, b: sk.l1_ssim_loss(a, b, ssim_weight=w, padding=padding, backend=any_backend),
        lambda a, b: (1 - w) * (a - b).abs().mean() + w * (1 - ssim_and_cs_maps(a, b, padding=padding)[0].mean()),
        (x, y),
        rtol=2e-6,
        name=f"l1_ssim_loss {padding}",
    )
    with pytest.raises(ValueError, match="ssim_weight"):
        sk.l1_ssim_loss(x, y, ssim_weight=1.5)


@pytest.mark.parametrize("ssim_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("padding", ["zero", "valid"])
def test_l1_ssim_loss_over_several_tiles_with_ties(any_backend, padding, ssim_weight):
    """The fused L1 term counts every pixel once across tiles (CPU 64, CUDA 32) and strips (Triton: 300
    columns are two), including valid padding's border rows and a bottom tile row without window centres
    (68 = 64 + 4 rows); pixels where x = y get a zero L1 gradient, as torch's abs gives; w = 0 and 1 too."""
    device = device_of(any_backend)
    x, y = images((1, 2, 68, 300), device=device)
    with torch.no_grad():
        y[:, :, 10:14] = x[:, :, 10:14]
        y[:, 1, :, 290:] = x[:, 1, :, 290:]
    check_against(
        lambda a, b: sk.l1_ssim_loss(a, b, ssim_weight=ssim_weight, padding=padding, backend=any_backend),
        lambda a, b: (
            (1 - ssim_weight) * (a - b).abs().mean()
            + ssim_weight * (1 - ssim_and_cs_maps(a, b, padding=padding)[0].mean())
        ),
        (x, y),
        rtol=2e-6,
        name=f"l1_ssim_loss {padding} w={ssim_weight}",
    )


@pytest.mark.parametrize("layout", ["channels_last", "transposed-view", "bfloat16"])
def test_l1_ssim_loss_layouts_and_dtypes(any_backend, layout):
    """The fused L1 term reads any strides (channels_last, a transposed view: no unit column stride) and
    bfloat16 inputs (float32 statistics), values and both gradients against the float64 formula."""
    device = device_of(any_backend)
    x, y = images((1, 2, 40, 70), device=device)
    with torch.no_grad():
        y[:, :, :3] = x[:, :, :3]  # ties
    if layout == "channels_last":
        x, y = (t.detach().to(memory_format=torch.channels_last).requires_grad_() for t in (x, y))
    elif layout == "transposed-view":
        x, y = (t.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() for t in (x, y))
    else:
        x, y = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x, y))
    w = 0.3
    check_against(
        lambda a, b: sk.l1_ssim_loss(a, b, ssim_weight=w, backend=any_backend),
        lambda a, b: (1 - w) * (a - b).abs().mean() + w * (1 - ssim_and_cs_maps(a, b, padding="zero")[0].mean()),
        (x, y),
        rtol=1e-3 if layout == "bfloat16" else 2e-6,  # bfloat16 gradients round to 8 bits
        name=f"l1_ssim_loss {layout}",
    )


# ------------------------------------------------------------------------------------------------
# ms_ssim
# ------------------------------------------------------------------------------------------------


def ms_ssim_formula(x, y, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), data_range=1.0):
    """MS-SSIM per sample from the independent maps, with relu'd terms; float64."""
    terms = []
    for level in range(len(weights)):
        smap, cs = ssim_and_cs_maps(x, y, padding="valid", data_range=data_range)
        if level < len(weights) - 1:
            terms.append(cs.mean(dim=(2, 3)))
            pad = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
        else:
            terms.append(smap.mean(dim=(2, 3)))
    per_channel = torch.ones_like(terms[0])
    for t, w in zip(terms, weights):
        per_channel = per_channel * t.clamp(min=0) ** w
    return per_channel.mean(dim=1)


def test_ms_ssim_matches_pytorch_msssim_with_gradients():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x, y = images((2, 3, 171, 166), dtype=torch.float64)
    ours = sk.ms_ssim(x, y, data_range=1.0, reduction="none")
    theirs = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    # pytorch-msssim builds its window in float32 (5e-7 relative here); the bound is 1e-5.
    assert_close_verbose(ours, theirs, rtol=1e-5)
    g_ours = torch.autograd.grad(ours.sum(), (x, y))
    g_theirs = torch.autograd.grad(theirs.sum(), (x, y))
    assert_close_verbose(list(g_ours), list(g_theirs), rtol=3e-5, name="gradients")
    check_against(
        lambda a, b: sk.ms_ssim(a, b, reduction="none"), ms_ssim_formula, (x, y), rtol=1e-10, name="ms_ssim float64"
    )
    x32, y32 = (t.detach().float() * 255 for t in (x, y))
    assert_close_verbose(
        sk.ms_ssim(x32, y32, data_range=255.0), pytorch_msssim.ms_ssim(x32, y32, data_range=255.0), rtol=1e-5
    )


def test_ms_ssim_on_every_backend(any_backend):
    device = device_of(any_backend)
    shape = (1, 1 if any_backend == "triton" else 2, 163, 170)
    x, y = images(shape, device=device)
    check_against(
        lambda a, b: sk.ms_ssim(a, b, reduction="none", backend=any_backend),
        ms_ssim_formula,
        (x, y),
        rtol=1e-5,
        name="ms_ssim",
    )


def test_ms_ssim_gradient_is_finite_where_a_term_is_negative():
    x = torch.rand(1, 1, 170, 170, dtype=torch.float64, requires_grad=True)
    y = (1 - x).detach()  # anti-correlated: c s < 0 at the fine scales
    value = sk.ms_ssim(x, y)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_ms_ssim_names_the_minimum_image_size():
    x, y = images((1, 1, 160, 300))
    with pytest.raises(ValueError, match="smaller side exceeds 160"):
        sk.ms_ssim(x, y)
    value = sk.ms_ssim(*images((1, 1, 41, 41)), weights=(0.5, 0.5, 1.0))  # 3 scales: needs > 40
    assert torch.isfinite(value)


def test_ms_ssim_loss_module():
    x, y = images((1, 2, 170, 165))
    criterion = sk.MSSSIMLoss(data_range=1.0, backend="reference")
    assert_close_verbose(criterion(x, y), 1 - sk.ms_ssim(x, y, backend="reference"), rtol=0)
    with pytest.raises(TypeError, match="unknown options"):
        sk.MSSSIMLoss(size_average=True)
    assert math.isclose(float(sk.MSSSIMLoss()(x, x.detach())), 0.0, abs_tol=1e-6)


@pytest.mark.parametrize(
    "call", ["ssim-none", "ssim-sum", "ssim-mask-mean", "ssim-mask-none", "ms_ssim", "l1_ssim_loss"]
)
def test_fused_reductions_write_no_map(monkeypatch, call):
    """reduction="none"/"sum", a mask (weights of m inside the op), ms_ssim and l1_ssim_loss reduce inside
    the fused op (per level, or per plane of each level): the op is never asked for an SSIM map, and each
    is one call of one launch (ms_ssim: a level per scale; l1_ssim_loss: its L1 term in the same call)."""
    if not backend_available("cpu"):
        pytest.skip("the C++ extension is not available here")
    import ssimkd_kernels.image as image_module
    import ssimkd_kernels.loss as loss_module

    calls = []

    def spy(backend, xs, ys, *args, write_map=False, **kwargs):
        calls.append((len(xs), write_map))
        return fused(backend, xs, ys, *args, write_map=write_map, **kwargs)

    fused = loss_module.fused_ssim
    monkeypatch.setattr(loss_module, "fused_ssim", spy)
    monkeypatch.setattr(image_module, "fused_ssim_op", spy)
    x = torch.rand(2, 3, 170, 170, requires_grad=True)
    y = torch.rand(2, 3, 170, 170)
    if call == "ms_ssim":
        value = sk.ms_ssim(x, y, backend="cpu")
        expected_levels = [5]  # the five scales, each its own exponents
    elif call == "l1_ssim_loss":
        value = sk.l1_ssim_loss(x, y, backend="cpu")
        expected_levels = [1]
    else:
        mask = torch.rand(2, 1, 170, 170) if "mask" in call else None
        reduction = call.split("-")[-1]
        value = sk.ssim(x, y, reduction=reduction, mask=mask, backend="cpu")
        expected_levels = [1]
    value.sum().backward()
    assert calls == [(n, False) for n in expected_levels]
    assert torch.isfinite(x.grad).all()


def test_a_mask_that_needs_a_gradient_gets_one():
    """The fused path treats the mask as a constant; a mask that requires grad takes the SSIM map, so its
    gradient (the map, normalised) is there, equal to the reference backend's."""
    x, y = images((1, 2, 16, 15))
    grads = {}
    for backend in ("reference", "cpu") if backend_available("cpu") else ("reference",):
        mask = torch.rand(1, 1, 16, 15, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        value = sk.ssim(x, y, padding="zero", mask=mask, backend=backend)
        (grads[backend],) = torch.autograd.grad(value, mask)
    assert torch.isfinite(grads["reference"]).all() and grads["reference"].abs().sum() > 0
    for grad in grads.values():
        assert_close_verbose(grad, grads["reference"], rtol=1e-4, name="d ssim / d mask")


def test_a_bool_mask_selects_pixels():
    """A bool mask is the mean over the pixels it selects, fused as weights 0 and 1."""
    x, y = images((2, 3, 18, 20))
    mask = torch.rand(2, 1, 18, 20) > 0.5
    smap = sk.ssim_map(x, y, padding="zero", backend="reference")
    expected = smap[mask.expand_as(smap)].mean()
    backends = ["reference"] + [b for b in ("cpu", "triton", "cuda_emulated") if backend_available(b)]
    for backend in backends:
        value = sk.ssim(x, y, padding="zero", mask=mask, backend=backend)
        assert_close_verbose(value, expected, rtol=2e-6, name=f"bool mask {backend}")


def test_a_mask_with_inputs_of_two_dtypes():
    """x float32 and y float64 run in float64 on every backend, the reference too (it ran float32), and
    the mask's weights follow them."""
    x, _ = images((1, 2, 16, 17))
    y = torch.rand(1, 2, 16, 17, dtype=torch.float64)
    mask = torch.rand(1, 1, 16, 17)
    expected = sk.ssim(x.double(), y, padding="zero", mask=mask.double(), backend="reference")
    backends = ["reference"] + [b for b in ("cpu", "cuda_emulated") if backend_available(b)]
    for backend in backends:
        value = sk.ssim(x, y, padding="zero", mask=mask, backend=backend)
        assert value.dtype == torch.float64
        assert_close_verbose(value, expected, rtol=1e-10, name=f"mixed dtypes {backend}")
