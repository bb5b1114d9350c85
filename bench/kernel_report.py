"""Static GPU report of the fused kernels, made without a GPU (SPEC section 4, issue 14).

    python bench/kernel_report.py                      # every configuration, sm_80 and sm_90
    python bench/kernel_report.py --arch 90 --default  # the default forward and backward only
    ssimkd kernels --arch 90                           # the same through the command line

For every Triton kernel configuration the loss launches (ssimkd_kernels.kernel_report.default_configs)
and each architecture: registers, local memory (stack bytes, LDL/STL), shared memory, theoretical
occupancy, and the SASS instruction mix per element of SPEC's `retinanet` workload (FFMA, tensor-core
MACs, LDG/STG, LDS/STS, barriers, all instructions). Then the CUDA extension's kernels (cuobjdump of
the built library) and, from the default forward and backward, an ESTIMATED lower bound on the
`retinanet` fwd+bwd time on an H100 SXM: the largest of issue, fp32-pipe, load/store-pipe and DRAM
time implied by the mix (kernel_report.throughput_bound), not a measurement. Prints tables and writes
bench/results/kernel-report-<machine>-<date>.json (machine, versions, every figure).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from workloads import DEVICE_PEAKS, FLOOR_BYTES, FLOOR_FLOPS, WORKLOADS  # noqa: E402

from ssimkd_kernels import kernel_report as kr  # noqa: E402

# The estimate's device: H100 SXM5, 132 SMs at 1.98 GHz boost (132 x 128 fp32 lanes x 2 x 1.98e9 is
# SPEC's ~67 TFLOP/s), 3.35 TB/s of HBM3.
H100_SMS = 132
H100_CLOCK_HZ = 1.98e9
MIX_COLUMNS = ("FFMA", "FMUL", "FADD", "LDG", "STG", "LDS", "STS", "LDL", "STL", "BAR")


def environment() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(
        machine=platform.processor() or platform.machine(),
        node=platform.node(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        git_commit=commit,
    )


def row_of(config: kr.KernelConfig, stats: kr.KernelStats, workload) -> dict:
    work = kr.level_work(
        stats, config.kernel, workload.batch, workload.channels, workload.planes, config.window, config.padding
    )
    mix = work["per_element"]
    return dict(
        config=config.name,
        arch=stats.arch,
        registers=stats.registers,
        stack_bytes=stats.stack_bytes,
        spill_loads=stats.spill_loads,
        spill_stores=stats.spill_stores,
        shared_bytes=stats.shared_bytes,
        warps_per_sm=stats.warps_per_sm,
        occupancy=round(stats.occupancy, 3),
        local_memory=stats.local_memory,
        per_element={k: round(v, 2) for k, v in sorted(mix.items())},
        fma_per_element=round(kr.fma_per_element(mix, stats.mma_macs_per_row), 1),
        instructions_per_element=round(sum(mix.values()), 1),
        per_interior_row=stats.per_row,
        row_barriers=stats.row_barriers,
        compile_seconds=round(stats.compile_seconds, 1),
    )


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'configuration':<40} {'sm':>3} {'regs':>4} {'stack':>5} {'LDL/STL':>8} {'smem':>6} {'warps':>5} "
        + " ".join(f"{c:>6}" for c in MIX_COLUMNS)
        + f" {'instr':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mix = r["per_element"]
        lines.append(
            f"{r['config']:<40} {r['arch']:>3} {r['registers']:>4} {r['stack_bytes']:>5} "
            f"{r['spill_loads']:>4}/{r['spill_stores']:<3} {r['shared_bytes']:>6} {r['warps_per_sm']:>5} "
            + " ".join(f"{mix.get(c, 0.0):>6.1f}" for c in MIX_COLUMNS)
            + f" {r['instructions_per_element']:>7.0f}"
        )
    return "\n".join(lines)


def estimate(rows: list[dict], workload) -> dict:
    """The default forward + backward (student gradient only, as in distillation) on an H100 SXM."""
    bandwidth, _ = DEVICE_PEAKS["H100"]
    parts = {}
    for kernel, name, dram_per_element in (
        ("fwd", "fwd/float32/reflect/w11", 8),
        ("bwd", "bwd/float32/reflect/w11/x", 12),
    ):
        row = next(r for r in rows if r["config"] == name and r["arch"] == 90)
        parts[kernel] = kr.throughput_bound(
            row["per_element"],
            workload.elements,
            dram_per_element * workload.elements,
            H100_SMS,
            H100_CLOCK_HZ,
            bandwidth,
        )
        parts[kernel]["fma_per_element"] = row["fma_per_element"]
    total = parts["fwd"]["bound"] + parts["bwd"]["bound"]
    floor_memory = FLOOR_BYTES["fwd+bwd"] * workload.elements / bandwidth
    floor_compute = FLOOR_FLOPS["fwd+bwd"] * workload.elements / DEVICE_PEAKS["H100"][1]
    return dict(
        label="ESTIMATE from the static instruction mix (not a measurement): per kernel the largest of issue "
        "(4 warp instructions/clock/SM), fp32 pipe (4/clock/SM), load/store pipe (1/clock/SM, one L1 "
        "wavefront each) and DRAM (inputs read once, outputs written once); latency, occupancy and "
        f"cache misses ignored. H100 SXM: {H100_SMS} SMs at {H100_CLOCK_HZ / 1e9:.2f} GHz, "
        f"{bandwidth / 1e12:.2f} TB/s.",
        workload=workload.name,
        elements=workload.elements,
        fwd=parts["fwd"],
        bwd=parts["bwd"],
        fwd_bwd_seconds=total,
        fma_per_element_fwd_bwd=parts["fwd"]["fma_per_element"] + parts["bwd"]["fma_per_element"],
        spec_floor_seconds=max(floor_memory, floor_compute),
        spec_floor_memory_seconds=floor_memory,
        spec_floor_compute_seconds=floor_compute,
        time_over_floor=total / max(floor_memory, floor_compute),
    )


def format_estimate(e: dict) -> str:
    lines = [e["label"]]
    for kernel in ("fwd", "bwd"):
        p = e[kernel]
        lines.append(
            f"  {kernel}: >= {p['bound'] * 1e6:7.1f} us (issue {p['issue'] * 1e6:.1f}, fp32 {p['fp32'] * 1e6:.1f}, "
            f"load/store {p['load_store'] * 1e6:.1f}, DRAM {p['dram'] * 1e6:.1f}; limited by {p['limiter']}); "
            f"{p['fma_per_element']:.0f} FMA per element"
        )
    lines.append(
        f"  fwd+bwd: >= {e['fwd_bwd_seconds'] * 1e6:.1f} us for {e['elements']:,} elements per input "
        f"({e['workload']}); SPEC floor {e['spec_floor_seconds'] * 1e6:.0f} us "
        f"(memory {e['spec_floor_memory_seconds'] * 1e6:.0f}, compute {e['spec_floor_compute_seconds'] * 1e6:.0f}): "
        f"{e['time_over_floor']:.1f}x the floor; {e['fma_per_element_fwd_bwd']:.0f} FMA per element fwd+bwd "
        f"(SPEC: ~290, criterion <= 3x)"
    )
    return "\n".join(lines)


def format_extension(kernels) -> str:
    if isinstance(kernels, str):
        return f"CUDA extension: {kernels}"
    head = f"{'CUDA kernel':<60} {'sm':>3} {'regs':>4} {'stack':>5} {'smem':>6}"
    lines = [head, "-" * len(head)]
    for k in kernels:
        lines.append(
            f"{k['function'][:60]:<60} {k['arch']:>3} {k.get('registers', 0):>4} {k.get('stack_bytes', 0):>5} "
            f"{k.get('shared_bytes', 0):>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma list of SM versions (80, 90)")
    parser.add_argument("--default", action="store_true", help="only the default forward and backward")
    parser.add_argument("--workload", default="retinanet", choices=sorted(WORKLOADS))
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON result")
    parser.add_argument("--json", metavar="PATH", help="write the JSON to this file (instead of --out's dated name)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    archs = [int(a) for a in args.arch.split(",")]
    configs = kr.default_configs()
    if args.default:
        configs = [
            c
            for c in configs
            if c in (kr.KernelConfig("fwd"), kr.KernelConfig("bwd"), kr.KernelConfig("bwd", teacher_grad=True))
        ]
    targets = ", ".join(f"sm_{a}" for a in archs)
    print(f"compiling {len(configs)} configurations for {targets} ...", file=sys.stderr)
    stats = kr.analyse_many(configs, archs)
    rows = [row_of(config, s, workload) for (arch, config), s in zip([(a, c) for a in archs for c in configs], stats)]
    print(f"\nTriton kernels, per element of one input of `{workload.name}` ({workload.description})")
    print(format_rows(rows))
    with_local = [r["config"] + f" sm_{r['arch']}" for r in rows if r["local_memory"]]
    print(f"\nlocal memory (spills, stack): {'none' if not with_local else ', '.join(with_local)}")
    converting = [
        r["config"] + f" sm_{r['arch']}"
        for r in rows
        if r["row_barriers"] != kr.ROW_BARRIERS[r["config"].split("/")[0]]
    ]
    if converting:
        print(
            "row loops with more barriers than rows need (layout conversions through shared memory, or no "
            f"row loop found; their per-element figures are rough): {', '.join(converting)}"
        )
    result = dict(environment=environment(), workload=workload.name, rows=rows, local_memory=with_local)
    if 90 in archs:
        result["estimate"] = estimate(rows, workload)
        print(format_estimate(result["estimate"]))
    result["cuda_extension"] = kr.extension_resources()
    print("\n" + format_extension(result["cuda_extension"]))
    if not args.no_save:
        date = _dt.date.today().isoformat()
        env = result["environment"]
        tag = "".join(c if c.isalnum() else "-" for c in f"{env['machine']}-triton-{env['triton']}").strip("-")[:60]
        path = Path(args.json) if args.json else Path(args.out) / f"kernel-report-{tag}-{date}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
