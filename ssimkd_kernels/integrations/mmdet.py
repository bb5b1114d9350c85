"""mmdetection 3.x adapter: the fused SSIM-KD loss and a small teacher-student distiller as mmdet models.

Importing this module registers, in mmdet's MODELS registry (and in mmrazor's, where mmrazor imports):

    SSIMKDLoss        ssimkd_kernels.SSIMKDLoss itself: loss_weight * sum over levels of mean (1 - SSIM) / 2
    SSIMKDDistiller   a detector that trains a student against a frozen teacher (mmdet only)

so that an mmdet config can say

    custom_imports = dict(imports=['ssimkd_kernels.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='SSIMKDDistiller', student=..., teacher=..., teacher_ckpt='r101.pth',
                 distill_loss=dict(type='SSIMKDLoss', loss_weight=4.0, normalize='sample'))

configs/mmdet/retinanet_r101_to_r50_fpn_ssimkd_1x_coco.py is the paper's RetinaNet setting.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import warnings

import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.config import Config, ConfigDict
from mmengine.hub import get_config
from mmengine.runner.checkpoint import load_checkpoint
from torch import Tensor

from ..loss import SSIMKDLoss

__all__ = ["SSIMKDLoss", "SSIMKDDistiller"]


def _register(registry, cls) -> None:
    """Register cls under its own name, once: importing this module again (a reload, or custom_imports in
    several configs) leaves the registry alone. Another class already holding the name is an error."""
    name = cls.__name__
    existing = registry.module_dict.get(name)
    if existing is None:
        registry.register_module(name=name, module=cls)
    elif (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise KeyError(
            f"{name} is already registered in {registry.scope}'s {registry.name} registry by "
            f"{existing.__module__}.{existing.__qualname__}"
        )


def _model_cfg(cfg, role: str) -> ConfigDict:
    """A detector config: a dict, or the path of a config file whose `model` it is: a file, or a config
    of an installed OpenMMLab package ('mmdet::retinanet/retinanet_r101_fpn_1x_coco.py')."""
    if isinstance(cfg, str):
        return (get_config(cfg) if "::" in cfg else Config.fromfile(cfg))["model"]
    if isinstance(cfg, dict):
        return ConfigDict(copy.deepcopy(cfg))
    raise TypeError(f"{role} must be a model config dict or a config file path, got {type(cfg).__name__}")


@contextlib.contextmanager
def _full_unpickling():
    """torch >= 2.6 unpickles checkpoints weights-only by default, and mmengine's loader does not say
    otherwise; a checkpoint written by mmengine's runner also holds its message hub (numpy objects) and
    fails that way. The teacher checkpoint is the user's own file, named in their config: read it whole."""
    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous


class SSIMKDDistiller(BaseDetector):
    """Feature distillation of one detector into another: L = L_det(student) + distill_loss(F_S, F_T).

    F_S and F_T are the outputs of the student's and the teacher's ``extract_feat`` (the FPN levels) on
    the same preprocessed batch. The teacher is frozen: no gradients, always in eval mode (its BatchNorm
    statistics stay as loaded). Prediction, the "tensor" mode and ``extract_feat`` are the student's, so
    the distiller validates and tests like the student alone.

    Args:
        student, teacher: mmdet detector configs (dicts), or paths of config files whose ``model`` is the
            detector (``'mmdet::retinanet/retinanet_r101_fpn_1x_coco.py'`` works). Both must take the
            same preprocessed input and give feature levels of matching shapes (or set the loss's
            ``student_channels``/``teacher_channels``/``num_levels`` for 1x1 adapters).
        teacher_ckpt: checkpoint of the trained teacher (path or URL), loaded at construction; the teacher
            is then skipped by ``init_weights``. Without it the teacher keeps its own initialisation
            (only useful for tests).
        distill_loss: config of the feature loss (default ``dict(type='SSIMKDLoss')``); its value is
            reported as ``loss_ssimkd``.
        data_preprocessor: defaults to the student's.
        init_cfg: as for any mmengine module.

    Returns (``loss``): the student's loss dict plus ``loss_ssimkd``.
    """

    def __init__(
        self,
        student,
        teacher,
        teacher_ckpt: str | None = None,
        distill_loss=None,
        data_preprocessor=None,
        init_cfg=None,
    ):
        student = _model_cfg(student, "student")
        teacher = _model_cfg(teacher, "teacher")
        if data_preprocessor is None:
            data_preprocessor = student.get("data_preprocessor")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.student = MODELS.build(student)
        self.teacher = MODELS.build(teacher)
        self.distill_loss = MODELS.build(distill_loss if distill_loss is not None else dict(type="SSIMKDLoss"))
        if teacher_ckpt is not None:
            with _full_unpickling():
                load_checkpoint(self.teacher, teacher_ckpt, map_location="cpu", strict=True)
            self.teacher._is_init = True  # init_weights must not overwrite the loaded teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @staticmethod
    def _feature_module(detector) -> torch.nn.Module:
        """The module whose output extract_feat returns: the neck, or the backbone without one."""
        return detector.neck if detector.with_neck else detector.backbone

    def loss(self, batch_inputs: Tensor, batch_data_samples) -> dict:
        with torch.no_grad():
            teacher_feats = self.teacher.extract_feat(batch_inputs)
        # The student's features are taken from its own loss pass (one forward, whatever the detector's
        # heads do with them), by a hook on the module extract_feat ends with.
        student_feats = []
        handle = self._feature_module(self.student).register_forward_hook(
            lambda _module, _args, output: student_feats.append(output)
        )
        try:
            losses = self.student.loss(batch_inputs, batch_data_samples)
        finally:
            handle.remove()
        if len(student_feats) != 1:
            raise RuntimeError(
                f"the student's feature module ran {len(student_feats)} times in one loss pass, expected once"
            )
        losses["loss_ssimkd"] = self.distill_loss(list(student_feats[0]), list(teacher_feats))
        return losses

    def predict(self, batch_inputs: Tensor, batch_data_samples, rescale: bool = True):
        return self.student.predict(batch_inputs, batch_data_samples, rescale=rescale)

    def _forward(self, batch_inputs: Tensor, batch_data_samples=None):
        return self.student._forward(batch_inputs, batch_data_samples)

    def extract_feat(self, batch_inputs: Tensor):
        return self.student.extract_feat(batch_inputs)


def _register_all() -> None:
    _register(MODELS, SSIMKDLoss)
    _register(MODELS, SSIMKDDistiller)
    if importlib.util.find_spec("mmrazor") is None:
        return
    try:
        from mmrazor.registry import MODELS as RAZOR_MODELS
    except Exception as error:  # an mmrazor that does not import must not break the mmdet adapter
        warnings.warn(
            f"mmrazor is installed but does not import ({error!r}); SSIMKDLoss is registered for mmdet only",
            stacklevel=2,
        )
        return
    _register(RAZOR_MODELS, SSIMKDLoss)


_register_all()
