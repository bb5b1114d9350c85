"""COCO box mAP of a detector: predictions over the val split, scored by faster-coco-eval (or pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from torch import nn

# The six COCO summary numbers, in the order of COCOeval.stats.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: nn.Module, loader, categories: list[dict], *, device, amp_dtype=None, progress: bool = False):
    """COCO-format detections of every image of loader, boxes in original image pixels.

    Args:
        model: a torchvision detector (put in eval mode here).
        loader: yields (images, targets) with target["image_id"] and target["scale"].
        categories: the dataset's categories; label k is categories[k - 1].
        device: where the model runs; amp_dtype: autocast dtype or None.
        progress: show a progress bar.

    Returns:
        (detections as [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], evaluated image ids)
    """
    model.eval()
    detections, image_ids = [], []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="eval", unit="batch", leave=False)
    for images, targets in batches:
        if not images:
            continue
        images = [image.to(device) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        for output, target in zip(outputs, targets):
            image_ids.append(target["image_id"])
            boxes = output["boxes"].float().cpu() / target["scale"]  # back to the original image's pixels
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(
                boxes.tolist(), output["scores"].float().cpu().tolist(), output["labels"].tolist()
            ):
                detections.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": categories[label - 1]["id"],
                        "bbox": [round(v, 3) for v in box],
                        "score": round(score, 5),
                    }
                )
    return detections, image_ids


def _coco_api():
    """(COCO, COCOeval) of faster-coco-eval, else of pycocotools."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def coco_map(annotation_file, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCO box AP, AP50, AP75, APs, APm, APl (in percent) of detections over image_ids.

    A metric with no ground truth in its range (e.g. APl when no object is large; COCO's -1) is
    None; with no detections at all every metric is 0.
    """
    if not image_ids:
        raise ValueError("no image was evaluated")
    coco_cls, eval_cls = _coco_api()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary table
        ground_truth = coco_cls(str(annotation_file))
        if not detections:
            return {name: 0.0 for name in METRICS}
        results = ground_truth.loadRes(detections)
        evaluator = eval_cls(ground_truth, results, "bbox")
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (100.0 * float(v) if v >= 0 else None) for name, v in zip(METRICS, evaluator.stats[:6])}


def evaluate_detector(
    model: nn.Module,
    dataset,
    *,
    batch_size: int,
    max_images: int = 0,
    device=None,
    amp_dtype=None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """COCO metrics of model on a CocoDetection val dataset (see coco_map), plus "images"."""
    from .data import eval_loader

    device = device or next(model.parameters()).device
    loader = eval_loader(dataset, batch_size=batch_size, num_workers=num_workers, max_images=max_images)
    detections, image_ids = predict(
        model, loader, dataset.categories, device=device, amp_dtype=amp_dtype, progress=progress
    )
    metrics = coco_map(dataset.annotation_file, detections, image_ids)
    metrics["images"] = len(image_ids)
    return metrics


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{name} {'n/a' if metrics[name] is None else f'{metrics[name]:.1f}'}" for name in METRICS)


def run_eval(checkpoint, config_overrides=(), *, out_json=None, progress: bool = True) -> dict[str, float]:
    """`ssimkd eval`: load a detector file, evaluate it on the val split of its config (overridable).

    Args:
        checkpoint: model.pt or checkpoint.pt of a `ssimkd train` run.
        config_overrides: `section.field=value` strings applied to the saved config (e.g. another
            data.val_annotations, eval.max_images).
        out_json: also write the metrics there.

    Returns:
        The metrics dict.
    """
    from .config import apply_overrides, from_dict, validate
    from .data import build_dataset
    from .models import load_detector
    from .runtime import resolve_device
    from .synthetic import ensure_dataset

    device = resolve_device("auto")
    model, saved = load_detector(checkpoint, device)
    config = apply_overrides(from_dict(saved["config"]), list(config_overrides) + [("kd.mode", "none")])
    validate(config)
    files = ensure_dataset(config.data, progress=progress)
    dataset = build_dataset(files, "val", config.data)
    if [c["id"] for c in dataset.categories] != [c["id"] for c in saved["categories"]]:
        raise ValueError(
            f"the categories of {files.val_annotations} differ from those the model in {checkpoint} was trained on"
        )
    metrics = evaluate_detector(
        model,
        dataset,
        batch_size=config.eval.batch_size,
        max_images=config.eval.max_images,
        device=device,
        num_workers=config.data.num_workers,
        progress=progress,
    )
    if out_json:
        Path(out_json).write_text(json.dumps(metrics, indent=2))
    return metrics
