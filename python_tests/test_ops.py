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


def _op_args(backend, write_map, affine: bool):
    students, teachers = sample_levels([(3, 4), (9, 13)], dtype=torch.float32, device=device_of(backend))
    affines = []
    if affine:
        affines = [torch.rand(s.shape[0], s.shape[1], 2, device=s.device, requires_grad=True) for s in students]
    return (students, teachers, affines, affines, [0.1, 0.2], *OPTIONS.as_args(), write_map)


@pytest.mark.parametrize("write_map", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_opcheck(backend, write_map, affine):
    fwd_name, _ = _OP_PAIRS[backend]
    args = _op_args(backend, write_map, affine)
    torch.library.opcheck(_op(fwd_name), args)


@pytest.mark.parametrize("write_map", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("needs", [(True, True), (True, False)], ids=["both", "student-only"])
def test_opcheck_backward(backend, write_map, affine, needs):
    """The backward ops as torch sees them: schema, fake kernel, no input mutated, no aliasing."""
    fwd_name, bwd_name = _OP_PAIRS[backend]
    students, teachers, x_affines, y_affines, level_scales, *rest = _op_args(backend, write_map, affine)
    options, write = rest[:-1], rest[-1]
    with torch.no_grad():
        losses, maps = _op(fwd_name)(students, teachers, x_affines, y_affines, level_scales, *options, write)
    grad_losses = torch.rand_like(losses)
    grad_maps = [torch.rand_like(m) for m in maps] if write_map else []
    args = (grad_losses, grad_maps, students, teachers, x_affines, y_affines, level_scales, *options, *needs)
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


def test_fused_ssim_returns_scaled_level_sums(backend):
    students, teachers = sample_levels([(5, 6), (7, 3)], device=device_of(backend), requires_grad=False)
    ones, _ = fused_ssim(backend, students, teachers, [], [], [1.0, 1.0], OPTIONS)
    halves, _ = fused_ssim(backend, students, teachers, [], [], [0.5, 2.0], OPTIONS)
    assert torch.allclose(halves, ones * torch.tensor([0.5, 2.0], device=ones.device))


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
