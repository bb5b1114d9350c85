"""The distillation trainer (ssimkd_kernels.distill): data, models, KD modes, resume, DDP, evaluation.

Everything runs on tiny synthetic data (64-px images, FPN width 16) so the file stays fast on a 2-core CPU.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import TINY_DATA_AND_MODEL

import ssimkd_kernels as sk
from ssimkd_kernels.distill import config as cfg
from ssimkd_kernels.distill.checkpoint import save_detector
from ssimkd_kernels.distill.data import CocoDetection, DataError, ResumableSampler, build_dataset
from ssimkd_kernels.distill.evaluate import METRICS, coco_map, predict, run_eval
from ssimkd_kernels.distill.kd import Distiller, build_feature_loss
from ssimkd_kernels.distill.models import build_detector, freeze, load_detector
from ssimkd_kernels.distill.synthetic import ensure_dataset, make_dataset
from ssimkd_kernels.distill.train import lr_factor, train

REPO = Path(__file__).resolve().parents[1]

TINY = TINY_DATA_AND_MODEL + [
    "model.rpn_pre_nms_top_n_train=200",
    "model.rpn_post_nms_top_n_train=100",
    "model.box_batch_size_per_image=64",
    "model.box_head_dim=64",
    "train.batch_size=2",
    "train.steps=1",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.checkpoint_every=0",
    "train.progress=false",
    "eval.after_train=false",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and under pytest-xdist a second thread per worker would
    oversubscribe a 2-core machine (OpenMP's spin-waiting then slows everything down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ssimkd-data")


def tiny_config(data_root, out, *overrides) -> cfg.Config:
    return cfg.load_config(None, TINY + [f"data.root={data_root}", f"train.out={out}", *overrides])


@pytest.fixture(scope="module")
def tiny_files(data_root):
    config = tiny_config(data_root, data_root / "unused")
    return ensure_dataset(config.data)


@pytest.fixture(scope="module")
def teachers(data_root, tiny_files, tmp_path_factory):
    """An (untrained) R34 teacher file per detector family: enough to exercise distillation."""
    folder = tmp_path_factory.mktemp("teachers")
    files = {}
    for family in cfg.FAMILIES:
        config = tiny_config(data_root, folder, f"model.family={family}", "model.depth=34")
        dataset = build_dataset(tiny_files, "train", config.data)
        torch.manual_seed(1)
        model = build_detector(config.model, dataset.num_classes(), min_size=64, max_size=86)
        files[family] = folder / f"{family}.pt"
        save_detector(files[family], model, config, dataset.categories)
    return files


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


# ------------------------------------------------------------------------------------------------
# Synthetic data and the COCO loader
# ------------------------------------------------------------------------------------------------


def test_synthetic_dataset_is_reproducible_and_well_formed(tmp_path):
    small = cfg.SyntheticConfig(num_train=6, num_val=3, image_size=64, classes=list(cfg.SHAPE_CLASSES))
    first = make_dataset(tmp_path / "a", small)
    again = make_dataset(tmp_path / "b", small)
    other = make_dataset(tmp_path / "c", cfg.SyntheticConfig(**{**vars(small), "seed": 1}))
    assert first.train_annotations.read_text() == again.train_annotations.read_text()
    assert (first.train_images / "000003.jpg").read_bytes() == (again.train_images / "000003.jpg").read_bytes()
    assert first.train_annotations.read_text() != other.train_annotations.read_text()

    coco = json.loads(first.train_annotations.read_text())
    assert [c["name"] for c in coco["categories"]] == list(cfg.SHAPE_CLASSES)
    assert len(coco["images"]) == 6 and coco["annotations"]
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height and w >= 1 and h >= 1
        assert 0 < ann["area"] <= w * h


def test_loader_resizes_keeping_aspect_and_scales_boxes(tiny_files):
    dataset = CocoDetection(tiny_files.train_images, tiny_files.train_annotations, min_size=48, max_size=56)
    coco = json.loads(tiny_files.train_annotations.read_text())
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = dataset.images[index]
        height, width = image.shape[1:]
        assert min(height, width) == 48 or max(height, width) == 56  # one side hits its limit
        assert max(height, width) <= 56
        assert abs(height / width - info["height"] / info["width"]) < 0.05
        raw = [a["bbox"] for a in coco["annotations"] if a["image_id"] == info["id"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw]).reshape(-1, 4) * target["scale"]
        torch.testing.assert_close(target["boxes"], expected)


def test_flip_mirrors_image_and_boxes_and_depends_only_on_seed_epoch_index(tiny_files):
    plain = CocoDetection(tiny_files.train_images, tiny_files.train_annotations, min_size=64, max_size=86)
    always = CocoDetection(tiny_files.train_images, tiny_files.train_annotations, min_size=64, max_size=86, flip=1.0)
    image, target = plain[0]
    flipped, flipped_target = always[0]
    width = image.shape[-1]
    torch.testing.assert_close(flipped, image.flip(-1))
    torch.testing.assert_close(flipped_target["boxes"][:, [2, 0]], width - target["boxes"][:, [0, 2]])

    half = CocoDetection(tiny_files.train_images, tiny_files.train_annotations, min_size=64, max_size=86, flip=0.5)
    draws = {(i, e): bool(torch.equal(half[(i, e)][0], always[(i, e)][0])) for i in range(8) for e in range(4)}
    assert draws == {(i, e): bool(torch.equal(half[(i, e)][0], always[(i, e)][0])) for i in range(8) for e in range(4)}
    assert 0 < sum(draws.values()) < len(draws)  # some flipped, some not


def _copy_dataset(files, folder: Path):
    shutil.copytree(files.train_images.parent, folder)
    return folder / "train", folder / "annotations" / "instances_train.json"


def test_broken_image_gives_error_naming_the_file(tiny_files, tmp_path):
    images, annotations = _copy_dataset(tiny_files, tmp_path / "copy")
    (images / "000002.jpg").write_bytes(b"this is not a jpeg")
    dataset = CocoDetection(images, annotations, min_size=64, max_size=86)
    with pytest.raises(DataError, match=r"cannot read image .*000002\.jpg"):
        dataset[2]

    replacing = CocoDetection(images, annotations, min_size=64, max_size=86, flip=0.5, on_broken="replace")
    with pytest.warns(UserWarning, match=r"skipping: cannot read image .*000002\.jpg"):
        image, target = replacing[(2, 0)]
    assert target["image_id"] == 4  # the next image (ids are 1-based)
    dropping = CocoDetection(images, annotations, min_size=64, max_size=86, on_broken="drop")
    with pytest.warns(UserWarning, match="000002.jpg"):
        assert dropping[2] is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"images": [], "categories": []}', "missing or malformed 'annotations'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks \['file_name'\]"),
        (
            '{"images": [], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2]}], "categories": []}',
            r"annotations\[0\] bbox \[1, 2\] is not",
        ),
        (
            '{"images": [], "annotations": [{"id": 7, "image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}],'
            ' "categories": [{"id": 1, "name": "circle"}]}',
            "image_id 3, which is not in 'images'",
        ),
    ],
)
def test_broken_annotation_file_gives_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "instances_bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"annotation file .*instances_bad.json.*{message}"):
        CocoDetection(tmp_path, path, min_size=64, max_size=86)


def test_missing_coco_files_are_named(tmp_path):
    config = cfg.load_config(
        None,
        [
            "data.source=coco",
            f"data.train_images={tmp_path}",
            f"data.train_annotations={tmp_path / 'nope.json'}",
            f"data.val_images={tmp_path}",
            f"data.val_annotations={tmp_path}",
        ],
    )
    with pytest.raises(FileNotFoundError, match=r"data.train_annotations: .*nope\.json does not exist"):
        ensure_dataset(config.data)


def test_sampler_resumes_mid_epoch_and_splits_ranks(tiny_files):
    dataset = build_dataset(tiny_files, "train", cfg.DataConfig())
    full = ResumableSampler(dataset, num_replicas=1, rank=0, seed=3, batch_size=2)
    full.set_position(epoch=1, start=0)
    order = list(full)
    resumed = ResumableSampler(dataset, num_replicas=1, rank=0, seed=3, batch_size=2)
    resumed.set_position(epoch=1, start=4)
    assert list(resumed) == order[4:] and len(resumed) == len(order) - 4
    assert all(epoch == 1 for _, epoch in order) and sorted(i for i, _ in order) == list(range(8))
    full.set_position(epoch=2, start=0)
    assert list(full) != order
    ranks = [ResumableSampler(dataset, num_replicas=2, rank=r, seed=3, batch_size=2) for r in range(2)]
    shares = [{i for i, _ in sampler} for sampler in ranks]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 8


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def test_overrides_are_typed_and_unknown_fields_rejected():
    config = cfg.load_config(
        None,
        [
            "train.lr=2e-2",
            "kd.mode=ssim",
            "kd.teacher=t.pt",
            "kd.clamp=false",
            "model.anchor_sizes=[4, 8, 16, 32, 64]",
            "train.out=2024",
            "kd.weight=3",
        ],
    )
    assert config.train.lr == 0.02 and config.kd.mode == "ssim" and config.kd.clamp is False
    assert config.model.anchor_sizes == [4, 8, 16, 32, 64] and config.train.out == "2024"
    assert config.kd.weight == 3.0 and isinstance(config.kd.weight, float)
    with pytest.raises(ValueError, match="unknown config field 'train.lrr'"):
        cfg.load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="train.steps must be an integer"):
        cfg.load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match="kd.mode must be one of"):
        cfg.load_config(None, ["kd.mode=ssmi"])
    with pytest.raises(ValueError, match="needs a teacher checkpoint"):
        cfg.load_config(None, ["kd.mode=l2"])


def test_every_config_file_loads_and_validates():
    files = sorted((REPO / "configs").glob("*.toml"))
    assert len(files) >= 7
    for path in files:
        config = cfg.load_config(str(path))
        round_trip = cfg.from_dict(cfg.to_dict(config))
        assert round_trip == config, path.name


def test_lr_schedule_warms_up_then_steps_down():
    train_config = cfg.TrainConfig(warmup_steps=10, warmup_factor=0.1, lr_steps=[20, 30], lr_gamma=0.1)
    assert lr_factor(0, train_config) == pytest.approx(0.1)
    assert lr_factor(5, train_config) == pytest.approx(0.55)
    assert [lr_factor(s, train_config) for s in (10, 19, 20, 30)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


# ------------------------------------------------------------------------------------------------
# Models, feature capture and one training step per KD mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", cfg.FAMILIES)
def test_distiller_feature_loss_is_ssim_kd_of_the_two_backbones(family, data_root, tiny_files, teachers):
    config = tiny_config(
        data_root, data_root / "x", f"model.family={family}", "kd.mode=ssim", f"kd.teacher={teachers[family]}"
    )
    dataset = build_dataset(tiny_files, "train", config.data)
    student = build_detector(config.model, dataset.num_classes(), min_size=64, max_size=86)
    teacher, _ = load_detector(teachers[family])
    loss = build_feature_loss(config.kd, student_channels=16, teacher_channels=16, num_levels=5)
    distiller = Distiller(student, loss, freeze(teacher))
    images, targets = zip(*[dataset[i] for i in range(2)])
    det_losses, feature_loss = distiller(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    assert all(torch.isfinite(v) for v in det_losses.values())

    batch, _ = student.transform(list(images))
    expected_levels = ["0", "1", "2", "p6", "p7"] if family == "retinanet" else ["0", "1", "2", "3", "pool"]
    with torch.no_grad():
        student_feats, teacher_feats = student.backbone(batch.tensors), teacher.backbone(batch.tensors)
    assert list(student_feats) == expected_levels
    torch.testing.assert_close(feature_loss.detach(), sk.ssim_kd_loss(student_feats, teacher_feats))


@pytest.mark.parametrize("mode", cfg.KD_MODES)
@pytest.mark.parametrize("family", cfg.FAMILIES)
def test_one_training_step_per_kd_mode(family, mode, data_root, teachers, tmp_path):
    teacher = [f"kd.teacher={teachers[family]}"] if mode != "none" else []
    config = tiny_config(data_root, tmp_path, f"model.family={family}", f"kd.mode={mode}", "kd.weight=2", *teacher)
    torch.manual_seed(0)
    initial = build_detector(config.model, 7, min_size=64, max_size=86).state_dict()
    train(config)
    (record,) = read_metrics(tmp_path)
    assert record["step"] == 1 and math.isfinite(record["loss_det"])
    if mode == "none":
        assert "loss_feat" not in record and record["loss"] == pytest.approx(record["loss_det"])
    else:
        assert record["loss_feat"] > 0
        assert record["loss"] == pytest.approx(record["loss_det"] + 2 * record["loss_feat"], rel=1e-5)
    trained = load_detector(tmp_path / "model.pt")[0].state_dict()
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])]
    assert any(k.startswith("backbone.body") for k in changed) and any(k.startswith("backbone.fpn") for k in changed)
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["l2", "ssim"])
def test_adapters_bridge_different_fpn_widths(mode, data_root, teachers, tmp_path):
    """A teacher of FPN width 16 and a student of width 8: one trained 1x1 adapter per level."""
    config = tiny_config(
        data_root,
        tmp_path,
        "model.fpn_channels=8",
        f"kd.mode={mode}",
        f"kd.teacher={teachers['retinanet']}",
        "train.checkpoint_every=1",
    )
    train(config)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["feature_loss"]
    assert sorted(state) == [f"adapters.{i}.{p}" for i in range(5) for p in ("bias", "weight")]
    assert state["adapters.0.weight"].shape == (16, 8, 1, 1)


# ------------------------------------------------------------------------------------------------
# Checkpoint / resume, DDP
# ------------------------------------------------------------------------------------------------


def _losses(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "mem_")) and k != "images_per_s"} for r in records]


@pytest.mark.parametrize("family, mode", [("faster_rcnn", "ssim"), ("retinanet", "l2")])
def test_resume_continues_exactly(family, mode, data_root, teachers, tmp_path):
    """6 steps straight vs 3 steps, stop, resume for 3 (mid-epoch, across an epoch end): same weights and logs."""
    common = [
        f"model.family={family}",
        f"kd.mode={mode}",
        f"kd.teacher={teachers[family]}",
        "train.steps=6",
        "train.checkpoint_every=3",
        "data.flip=0.5",
    ]
    train(tiny_config(data_root, tmp_path / "straight", *common))
    interrupted = tiny_config(data_root, tmp_path / "resumed", *common, "train.stop_at=3")
    train(interrupted)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 3
    from ssimkd_kernels.distill.train import run_train

    summary = run_train(overrides=[], resume=tmp_path / "resumed" / "checkpoint.pt")
    assert summary["resumed_from"] == 3  # it ran steps 4-6 only

    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["model"]
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    assert _losses(read_metrics(tmp_path / "straight")) == _losses(read_metrics(tmp_path / "resumed"))


_DIE_WHILE_SAVING = """
import os, signal, sys, torch
from ssimkd_kernels.distill.config import load_config
from ssimkd_kernels.distill.train import train

real_save, saves = torch.save, 0

def save_then_die_halfway(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves == int(sys.argv[1]):  # this checkpoint: half a file on disk, then SIGKILL
        f.write(b"PK\\x03\\x04 truncated")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

torch.save = save_then_die_halfway
train(load_config(None, sys.argv[2:]))
"""


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_good_one(data_root, teachers, tmp_path):
    """SIGKILL in the middle of the second checkpoint's write (step 4 of 6): checkpoint.pt still holds
    step 2, and resuming from it ends with the same weights and logs as a run never interrupted."""
    common = TINY + [
        f"data.root={data_root}",
        "kd.mode=ssim",
        f"kd.teacher={teachers['faster_rcnn']}",
        "model.family=faster_rcnn",
        "train.steps=6",
        "train.checkpoint_every=2",
    ]
    train(cfg.load_config(None, common + [f"train.out={tmp_path / 'straight'}"]))
    out = tmp_path / "killed"
    script = tmp_path / "die_while_saving.py"
    script.write_text(_DIE_WHILE_SAVING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), "2", *common, f"train.out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == -9, result.stderr[-3000:]
    assert list(out.glob(".checkpoint.pt.*.tmp")), "the fault was not injected during the write"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2

    from ssimkd_kernels.distill.train import run_train

    summary = run_train(overrides=[], resume=out / "checkpoint.pt")
    assert summary["resumed_from"] == 2
    assert not list(out.glob(".checkpoint.pt.*.tmp"))  # the dead writer's half file is cleaned up
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    resumed = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _losses(read_metrics(tmp_path / "straight")) == _losses(read_metrics(out))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_state(data_root, tmp_path, monkeypatch):
    """A non-finite loss at step 3 stops training with a message, and checkpoint.pt is the state after step 2,
    the same as an uninterrupted run's checkpoint there (the failing forward's BatchNorm updates undone)."""
    train(
        tiny_config(
            data_root, tmp_path / "good", "model.family=faster_rcnn", "train.steps=2", "train.checkpoint_every=2"
        )
    )
    forward, calls = Distiller.forward, []

    def poisoned(self, *args, **kwargs):
        det_losses, feature_loss = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            det_losses = {**det_losses, "loss_objectness": det_losses["loss_objectness"] * math.nan}
        return det_losses, feature_loss

    monkeypatch.setattr(Distiller, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 .*last good state \(step 2\)"):
        train(
            tiny_config(
                data_root, tmp_path / "nan", "model.family=faster_rcnn", "train.steps=5", "train.checkpoint_every=2"
            )
        )
    saved = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    good = torch.load(tmp_path / "good" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    assert all(torch.equal(saved["model"][k], good["model"][k]) for k in good["model"])  # BatchNorm statistics too
    assert torch.equal(saved["rng"][0]["torch"], good["rng"][0]["torch"])
    assert saved["optimizer"]["state"].keys() == good["optimizer"]["state"].keys()


def test_ddp_two_processes_on_cpu_with_torchrun(data_root, teachers, tmp_path):
    out = tmp_path / "ddp"
    overrides = TINY + [
        f"data.root={data_root}",
        f"train.out={out}",
        "train.steps=2",
        "kd.mode=ssim",
        f"kd.teacher={teachers['retinanet']}",
        "train.checkpoint_every=2",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ssimkd_kernels",
        "train",
        "--set",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank its own stream
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss_feat"]) for r in records)
    assert (out / "model.pt").exists()


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


class _Oracle(torch.nn.Module):
    """Predicts the ground truth of each image (in the resized frame the model sees), optionally shifted."""

    def __init__(self, targets, shift: float = 0.0):
        super().__init__()
        self.queue, self.shift = list(targets), shift

    def forward(self, images):
        outputs = []
        for _ in images:
            target = self.queue.pop(0)
            boxes = target["boxes"] + self.shift
            outputs.append({"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes))})
        return outputs


def test_map_is_100_for_ground_truth_predictions_and_lower_for_shifted(tiny_files):
    from ssimkd_kernels.distill.data import eval_loader

    dataset = build_dataset(tiny_files, "val", cfg.DataConfig(min_size=48, max_size=60))
    results = {}
    for shift in (0.0, 6.0):
        oracle = _Oracle([dataset[i][1] for i in range(len(dataset))], shift)
        detections, ids = predict(
            oracle, eval_loader(dataset, batch_size=3, num_workers=0), dataset.categories, device=torch.device("cpu")
        )
        results[shift] = coco_map(dataset.annotation_file, detections, ids)
    assert results[0.0]["AP"] == pytest.approx(100.0) and results[0.0]["AP50"] == pytest.approx(100.0)
    assert results[6.0]["AP"] < 90.0
    assert set(results[0.0]) == set(METRICS)


def test_eval_after_training_and_eval_of_the_checkpoint_agree(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path, "train.steps=2", "eval.after_train=true")
    summary = train(config)
    assert set(METRICS) <= set(summary["eval"]) and summary["eval"]["images"] == 4
    for name in METRICS:
        value = summary["eval"][name]
        assert value is None or 0.0 <= value <= 100.0
    again = run_eval(tmp_path / "model.pt", progress=False)
    assert {k: again[k] for k in METRICS} == pytest.approx({k: summary["eval"][k] for k in METRICS})
    assert json.loads((tmp_path / "summary.json").read_text())["eval"]["images"] == 4
