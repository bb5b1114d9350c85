"""Trainer configuration: typed sections, TOML files, and `--set section.field=value` overrides.

A config is a tree of dataclasses whose defaults are the small synthetic CPU setting. TOML files in
configs/ change only what differs; every field can then be overridden on the command line:

    ssimkd train --config configs/synthetic-retinanet.toml --set train.lr=0.01 kd.mode=ssim

Values on the command line are read as TOML literals (`train.lr=1e-2`, `model.anchor_sizes=[16,32]`,
`kd.clamp=false`); anything that is not a TOML literal is taken as a string (`kd.mode=ssim`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

# The configs/ folder of a source checkout: presets are looked up there by name.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

KD_MODES = ("none", "l2", "l1", "ssim")
FAMILIES = ("retinanet", "faster_rcnn")
NORMS = ("batch", "frozen", "group")
AMP_MODES = ("auto", "off", "bf16", "fp16")
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond")


@dataclass
class SyntheticConfig:
    """The embedded synthetic shapes dataset (written in COCO format by `ssimkd make-data`)."""

    seed: int = 0
    num_train: int = 600
    num_val: int = 150
    image_size: int = 160  # mean side in pixels; each image gets an aspect ratio in [3/4, 4/3]
    classes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star", "ring", "cross"])
    min_objects: int = 1
    max_objects: int = 6
    object_size: list[float] = field(default_factory=lambda: [0.1, 0.45])  # of the shorter side
    clutter: int = 8  # distractor strokes and blobs per image


@dataclass
class DataConfig:
    """Where images come from and how they are resized and augmented."""

    source: str = "synthetic"  # "synthetic" (generated into the cache on first use) or "coco"
    root: str = ""  # synthetic: folder to write to (default: under ssimkd_kernels._cache.cache_root())
    train_images: str = ""  # coco: image folder and instances json of each split
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    min_size: int = 160  # shorter side after resizing, unless the longer would exceed max_size
    max_size: int = 214
    flip: float = 0.5  # probability of a horizontal flip of a training image
    skip_broken: bool = False  # warn and skip unreadable images instead of stopping
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """A torchvision detector on a ResNet-FPN backbone, built with weights=None."""

    family: str = "retinanet"  # "retinanet" or "faster_rcnn"
    depth: int = 18  # ResNet depth: 18, 34, 50, 101 or 152
    fpn_channels: int = 64  # torchvision's builders use 256; narrower FPNs make CPU runs feasible
    norm: str = "batch"  # backbone norm: "batch" (from scratch), "frozen" (pretrained backbone), "group"
    trainable_layers: int = 5  # ResNet stages trained (5 = all), as torchvision's trainable_backbone_layers
    backbone_checkpoint: str = ""  # optional local ImageNet ResNet state_dict (nothing is downloaded)
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # base size per level
    head_norm: str = "none"  # "none" (torchvision's v1 heads) or "group" (GroupNorm in the heads, as its v2)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    # Faster R-CNN only: proposals kept before/after NMS, RoIs sampled per image, box head width.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_head_dim: int = 1024


@dataclass
class KDConfig:
    """Feature distillation on the FPN outputs: total = detection loss + weight * feature loss."""

    mode: str = "none"  # "none", "l2", "l1" or "ssim"
    weight: float = 1.0  # lambda
    teacher: str = ""  # checkpoint of the teacher (a `ssimkd train` output); needed unless mode is none
    adapter: bool = False  # 1x1 conv per level on the student (always built when channels differ)
    # ssim_kd_loss options (SPEC section 3)
    normalize: str = "sample"
    padding: str = "reflect"
    exponents: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    clamp: bool = True
    level_weights: list[float] = field(default_factory=list)  # empty: every level weighs 1
    backend: str = "auto"
    window_size: int = 11
    sigma: float = 1.5
    data_range: float = 1.0
    k1: float = 0.01
    k2: float = 0.03


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda"
    steps: int = 300
    batch_size: int = 8  # per process
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    warmup_factor: float = 0.001  # lr multiplier at step 0, rising linearly to 1 at warmup_steps
    lr_steps: list[int] = field(default_factory=list)  # steps at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float = 35.0  # max gradient norm; 0 disables clipping
    amp: str = "auto"  # "auto" (bf16 on GPUs that have it, else fp16; off on CPU), "off", "bf16", "fp16"
    checkpoint_every: int = 100  # steps between checkpoints; 0: only the final one
    log_every: int = 10
    progress: bool = True
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    stop_at: int = 0  # stop after this step as if interrupted (resume continues); 0: run to the end


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_images: int = 0  # evaluate only the first N validation images; 0: all
    after_train: bool = True  # evaluate on the val split when training ends


@dataclass
class DemoConfig:
    """What `ssimkd demo` runs: a teacher, then one student per (KD mode, seed)."""

    modes: list[str] = field(default_factory=lambda: ["none", "l2", "ssim"])
    seeds: list[int] = field(default_factory=lambda: [0])
    teacher: dict[str, Any] = field(default_factory=dict)  # overrides of this config for the teacher run


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# ------------------------------------------------------------------------------------------------
# Building configs from TOML tables and overrides
# ------------------------------------------------------------------------------------------------


def _coerce(value, hint, where: str):
    """value converted to the annotated type hint, or a ValueError naming the field."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table, got {value!r}")
        return _from_table(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _from_table(cls, table: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    unknown = set(table) - set(hints)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config field(s) {sorted(prefix + k for k in unknown)}; known: {sorted(hints)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()}
    return cls(**values)


def from_dict(table: dict) -> Config:
    """A Config from a nested dict (a parsed TOML file); missing fields keep their defaults."""
    return _from_table(Config, table)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def parse_value(text: str):
    """A command-line value: a TOML literal when it is one (1e-2, true, [1, 2]), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: Config, overrides) -> Config:
    """A copy of config with `section.field=value` overrides (strings) or (dotted key, value) pairs.

    Raises:
        ValueError: an unknown field, a malformed override or a value of the wrong type.
    """
    table = to_dict(config)
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form section.field=value")
            key, text = item.split("=", 1)
            value = parse_value(text.strip())
        else:
            key, value = item
        parts = key.strip().split(".")
        node = table
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config field {key!r}: {'.'.join(parts[: depth + 1])!r} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config field {key!r}")
        if isinstance(node[parts[-1]], dict) and not isinstance(value, dict):
            raise ValueError(f"config field {key!r} is a section, not a value")
        hint_str = isinstance(value, (int, float, bool)) and isinstance(node[parts[-1]], str)
        # A string field given something that reads as a number (a folder called 2024) keeps the text.
        node[parts[-1]] = str(text).strip() if hint_str and isinstance(item, str) else value
    return from_dict(table)


def resolve_config_path(name_or_path: str) -> Path:
    """A config file from a path, or a preset name in configs/ (e.g. "demo-smoke")."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if not preset.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no config file {name_or_path!r} and no preset {preset.name} in {CONFIG_DIR}; presets: {known}"
        )
    return preset


def load_config(name_or_path: str | None = None, overrides=()) -> Config:
    """Defaults, then a TOML file or preset (if given), then the overrides; validated.

    Returns:
        The Config. Raises ValueError naming the file or field for anything invalid.
    """
    config = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path}: {error}") from error
        try:
            config = from_dict(table)
        except ValueError as error:
            raise ValueError(f"config file {path}: {error}") from error
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def save_config(config: Config, path: Path) -> None:
    Path(path).write_text(tomli_w.dumps(to_dict(config)))


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(config: Config) -> None:
    """Check option values and ranges; the ssim options are checked again by ssim_kd_loss itself."""
    data, model, kd, train = config.data, config.model, config.kd, config.train
    _choice("data.source", data.source, ("synthetic", "coco"))
    if data.source == "coco":
        for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if not getattr(data, name):
                raise ValueError(f"data.source = 'coco' needs data.{name}")
    if not 0 < data.min_size <= data.max_size:
        raise ValueError(f"need 0 < data.min_size <= data.max_size, got {data.min_size}, {data.max_size}")
    if not 0.0 <= data.flip <= 1.0:
        raise ValueError(f"data.flip is a probability, got {data.flip}")
    syn = data.synthetic
    for name in syn.classes:
        _choice("data.synthetic.classes[]", name, SHAPE_CLASSES)
    if len(set(syn.classes)) != len(syn.classes) or not syn.classes:
        raise ValueError(f"data.synthetic.classes must be distinct and non-empty, got {syn.classes}")
    if not 1 <= syn.min_objects <= syn.max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {syn.min_objects}, {syn.max_objects}")
    if len(syn.object_size) != 2 or not 0 < syn.object_size[0] <= syn.object_size[1] <= 1:
        raise ValueError(f"data.synthetic.object_size must be [low, high] in (0, 1], got {syn.object_size}")
    if syn.num_train < 1 or syn.num_val < 1 or syn.image_size < 32:
        raise ValueError("data.synthetic needs num_train >= 1, num_val >= 1 and image_size >= 32")
    _choice("model.family", model.family, FAMILIES)
    _choice("model.depth", model.depth, (18, 34, 50, 101, 152))
    _choice("model.norm", model.norm, NORMS)
    _choice("model.head_norm", model.head_norm, ("none", "group"))
    if not 0 <= model.trainable_layers <= 5:
        raise ValueError(f"model.trainable_layers must be in [0, 5], got {model.trainable_layers}")
    if model.fpn_channels < 8:
        raise ValueError(f"model.fpn_channels must be >= 8, got {model.fpn_channels}")
    if len(model.anchor_sizes) != 5 or any(s <= 0 for s in model.anchor_sizes):
        raise ValueError(f"model.anchor_sizes must be 5 positive sizes (one per FPN level), got {model.anchor_sizes}")
    _choice("kd.mode", kd.mode, KD_MODES)
    _positive("kd.weight", kd.weight, allow_zero=True)
    if kd.mode != "none" and not kd.teacher:
        raise ValueError(f"kd.mode = {kd.mode!r} needs a teacher checkpoint: set kd.teacher")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    for name in ("lr", "warmup_factor"):
        _positive(f"train.{name}", getattr(train, name))
    for name in ("momentum", "weight_decay", "grad_clip"):
        _positive(f"train.{name}", getattr(train, name), allow_zero=True)
    if train.warmup_steps < 0 or train.checkpoint_every < 0 or train.stop_at < 0:
        raise ValueError("train.warmup_steps, train.checkpoint_every and train.stop_at must be >= 0")
    if sorted(train.lr_steps) != train.lr_steps:
        raise ValueError(f"train.lr_steps must be increasing, got {train.lr_steps}")
    _choice("train.amp", train.amp, AMP_MODES)
    _choice("train.device", train.device, ("auto", "cpu", "cuda"))
    for mode in config.demo.modes:
        _choice("demo.modes[]", mode, KD_MODES)
    if not config.demo.seeds:
        raise ValueError("demo.seeds must hold at least one seed")
