"""The custom ops as torch sees them: opcheck, fake kernels, torch.compile without graph breaks."""

from dataclasses import fields

import pytest
import torch
from conftest import backend_available, device_of, sample_levels
from torch import nn

import ssimkd_kernels as sk
from ssimkd_kernels.ops import _FWD_OPTIONS, _OP_PAIRS, _OPTION_COUNT, EMULATED_CUDA, KernelOptions, _op, fused_ssim

OPTIONS = KernelOptions(
    window_size=11, sigma=1.5, c1=1e-4, c2=9e-4, padding=0, alpha=1.0, beta=1.0, gamma=1.0, clamp=True
)


def _op_args(backend, write_map, affine: bool, weighted: bool = False):
    students, teachers = sample_levels([(3, 4), (9, 13)], dtype=torch.float32, device=device_of(backend))
    affines = []
    if affine:
        affines = [torch.rand(s.shape[0], s.shape[1], 2, device=s.device, requires_grad=True) for s in students]
    # weighted: per-pixel weights of m, a mask shared by the channels (an expanded view) on one level, full
    # on the other
    weights = []
    if weighted:
        n, c, h, w = students[0].shape
        weights = [torch.rand(n, 1, h, w, device=students[0].device).expand(n, c, h, w), torch.rand_like(students[1])]
    options = KernelOptions(**{**OPTIONS.__dict__, "plane_sums": weighted})  # and one loss per plane
    exponents = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0] if weighted else []  # and each level its own exponents
    l1_scales = [0.3, 0.05] if weighted else []  # and an L1 term
    args = (students, teachers, affines, affines, weights, [0.1, 0.2], l1_scales, exponents)
    return (*args, *options.as_args(), write_map)


@pytest.mark.parametrize("write_map", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_opcheck(backend, write_map, affine, weighted):
    fwd_name, _ = _OP_PAIRS[backend]
    args = _op_args(backend, write_map, affine, weighted)
    torch.library.opcheck(_op(fwd_name), args)


@pytest.mark.parametrize("write_map", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("needs", [(True, True), (True, False)], ids=["both", "student-only"])
def test_opcheck_backward(backend, write_map, affine, needs):
    """The backward ops as torch sees them: schema, fake kernel, no input mutated, no aliasing."""
    fwd_name, bwd_name = _OP_PAIRS[backend]
    students, teachers, x_affines, y_affines, weights, level_scales, l1_scales, exponents, *rest = _op_args(
        backend, write_map, affine, weighted=affine
    )
    options, write = rest[:-1], rest[-1]
    inputs = (students, teachers, x_affines, y_affines, weights, level_scales, l1_scales, exponents)
    with torch.no_grad():
        losses, maps = _op(fwd_name)(*inputs, *options, write)
    grad_losses = torch.rand_like(losses)
    grad_maps = [torch.rand_like(m) for m in maps] if write_map else []
    args = (grad_losses, grad_maps, *inputs, *options, *needs)
    torch.library.opcheck(_op(bwd_name), args, test_utils=("test_schema", "test_faketensor"))


def test_fake_kernel_shapes_match(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd_name, _ = _OP_PAIRS[backend]
    real = _op(fwd_name)(*_op_args(backend, True, False))
    with FakeTensorMode() as mode:
        args = _op_args(backend, True, False)
        fake_args = tuple(
            [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args
        )
        fake = _op(fwd_name)(*fake_args)
    assert fake[0].shape == real[0].shape and fake[0].dtype == real[0].dtype
    assert [m.shape for m in fake[1]] == [m.shape for m in real[1]]


class _Distiller(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.student = nn.Conv2d(3, 4, 3, padding=1)
        self.teacher = nn.Conv2d(3, 4, 3, padding=1)
        self.criterion = sk.SSIMKDLoss(loss_weight=1.5, backend=backend)

    def forward(self, image):
        s3 = self.student(image)
        s4 = nn.functional.avg_pool2d(s3, 2)
        with torch.no_grad():
            t3 = self.teacher(image)
            t4 = nn.functional.avg_pool2d(t3, 2)
        return self.criterion({"p3": s3, "p4": s4}, {"p3": t3, "p4": t4})


def test_torch_compile_fullgraph(backend):
    device = device_of(backend)
    model = _Distiller(backend).to(device)
    image = torch.rand(2, 3, 12, 17, device=device)
    eager = model(image)
    eager.backward()
    eager_grad = model.student.weight.grad.clone()
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(image)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.student.weight.grad, eager_grad, rtol=1e-4, atol=1e-7)


def test_level_exponents_equal_one_call_per_level(backend):
    """level_exponents: each level with its own (alpha, beta, gamma) in one call (MS-SSIM's c s scales and
    its coarsest) equals a call per level with those exponents as options, values and gradients."""
    students, teachers = sample_levels([(13, 12), (11, 14), (12, 11)], device=device_of(backend))
    triples = [(0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.5, 1.0)]
    base = KernelOptions(**{**OPTIONS.__dict__, "clamp": False})
    together, _ = fused_ssim(backend, students, teachers, [], [], [0.5] * 3, base, level_exponents=triples)
    per_level = [KernelOptions(**{**base.__dict__, "alpha": a, "beta": b, "gamma": g}) for a, b, g in triples]
    apart = torch.cat(
        [fused_ssim(backend, [s], [t], [], [], [0.5], o)[0] for s, t, o in zip(students, teachers, per_level)]
    )
    assert torch.allclose(together, apart, rtol=1e-5, atol=1e-7)
    cotangent = torch.tensor([1.0, -2.0, 0.5], device=together.device)
    got = torch.autograd.grad(together, students + teachers, cotangent)
    want = torch.autograd.grad(apart, students + teachers, cotangent)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)


def test_fused_ssim_returns_scaled_level_sums(backend):
    students, teachers = sample_levels([(5, 6), (7, 3)], device=device_of(backend), requires_grad=False)
    ones, _ = fused_ssim(backend, students, teachers, [], [], [1.0, 1.0], OPTIONS)
    halves, _ = fused_ssim(backend, students, teachers, [], [], [0.5, 2.0], OPTIONS)
    assert torch.allclose(halves, ones * torch.tensor([0.5, 2.0], device=ones.device))


@pytest.mark.parametrize("plane_sums", [False, True], ids=["level-sums", "plane-sums"])
@pytest.mark.parametrize("padding", ["reflect", "valid"])
def test_weights_scale_m_per_pixel_in_the_fused_pass(backend, padding, plane_sums):
    """level_losses[l] = scale * sum(w m) (with plane_sums one entry per plane (n, c), levels in order), and
    both inputs' gradients with it, for weights of any strides (a mask expanded over channels, a
    transposed view): against the map the same op writes, weighted and summed here."""
    from ssimkd_kernels._constants import PADDING_CODES

    options = KernelOptions(
        **{**OPTIONS.__dict__, "padding": PADDING_CODES[padding], "clamp": False, "plane_sums": plane_sums}
    )
    device = device_of(backend)
    students, teachers = sample_levels([(13, 17), (12, 11)], device=device)
    shrink = 10 if padding == "valid" else 0
    (n0, c0, h0, w0), (n1, c1, h1, w1) = students[0].shape, students[1].shape
    weights = [
        torch.rand(n0, 1, h0 - shrink, w0 - shrink, device=device).expand(n0, c0, -1, -1),
        torch.rand(n1, c1, w1 - shrink, h1 - shrink, device=device).transpose(2, 3),
    ]
    scales = [0.5, 2.0]
    losses, _ = fused_ssim(backend, students, teachers, [], [], scales, options, weights=weights)
    cotangent = torch.rand(losses.shape, device=device)  # a different upstream gradient per entry
    grads = torch.autograd.grad(losses, students + teachers, cotangent)

    _, maps = fused_ssim(backend, students, teachers, [], [], [0.0, 0.0], options, write_map=True)
    sums = [scale * (w * (1.0 - m) / 2).sum(dim=(2, 3)) for scale, w, m in zip(scales, weights, maps)]
    expected = torch.cat([s.flatten() for s in sums]) if plane_sums else torch.stack([s.sum() for s in sums])
    assert losses.shape == expected.shape
    expected_grads = torch.autograd.grad(expected, students + teachers, cotangent)
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def _signature(qualified_name: str) -> tuple:
    schema = _op(qualified_name).default._schema
    return [(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns]


@pytest.mark.parametrize("direction", [0, 1], ids=["fwd", "bwd"])
def test_every_backend_defines_one_schema(direction):
    """The C++ ops (csrc/ops.cpp) and the Triton ops (ops.py) are declared separately: they must agree
    argument for argument, and the scalar options must sit where KernelOptions says."""
    if not backend_available("cpu"):
        pytest.skip("the C++ extension is not available here")
    triton = _signature(_OP_PAIRS["triton"][direction])
    for backend in ("cpu", EMULATED_CUDA):
        assert _signature(_OP_PAIRS[backend][direction]) == triton, backend
    names = [name for name, _ in triton[0]]
    first = names.index("window_size")
    assert tuple(names[first : first + _OPTION_COUNT]) == tuple(f.name for f in fields(KernelOptions))
    if direction == 0:
        assert names[_FWD_OPTIONS] == [f.name for f in fields(KernelOptions)]


@pytest.mark.parametrize("plane_sums", [False, True], ids=["level-sums", "plane-sums"])
@pytest.mark.parametrize("padding", ["zero", "valid"])
def test_l1_scales_add_the_l1_term_in_the_fused_pass(backend, padding, plane_sums):
    """level_l1_scales[l] * sum |x-hat - y-hat| over every pixel of the level (or plane), whatever the
    padding, is added to its loss in the same pass; its gradient (sign 0 where x-hat = y-hat, as torch's
    abs) reaches both inputs and both affines. Against the op without the term plus the term in torch."""
    from ssimkd_kernels._constants import PADDING_CODES

    options = KernelOptions(
        **{**OPTIONS.__dict__, "padding": PADDING_CODES[padding], "clamp": False, "plane_sums": plane_sums}
    )
    device = device_of(backend)
    students, teachers = sample_levels([(13, 17), (12, 40)], device=device, requires_grad=False)
    with torch.no_grad():  # ties: rows where student and teacher agree exactly
        teachers[0][:, :, :3] = students[0][:, :, :3]
    students = [s.requires_grad_() for s in students]
    teachers = [t.requires_grad_() for t in teachers]
    affines = [  # one affine for both inputs keeps the ties exact in x-hat
        (torch.rand(s.shape[0], s.shape[1], 2, device=device) + 0.5).requires_grad_() for s in students
    ]
    scales, l1_scales = [0.5, 2.0], [0.25, 3.0]
    inputs = students + teachers + affines
    losses, _ = fused_ssim(backend, students, teachers, affines, affines, scales, options, level_l1_scales=l1_scales)
    cotangent = torch.rand(losses.shape, device=device)
    grads = torch.autograd.grad(losses, inputs, cotangent)

    ssim_part, _ = fused_ssim(backend, students, teachers, affines, affines, scales, options)
    l1_sums = []
    for x, y, a, k in zip(students, teachers, affines, l1_scales):
        scale, offset = a[..., 0, None, None], a[..., 1, None, None]
        l1_sums.append(k * (scale * (x - offset) - scale * (y - offset)).abs().sum(dim=(2, 3)))
    l1_part = torch.cat([s.flatten() for s in l1_sums]) if plane_sums else torch.stack([s.sum() for s in l1_sums])
    expected = ssim_part + l1_part
    expected_grads = torch.autograd.grad(expected, inputs, cotangent)
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
