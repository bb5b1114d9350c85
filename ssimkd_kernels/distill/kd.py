"""Feature distillation: the feature losses (l2, l1, ssim) and the Distiller module the trainer runs.

    total = detection loss + lambda * feature loss

The feature loss compares the student's FPN outputs with the teacher's, level by level, after an
optional 1x1 conv adapter per level on the student:
    l2:   sum over levels of mean (phi(S) - T)^2
    l1:   sum over levels of mean |phi(S) - T|
    ssim: sum over levels of mean (1 - SSIM(psi(phi(S)), psi(T))) / 2   (ssimkd_kernels.SSIMKDLoss)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..loss import SSIMKDLoss
from .config import KDConfig
from .models import FeatureTap


def _adapters(channels: int, teacher_channels: int, num_levels: int, always: bool) -> nn.ModuleList | None:
    """One 1x1 conv per level on the student, as SSIMKDLoss builds them, or None when not needed."""
    if not always and channels == teacher_channels:
        return None
    return nn.ModuleList(nn.Conv2d(channels, teacher_channels, kernel_size=1) for _ in range(num_levels))


class FeatureDistanceLoss(nn.Module):
    """The l2 / l1 feature-imitation loss: sum over levels of the mean squared / absolute error.

    Args:
        norm: "l2" or "l1".
        student_channels, teacher_channels: FPN widths; adapters are built when they differ.
        num_levels: FPN levels (for the adapters).
        adapter: always put a 1x1 conv adapter on the student.

    Shape:
        forward(student_feats, teacher_feats): dicts (or sequences) of (N, C, H, W) levels -> scalar.
    """

    def __init__(self, norm: str, *, student_channels: int, teacher_channels: int, num_levels: int, adapter: bool):
        super().__init__()
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
        self.norm = norm
        self.adapters = _adapters(student_channels, teacher_channels, num_levels, adapter)

    def forward(self, student_feats, teacher_feats) -> Tensor:
        students = list(student_feats.values()) if isinstance(student_feats, Mapping) else list(student_feats)
        if isinstance(teacher_feats, Mapping) and isinstance(student_feats, Mapping):
            teachers = [teacher_feats[k] for k in student_feats]
        else:
            teachers = list(teacher_feats.values()) if isinstance(teacher_feats, Mapping) else list(teacher_feats)
        if len(students) != len(teachers):
            raise ValueError(f"student has {len(students)} FPN levels, teacher {len(teachers)}")
        if self.adapters is not None:
            students = [adapter(s) for adapter, s in zip(self.adapters, students)]
        total = students[0].new_zeros((), dtype=torch.float32)
        for level, (s, t) in enumerate(zip(students, teachers)):
            if s.shape != t.shape:
                raise ValueError(f"level {level}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
            diff = s.float() - t.float()
            total = total + (diff.square().mean() if self.norm == "l2" else diff.abs().mean())
        return total


def build_feature_loss(
    kd: KDConfig, *, student_channels: int, teacher_channels: int, num_levels: int
) -> nn.Module | None:
    """The unweighted feature loss of kd.mode (lambda is applied by the trainer), or None for "none"."""
    if kd.mode == "none":
        return None
    if kd.mode in ("l2", "l1"):
        return FeatureDistanceLoss(
            kd.mode,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            num_levels=num_levels,
            adapter=kd.adapter,
        )
    return SSIMKDLoss(
        loss_weight=1.0,
        student_channels=student_channels,
        teacher_channels=teacher_channels,
        adapter=kd.adapter,
        num_levels=num_levels,
        normalize=kd.normalize,
        padding=kd.padding,
        exponents=tuple(kd.exponents),
        clamp=kd.clamp,
        level_weights=list(kd.level_weights) or None,
        backend=kd.backend,
        window_size=kd.window_size,
        sigma=kd.sigma,
        data_range=kd.data_range,
        k1=kd.k1,
        k2=kd.k2,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Distiller(nn.Module):
    """The student, its feature loss and (hidden) the frozen teacher: what DDP wraps and trains.

    forward(images, targets) runs the student (its detection losses), then, when distilling, the
    teacher's backbone on the very batch the student's backbone saw (captured by a FeatureTap), and
    the feature loss between the two sets of FPN outputs.

    Args:
        student: a torchvision detector in train mode.
        feature_loss: from build_feature_loss, or None (no distillation).
        teacher: the frozen teacher detector, or None.

    Returns (forward):
        (dict of detection losses, unweighted feature loss or None).
    """

    def __init__(self, student: nn.Module, feature_loss: nn.Module | None = None, teacher: nn.Module | None = None):
        super().__init__()
        if (feature_loss is None) != (teacher is None):
            raise ValueError("a feature loss needs a teacher and a teacher needs a feature loss")
        self.student = student
        self.feature_loss = feature_loss
        # In a tuple, the teacher is no submodule: it is not trained, not in state_dict, not synced by DDP.
        self._teacher = (teacher,)
        self._tap = FeatureTap(student.backbone) if teacher is not None else None
        self.timings: dict[str, float] = {}  # seconds of the last forward's teacher and feature-loss parts
        self.measure = False  # synchronise the device around the timed parts (GPU timings are async)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, images, targets):
        if self._tap is None:
            return self.student(images, targets), None
        self._tap.armed = True
        try:
            det_losses = self.student(images, targets)
        finally:
            self._tap.armed = False
        inputs, student_feats = self._tap.pop()
        device = inputs.device
        if self.measure:
            _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            teacher_feats = self.teacher.backbone(inputs)
        if self.measure:
            _sync(device)
        middle = time.perf_counter()
        feature_loss = self.feature_loss(student_feats, teacher_feats)
        if self.measure:
            _sync(device)
        self.timings = {"teacher": middle - start, "feat_fwd": time.perf_counter() - middle}
        return det_losses, feature_loss

    def capture_features(self, images) -> tuple[dict, dict]:
        """(student, teacher) FPN outputs of one batch, detached, for timing the feature loss alone."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                batch, _ = self.student.transform(images)
                return self.student.backbone(batch.tensors), self.teacher.backbone(batch.tensors)
        finally:
            self.student.train(was_training)


def time_feature_loss(feature_loss: nn.Module, student_feats: dict, teacher_feats: dict, *, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of the feature loss on these features (after a warm-up).

    This is the feature loss's own cost in a training step: the part SSIM-KD adds besides the
    teacher's forward pass.
    """
    device = next(iter(student_feats.values())).device
    times = []
    for run in range(repeats + 1):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in student_feats.items()}
        _sync(device)
        start = time.perf_counter()
        feature_loss(leaves, teacher_feats).backward()
        _sync(device)
        if run:  # the first run warms up caches and kernels
            times.append(time.perf_counter() - start)
    feature_loss.zero_grad(set_to_none=True)
    return statistics.median(times)
