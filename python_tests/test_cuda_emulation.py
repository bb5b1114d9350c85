"""The CUDA kernels' code under the host emulation (csrc/ssim_cuda_emulated.cpp): every thread of every
block, checked for races, out-of-bounds accesses, uninitialised shared reads and barrier divergence.

The "cuda_emulated" backend also runs every test of test_backends.py and test_properties.py against the
reference. Here: shapes that reach every stage of the kernels, the min-max kernels, and bugs planted at
run time (ssimkd::cuda_emulated_plant_bug) that the checks must report, each naming its check, buffer,
index, threads and stage.
"""

import contextlib

import pytest
import torch
from conftest import backend_available, sample_levels
from test_backends import check_against_reference

import ssimkd_kernels as sk
from ssimkd_kernels.normalize import _GROUP_CODES, _group_minmax
from ssimkd_kernels.ops import EMULATED_CUDA

pytestmark = pytest.mark.skipif(not backend_available(EMULATED_CUDA), reason="the C++ extension is not available here")


@contextlib.contextmanager
def planted(bug: str, site: str = "", value: int = 0):
    """Emulated launches inside the block run with `bug` planted."""
    torch.ops.ssimkd.cuda_emulated_plant_bug(bug, site, value)
    try:
        yield
    finally:
        torch.ops.ssimkd.cuda_emulated_plant_bug("none", "", 0)


def _forward_backward(planes=((20, 37),), dtype=torch.float32, **options):
    students, teachers = sample_levels(list(planes), batch=1, channels=2, dtype=dtype)
    loss = sk.ssim_kd_loss(students, teachers, backend=EMULATED_CUDA, **options)
    return torch.autograd.grad(loss, students + teachers)


def _tile_kernel_barriers() -> list[str]:
    """The barrier statements (file:line) of the tile kernels, after one clean forward and backward."""
    _forward_backward()
    return [site for site in torch.ops.ssimkd.cuda_emulated_barrier_sites() if site.startswith("ssim_cuda_blocks.h:")]


# ------------------------------------------------------------------------------------------------
# Every stage against the reference
# ------------------------------------------------------------------------------------------------

# Several tiles both ways (2 x 2 float32 tiles of 32, 3 x 3 float64 tiles of 16), a plane smaller than
# the window and a 1x1 plane; "valid" needs planes of at least the window.
STAGE_PLANES = {
    "reflect": [(35, 40), (5, 7), (1, 1)],
    "zero": [(35, 40), (5, 7), (1, 1)],
    "valid": [(35, 40), (11, 12)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["reflect", "zero", "valid"])
@pytest.mark.parametrize("normalize, teacher_grad", [("sample", False), ("none", True)])
def test_every_stage_matches_the_reference(dtype, padding, normalize, teacher_grad):
    # "sample": per-plane affines and their gradient (the plane-sum kernel), student gradient only (3
    # coefficient maps blurred back); "none": no affine, both gradients (5 maps).
    students, teachers = sample_levels(
        STAGE_PLANES[padding], batch=2, channels=2, dtype=dtype, signed=normalize != "none"
    )
    if not teacher_grad:
        teachers = [t.detach() for t in teachers]
    check_against_reference(EMULATED_CUDA, students, teachers, padding=padding, normalize=normalize)


# ------------------------------------------------------------------------------------------------
# Planted bugs: each is reported, by the right check
# ------------------------------------------------------------------------------------------------


def test_without_any_barrier_a_race_is_reported():
    with planted("drop_barrier", "*"), pytest.raises(RuntimeError) as error:
        _forward_backward(planes=[(20, 37), (5, 7)])
    message = str(error.value)
    assert "ssimkd emulated racecheck: race on " in message
    assert "between thread" in message and "stage '" in message and "block 0 of ssim_fwd_kernel<float, R=5>" in message


def test_every_barrier_of_the_tile_kernels_is_needed():
    sites = _tile_kernel_barriers()
    # block_sum (2), the region load (3), the forward's passes (1), the backward's (3)
    assert len(sites) == 9, sites
    for site in sites:
        with planted("drop_barrier", site), pytest.raises(RuntimeError, match="ssimkd emulated racecheck: race on "):
            _forward_backward(normalize="sample")


def test_a_thread_at_an_extra_barrier_is_barrier_divergence():
    with planted("extra_barrier", value=1), pytest.raises(RuntimeError) as error:
        _forward_backward()
    message = str(error.value)
    assert message.startswith("ssimkd emulated synccheck: barrier divergence in block 0 of ssim_fwd_kernel")
    assert "thread 1 at barrier " in message and "while threads 0, 2-255 returned after " in message


def test_a_halo_one_row_short_is_an_uninitialised_read():
    with planted("halo_rows", value=-1), pytest.raises(RuntimeError) as error:
        _forward_backward()
    # the region is 42 x 42 (a 32-pixel tile and 5 pixels each side); its last row starts at xs[1722],
    # which the centring (thread 1722 % 256) reads first
    message = str(error.value)
    assert message.startswith(
        "ssimkd emulated initcheck: read of xs[1722] before any thread wrote it, thread 186 "
        "in stage 'load', block 0 of ssim_fwd_kernel<float, R=5>"
    )


def test_a_halo_one_row_long_is_out_of_bounds():
    # the forward's region is 42 x 42 (a 32-pixel tile and 5 pixels each side); with one row more,
    # thread 0 (which runs first) strides from xs[1536] to xs[1792]
    with planted("halo_rows", value=1), pytest.raises(RuntimeError) as error:
        _forward_backward()
    assert str(error.value).startswith(
        "ssimkd emulated memcheck: xs[1792] is outside the buffer (1764 elements), "
        "thread 0 in stage 'load', block 0 of ssim_fwd_kernel<float, R=5>"
    )


def test_a_column_past_the_plane_is_outside_the_tensor():
    with planted("last_column", value=1), pytest.raises(RuntimeError) as error:
        _forward_backward(planes=[(20, 37)])
    message = str(error.value)
    assert (
        "ssimkd emulated memcheck: access outside tensor x of level 0 (1, 2, 20, 37) at (n, c, h, w) = (0, 0, "
        in message
    )
    assert ", 37), thread " in message and "in stage 'blur back vertically'" in message


def test_the_same_call_passes_once_the_bug_is_removed():
    with planted("drop_barrier", "*"), pytest.raises(RuntimeError, match="racecheck"):
        _forward_backward()
    grads = _forward_backward()
    assert all(torch.isfinite(g).all() for g in grads)


def test_unknown_bug_names_the_choices():
    with pytest.raises(RuntimeError, match="unknown bug 'typo' \\(none, drop_barrier"):
        torch.ops.ssimkd.cuda_emulated_plant_bug("typo", "", 0)


# ------------------------------------------------------------------------------------------------
# The min-max gradient's kernels (integer atomics)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sample", "level", "plane"])
@pytest.mark.parametrize(
    "dtype, layout", [(torch.float32, "contiguous"), (torch.float16, "channels_last"), (torch.float64, "sliced")]
)
def test_minmax_gradient_kernels_match_the_cpu_op(mode, dtype, layout):
    # 2 x 3 planes of 23 x 45: two count blocks per plane; rows 3 and 5 of every plane tie with the
    # first group's max and min, so every group has several ties at one bound or both
    (x,), _ = sample_levels([(23, 45)], batch=2, channels=3, dtype=dtype, layout=layout, requires_grad=False)
    low, high = _group_minmax(x, mode)
    x[:, :, 3, :] = high[0].to(dtype)
    x[:, :, 5, :] = low[0].to(dtype)
    low, high = _group_minmax(x, mode)
    args = (x, low, high, torch.randn_like(low), torch.randn_like(high), _GROUP_CODES[mode])
    torch.testing.assert_close(
        torch.ops.ssimkd.minmax_grad_cuda_emulated(*args), torch.ops.ssimkd.minmax_grad(*args), rtol=0, atol=0
    )


def test_minmax_gradient_of_a_group_with_nan_is_nan():
    x = torch.rand(2, 3, 5, 6)
    x[1, 2, 4, 4] = float("nan")
    low, high = _group_minmax(x, "sample")
    g = torch.ops.ssimkd.minmax_grad_cuda_emulated(x, low, high, torch.ones_like(low), torch.ones_like(high), 0)
    assert torch.isnan(g[1]).all() and torch.isfinite(g[0]).all()
