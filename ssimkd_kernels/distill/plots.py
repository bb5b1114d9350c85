"""PNG figures of the trainer: a run's loss curve and the demo's mAP per KD mode (matplotlib, no display)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_jsonl, png, *, title: str = "") -> None:
    """Total, detection and feature loss against step, from a metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    records = [r for r in records if "loss" in r]
    if not records:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    steps = [r["step"] for r in records]
    for key, label in (("loss", "total"), ("loss_det", "detection"), ("loss_feat", "feature (unweighted)")):
        if any(key in r for r in records):
            ax.plot(steps, [r.get(key, math.nan) for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_demo(results: dict, png) -> None:
    """Bar per KD mode (mean AP over seeds), a dot per seed, the teacher's AP as a dashed line."""
    plt = _pyplot()
    modes = list(results["modes"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    means = [results["modes"][m]["AP"] for m in modes]
    ax.bar(modes, means, color=["#999999", "#4c72b0", "#dd8452", "#55a868"][: len(modes)], alpha=0.8)
    for x, mode in enumerate(modes):
        per_seed = results["modes"][mode]["AP_per_seed"]
        ax.scatter([x] * len(per_seed), per_seed, color="black", s=12, zorder=3)
    ax.axhline(
        results["teacher"]["AP"],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"teacher R{results['teacher']['depth']} ({results['teacher']['AP']:.1f})",
    )
    ax.set_ylabel("COCO AP (val)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"student R{results['student_depth']}, {len(results['seeds'])} seed(s), preset {results['preset']}")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
