"""The C++ CPU op: float64 gradcheck, and results independent of the thread count."""

import pytest
import torch
from conftest import sample_levels

import ssimkd_kernels as sk

pytestmark = pytest.mark.skipif("cpu" not in sk.available_backends(), reason="the C++ extension is not built")


@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
@pytest.mark.parametrize("exponents", [(1, 1, 1), (0, 1, 1), (0, 0, 1), (0.5, 1.0, 2.0)])
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


# The CPU op's kernels are compiled per instruction set; SSIMKD_CPU_ISA caps the one a launch uses.
INSTRUCTION_SETS = ("baseline", "avx2", "avx512")


def _instruction_sets_here() -> tuple:
    """The instruction sets this CPU can run: those up to the best one, which a launch picks uncapped."""
    from ssimkd_kernels.ops import cpu_isa

    return INSTRUCTION_SETS[: INSTRUCTION_SETS.index(cpu_isa()) + 1]


def _loss_and_grads(students, teachers, padding):
    loss = sk.ssim_kd_loss(students, teachers, padding=padding, backend="cpu")
    return [loss] + list(torch.autograd.grad(loss, [f for f in students + teachers if f.requires_grad]))


@pytest.mark.parametrize("isa", INSTRUCTION_SETS)
@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
def test_each_instruction_set_against_reference(isa, padding, monkeypatch):
    """Every kernel width (4, 8, 16 floats) on tile borders, tails of partial vectors and tiny planes."""
    from test_backends import check_against_reference

    from ssimkd_kernels.ops import cpu_isa

    if isa not in _instruction_sets_here():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setenv("SSIMKD_CPU_ISA", isa)
    assert cpu_isa() == isa
    shapes = [(70, 131), (13, 21)] + ([] if padding == "valid" else [(3, 5), (1, 1)])
    for dtype in (torch.float32, torch.float64):
        students, teachers = sample_levels(shapes, batch=1, channels=2, dtype=dtype)
        check_against_reference("cpu", students, teachers, padding=padding)


def test_avx2_and_avx512_give_the_same_bits(monkeypatch):
    """The 8- and 16-lane kernels do the same operations on every pixel and sum in the same 16 lanes."""
    if "avx512" not in _instruction_sets_here():
        pytest.skip("this CPU cannot run the avx512 kernels")
    for dtype in (torch.float32, torch.float64):
        for padding in ("reflect", "zero", "valid"):
            shapes = [(70, 131), (40, 23)] + ([] if padding == "valid" else [(5, 9), (1, 1)])
            students, teachers = sample_levels(shapes, channels=3, dtype=dtype)
            if padding == "zero":  # a teacher without gradient: the backward blurs back 3 maps, not 5
                teachers = [t.detach() for t in teachers]
            results = []
            for isa in ("avx2", "avx512"):
                monkeypatch.setenv("SSIMKD_CPU_ISA", isa)
                results.append(_loss_and_grads(students, teachers, padding))
            for a, b in zip(*results):
                assert torch.equal(a, b), (dtype, padding)


def test_unknown_instruction_set_is_an_error(monkeypatch):
    students, teachers = sample_levels([(8, 8)], channels=1)
    monkeypatch.setenv("SSIMKD_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SSIMKD_CPU_ISA must be avx512, avx2 or baseline, got 'sse9'"):
        sk.ssim_kd_loss(students, teachers, backend="cpu")
