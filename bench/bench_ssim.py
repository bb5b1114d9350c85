"""Speed and memory of SSIM-KD: every backend of the project and the peers a user would pick instead.

    python bench/bench_ssim.py --workload small --device cpu
    python bench/bench_ssim.py --workload retinanet --device cuda --dtype float32,bfloat16

For each candidate and mode (fwd, fwd+bwd): warm-up, then the median and 20/80 % quantiles of many
repetitions (CUDA events on a GPU, with L2 flushed between repetitions; wall clock on the CPU), the
achieved GB/s and GFLOP/s by SPEC section 4's per-element floors, time / floor where the device's
peaks are known, and the peak extra memory (allocator peak minus what was allocated before; GPU only).
Prints a fixed-width table and writes bench/results/<workload>-<device>-<date>.json and a PNG made
from that JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import device_description, git_commit, measure, peak_extra_memory_mb, quantile, write_json  # noqa: E402
from peers import peer_candidates  # noqa: E402
from workloads import FLOOR_BYTES, FLOOR_FLOPS, WORKLOADS, device_peaks  # noqa: E402

import ssimkd_kernels as sk  # noqa: E402
from ssimkd_kernels.reference import ssim_kd_loss_reference, ssim_map_reference  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Candidates: name -> fn(students, teachers) -> scalar loss
# ------------------------------------------------------------------------------------------------


def project_candidates(device: torch.device, workload: str) -> dict:
    """The project's backends that run on `device`, plus the reference under torch.compile.

    FPN workloads measure ssim_kd_loss; the "image" workload measures 1 - ssim(x, y) with zero
    padding (fused-ssim's convention), the quantity the image-SSIM peers compute.
    """

    def objective(backend_or_fn):
        if workload == "image":
            return lambda s, t: 1 - sk.ssim(s[0], t[0], padding="zero", backend=backend_or_fn)
        return lambda s, t: sk.ssim_kd_loss(s, t, backend=backend_or_fn)

    found = {}
    for backend in sk.available_backends():
        if backend == "cpu" and device.type != "cpu":
            continue
        if backend == "cuda" and device.type != "cuda":
            continue
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timing
        found[backend] = objective(backend)
    if workload == "image":
        compiled = torch.compile(lambda x, y: 1 - ssim_map_reference(x, y, padding="zero").mean(), dynamic=False)
        found["reference+compile"] = lambda s, t: compiled(s[0], t[0])
        # The image entry points as their users call them (backend "auto"): fused-ssim's call, the 3DGS
        # loss, MS-SSIM (peers: pytorch-msssim's ssim and ms_ssim, L1 + its ssim).
        found["sk.fused_ssim"] = lambda s, t: 1 - sk.fused_ssim(s[0], t[0], padding="same")
        found["sk.l1_ssim_loss"] = lambda s, t: sk.l1_ssim_loss(s[0], t[0], ssim_weight=0.2)
        # the same loss with its L1 term in torch beside the fused SSIM: what the fused term saves
        found["sk.ssim + L1 in torch"] = lambda s, t: (
            0.8 * (s[0] - t[0]).abs().mean() + 0.2 * (1 - sk.ssim(s[0], t[0], padding="zero"))
        )
        found["sk.ms_ssim"] = lambda s, t: 1 - sk.ms_ssim(s[0], t[0], data_range=1.0)
    else:
        compiled = torch.compile(ssim_kd_loss_reference, dynamic=False)
        found["reference+compile"] = lambda s, t: compiled(s, t)
    return found


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def _timed_calls(loss_fn, students, teachers):
    """The two calls a row times: the forward without autograd, and forward + backward."""

    def forward():
        with torch.no_grad():
            return loss_fn(students, teachers)

    def forward_backward():
        loss = loss_fn(students, teachers)
        loss.backward()
        for s in students:
            s.grad = None

    return forward, forward_backward


def run(workload_name, device, dtype, candidates, modes, *, warmup, repeats, flush, on_row=None) -> list[dict]:
    """One row per candidate and mode; on_row(rows so far) is called after each row (see --incremental)."""
    workload = WORKLOADS[workload_name]
    image_like = workload_name == "image"
    elements = workload.elements
    peaks = device_peaks(device_description(device)["device_name"]) if device.type == "cuda" else None
    rows = []
    for name, loss_fn in candidates.items():
        students, teachers = workload.make(device, dtype, unit_range=image_like)
        forward, forward_backward = _timed_calls(loss_fn, students, teachers)
        for mode in modes:
            fn = forward if mode == "fwd" else forward_backward
            try:
                times = measure(fn, device, warmup=warmup, repeats=repeats, flush=flush)
                memory = peak_extra_memory_mb(fn, device)
            except Exception as error:  # a peer that cannot run this case is reported, not fatal
                rows.append(
                    {
                        "candidate": name,
                        "mode": mode,
                        "dtype": str(dtype).replace("torch.", ""),
                        "error": f"{type(error).__name__}: {error}"[:200],
                    }
                )
                if on_row is not None:
                    on_row(rows)
                continue
            median = statistics.median(times)
            seconds = median / 1e3
            row = {
                "candidate": name,
                "mode": mode,
                "dtype": str(dtype).replace("torch.", ""),
                "median_ms": median,
                "p20_ms": quantile(times, 0.2),
                "p80_ms": quantile(times, 0.8),
                "repeats": repeats,
                "gbps": FLOOR_BYTES[mode] * elements / seconds / 1e9,
                "gflops": FLOOR_FLOPS[mode] * elements / seconds / 1e9,
                "peak_extra_mb": memory,
            }
            if peaks is not None:
                bandwidth, flops = peaks
                floor = max(FLOOR_BYTES[mode] * elements / bandwidth, FLOOR_FLOPS[mode] * elements / flops)
                row["floor_ms"] = floor * 1e3
                row["time_over_floor"] = seconds / floor
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    # Speed-up against the eager reference of the same mode and dtype.
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["candidate"] == "reference"
                and r["mode"] == row["mode"]
                and r["dtype"] == row["dtype"]
                and "median_ms" in r
            ),
            None,
        )
        if base is not None and "median_ms" in row:
            row["speedup_vs_reference"] = base["median_ms"] / row["median_ms"]
    return rows


def _result(workload: str, environment: dict, rows: list[dict]) -> dict:
    """The JSON record of one workload's rows."""
    return {
        "workload": workload,
        "workload_description": WORKLOADS[workload].description,
        "elements": WORKLOADS[workload].elements,
        "date": _dt.datetime.now().strftime("%Y-%m-%d"),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "environment": environment,
        "floors_per_element": {"bytes": FLOOR_BYTES, "flops": FLOOR_FLOPS},
        "rows": rows,
    }


def _write_partial(workload, environment, earlier_rows, out_dir, dtype_rows) -> None:
    """--incremental: the JSON rewritten after every row (earlier dtypes' rows, then this dtype's)."""
    write_json(_result(workload, environment, earlier_rows + dtype_rows), out_dir, workload)


def format_table(rows) -> str:
    header = (
        f"{'candidate':<22} {'mode':<8} {'dtype':<9} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>8} "
        f"{'GFLOP/s':>9} {'x floor':>8} {'vs ref':>7} {'extra MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['candidate']:<22} {r['mode']:<8} {r['dtype']:<9} failed: {r['error']}")
            continue
        floor = f"{r['time_over_floor']:.2f}" if "time_over_floor" in r else "-"
        memory = f"{r['peak_extra_mb']:.1f}" if r.get("peak_extra_mb") is not None else "-"
        speedup = f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-"
        lines.append(
            f"{r['candidate']:<22} {r['mode']:<8} {r['dtype']:<9} {r['median_ms']:>10.3f} "
            f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f} {r['gbps']:>8.1f} {r['gflops']:>9.1f} {floor:>8} "
            f"{speedup:>7} {memory:>10}"
        )
    return "\n".join(lines)


def save(result: dict, out_dir: Path, png: bool) -> Path:
    path = write_json(result, out_dir, result["workload"])
    if png:
        from plot import plot_result

        plot_result(path, path.with_suffix(".png"))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small", help="small, retinanet, image, or a comma list")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--candidates", default="all", help="comma list of backends/peers, or 'all'")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-flush", action="store_true", help="do not flush the L2 between repetitions")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="rewrite the JSON after every row, so a run stopped midway keeps what it measured",
    )
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 3)
    repeats = args.repeats if args.repeats is not None else (100 if device.type == "cuda" else 15)
    modes = args.modes.split(",")
    environment = device_description(device)
    saved = []
    for workload in args.workload.split(","):
        rows = []
        for dtype_name in args.dtype.split(","):
            candidates = project_candidates(device, workload)
            if not args.no_peers:
                candidates.update(peer_candidates(device, workload))
            if args.candidates != "all":
                wanted = args.candidates.split(",")
                candidates = {k: v for k, v in candidates.items() if k in wanted}
            on_row = None
            if args.incremental and not args.no_save:
                on_row = functools.partial(_write_partial, workload, environment, list(rows), Path(args.out))
            dtype_rows = run(
                workload,
                device,
                getattr(torch, dtype_name),
                candidates,
                modes,
                warmup=warmup,
                repeats=repeats,
                flush=not args.no_flush,
                on_row=on_row,
            )
            print(
                f"\n{WORKLOADS[workload].description} ({WORKLOADS[workload].elements:,} elements per input), "
                f"{dtype_name}, on {environment['device_name']}"
            )
            print(format_table(dtype_rows))
            rows += dtype_rows
        result = _result(workload, environment, rows)
        if not args.no_save:
            saved.append(save(result, Path(args.out), png=not args.no_png))
    for path in saved:
        print(f"wrote {path}")
    return saved


if __name__ == "__main__":
    main()
