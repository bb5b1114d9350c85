"""The Triton kernels fit the GPU they are written for (SPEC section 4, static evidence, no GPU needed).

Compiled for sm_90 through ssimkd_kernels.kernel_report (Triton compiles for a named target; cuobjdump
ships in its wheel), the default forward and backward must use no local memory (no register spills,
no stack frame, no LDL/STL) and issue at most 3x the multiply-adds of the direct separable blur per
output element (SPEC: ~290 FMA forward+backward). The full report, every configuration on sm_80 and
sm_90, is bench/kernel_report.py.
"""

from pathlib import Path

import pytest

pytest.importorskip("triton")

from ssimkd_kernels import kernel_report as kr  # noqa: E402

DEFAULTS = [kr.KernelConfig("fwd"), kr.KernelConfig("bwd"), kr.KernelConfig("bwd", teacher_grad=True)]
SEPARABLE_FMA_PER_ELEMENT = 290  # SPEC section 4: 5 maps forward, 8 backward, 22 FMA each, and the terms


@pytest.fixture(scope="module")
def compiled():
    """The default kernels compiled for sm_90, all in one go (one child process under the interpreter)."""
    if not Path(kr.cuda_tool("cuobjdump")).exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    return dict(zip(DEFAULTS, kr.analyse_many(DEFAULTS, [90])))


@pytest.mark.parametrize("config", DEFAULTS, ids=lambda c: c.name)
def test_default_kernels_use_no_local_memory(compiled, config):
    stats = compiled[config]
    assert not stats.local_memory, (
        f"{config.name} on sm_90: {stats.registers} registers, {stats.stack_bytes} B stack, {stats.local_bytes} B "
        f"local, {stats.spill_loads} LDL / {stats.spill_stores} STL in the SASS"
    )
    assert stats.per_row, f"{config.name}: no row loop found in the SASS (see kernel_report.parse_sass)"


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["x", "x+y"])
def test_multiply_adds_per_element_within_3x_of_the_separable_blur(compiled, teacher_grad):
    # Per interior output row of a program, one row of output elements per lane: FFMA plus tensor-core
    # MACs, forward + backward (the once-per-program set-up is spread over the rows of a plane).
    fwd = compiled[kr.KernelConfig("fwd")]
    bwd = compiled[kr.KernelConfig("bwd", teacher_grad=teacher_grad)]
    per_element = sum(kr.fma_per_element(s.per_row, s.mma_macs_per_row) for s in (fwd, bwd))
    assert 0 < per_element <= 3 * SEPARABLE_FMA_PER_ELEMENT, f"{per_element:.0f} FMA per element forward+backward"


def test_cuda_extension_resources_are_read_from_the_built_library():
    """The report's CUDA side: every kernel of the built extension with its registers and stack, per
    architecture (cuobjdump of the library the lazy loader finds; never a build)."""
    from ssimkd_kernels import _extension

    extension = _extension.load(build=False)
    if extension is None or not extension.gpu_kernels:
        assert isinstance(kr.extension_resources(), str)  # a sentence saying why there are none
        pytest.skip("the extension here has no CUDA kernels")
    if not Path(kr.cuda_tool("cuobjdump")).exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    kernels = kr.extension_resources()
    assert isinstance(kernels, list), kernels
    names = {k["function"] for k in kernels}
    assert any("ssim_fwd_kernel" in n for n in names) and any("level_sum_kernel" in n for n in names), names
    assert all(k["registers"] > 0 and k["stack_bytes"] >= 0 for k in kernels)
