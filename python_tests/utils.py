"""Test helpers: comparisons that say where and how much two results differ."""

import torch

# A synthetic dataset and detectors small enough for a training step in well under a second on a
# 2-core CPU (config overrides of `ssimkd train --set`).
TINY_DATA_AND_MODEL = [
    "data.synthetic.image_size=64",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "data.synthetic.max_objects=3",
    "data.min_size=64",
    "data.max_size=86",
    "model.fpn_channels=16",
    "model.anchor_sizes=[8, 16, 32, 64, 128]",
]


def assert_close_verbose(actual, expected, *, rtol: float, atol: float = 0.0, name: str = "value"):
    """assert |actual - expected| <= atol + rtol * max|expected| elementwise, for tensors or lists of them.

    The bound is relative to the largest magnitude of the expected result (a norm-wise relative error),
    so entries that are rounding noise around 0 do not fail the check. On failure, reports the max abs
    and rel error and the worst index as (level, n, c, h, w): errors only on border pixels point at
    the transposed blur's fold.
    """
    actual = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected), f"{name}: {len(actual)} results vs {len(expected)} expected"
    scale = max(float(e.detach().abs().max()) if e.numel() else 0.0 for e in expected)
    bound = atol + rtol * scale
    worst = (0.0, None)
    for level, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{name} level {level}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        assert torch.isfinite(e64).all() == torch.isfinite(a64).all(), f"{name} level {level}: finiteness differs"
        diff = (a64 - e64).abs()
        if diff.numel() and float(diff.max()) > worst[0]:
            index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            worst = (float(diff.max()), (level,) + index, float(a64[index]), float(e64[index]))
    if worst[0] > bound:
        _, where, got, want = worst
        raise AssertionError(
            f"{name}: max abs error {worst[0]:.3e} > bound {bound:.3e} (rel to max|expected| "
            f"{worst[0] / max(scale, 1e-300):.3e}) at (level, n, c, h, w) = {where}: got {got:.9g}, want {want:.9g}"
        )


def grads(loss, tensors):
    """d loss / d each tensor (None where it does not require grad)."""
    need = [t for t in tensors if t.requires_grad]
    got = iter(torch.autograd.grad(loss, need, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in tensors]
