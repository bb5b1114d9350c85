"""A PNG chart of one bench result JSON: median time per candidate, one panel per mode and dtype."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_result(json_path, png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(json_path).read_text())
    rows = [r for r in result["rows"] if "median_ms" in r]
    panels = sorted({(r["mode"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 0.45 * max(4, len(rows) / max(1, len(panels))) + 1.8), squeeze=False
    )
    for ax, (mode, dtype) in zip(axes[0], panels):
        panel = sorted((r for r in rows if r["mode"] == mode and r["dtype"] == dtype), key=lambda r: r["median_ms"])
        names = [r["candidate"] for r in panel]
        values = [r["median_ms"] for r in panel]
        errors = [[r["median_ms"] - r["p20_ms"] for r in panel], [r["p80_ms"] - r["median_ms"] for r in panel]]
        colors = ["tab:blue" if r["candidate"] in ("cpu", "triton", "cuda") else "tab:gray" for r in panel]
        ax.barh(names, values, xerr=errors, color=colors)
        for y, r in enumerate(panel):
            label = f" {r['median_ms']:.3g} ms"
            if "speedup_vs_reference" in r:
                label += f" ({r['speedup_vs_reference']:.1f}x)"
            ax.text(r["median_ms"], y, label, va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("median time, ms (log)")
        ax.set_title(f"{mode}, {dtype}")
        ax.invert_yaxis()
    env = result["environment"]
    fig.suptitle(
        f"{result['workload_description']} on {env['device_name']} (torch {env['torch']}, "
        f"commit {result.get('git_commit')})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot_result(sys.argv[1], sys.argv[2])
