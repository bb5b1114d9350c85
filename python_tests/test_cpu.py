"""The C++ CPU op: float64 gradcheck, and results independent of the thread count."""

import pytest
import torch
from conftest import sample_levels

import ssimkd_kernels as sk

pytestmark = pytest.mark.skipif("cpu" not in sk.available_backends(), reason="the C++ extension is not built")


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
@pytest.mark.parametrize("exponents", [(1, 1, 1), (0, 0, 1), (0.5, 1.0, 2.0)])
@pytest.mark.parametrize("normalize", ["sample", "none"])
def test_gradcheck_float64(padding, exponents, normalize):
    window = 3 if padding == "valid" else 11
    students, teachers = sample_levels(
        [(3, 4), (5, 7), (7, 11)], batch=1, channels=2, dtype=torch.float64, signed=normalize != "none"
    )

    def loss(*feats):
        return sk.ssim_kd_loss(
            list(feats[:3]),
            list(feats[3:]),
            padding=padding,
            exponents=exponents,
            normalize=normalize,
            window_size=window,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(loss, tuple(students + teachers))


def test_gradcheck_ssim_map_float64():
    x = torch.rand(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sk.ssim_map(a, b, backend="cpu"), (x, y))


def test_thread_count_does_not_change_a_bit():
    students, teachers = sample_levels([(1, 1), (40, 70), (100, 168)], channels=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            loss = sk.ssim_kd_loss(students, teachers, backend="cpu")
            results.append((loss, torch.autograd.grad(loss, students + teachers)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
def test_tile_borders(padding):
    """Planes cut into several 64x64 tiles: tile rows and columns whose windows cross a tile border,
    the plane's border, or (valid padding, 131 = 2 * 64 + 3 columns) hold no window centre at all."""
    from test_backends import check_against_reference

    students, teachers = sample_levels([(70, 131), (133, 20), (65, 64)], batch=1, channels=2, dtype=torch.float64)
    check_against_reference("cpu", students, teachers, padding=padding)
