"""The public API: input forms, options, normalisation modes, the module, and every bad input."""

import pytest
import torch
from conftest import sample_levels
from utils import assert_close_verbose

import ssimkd_kernels as sk


def test_tensor_sequence_and_dict_inputs_agree():
    students, teachers = sample_levels([(8, 8), (4, 4)], requires_grad=False)
    as_list = sk.ssim_kd_loss(students, teachers)
    as_dict = sk.ssim_kd_loss({"p3": students[0], "p4": students[1]}, {"p4": teachers[1], "p3": teachers[0]})
    assert torch.equal(as_list, as_dict)
    single = sk.ssim_kd_loss(students[0], teachers[0])
    assert torch.equal(single, sk.ssim_kd_loss([students[0]], [teachers[0]]))


def test_identical_features_give_zero_loss_and_unit_ssim():
    x = torch.rand(2, 4, 16, 16)
    assert float(sk.ssim_kd_loss(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(sk.ssim(x, x.clone())) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["sample", "level", "plane", "none"])
def test_normalisation_modes_match_their_definition(mode):
    students, teachers = sample_levels([(9, 12)], batch=3, channels=4, dtype=torch.float64, requires_grad=False)
    s, t = students[0], teachers[0]
    dims = {"sample": (1, 2, 3), "level": (0, 1, 2, 3), "plane": (2, 3), "none": None}[mode]

    def psi(f):
        if dims is None:
            return f
        lo, hi = f.amin(dim=dims, keepdim=True), f.amax(dim=dims, keepdim=True)
        return (f - lo) / (hi - lo + 1e-6)

    expected = ((1 - sk.ssim_map(psi(s), psi(t), backend="reference")) / 2).clamp(0, 1).mean()
    assert_close_verbose(sk.ssim_kd_loss(s, t, normalize=mode), expected, rtol=1e-12)


def test_sample_mode_has_no_coupling_between_samples():
    students, teachers = sample_levels([(10, 10)], batch=4, requires_grad=False)
    s, t = students[0], teachers[0]
    whole = sk.ssim_kd_loss(s, t)
    halves = (sk.ssim_kd_loss(s[:2], t[:2]) + sk.ssim_kd_loss(s[2:], t[2:])) / 2
    assert_close_verbose(whole, halves, rtol=1e-6)


def test_level_weights_weight_each_level():
    students, teachers = sample_levels([(8, 8), (5, 5)], requires_grad=False)
    parts = [sk.ssim_kd_loss(s, t) for s, t in zip(students, teachers)]
    weighted = sk.ssim_kd_loss(students, teachers, level_weights=[0.25, 3.0])
    assert_close_verbose(weighted, 0.25 * parts[0] + 3.0 * parts[1], rtol=1e-6)


def test_module_adapters_and_loss_weight():
    criterion = sk.SSIMKDLoss(loss_weight=2.0, student_channels=[4, 6], teacher_channels=8)
    assert len(criterion.adapters) == 2 and criterion.adapters[1].in_channels == 6
    students = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    teachers = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    loss = criterion(students, teachers)
    adapted = [a(s) for a, s in zip(criterion.adapters, students)]
    assert_close_verbose(loss, 2.0 * sk.ssim_kd_loss(adapted, teachers), rtol=1e-6)
    loss.backward()
    assert criterion.adapters[0].weight.grad is not None


def test_module_without_adapter_is_the_function():
    criterion = sk.SSIMKDLoss(loss_weight=0.5, normalize="plane", padding="zero")
    assert criterion.adapters is None
    s, t = torch.randn(1, 3, 9, 9), torch.randn(1, 3, 9, 9)
    assert torch.equal(criterion(s, t), 0.5 * sk.ssim_kd_loss(s, t, normalize="plane", padding="zero"))


def test_module_single_int_channels_share_one_adapter_across_levels():
    criterion = sk.SSIMKDLoss(student_channels=4, teacher_channels=8)
    assert len(criterion.adapters) == 1 and criterion.shared_adapter
    students = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    teachers = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    loss = criterion({"p3": students[0], "p4": students[1]}, {"p3": teachers[0], "p4": teachers[1]})
    shared = criterion.adapters[0]
    assert_close_verbose(loss, sk.ssim_kd_loss([shared(s) for s in students], teachers), rtol=1e-6)
    loss.backward()
    assert shared.weight.grad is not None and all(s.grad is not None for s in students)
    per_level = sk.SSIMKDLoss(student_channels=4, teacher_channels=8, num_levels=5)
    assert len(per_level.adapters) == 5 and not per_level.shared_adapter
    with pytest.raises(ValueError, match="disagree on the number of levels"):
        sk.SSIMKDLoss(student_channels=[4, 4], teacher_channels=8, num_levels=3)
    with pytest.raises(TypeError, match="student_channels must be an int or a sequence of ints"):
        sk.SSIMKDLoss(student_channels="4", teacher_channels=8)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda_emulated"])
@pytest.mark.parametrize("normalize", ["sample", "none"])
def test_teacher_made_under_inference_mode_is_accepted_as_it_is(backend, normalize):
    from conftest import backend_available

    if backend != "reference" and not backend_available(backend):
        pytest.skip(f"backend {backend!r} is not available here")
    students, teachers = sample_levels([(9, 12), (3, 4)], batch=1, channels=2)
    with torch.inference_mode():
        frozen = [t.detach() * 1.0 for t in teachers]
    assert all(t.is_inference() for t in frozen)
    plain = [t.detach() for t in teachers]
    got = sk.ssim_kd_loss(students, frozen, normalize=normalize, backend=backend)
    want = sk.ssim_kd_loss(students, plain, normalize=normalize, backend=backend)
    assert torch.equal(got, want)
    assert_close_verbose(list(torch.autograd.grad(got, students)), list(torch.autograd.grad(want, students)), rtol=0)


def test_resize_student_to_the_teachers_size():
    student = torch.randn(2, 3, 10, 14, requires_grad=True)
    teacher = torch.randn(2, 3, 20, 28)
    with pytest.raises(ValueError, match="resize='student'"):
        sk.ssim_kd_loss(student, teacher)
    resized = torch.nn.functional.interpolate(student, size=(20, 28), mode="bilinear", align_corners=False)
    assert torch.equal(sk.ssim_kd_loss(student, teacher, resize="student"), sk.ssim_kd_loss(resized, teacher))
    criterion = sk.SSIMKDLoss(resize="student")
    assert torch.equal(criterion([student], [teacher]), sk.ssim_kd_loss(resized, teacher))
    with pytest.raises(ValueError, match="resize must be one of"):
        sk.ssim_kd_loss(student, teacher, resize="teacher")
    with pytest.raises(ValueError, match=r"student \(2, 3, 10, 14\) vs teacher \(2, 4, 20, 28\)"):
        sk.ssim_kd_loss(student, torch.randn(2, 4, 20, 28), resize="student")


def test_ssim_map_shapes():
    x = torch.rand(2, 3, 20, 17)
    assert sk.ssim_map(x, x, padding="reflect").shape == (2, 3, 20, 17)
    assert sk.ssim_map(x, x, padding="valid").shape == (2, 3, 10, 7)
    assert sk.ssim_map(x, x, padding="valid", window_size=5).shape == (2, 3, 16, 13)


def test_mixed_dtypes_are_promoted():
    s = torch.rand(1, 2, 8, 8, dtype=torch.float16)
    t = s.float()
    assert float(sk.ssim_kd_loss(s, t)) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs
# ------------------------------------------------------------------------------------------------


def _pair(*shape):
    return torch.rand(*shape), torch.rand(*shape)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: sk.ssim_kd_loss(
                {"p3": torch.rand(2, 4, 8, 8), "p7": torch.rand(2, 256, 7, 11)},
                {"p3": torch.rand(2, 4, 8, 8), "p7": torch.rand(2, 256, 7, 12)},
            ),
            ValueError,
            r"level 'p7': student \(2, 256, 7, 11\) vs teacher \(2, 256, 7, 12\)",
        ),
        (
            lambda: sk.ssim_kd_loss([torch.rand(1, 1, 4, 4)] * 2, [torch.rand(1, 1, 4, 4)]),
            ValueError,
            "student_feats has 2 levels, teacher_feats has 1",
        ),
        (lambda: sk.ssim_kd_loss([], []), ValueError, "student_feats is empty"),
        (lambda: sk.ssim_kd_loss(torch.rand(4, 8, 8), torch.rand(4, 8, 8)), ValueError, r"must be \(N, C, H, W\)"),
        (
            lambda: sk.ssim_kd_loss(
                torch.ones(1, 1, 4, 4, dtype=torch.int64), torch.ones(1, 1, 4, 4, dtype=torch.int64)
            ),
            TypeError,
            "torch.int64 is not float16",
        ),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), padding="same"), ValueError, "padding must be one of"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), normalize="global"), ValueError, "normalize must be one of"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), window_size=10), ValueError, "window_size must be odd"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), window_size=17), ValueError, r"in \[3, 15\]"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), sigma=0.0), ValueError, "sigma must be"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), exponents=(1, 1)), ValueError, "exponents must be three"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), exponents=(1, -1, 1)), ValueError, "exponents must be three"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), level_weights=[1, 2]), ValueError, "level_weights must be 1"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), backend="opencl"), ValueError, "backend must be one of"),
        (
            lambda: sk.ssim_kd_loss({"p7": torch.rand(1, 2, 7, 11)}, {"p7": torch.rand(1, 2, 7, 11)}, padding="valid"),
            ValueError,
            r"level 'p7': padding 'valid' needs planes of at least 11x11, got 7x11",
        ),
        (lambda: sk.ssim_kd_loss(torch.rand(0, 2, 4, 4), torch.rand(0, 2, 4, 4)), ValueError, "is empty"),
        (lambda: sk.ssim_kd_loss("p3", "p3"), TypeError, "must be a Tensor, a sequence"),
        (
            lambda: sk.ssim_kd_loss([torch.rand(1, 1, 4, 4), 3], [torch.rand(1, 1, 4, 4), 3]),
            TypeError,
            "level '1': student_feats must hold Tensors",
        ),
        (
            lambda: sk.ssim_kd_loss({"a": torch.rand(1, 1, 4, 4)}, {"b": torch.rand(1, 1, 4, 4)}),
            ValueError,
            r"levels \['a'\] vs teacher_feats levels \['b'\]",
        ),
        (lambda: sk.ssim(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), k1=-0.1), ValueError, "k1 must be"),
        (lambda: sk.ssim_kd_loss(*_pair(1, 1, 4, 4), clamp="yes"), TypeError, "clamp must be a bool"),
        (lambda: sk.SSIMKDLoss(window=11), TypeError, r"unknown options \['window'\]"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_on_the_wrong_device_is_refused():
    x, y = _pair(1, 1, 4, 4)
    if "cpu" in sk.available_backends() and torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
            sk.ssim_kd_loss(x.cuda(), y.cuda(), backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="backend 'cuda'"):
            sk.ssim_kd_loss(x, y, backend="cuda")


def test_environment_variable_overrides_auto(monkeypatch):
    x, y = _pair(1, 2, 6, 6)
    from ssimkd_kernels.ops import resolve_backend

    monkeypatch.setenv("SSIMKD_BACKEND", "reference")
    assert resolve_backend("auto", x.device) == "reference"
    assert resolve_backend("cpu", x.device) == "cpu" or "cpu" not in sk.available_backends()  # explicit wins
    monkeypatch.setenv("SSIMKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.ssim_kd_loss(x, y)
