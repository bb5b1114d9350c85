"""Does the trainer's memory grow over a long run? Trains with SSIM KD and reads the resident memory
(and the CUDA allocator's peak on a GPU) that every metrics.jsonl record carries.

    python bench/trainer_memory.py --steps 1000

The default is a small synthetic setting (64-px images, R18 student, untrained R18 teacher: memory
behaviour does not depend on what the weights learned). Reports the memory after the warm-up
(first 10 % of steps), at the end, and the least-squares growth per 1000 steps over the remaining
records; writes bench/results/trainer-memory-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import device_description, git_commit, write_json  # noqa: E402

from ssimkd_kernels.distill.checkpoint import save_detector  # noqa: E402
from ssimkd_kernels.distill.config import load_config  # noqa: E402
from ssimkd_kernels.distill.data import build_dataset  # noqa: E402
from ssimkd_kernels.distill.models import build_detector  # noqa: E402
from ssimkd_kernels.distill.runtime import resolve_device  # noqa: E402
from ssimkd_kernels.distill.synthetic import ensure_dataset  # noqa: E402
from ssimkd_kernels.distill.train import train  # noqa: E402

SMALL = [
    "data.synthetic.image_size=64",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=8",
    "data.min_size=64",
    "data.max_size=86",
    "model.fpn_channels=16",
    "model.anchor_sizes=[8, 16, 32, 64, 128]",
    "train.batch_size=4",
    "train.warmup_steps=10",
    "train.lr=0.005",
    "train.progress=false",
    "eval.after_train=false",
]


def growth_per_1000(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of values against steps, times 1000."""
    n = len(steps)
    mean_s, mean_v = sum(steps) / n, sum(values) / n
    var = sum((s - mean_s) ** 2 for s in steps)
    return 1000 * sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values)) / var if var else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides (section.field=value)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        base = SMALL + [
            f"data.root={work / 'data'}",
            f"train.steps={args.steps}",
            f"train.log_every={args.log_every}",
            "train.checkpoint_every=0",
            *args.set,
        ]
        config = load_config(None, base + [f"train.out={work / 'teacher'}"])
        dataset = build_dataset(ensure_dataset(config.data), "train", config.data)
        torch.manual_seed(1)
        teacher = build_detector(config.model, dataset.num_classes(), min_size=64, max_size=86)
        save_detector(work / "teacher.pt", teacher, config, dataset.categories)
        config = load_config(
            None, base + [f"train.out={work / 'run'}", "kd.mode=ssim", f"kd.teacher={work / 'teacher.pt'}"]
        )
        train(config)
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
    records = [r for r in records if "mem_rss_mb" in r]
    settled = [r for r in records if r["step"] > args.steps // 10]
    keys = [k for k in ("mem_rss_mb", "mem_cuda_peak_mb") if k in records[0]]
    summary = {}
    for key in keys:
        steps, values = [r["step"] for r in settled], [r[key] for r in settled]
        summary[key] = {
            "after_warmup": values[0],
            "end": values[-1],
            "max": max(values),
            "growth_per_1000_steps": growth_per_1000(steps, values),
        }
        print(
            f"{key}: {values[0]:.1f} MiB at step {steps[0]}, {values[-1]:.1f} at step {steps[-1]} "
            f"(max {max(values):.1f}); growth {summary[key]['growth_per_1000_steps']:+.2f} MiB per 1000 steps"
        )
    device = resolve_device(config.train.device)
    result = {
        "benchmark": "trainer-memory",
        "date": _dt.datetime.now().strftime("%Y-%m-%d"),
        "git_commit": git_commit(),
        "environment": device_description(device),
        "steps": args.steps,
        "overrides": [o for o in base[len(SMALL) :] if not o.startswith("data.root=")] + ["kd.mode=ssim"],
        "summary": summary,
        "records": [{"step": r["step"], **{k: r[k] for k in keys}} for r in records],
    }
    if not args.no_save:
        print(f"wrote {write_json(result, Path(args.out), 'trainer-memory')}")
    return result


if __name__ == "__main__":
    main()
