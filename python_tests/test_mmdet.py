"""The mmdetection adapter: SSIMKDLoss in mmdet's registry, the SSIMKDDistiller, the shipped config.

`make test` installs mmdet first (make setup-mmdet); elsewhere the module skips without it.
"""

import copy
import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet is not installed: `make setup-mmdet` installs mmengine, mmcv and mmdet")

from conftest import sample_levels  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hub import get_config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import Registry, init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import ssimkd_kernels as sk  # noqa: E402
from ssimkd_kernels.integrations import mmdet as sk_mmdet  # noqa: E402

# mmengine 0.10 imports pkg_resources (hence setuptools < 81 in requirements/mmdet.txt), which warns.
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mmdet" / "retinanet_r101_to_r50_fpn_ssimkd_1x_coco.py"
PLANES = [(20, 24), (10, 12), (5, 6), (3, 3), (1, 2)]  # P3-P7-like, down to planes smaller than the window


@pytest.fixture(autouse=True)
def _mmdet_scope():
    init_default_scope("mmdet")  # as mmdet's runner does: data preprocessors resolve in mmdet's registry


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("loss_weight", [1.0, 4.0])
def test_registered_loss_is_loss_weight_times_ssim_kd_loss(loss_weight):
    criterion = MODELS.build(dict(type="SSIMKDLoss", loss_weight=loss_weight))
    assert type(criterion) is sk.SSIMKDLoss
    students, teachers = sample_levels(PLANES, channels=4)
    got = criterion(students, teachers)
    expected = loss_weight * sk.ssim_kd_loss(students, teachers)
    assert torch.equal(got, expected)  # the same fused op on the same inputs: bitwise
    inputs = students + teachers
    for g, e in zip(_grads(got, inputs), _grads(expected, inputs)):
        assert torch.equal(g, e)
    assert any(float(g.abs().max()) > 0 for g in _grads(got, students))


def test_config_options_reach_the_loss():
    options = dict(
        normalize="plane",
        padding="zero",
        exponents=(0.0, 0.0, 1.0),
        clamp=False,
        level_weights=[1.0, 0.5, 0.25],
        window_size=7,
        sigma=1.0,
        k1=0.02,
        k2=0.05,
    )
    cfg = Config(dict(loss=dict(type="SSIMKDLoss", loss_weight=2.0, **options)))  # as a config file gives it
    criterion = MODELS.build(cfg.loss)
    assert criterion.loss_weight == 2.0
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in criterion.loss_options.items()} == {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()
    }
    students, teachers = sample_levels(PLANES[:3], channels=3, requires_grad=False)
    got = criterion(students, teachers)
    assert torch.equal(got, 2.0 * sk.ssim_kd_loss(students, teachers, **options))
    assert not torch.allclose(got, 2.0 * sk.ssim_kd_loss(students, teachers))

    with_adapters = MODELS.build(dict(type="SSIMKDLoss", student_channels=128, teacher_channels=256, num_levels=5))
    assert len(with_adapters.adapters) == 5 and with_adapters.adapters[0].out_channels == 256
    with pytest.raises(TypeError, match="unknown options"):
        MODELS.build(dict(type="SSIMKDLoss", windowsize=11))


def test_registration_happens_once_and_guards_the_name():
    importlib.reload(sk_mmdet)  # a second import (custom_imports in several configs) must not raise
    assert MODELS.get("SSIMKDLoss") is sk.SSIMKDLoss
    assert MODELS.get("SSIMKDDistiller").__name__ == "SSIMKDDistiller"
    other = Registry("models", scope="test_mmdet")
    other.register_module(name="SSIMKDLoss", module=torch.nn.L1Loss)
    with pytest.raises(KeyError, match="already registered"):
        sk_mmdet._register(other, sk.SSIMKDLoss)


def _tiny_distiller_cfg():
    """The shipped config with small detectors: ResNet-18 student, ResNet-34 teacher, 3 classes, no
    pretrained weights and no teacher checkpoint (nothing may be downloaded)."""
    cfg = Config.fromfile(CONFIG).model
    student = cfg.student
    student.backbone.update(depth=18, init_cfg=None)
    student.neck.in_channels = [64, 128, 256, 512]
    student.neck.out_channels = 64
    student.bbox_head.update(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=1)
    teacher = copy.deepcopy(student)
    teacher.backbone.depth = 34
    cfg.update(teacher=teacher, teacher_ckpt=None)
    return cfg


def _batch(n=2, size=64):
    samples = []
    for i in range(n):
        sample = DetDataSample(
            metainfo=dict(img_id=i, img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
        )
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[8.0, 10.0, 40.0, 44.0]]), labels=torch.tensor([i % 3]))
        samples.append(sample)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=images, data_samples=samples)


def test_one_training_iteration_of_the_distiller():
    model = MODELS.build(_tiny_distiller_cfg())
    model.init_weights()
    model.train()
    assert model.student.training and not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    student_before = {n: p.detach().clone() for n, p in model.student.named_parameters() if p.requires_grad}
    teacher_before = {n: t.detach().clone() for n, t in model.teacher.state_dict().items()}

    # The feature loss alone sends gradients into the student's FPN, none into the teacher.
    data = model.data_preprocessor(_batch(), True)
    losses = model(**data, mode="loss")
    assert {"loss_cls", "loss_bbox", "loss_ssimkd"} <= set(losses)
    assert torch.isfinite(losses["loss_ssimkd"]) and losses["loss_ssimkd"].item() > 0
    losses["loss_ssimkd"].backward()
    assert float(model.student.neck.fpn_convs[0].conv.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)

    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    log_vars = model.train_step(_batch(), optim_wrapper)
    assert {"loss", "loss_cls", "loss_bbox", "loss_ssimkd"} <= set(log_vars)
    assert all(torch.isfinite(torch.as_tensor(v).detach()).all() for v in log_vars.values())
    changed = [
        n for n, p in model.student.named_parameters() if p.requires_grad and not torch.equal(p, student_before[n])
    ]
    assert any(n.startswith("neck.") for n in changed) and any(n.startswith("backbone.") for n in changed)
    for name, tensor in model.teacher.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(tensor, teacher_before[name]), name

    model.eval()
    predictions = model.test_step(_batch(n=1))  # the student's predict, through mmcv's compiled nms
    assert len(predictions) == 1 and "pred_instances" in predictions[0]


def test_teacher_checkpoint_is_loaded_and_kept_by_init_weights(tmp_path):
    cfg = _tiny_distiller_cfg()
    source = MODELS.build(cfg.teacher)
    path = tmp_path / "teacher.pth"
    # Like a checkpoint of mmengine's runner: besides the weights, its message hub, which torch >= 2.6
    # does not unpickle weights-only (the default) because of the numpy objects in it.
    hub = MessageHub.get_instance("test_mmdet")
    hub.update_scalar("train/loss", 1.0)
    torch.save({"state_dict": source.state_dict(), "message_hub": hub.state_dict()}, path)
    model = MODELS.build(dict(cfg, teacher_ckpt=str(path)))
    model.init_weights()
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], tensor), name


def test_shipped_config_parses_and_builds():
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.type == "SSIMKDDistiller"
    assert cfg.model.student.backbone.depth == 50
    loss = cfg.model.distill_loss
    assert (loss.type, loss.normalize, loss.padding, tuple(loss.exponents)) == (
        "SSIMKDLoss",
        "sample",
        "reflect",
        (1.0, 1.0, 1.0),
    )
    assert cfg.train_cfg.max_epochs == 12

    model_cfg = cfg.model
    model_cfg.teacher_ckpt = None  # nothing may be downloaded
    model_cfg.student.backbone.init_cfg = None
    teacher = get_config(model_cfg.teacher).model  # the 'mmdet::' config the distiller would read itself
    teacher.backbone.init_cfg = None
    model_cfg.teacher = teacher
    model = MODELS.build(model_cfg)
    assert (model.student.backbone.depth, model.teacher.backbone.depth) == (50, 101)
    assert model.distill_loss.loss_weight == loss.loss_weight and model.distill_loss.adapters is None
