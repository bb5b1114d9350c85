"""What every bench script shares: timing (CUDA events or the wall clock), peak memory, the
environment record, and the JSON naming of results in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from ssimkd_kernels.ops import cpu_isa

HERE = Path(__file__).resolve().parent

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
        info.update(
            device_name=props.name, sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1)
        )
        try:
            smi = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[0]
            )
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
        isa = cpu_isa()
        # Wall clock on a CPU shared with other work is noisy: the load next to the numbers says how much.
        info.update(
            load_average=[round(v, 2) for v in os.getloadavg()],
            cpu_isa=isa,
            device_name=f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads"
            + (f", {isa})" if isa else ")"),
        )
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def write_json(result: dict, out_dir: Path, prefix: str) -> Path:
    """out_dir/<prefix>-<device>-<date>.json; every bench script names its results this way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device_tag = "".join(c if c.isalnum() else "-" for c in result["environment"]["device_name"]).strip("-")[:40]
    path = out_dir / f"{prefix}-{device_tag}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
