"""COCO-format detection data: the dataset, its transforms, a resumable sampler and the loaders.

Images are resized here, once, keeping the aspect ratio (shorter side to min_size unless the longer
side would pass max_size), and the detector is built with the same sizes, so its own transform does
not resize again. Training images are flipped horizontally with probability data.flip; the flip is
drawn from (seed, epoch, index), never from a global generator, so it does not depend on the
number of loader workers and a resumed run sees exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import DataConfig


class DataError(RuntimeError):
    """An image or annotation file that cannot be read; the message names the file."""


# What the loader reads from each entry of an instances json.
_REQUIRED_FIELDS = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _load_annotations(path: Path) -> dict:
    """The parsed instances json, checked for the keys the loader needs."""
    try:
        with open(path) as f:
            coco = json.load(f)
    except FileNotFoundError as error:
        raise DataError(f"annotation file {path} does not exist") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(coco, dict):
        raise DataError(f"annotation file {path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"annotation file {path}: missing or malformed {key!r} list")
    for key, fields in _REQUIRED_FIELDS.items():
        for position, entry in enumerate(coco[key]):
            missing = [name for name in fields if not isinstance(entry, dict) or name not in entry]
            if missing:
                raise DataError(f"annotation file {path}: {key}[{position}] lacks {missing}")
    for position, ann in enumerate(coco["annotations"]):
        if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
            raise DataError(f"annotation file {path}: annotations[{position}] bbox {ann['bbox']!r} is not [x, y, w, h]")
    return coco


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances file, resized for a detector.

    Category ids are mapped to contiguous labels 1..K in the order of `categories` (0 is left to the
    background, as torchvision's detectors expect). Crowd annotations and boxes narrower than one
    pixel are not training targets.

    Args:
        images: folder of the image files.
        annotations: the instances json.
        min_size, max_size: aspect-preserving resize target.
        flip: probability of a horizontal flip (0 for evaluation).
        seed: seed of the flips.
        on_broken: what an unreadable image does: "raise" a DataError naming the file, "replace" it by
            the next readable image (training: batches stay full), or "drop" it (evaluation); the
            last two warn once per file.

    Items: dataset[index] or dataset[(index, epoch)] -> (image float (3, H, W) in [0, 1], target) with
    target keys boxes (n, 4) xyxy in resized pixels, labels (n,), image_id, scale (resized / original).
    """

    def __init__(
        self,
        images,
        annotations,
        *,
        min_size: int,
        max_size: int,
        flip: float = 0.0,
        seed: int = 0,
        on_broken: str = "raise",
    ):
        if on_broken not in ("raise", "replace", "drop"):
            raise ValueError(f"on_broken must be 'raise', 'replace' or 'drop', got {on_broken!r}")
        self.images_dir = Path(images)
        self.annotation_file = Path(annotations)
        self.min_size, self.max_size = min_size, max_size
        self.flip, self.seed, self.on_broken = flip, seed, on_broken
        coco = _load_annotations(self.annotation_file)
        self.categories = coco["categories"]
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.images = coco["images"]
        per_image: dict = {image["id"]: [] for image in self.images}
        for ann in coco["annotations"]:
            if ann["image_id"] not in per_image:
                raise DataError(
                    f"annotation file {self.annotation_file}: annotation {ann.get('id')} names "
                    f"image_id {ann['image_id']}, which is not in 'images'"
                )
            if ann["category_id"] not in self.label_of:
                raise DataError(
                    f"annotation file {self.annotation_file}: annotation {ann.get('id')} has "
                    f"category_id {ann['category_id']}, which is not in 'categories'"
                )
            per_image[ann["image_id"]].append(ann)
        self.annotations = per_image
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.images)

    def portrait(self) -> list[bool]:
        """Whether each image is taller than wide (from the json's sizes; unknown sizes count as landscape)."""
        return [image.get("height", 0) > image.get("width", 0) for image in self.images]

    def num_classes(self) -> int:
        """Classes of a torchvision detector for this dataset: K categories plus background."""
        return len(self.categories) + 1

    def _read(self, index: int) -> Image.Image:
        path = self.images_dir / self.images[index]["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read image {path}: {error}") from error

    def _target_boxes(self, index: int):
        boxes, labels = [], []
        for ann in self.annotations[self.images[index]["id"]]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            image = self._read(index)
        except DataError as error:
            if self.on_broken == "raise":
                raise
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping: {error}", stacklevel=2)
            if self.on_broken == "drop" or len(self._warned) == len(self):
                return None  # the collate drops it
            return self[((index + 1) % len(self), epoch)]
        boxes, labels = self._target_boxes(index)
        height, width = self.resized_shape(image.height, image.width)
        scale_x, scale_y = width / image.width, height / image.height
        image = image.resize((width, height), Image.BILINEAR)
        boxes = boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y])
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if self.flip > 0 and np.random.default_rng([self.seed, epoch, index]).random() < self.flip:
            tensor = tensor.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(self.images[index]["id"]),
            "scale": torch.tensor([scale_x, scale_y, scale_x, scale_y]),
        }
        return tensor, target


def collate(batch):
    """Lists of images and targets (detectors take lists of differently sized images); drops None."""
    batch = [item for item in batch if item is not None]
    return [image for image, _ in batch], [target for _, target in batch]


# Batches are grouped by orientation within windows of this many batches (see ResumableSampler).
GROUP_WINDOW = 8


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch), groups images by orientation, and can start mid-epoch.

    The order of an epoch depends only on (seed, epoch), as in DistributedSampler. Within each window
    of GROUP_WINDOW batches of this rank's share, landscape images come before portrait ones, so most
    batches hold one orientation and are padded less (torchvision's detectors pad a batch to its
    largest height and width). `start` skips the first items of the epoch: how a resumed run
    continues the interrupted epoch.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.portrait = dataset.portrait()
        self.window = batch_size * GROUP_WINDOW
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        grouped = []
        for begin in range(0, len(indices), self.window):
            grouped += sorted(indices[begin : begin + self.window], key=lambda i: self.portrait[i])  # stable
        return iter([(i, self.epoch) for i in grouped[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def train_loader(
    dataset: CocoDetection, *, batch_size: int, num_workers: int, num_replicas: int, rank: int, seed: int
) -> DataLoader:
    """A loader of full batches whose sampler is a ResumableSampler.

    The loader gets its own torch.Generator: without one, creating each epoch's iterator draws from
    the global RNG, which would make a resumed run's random stream differ from an uninterrupted one.
    """
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed, batch_size=batch_size)
    if len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} training images over {num_replicas} process(es) do not fill a batch of {batch_size}"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def steps_per_epoch(loader: DataLoader) -> int:
    sampler = loader.sampler
    return sampler.num_samples // loader.batch_size


def eval_loader(dataset: CocoDetection, *, batch_size: int, num_workers: int, max_images: int = 0) -> DataLoader:
    """A loader over the validation images in file order (the first max_images if > 0)."""
    subset = dataset if max_images <= 0 else torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)


def build_dataset(files, split: str, data: DataConfig, *, seed: int = 0) -> CocoDetection:
    """The train split (with flips) or the val split (without) of a DatasetFiles."""
    images, annotations = (
        (files.train_images, files.train_annotations) if split == "train" else (files.val_images, files.val_annotations)
    )
    on_broken = "raise" if not data.skip_broken else "replace" if split == "train" else "drop"
    return CocoDetection(
        images,
        annotations,
        min_size=data.min_size,
        max_size=data.max_size,
        flip=data.flip if split == "train" else 0.0,
        seed=seed,
        on_broken=on_broken,
    )
