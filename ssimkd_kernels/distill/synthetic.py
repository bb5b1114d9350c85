"""The embedded synthetic detection dataset: textured shapes on cluttered backgrounds, in COCO format.

Each image is drawn from its own seed (dataset seed, split, index), so any image can be regenerated
alone and the whole set is reproducible from `data.synthetic.seed`. Objects (circle, square,
triangle, star, ring, cross, hexagon, diamond) vary in size, colour, texture, rotation and aspect;
they may occlude each other, but every drawn object stays at least MIN_VISIBLE visible and is labelled
with the box of its visible pixels, as in COCO. Backgrounds are gradients, blotches or stripes with
noise and distractor strokes that belong to no class.

`ensure_dataset` is the one entry point of the trainer: it returns the files of a COCO dataset,
generating the synthetic one into the cache folder on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .._cache import cache_root
from .config import DataConfig, SyntheticConfig

# Bump when the drawing changes, so cached datasets of an older generator are not reused.
GENERATOR_VERSION = 1
# An object that would end up less visible than this (occluded by later ones) is not drawn.
MIN_VISIBLE = 0.5
# Objects smaller than this many visible pixels are not drawn (a label nobody could see).
MIN_PIXELS = 24
PLACEMENT_TRIES = 20
JPEG_QUALITY = 92


@dataclass
class DatasetFiles:
    """The four paths of a COCO-format detection dataset with a train and a val split."""

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------


def _regular(n: int, radii=(1.0,), start: float = 90.0) -> np.ndarray:
    """Vertices of a regular polygon (or star, with alternating radii) on the unit circle, (n, 2)."""
    angles = np.deg2rad(start + np.arange(n) * 360.0 / n)
    r = np.resize(np.asarray(radii, dtype=np.float64), n)
    return np.stack([r * np.cos(angles), -r * np.sin(angles)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
    )


# Unit outlines of the polygon shapes; circle and ring are ellipses drawn separately.
_OUTLINES = {
    "square": lambda: _regular(4, start=45.0) / math.sqrt(2) * 1.4,
    "triangle": lambda: _regular(3),
    "star": lambda: _regular(10, radii=(1.0, 0.42)),
    "cross": _cross,
    "hexagon": lambda: _regular(6, start=0.0),
    "diamond": lambda: _regular(4, radii=(1.0, 0.6)),
}


def _shape_mask(kind: str, size: int, center, angle: float, aspect: float, width: int, height: int) -> np.ndarray:
    """Boolean (H, W) mask of one shape of diameter `size` pixels."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    r = size / 2.0
    if kind in ("circle", "ring"):
        circle = _regular(48)
        draw.polygon([(cx + r * x, cy + r * y) for x, y in circle], fill=255)
        if kind == "ring":
            inner = 0.55 * r
            draw.polygon([(cx + inner * x, cy + inner * y) for x, y in circle], fill=0)
    else:
        points = _OUTLINES[kind]() * np.array([1.0, aspect])
        rot = np.deg2rad(angle)
        rotation = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        points = points @ rotation.T * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points], fill=255)
    return np.asarray(mask) > 127


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W, 3) float texture: solid, stripes, checker or mottled, in random colours."""
    base, other = _random_colour(rng), _random_colour(rng)
    kind = rng.choice(["solid", "solid", "stripes", "checker", "mottled"])
    if kind == "solid":
        return np.broadcast_to(base, (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 10)
        weight = (np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period) > 0).astype(np.float64)
    elif kind == "checker":
        cell = int(rng.integers(3, 8))
        weight = ((xx // cell + yy // cell) % 2).astype(np.float64)
    else:
        weight = _smooth_noise(rng, height, width, cells=6)
    return base * (1 - weight[..., None]) + other * weight[..., None]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], (H, W): a random grid upsampled bilinearly."""
    grid = Image.fromarray((rng.uniform(0, 255, size=(cells, cells))).astype(np.uint8))
    return np.asarray(grid.resize((width, height), Image.BILINEAR), dtype=np.float64) / 255.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.choice(["gradient", "blotches", "stripes"])
    a, b = _random_colour(rng), _random_colour(rng)
    if kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == "blotches":
        t = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 9)))
    else:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        theta, period = rng.uniform(0, np.pi), rng.uniform(12, 40)
        t = 0.5 + 0.5 * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
    image = a * (1 - t[..., None]) + b * t[..., None]
    return image + rng.normal(0, rng.uniform(2, 12), size=image.shape)


def _clutter(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Distractor strokes: lines, arcs and scribbles, thin enough to be no shape of any class."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(count):
        colour = tuple(int(c) for c in _random_colour(rng))
        stroke = int(rng.integers(1, 4))
        kind = rng.choice(["line", "arc", "scribble"])
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        if kind == "line":
            length, theta = rng.uniform(10, 0.6 * width), rng.uniform(0, 2 * np.pi)
            draw.line([(x0, y0), (x0 + length * np.cos(theta), y0 + length * np.sin(theta))], fill=colour, width=stroke)
        elif kind == "arc":
            r = rng.uniform(6, 0.3 * width)
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(40, 200), fill=colour, width=stroke)
        else:
            steps = rng.normal(0, 6, size=(int(rng.integers(4, 10)), 2)).cumsum(axis=0) + np.array([x0, y0])
            draw.line([tuple(p) for p in steps], fill=colour, width=stroke)


def render_image(rng: np.random.Generator, config: SyntheticConfig) -> tuple[Image.Image, list[dict]]:
    """Draw one image.

    Args:
        rng: the image's own generator.
        config: sizes, classes, object counts and clutter.

    Returns:
        (RGB image, objects), objects as dicts with "class" (name), "bbox" ([x, y, w, h] of the
        visible pixels) and "area" (visible pixel count).
    """
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    width = max(32, int(round(config.image_size * math.sqrt(aspect))))
    height = max(32, int(round(config.image_size / math.sqrt(aspect))))
    canvas = _background(rng, height, width)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(rng, image, config.clutter)
    canvas = np.asarray(image, dtype=np.float64).copy()

    owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows
    full_area: list[int] = []
    kinds: list[str] = []
    short = min(width, height)
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        kind = config.classes[int(rng.integers(len(config.classes)))]
        size = int(round(rng.uniform(*config.object_size) * short))
        angle, stretch = rng.uniform(0, 360), rng.uniform(0.7, 1.0)
        texture = _texture(rng, height, width)
        for _try in range(PLACEMENT_TRIES):
            center = (rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2))
            mask = _shape_mask(kind, size, center, angle, stretch, width, height)
            if mask.sum() < MIN_PIXELS:
                break
            # Drawing here must leave every earlier object at least MIN_VISIBLE visible.
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(kinds))
            visible = np.bincount(owner[owner >= 0], minlength=len(kinds))
            if all(visible[i] - covered[i] >= MIN_VISIBLE * full_area[i] for i in range(len(kinds))):
                owner[mask] = len(kinds)
                canvas[mask] = texture[mask]
                full_area.append(int(mask.sum()))
                kinds.append(kind)
                break

    canvas += rng.normal(0, 3, size=canvas.shape)  # sensor noise over everything
    objects = []
    for index, kind in enumerate(kinds):
        ys, xs = np.nonzero(owner == index)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"class": kind, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs))})
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), objects


# ------------------------------------------------------------------------------------------------
# Writing the dataset
# ------------------------------------------------------------------------------------------------


def _image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, {"train": 0, "val": 1}[split], index])


def write_split(folder: Path, split: str, count: int, config: SyntheticConfig, progress: bool = False) -> Path:
    """Draw `count` images into folder/split and write folder/annotations/instances_<split>.json.

    Returns:
        The annotation file.
    """
    images_dir = folder / split
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(config.classes)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    indices = range(count)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"make-data {split}", unit="img", leave=False)
    for index in indices:
        rng = np.random.default_rng(_image_seed(config.seed, split, index))
        image, objects = render_image(rng, config)
        file_name = f"{index:06d}.jpg"
        image.save(images_dir / file_name, quality=JPEG_QUALITY)
        images.append({"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_id[obj["class"]],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    annotation_file = folder / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "description": "ssimkd synthetic shapes",
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(config),
    }
    annotation_file.write_text(
        json.dumps(
            {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        )
    )
    return annotation_file


def files_of(folder: Path) -> DatasetFiles:
    folder = Path(folder)
    return DatasetFiles(
        folder / "train",
        folder / "annotations" / "instances_train.json",
        folder / "val",
        folder / "annotations" / "instances_val.json",
    )


def make_dataset(folder: Path, config: SyntheticConfig, progress: bool = False, replace: bool = False) -> DatasetFiles:
    """Write the synthetic dataset (train and val splits) into folder, atomically.

    It is drawn into a temporary sibling folder and renamed into place, so a reader (another
    process, another DDP rank) never sees a half-written dataset.

    Args:
        folder: where the dataset goes.
        config: what to draw.
        progress: show a progress bar.
        replace: replace an existing folder (else one that appeared meanwhile is kept, ours dropped).

    Returns:
        The dataset's files.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset is for everyone who shares the cache
    try:
        write_split(staging, "train", config.num_train, config, progress)
        write_split(staging, "val", config.num_val, config, progress)
        if folder.exists() and replace:
            shutil.rmtree(folder)
        if folder.exists():
            shutil.rmtree(staging)  # another process finished first; its copy is identical
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files_of(folder)


def cache_folder(config: SyntheticConfig, root: str | Path | None = None) -> Path:
    """The folder of one synthetic dataset: named by a hash of everything that shapes its content."""
    key = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(config)}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(root or cache_root()) / f"synthetic-{digest}"


def ensure_dataset(data: DataConfig, progress: bool = False) -> DatasetFiles:
    """The files of the configured dataset; the synthetic one is generated on first use.

    Raises:
        FileNotFoundError: a configured COCO path does not exist (the message names it).
    """
    if data.source == "coco":
        files = DatasetFiles(
            Path(data.train_images), Path(data.train_annotations), Path(data.val_images), Path(data.val_annotations)
        )
        for name, path in dataclasses.asdict(files).items():
            if not Path(path).exists():
                raise FileNotFoundError(f"data.{name}: {path} does not exist")
        return files
    folder = cache_folder(data.synthetic, data.root or None)
    if not files_of(folder).val_annotations.exists():
        try:
            make_dataset(folder, data.synthetic, progress)
        except OSError:
            # Another process may have renamed its copy into place first; that copy is as good.
            if not files_of(folder).val_annotations.exists():
                raise
    return files_of(folder)


def run_make_data(config: DataConfig, out=None, *, progress: bool = True) -> DatasetFiles:
    """`ssimkd make-data`: write the synthetic dataset to out (replacing it), or into the cache.

    Returns:
        The dataset's files (print them, or point data.source = "coco" at them).
    """
    if out:
        return make_dataset(Path(out), config.synthetic, progress=progress, replace=True)
    return ensure_dataset(dataclasses.replace(config, source="synthetic"), progress=progress)
