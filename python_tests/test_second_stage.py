"""The Triton backend's second stage (csrc/ssim_params.h, "second stage"): per-level and per-plane sums
of the tile partials accumulate in double and are rounded once, as on the CPU and CUDA backends.

The partials are chosen so that a float32 accumulation gives another answer: 1e8 + 1 rounds to 1e8
in float32, so [1e8, 1, -1e8, 1] sums to 0 (or 1) there and to 2 in double."""

import pytest
import torch

triton_kernels = pytest.importorskip("ssimkd_kernels.triton_kernels")
tk = triton_kernels

CANCELLING = [1e8, 1.0, -1e8, 1.0]


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _table(**columns) -> torch.Tensor:
    table = torch.zeros(1, tk.NUM_COLUMNS.value, dtype=torch.int64)
    for name, value in columns.items():
        table[0, getattr(tk, name).value] = value
    return table.to(_device())


@pytest.mark.parametrize("has_l1", [False, True])
def test_level_sum_accumulates_in_double(has_l1):
    # partials [pairs, 2]: (sum of w m, sum of |x-hat - y-hat|); the second column counts only with HAS_L1
    partials = torch.tensor(CANCELLING, dtype=torch.float32)
    assert partials.sum(dtype=torch.float32).item() != 2.0  # the case float32 gets wrong
    partials = torch.stack([partials, 3.0 * partials], dim=1).to(_device())
    scales = torch.tensor([[0.5, 0.25]], dtype=torch.float64, device=_device())  # (loss_scale, l1_scale)
    out = torch.full((1,), float("nan"), dtype=torch.float32, device=_device())
    table = _table(COL_PAIR_BEGIN=0, COL_PAIRS=len(CANCELLING))
    tk._level_sum_kernel[(1,)](
        partials_ptr=partials, table_ptr=table, scales_ptr=scales, out_ptr=out, CHUNK=2, HAS_L1=has_l1
    )
    assert out.item() == (1.0 + 1.5 if has_l1 else 1.0)  # 0.5 * 2 (+ 0.25 * 6), rounded once


def test_plane_losses_accumulate_in_double_with_the_l1_term():
    strips = len(CANCELLING)
    m = torch.tensor(CANCELLING * 2, dtype=torch.float32)  # two planes of 4 strips
    partials = torch.stack([m, 3.0 * m], dim=1).to(_device())
    scales = torch.tensor([[0.5, 0.25]], dtype=torch.float64, device=_device())
    out = torch.full((2,), float("nan"), dtype=torch.float32, device=_device())
    table = _table(COL_STRIPS=strips, COL_PAIRS=2 * strips, COL_PAIR_BEGIN=0, COL_LOSS_BEGIN=0)
    tk._plane_loss_kernel[(1, 1)](
        partials_ptr=partials, table_ptr=table, scales_ptr=scales, out_ptr=out, BLOCK=2, HAS_L1=True
    )
    assert out.tolist() == [2.5, 2.5]


def test_plane_sums_accumulate_in_double_then_give_the_affine_gradient():
    # One level of 2 planes (N=1, C=2), 4 strips each; the affine (N, C, 2): scale, offset per plane.
    strips = len(CANCELLING)
    partials = torch.zeros(2 * strips, 4, dtype=torch.float32)
    for plane in range(2):
        for k in range(4):
            partials[plane * strips : (plane + 1) * strips, k] = torch.tensor(CANCELLING) * (1 + plane + k)
    partials = partials.to(_device())
    x_affine = torch.tensor([[[3.0, 0.25], [-2.0, 0.5]]], device=_device())
    y_affine = torch.tensor([[[5.0, 0.0], [7.0, 1.0]]], device=_device())
    g_x = torch.full((1, 2, 2), float("nan"), device=_device())
    g_y = torch.full((1, 2, 2), float("nan"), device=_device())
    table = _table(
        COL_C=2,
        COL_STRIPS=strips,
        COL_PAIRS=2 * strips,
        COL_PAIR_BEGIN=0,
        COL_XA_N=4,
        COL_XA_C=2,
        COL_XA_K=1,
        COL_YA_N=4,
        COL_YA_C=2,
        COL_YA_K=1,
    )
    tk._plane_sums_kernel[(1, 1)](
        partials_ptr=partials,
        table_ptr=table,
        xa_ptr=x_affine,
        ya_ptr=y_affine,
        gxa_ptr=g_x,
        gya_ptr=g_y,
        NEED_X=True,
        NEED_Y=True,
        BLOCK=4,
    )
    for plane in range(2):
        sums = [2.0 * (1 + plane + k) for k in range(4)]  # each column's exact sum
        # dL/d(scale, offset) = (sum of dL/dx-hat (x - offset), -scale * sum of dL/dx-hat)
        assert g_x[0, plane].tolist() == [sums[0], -x_affine[0, plane, 0].item() * sums[1]]
        assert g_y[0, plane].tolist() == [sums[2], -y_affine[0, plane, 0].item() * sums[3]]
