"""`ssimkd demo`: the project's end-to-end job, SSIM-KD against L2-KD and no KD on one small task.

It makes the synthetic data, trains a teacher, then for every seed trains one student per KD mode,
all from the same initialisation, data order and flips (the seed fixes them), evaluates each on the
val split, prints a table (mAP per mode, the cost of distillation in step time) and writes
results.json and results.png into its output folder. Presets are TOML files in configs/:
demo-smoke (a couple of minutes on 2 CPU cores), demo (the default, under 30), demo-gpu.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .config import apply_overrides, load_config, to_dict
from .evaluate import METRICS
from .runtime import amp_dtype, resolve_device
from .synthetic import ensure_dataset
from .train import train

PRESETS = {"smoke": "demo-smoke", "default": "demo", "gpu": "demo-gpu"}


def _mean_std(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation, skipping None (a COCO metric without ground truth)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(value, width: int = 6) -> str:
    return f"{'n/a' if value is None else f'{value:.1f}':>{width}}"


def _feature_loss_seconds(config, student_file: Path) -> float:
    """Seconds of one forward + backward of the feature loss alone, on one training batch's real FPN
    outputs, in the precision training used (autocast on GPUs)."""
    from .data import build_dataset, collate
    from .kd import Distiller, build_feature_loss, time_feature_loss
    from .models import freeze, load_detector

    device = resolve_device(config.train.device)
    dtype = amp_dtype(config.train.amp, device)
    student, _ = load_detector(student_file, device)
    teacher, _ = load_detector(config.kd.teacher, device)
    feature_loss = build_feature_loss(
        config.kd,
        student_channels=student.backbone.out_channels,
        teacher_channels=teacher.backbone.out_channels,
        num_levels=len(config.model.anchor_sizes),
    ).to(device)
    distiller = Distiller(student, feature_loss, freeze(teacher))
    dataset = build_dataset(ensure_dataset(config.data), "train", config.data, seed=config.train.seed)
    images, _ = collate([dataset[i] for i in range(min(config.train.batch_size, len(dataset)))])
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        student_feats, teacher_feats = distiller.capture_features([image.to(device) for image in images])
        return time_feature_loss(feature_loss, student_feats, teacher_feats)


def _table(results: dict) -> str:
    """The fixed-width summary table printed at the end."""
    seeds = len(results["seeds"])
    lines = [
        f"{'mode':<6} {'AP':>12} {'AP50':>6} {'AP75':>6} {'APs':>6} {'APm':>6} {'vs none':>8} "
        f"{'step s':>7} {'teacher':>8} {'feat loss':>9}"
    ]
    teacher = results["teacher"]
    lines.append(
        f"{'teacher':<6} {_fmt(teacher['AP'], 12)} "
        + " ".join(_fmt(teacher[k]) for k in ("AP50", "AP75", "APs", "APm"))
        + f"  (R{teacher['depth']})"
    )
    base = results["modes"].get("none", {}).get("AP")
    for mode, row in results["modes"].items():
        ap = f"{row['AP']:.1f}" + (f" ± {row['AP_std']:.1f}" if row["AP_std"] is not None else "")
        delta = "" if mode == "none" or base is None else f"{row['AP'] - base:+.1f}"
        shares = [
            "-" if row[key] is None else f"{100 * row[key]:.1f}%" for key in ("teacher_share", "feature_loss_share")
        ]
        lines.append(
            f"{mode:<6} {ap:>12} "
            + " ".join(_fmt(row["metrics"][k]) for k in ("AP50", "AP75", "APs", "APm"))
            + f" {delta:>8} {row['time_step']:>7.3f} {shares[0]:>8} {shares[1]:>9}"
        )
    lines.append(
        f"AP: COCO box AP on val, mean ± sample std over {seeds} seed(s); 'teacher' and 'feat loss': "
        "share of the student's step time spent in the teacher's forward and in the feature loss "
        "(forward + backward)"
    )
    for name, pair in results["paired"].items():
        per_seed = ", ".join(f"{d:+.1f}" for d in pair["per_seed"])
        spread = "" if pair["std"] is None else f" ± {pair['std']:.2f}"
        lines.append(f"paired {name}: {pair['mean']:+.2f}{spread} AP (per seed: {per_seed})")
    return "\n".join(lines)


def run_demo(preset: str = "default", out="runs/demo", overrides=(), *, progress: bool = True) -> dict:
    """Run the demo preset and write results.json and results.png into out.

    Args:
        preset: "smoke", "default" or "gpu" (configs/demo-smoke.toml, demo.toml, demo-gpu.toml).
        out: output folder; one subfolder per training run.
        overrides: `section.field=value` strings applied to the preset.
        progress: progress bars.

    Returns:
        The results dict written to results.json.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    started = time.perf_counter()
    config = load_config(PRESETS[preset], list(overrides) + [f"train.progress={str(progress).lower()}"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.train.device)
    print(f"ssimkd demo, preset {preset!r}: {device}, {torch.get_num_threads()} threads; output in {out}")

    files = ensure_dataset(config.data, progress=progress)
    print(f"data: {files.train_annotations.parent.parent} ({time.perf_counter() - started:.0f} s)")

    teacher_config = apply_overrides(
        config,
        list(config.demo.teacher.items())
        + [("kd.mode", "none"), ("kd.teacher", ""), ("train.out", str(out / "teacher"))],
    )
    teacher_summary = train(teacher_config)
    teacher_file = out / "teacher" / "model.pt"
    print(f"teacher R{teacher_config.model.depth}: AP {teacher_summary['eval']['AP']:.1f}")

    runs: dict = {mode: [] for mode in config.demo.modes}
    for seed in config.demo.seeds:
        for mode in config.demo.modes:
            run_config = apply_overrides(
                config,
                [
                    ("kd.mode", mode),
                    ("kd.teacher", str(teacher_file) if mode != "none" else ""),
                    ("train.seed", seed),
                    ("train.out", str(out / f"{mode}-seed{seed}")),
                ],
            )
            summary = train(run_config)
            print(f"{mode} seed {seed}: AP {summary['eval']['AP']:.1f}")
            if mode != "none" and not runs[mode]:  # the feature loss's cost depends on shapes only: once per mode
                summary["feature_loss_seconds"] = _feature_loss_seconds(run_config, Path(summary["out"]) / "model.pt")
            runs[mode].append(summary)

    results = {
        "preset": preset,
        "seeds": list(config.demo.seeds),
        "student_depth": config.model.depth,
        "teacher": {"depth": teacher_config.model.depth, **teacher_summary["eval"]},
        "modes": {},
    }
    for mode, summaries in runs.items():
        per_seed = [s["eval"]["AP"] for s in summaries]
        ap, std = _mean_std(per_seed)
        step_time = statistics.fmean(s["time_step"] for s in summaries)
        row = {
            "AP": ap,
            "AP_std": std,
            "AP_per_seed": per_seed,
            "time_step": step_time,
            "metrics": {k: _mean_std([s["eval"][k] for s in summaries])[0] for k in METRICS},
            "teacher_share": None,
            "feature_loss_share": None,
        }
        if mode != "none":
            row["teacher_share"] = statistics.fmean(s["time_teacher"] for s in summaries) / step_time
            row["feature_loss_share"] = summaries[0]["feature_loss_seconds"] / step_time
        results["modes"][mode] = row
    # Same seed = same initialisation and data order, so per-seed differences pair up.
    results["paired"] = {}
    for a, b in (("ssim", "l2"), ("ssim", "none"), ("l2", "none"), ("l1", "none")):
        if a in runs and b in runs:
            diffs = [x["eval"]["AP"] - y["eval"]["AP"] for x, y in zip(runs[a], runs[b])]
            mean, std = _mean_std(diffs)
            results["paired"][f"{a} - {b}"] = {"mean": mean, "std": std, "per_seed": diffs}
    results["wall_time_s"] = time.perf_counter() - started
    results["environment"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    results["config"] = to_dict(config)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    from .plots import plot_demo

    plot_demo(results, out / "results.png")
    print()
    print(_table(results))
    print(f"\nwall time {results['wall_time_s'] / 60:.1f} min; wrote {out / 'results.json'} and {out / 'results.png'}")
    return results
