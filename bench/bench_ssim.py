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
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ssimkd_kernels as sk  # noqa: E402
from ssimkd_kernels.reference import ssim_kd_loss_reference, ssim_map_reference  # noqa: E402
from workloads import FLOOR_BYTES, FLOOR_FLOPS, WORKLOADS, device_peaks  # noqa: E402

from peers import peer_candidates  # noqa: E402


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
        compiled = torch.compile(
            lambda x, y: 1 - ssim_map_reference(x, y, padding="zero").mean(), dynamic=False
        )
        found["reference+compile"] = lambda s, t: compiled(s[0], t[0])
    else:
        compiled = torch.compile(ssim_kd_loss_reference, dynamic=False)
        found["reference+compile"] = lambda s, t: compiled(s, t)
    return found


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class _Flusher:
    """Overwrites a buffer larger than the GPU's L2 between repetitions, so no run starts warm."""

    def __init__(self, device):
        self.buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self):
        if self.buffer is not None:
            self.buffer.zero_()


def measure(fn, device, *, warmup: int, repeats: int, flush: bool) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after `warmup` calls."""
    flusher = _Flusher(device) if flush else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            flusher()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_extra_memory_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def device_description(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
            driver, sm_clock, mem_clock = (v.strip() for v in smi.split(","))
            info.update(driver=driver, max_sm_clock=sm_clock, max_mem_clock=mem_clock)
        except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
            pass
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        # The instruction set the cpu backend's kernels run with (SSIMKD_CPU_ISA caps it) names the row.
        isa = sk.ops.cpu_isa()
        # Wall clock on a CPU shared with other work is noisy: the load next to the numbers says how much.
        info.update(load_average=[round(v, 2) for v in os.getloadavg()], cpu_isa=isa,
                    device_name=f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads"
                    + (f", {isa})" if isa else ")"))
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def run(workload_name, device, dtype, candidates, modes, *, warmup, repeats, flush) -> list[dict]:
    workload = WORKLOADS[workload_name]
    image_like = workload_name == "image"
    elements = workload.elements
    peaks = device_peaks(device_description(device)["device_name"]) if device.type == "cuda" else None
    rows = []
    for name, loss_fn in candidates.items():
        students, teachers = workload.make(device, dtype, unit_range=image_like)

        def forward():
            with torch.no_grad():
                return loss_fn(students, teachers)

        def forward_backward():
            loss = loss_fn(students, teachers)
            loss.backward()
            for s in students:
                s.grad = None

        for mode in modes:
            fn = forward if mode == "fwd" else forward_backward
            try:
                times = measure(fn, device, warmup=warmup, repeats=repeats, flush=flush)
                memory = peak_extra_memory_mb(fn, device)
            except Exception as error:  # a peer that cannot run this case is reported, not fatal
                rows.append({"candidate": name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                             "error": f"{type(error).__name__}: {error}"[:200]})
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
    # Speed-up against the eager reference of the same mode and dtype.
    for row in rows:
        base = next((r for r in rows if r["candidate"] == "reference" and r["mode"] == row["mode"]
                     and r["dtype"] == row["dtype"] and "median_ms" in r), None)
        if base is not None and "median_ms" in row:
            row["speedup_vs_reference"] = base["median_ms"] / row["median_ms"]
    return rows


def format_table(rows) -> str:
    header = f"{'candidate':<22} {'mode':<8} {'dtype':<9} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>8} " \
             f"{'GFLOP/s':>9} {'x floor':>8} {'vs ref':>7} {'extra MiB':>10}"
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


def write_json(result: dict, out_dir: Path, prefix: str) -> Path:
    """out_dir/<prefix>-<device>-<date>.json; every bench script names its results this way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device_tag = "".join(c if c.isalnum() else "-" for c in result["environment"]["device_name"]).strip("-")[:40]
    path = out_dir / f"{prefix}-{device_tag}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


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
            dtype_rows = run(workload, device, getattr(torch, dtype_name), candidates, modes, warmup=warmup,
                             repeats=repeats, flush=not args.no_flush)
            print(f"\n{WORKLOADS[workload].description} ({WORKLOADS[workload].elements:,} elements per input), "
                  f"{dtype_name}, on {environment['device_name']}")
            print(format_table(dtype_rows))
            rows += dtype_rows
        result = {
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
        if not args.no_save:
            saved.append(save(result, Path(args.out), png=not args.no_png))
    for path in saved:
        print(f"wrote {path}")
    return saved


if __name__ == "__main__":
    main()
