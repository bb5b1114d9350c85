"""Property tests (hypothesis): random shapes, levels, strides, dtypes and options, every fused backend
against the reference (values and gradients), and edge values that must not break quietly.

Case counts per run are set by the hypothesis profile: "ci" (default) or "deep" (HYPOTHESIS_PROFILE=deep,
for a long fuzzing session). The tolerances are test_backends.py's.
"""

import math
import os

import pytest
import torch
from conftest import EMULATED_CUDA, FUSED_BACKENDS, backend_available, device_of, sample_levels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backends import check_against_reference

import ssimkd_kernels as sk

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "2000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Fewer examples where one example costs more: the interpreter and the one-thread emulation.
EXAMPLE_SHARE = {"cpu": 1.0, EMULATED_CUDA: 0.4, "triton": 0.2, "cuda": 1.0}


def _examples(backend):
    return max(3, int(settings().max_examples * EXAMPLE_SHARE[backend]))


@st.composite
def cases(draw, backend):
    """A level list (1 to 4 levels) of random planes plus options and a layout."""
    interpreted = backend in ("triton", EMULATED_CUDA) and not torch.cuda.is_available()
    big = 48 if interpreted else 300
    window = draw(st.sampled_from([3, 5, 7, 9, 11, 13, 15]))
    padding = draw(st.sampled_from(["reflect", "zero", "valid"]))
    low = window if padding == "valid" else 1
    side = st.one_of(st.integers(low, max(low, 24)), st.integers(max(low, 25), max(low, big)))
    levels = draw(st.integers(1, 3 if interpreted else 4))
    planes = [(draw(side), draw(side)) for _ in range(levels)]
    area = sum(h * w for h, w in planes)
    batch = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 3 if area < 20000 else 1))
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if backend != "triton":
        dtypes.append(torch.float64)
    options = dict(
        window_size=window,
        sigma=draw(st.floats(0.5, 3.0)),
        padding=padding,
        normalize=draw(st.sampled_from(["sample", "level", "plane", "none"])),
        exponents=draw(st.sampled_from([(1, 1, 1), (0, 0, 1), (0, 1, 1), (1, 0.5, 2), (2, 1, 1)])),
        clamp=draw(st.booleans()),
    )
    return dict(
        planes=planes,
        batch=batch,
        channels=channels,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        teacher_grad=draw(st.booleans()),
        options=options,
    )


def _levels(case, device):
    students, teachers = sample_levels(
        case["planes"],
        batch=case["batch"],
        channels=case["channels"],
        dtype=case["dtype"],
        device=device,
        layout=case["layout"],
        signed=case["options"]["normalize"] != "none",
    )
    if not case["teacher_grad"]:
        teachers = [t.detach() for t in teachers]
    return students, teachers


@pytest.mark.parametrize("backend_name", FUSED_BACKENDS)
def test_random_cases_match_the_reference(backend_name):
    if not backend_available(backend_name):
        pytest.skip(f"backend {backend_name!r} is not available here")

    @settings(max_examples=_examples(backend_name))
    @given(case=cases(backend_name))
    def run(case):
        students, teachers = _levels(case, device_of(backend_name))
        check_against_reference(backend_name, students, teachers, **case["options"])

    run()


# ------------------------------------------------------------------------------------------------
# Edge values
# ------------------------------------------------------------------------------------------------

FILLS = {
    "zeros": lambda t: t.zero_(),
    "ones": lambda t: t.fill_(1.0),
    "constant": lambda t: t.fill_(-3.25),
    "float16 max": lambda t: t.uniform_(-65000.0, 65000.0),
}


@pytest.mark.parametrize("fill", list(FILLS))
@pytest.mark.parametrize("normalize", ["sample", "none"])
def test_edge_value_planes(backend, fill, normalize):
    dtype = torch.float16 if fill == "float16 max" else torch.float32
    device = device_of(backend)
    students = [torch.empty(1, 2, h, w, dtype=torch.float64) for h, w in [(1, 1), (6, 9), (20, 13)]]
    teachers = [torch.rand_like(s) for s in students]
    for s in students:
        FILLS[fill](s)
    students = [s.to(device=device, dtype=dtype).requires_grad_() for s in students]
    teachers = [t.to(device=device, dtype=dtype) for t in teachers]
    loss = sk.ssim_kd_loss(students, teachers, normalize=normalize, backend=backend)
    reference = sk.ssim_kd_loss(
        [s.detach().double() for s in students],
        [t.double() for t in teachers],
        normalize=normalize,
        backend="reference",
    )
    assert torch.isfinite(loss) == torch.isfinite(reference)
    if torch.isfinite(reference):
        assert abs(float(loss.detach()) - float(reference)) <= 1e-4 * max(1.0, abs(float(reference)))
        grads = torch.autograd.grad(loss, students)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_never_a_silent_number(backend, value):
    device = device_of(backend)
    for normalize in ("sample", "level", "plane", "none"):
        students = [torch.rand(1, 2, 7, 9, device=device), torch.rand(1, 2, 3, 4, device=device)]
        teachers = [torch.rand(1, 2, 7, 9, device=device), torch.rand(1, 2, 3, 4, device=device)]
        teachers[0][0, 0, 3, 3] = value
        assert torch.isnan(sk.ssim_kd_loss(students, teachers, normalize=normalize, backend=backend))


def test_huge_magnitudes_without_normalisation(backend):
    # x^2 overflows float32 (|x| > 1.8e19): the reference's variance is inf, and S -> 0, m -> 1/2.
    # A fused backend may give that limit or NaN (Triton's banded products meet inf * 0 = NaN), but
    # never another finite number.
    device = device_of(backend)
    x = torch.full((1, 1, 8, 8), 3e20, device=device)
    x[0, 0, ::2] = -3e20
    y = torch.rand(1, 1, 8, 8, device=device)
    fused = sk.ssim_kd_loss(x, y, normalize="none", backend=backend)
    reference = sk.ssim_kd_loss(x, y, normalize="none", backend="reference")
    assert torch.isnan(fused) or abs(float(fused) - float(reference)) <= 1e-6
