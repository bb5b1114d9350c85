"""The training-step view: what distillation adds to a detector's step, per KD mode.

    python bench/bench_train_step.py                        # CPU: small images and FPN
    python bench/bench_train_step.py --device cuda --size 800,1333 --batch 2 --fpn-channels 256 --amp bf16

Times a full student step (forward, loss, backward, SGD) of a torchvision detector distilled from a
frozen teacher, for: no KD, L2 KD, SSIM KD with the plain-PyTorch reference, SSIM KD with the fused
kernels (backend "auto"). The models are randomly initialised and the batch is random images with a
few random boxes: step time does not depend on what the weights have learned. Reports the median
and 20/80 % quantiles of the step time, each mode's ratio to L2 KD, and writes
bench/results/train-step-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import device_description, git_commit, quantile, write_json  # noqa: E402

from ssimkd_kernels.distill.config import KDConfig, ModelConfig  # noqa: E402
from ssimkd_kernels.distill.kd import Distiller, build_feature_loss  # noqa: E402
from ssimkd_kernels.distill.models import build_detector, freeze  # noqa: E402

MODES = {
    "none": ("none", "auto"),
    "l2": ("l2", "auto"),
    "ssim-reference": ("ssim", "reference"),
    "ssim-fused": ("ssim", "auto"),
}


def random_batch(batch: int, height: int, width: int, num_classes: int, device, generator):
    """Images in [0, 1] and 3 boxes per image, at least 8 pixels a side."""
    images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        corner = torch.rand(3, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        extent = 8 + torch.rand(3, 2, generator=generator) * torch.tensor([width * 0.3, height * 0.3])
        boxes = torch.cat([corner, corner + extent], dim=1)
        labels = torch.randint(1, num_classes, (3,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def time_steps(distiller: Distiller, batch, *, steps: int, warmup: int, amp_dtype) -> list[float]:
    """Seconds of each training step after the warm-up (the device synchronised around each)."""
    device = batch[0][0].device
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            det_losses, feature_loss = distiller(*batch)
        loss = sum(det_losses.values()) + (0 if feature_loss is None else feature_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--family", default="retinanet", choices=["retinanet", "faster_rcnn"])
    parser.add_argument("--student-depth", type=int, default=18)
    parser.add_argument("--teacher-depth", type=int, default=50)
    parser.add_argument("--size", default=None, help="H,W of the batch (default 800,1333 on GPU, 256,341 on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fpn-channels", type=int, default=None, help="default 256 on GPU, 64 on CPU")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    height, width = map(int, (args.size or ("800,1333" if on_gpu else "256,341")).split(","))
    fpn = args.fpn_channels or (256 if on_gpu else 64)
    steps = args.steps or (30 if on_gpu else 8)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    num_classes = 81

    def detector(depth: int, seed: int):
        torch.manual_seed(seed)
        config = ModelConfig(family=args.family, depth=depth, fpn_channels=fpn)
        return build_detector(config, num_classes, min_size=min(height, width), max_size=max(height, width)).to(device)

    teacher = freeze(detector(args.teacher_depth, 1))
    batch = random_batch(args.batch, height, width, num_classes, device, torch.Generator().manual_seed(0))
    environment = device_description(device)
    rows = []
    for name in args.modes.split(","):
        mode, backend = MODES[name]
        student = detector(args.student_depth, 0).train()
        feature_loss = build_feature_loss(
            KDConfig(mode=mode, backend=backend), student_channels=fpn, teacher_channels=fpn, num_levels=5
        )
        if feature_loss is not None:
            feature_loss = feature_loss.to(device)
        distiller = Distiller(student, feature_loss, teacher if mode != "none" else None)
        times = time_steps(distiller, batch, steps=steps, warmup=args.warmup, amp_dtype=amp_dtype)
        rows.append(
            {
                "mode": name,
                "median_s": quantile(times, 0.5),
                "q20_s": quantile(times, 0.2),
                "q80_s": quantile(times, 0.8),
                "steps": len(times),
            }
        )
        del distiller, student, feature_loss
    l2 = next((r["median_s"] for r in rows if r["mode"] == "l2"), None)
    print(
        f"\n{args.family} R{args.student_depth} student / R{args.teacher_depth} teacher, batch {args.batch} "
        f"at {height}x{width}, FPN {fpn}, amp {args.amp}, on {environment['device_name']}"
    )
    print(f"{'mode':<16} {'step ms':>9} {'20-80 %':>17} {'vs L2':>7}")
    for row in rows:
        row["vs_l2"] = row["median_s"] / l2 if l2 else None
        ratio = "" if row["vs_l2"] is None else f"{row['vs_l2']:.3f}x"
        print(
            f"{row['mode']:<16} {1e3 * row['median_s']:>9.1f} "
            f"{1e3 * row['q20_s']:>8.1f}-{1e3 * row['q80_s']:<8.1f} {ratio:>7}"
        )
    result = {
        "benchmark": "train-step",
        "date": _dt.datetime.now().strftime("%Y-%m-%d"),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "environment": environment,
        "setting": {
            "family": args.family,
            "student_depth": args.student_depth,
            "teacher_depth": args.teacher_depth,
            "batch": args.batch,
            "size": [height, width],
            "fpn_channels": fpn,
            "amp": args.amp,
            "warmup": args.warmup,
        },
        "rows": rows,
    }
    if not args.no_save:
        print(f"wrote {write_json(result, Path(args.out), 'train-step')}")
    return result


if __name__ == "__main__":
    main()
