"""The GPU self-test's summary: each of the project's GPU targets with its measured figure, pass or fail.

    python tools/gpu_selftest_summary.py --work <scratch folder> --results <results folder>

tools/gpu_selftest.sh calls it after every step, so a run cut short still leaves a summary of what it
measured. It reads the step records (<work>/steps.jsonl), the details the steps left in <work>/details
(env.json, pytest-junit-<backend>.xml, sanitizer/<tool>-<backend>.log, large-*.json, streams-*.json, ncu.csv,
kernel-report.json)
and the bench JSONs in <results> (bench-retinanet.json, bench-image-float32.json, bench-train-step.json),
writes <results>/selftest-summary.json and prints a short table.
A target whose measurement is missing is reported with "pass": null and the reason, never as passed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

# The GPU targets of the issues this self-test closes (thresholds as the issues state them).
REFERENCE_SPEEDUP = 20.0  # retinanet fp32 fwd+bwd vs the eager reference
COMPILE_SPEEDUP = 5.0  # vs torch.compile(reference)
FLOOR_RATIO = 1.5  # time / SPEC section 4 floor
FUSED_SSIM_SPEEDUP = 1.5  # cuda vs fused-ssim, same single-level input
BF16_SPEEDUP = 1.6  # bf16 vs fp32, same backend
TRAIN_STEP_RATIO = 1.03  # SSIM-KD step / L2-KD step
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
FUSED_BACKENDS = ("cuda", "triton")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(bench, candidate, mode, dtype):
    if not bench:
        return None
    for row in bench.get("rows", []):
        if row.get("candidate") == candidate and row.get("mode") == mode and row.get("dtype") == dtype:
            return row
    return None


def _target(name, measured, threshold, comparison, unit="", *, missing=None, detail=None):
    """One target; comparison is '>=' or '<='; measured None means not measured (pass: null)."""
    entry = {"target": name, "threshold": f"{comparison} {threshold}{unit}"}
    if measured is None:
        entry.update(measured=None, **{"pass": None}, reason=missing or "not measured")
    else:
        ok = measured >= threshold if comparison == ">=" else measured <= threshold
        entry.update(measured=round(measured, 4), **{"pass": bool(ok)})
    if detail:
        entry["detail"] = detail
    return entry


def _ratio(numerator_row, denominator_row):
    if not numerator_row or not denominator_row:
        return None
    if "median_ms" not in numerator_row or "median_ms" not in denominator_row:
        return None
    return numerator_row["median_ms"] / denominator_row["median_ms"]


def _why_missing(row, bench_name):
    if row is None:
        return f"no row in {bench_name} (step cut, skipped or candidate unavailable)"
    return f"failed: {row.get('error', '?')}"


def bench_targets(results: Path) -> list[dict]:
    fp32 = bf16 = _load(results / "bench-retinanet.json")  # both dtypes, one file
    image = _load(results / "bench-image-float32.json")
    train = _load(results / "bench-train-step.json")
    targets = []
    for backend in FUSED_BACKENDS:
        row = _row(fp32, backend, "fwd+bwd", "float32")
        ref = _row(fp32, "reference", "fwd+bwd", "float32")
        compiled = _row(fp32, "reference+compile", "fwd+bwd", "float32")
        times = row and ref and f"{row.get('median_ms', 0):.3f} ms vs {ref.get('median_ms', 0):.3f} ms"
        targets.append(
            _target(
                f"{backend}: retinanet fp32 fwd+bwd vs eager reference",
                _ratio(ref, row),
                REFERENCE_SPEEDUP,
                ">=",
                "x",
                detail=times,
                missing=_why_missing(row if ref else None, "bench-retinanet"),
            )
        )
        targets.append(
            _target(
                f"{backend}: retinanet fp32 fwd+bwd vs torch.compile(reference)",
                _ratio(compiled, row),
                COMPILE_SPEEDUP,
                ">=",
                "x",
                missing=_why_missing(compiled if row else None, "bench-retinanet"),
            )
        )
        targets.append(
            _target(
                f"{backend}: retinanet fp32 fwd+bwd time / SPEC floor",
                row.get("time_over_floor") if row else None,
                FLOOR_RATIO,
                "<=",
                "x",
                missing=_why_missing(row, "bench-retinanet"),
                detail=row and row.get("floor_ms") and f"floor {row['floor_ms'] * 1e3:.0f} us",
            )
        )
        row_bf16 = _row(bf16, backend, "fwd+bwd", "bfloat16")
        targets.append(
            _target(
                f"{backend}: retinanet fwd+bwd bf16 speed-up over fp32",
                _ratio(row, row_bf16),
                BF16_SPEEDUP,
                ">=",
                "x",
                missing=_why_missing(row_bf16 if row else None, "bench-retinanet"),
            )
        )
    cuda = _row(image, "cuda", "fwd+bwd", "float32")
    fused = _row(image, "fused-ssim", "fwd+bwd", "float32")
    targets.append(
        _target(
            "cuda vs fused-ssim, image 8x3x512x512 fp32 fwd+bwd",
            _ratio(fused, cuda),
            FUSED_SSIM_SPEEDUP,
            ">=",
            "x",
            missing=_why_missing(fused if cuda else None, "bench-image-float32"),
        )
    )
    fused_step = next((r for r in (train or {}).get("rows", []) if r.get("mode") == "ssim-fused"), None)
    targets.append(
        _target(
            "SSIM-KD (fused) training step / L2-KD step, 800x1333 batch 2",
            fused_step.get("vs_l2") if fused_step else None,
            TRAIN_STEP_RATIO,
            "<=",
            "x",
            missing="no bench-train-step.json rows" if train is None else "no ssim-fused row",
        )
    )
    return targets


def sanitizer_result(details: Path) -> tuple[dict, dict]:
    """One entry per tool and backend (sanitizer/<tool>-<backend>.log and its driver JSON), one target."""
    runs = {}
    for tool in SANITIZER_TOOLS:
        for backend in FUSED_BACKENDS:
            log = details / "sanitizer" / f"{tool}-{backend}.log"
            driver = _load(details / "sanitizer" / f"{tool}-{backend}-driver.json")
            entry = {"ran": log.exists()}
            if log.exists():
                text = log.read_text(errors="replace")
                summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
                race = re.search(
                    r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text
                )
                if race:
                    entry.update(errors=int(race.group(2)), warnings=int(race.group(3)))
                elif summary:
                    entry["errors"] = int(summary.group(1))
            entry["driver_complete"] = bool(driver and driver.get("complete"))
            entry["driver_failures"] = driver.get("failures") if driver else None
            entry["clean"] = entry.get("errors") == 0 and entry["driver_complete"] and entry["driver_failures"] == 0
            runs[f"{tool} {backend}"] = entry
    name = "compute-sanitizer memcheck, racecheck, initcheck, synccheck: 0 errors"
    ran = [r for r in runs.values() if r["ran"]]
    if not ran:
        return _target(name, None, 0, "<=", missing="the sanitizer step did not run"), runs
    errors = sum(r.get("errors", 0) for r in ran)
    target = _target(name, errors, 0, "<=")
    incomplete = [key for key, r in runs.items() if not r["ran"] or "errors" not in r or not r["driver_complete"]]
    if any(r["driver_failures"] for r in runs.values()):
        target["pass"] = False
        target["reason"] = "the driver's value checks failed under the sanitizer"
    elif incomplete:  # a run cut short proves nothing about the cases it did not reach
        target["pass"] = False if errors else None
        target["reason"] = f"incomplete: {', '.join(incomplete)}"
    return target, runs


def check_targets(details: Path) -> list[dict]:
    targets = []
    for name, label in (
        ("large", "fwd+bwd above 2^31 elements equals the exact result"),
        ("streams", "non-default and concurrent streams: results bitwise equal"),
    ):
        # One JSON per backend (<name>-<backend>.json: each ran in its own process) or one for both.
        found = [r for path in sorted(details.glob(f"{name}*.json")) for r in (_load(path) or {}).get("runs", [])]
        for backend in FUSED_BACKENDS:
            run = next((r for r in found if r.get("backend") == backend), None)
            entry = {"target": f"{backend}: {label}", "threshold": "pass"}
            if run is None:
                entry.update(
                    measured=None,
                    **{"pass": None},
                    reason=f"no {name} run recorded (step cut, skipped or crashed: see the log)",
                )
            elif run.get("skipped"):
                entry.update(measured=None, **{"pass": None}, reason=f"skipped: {run['skipped']}")
            else:
                entry.update(
                    measured={k: v for k, v in run.items() if k not in ("backend", "ok")},
                    **{"pass": bool(run.get("ok"))},
                )
            targets.append(entry)
    return targets


def test_result(details: Path, steps: list[dict]) -> dict:
    junits = sorted(details.glob("pytest-junit*.xml"))  # one per backend's run
    entry = {
        "target": "pytest: cuda and triton backends on CUDA tensors (values, gradients, dtypes, strides, "
        "paddings, determinism, torch.compile fullgraph, hypothesis)",
        "threshold": "0 failures",
    }
    if not junits:
        return {**entry, "measured": None, "pass": None, "reason": "no junit report (test step cut or skipped)"}
    suites, failed = [], []
    for junit in junits:
        root = ET.parse(junit).getroot()
        suites += [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        failed += [
            f"{case.get('classname')}::{case.get('name')}"
            for case in root.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    entry.update(
        measured={**counts, "passed": passed, "failed": failed[:30]},
        **{"pass": counts["failures"] + counts["errors"] == 0 and passed > 0},
    )
    cut = [s["step"] for s in steps if s["step"].startswith("test.pytest") and s["status"] == "timeout"]
    if cut and entry["pass"]:  # stopped at its limit: what ran passed, the rest did not run
        entry.update(
            **{"pass": None}, reason=f"{', '.join(cut)} stopped at its limit after {counts['tests']} tests, none failed"
        )
    return entry


def ncu_metrics(details: Path) -> dict:
    """{kernel: {metric: mean value}} from ncu's --csv output."""
    path = details / "ncu.csv"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith('"')]
    table: dict = {}
    for row in csv.DictReader(lines):
        kernel = re.split(r"[(<]", row.get("Kernel Name", "?"))[0].strip()
        metric, value = row.get("Metric Name"), row.get("Metric Value", "").replace(",", "")
        try:
            table.setdefault(kernel, {}).setdefault(metric, []).append(float(value))
        except ValueError:
            continue
    return {k: {m: round(sum(v) / len(v), 3) for m, v in metrics.items()} for k, metrics in table.items()}


def static_estimate(details: Path, results: Path) -> dict:
    """The static kernel report's estimates (bench/kernel_report.py), beside the measured times."""
    report = _load(details / "kernel-report.json")
    entry: dict = {"present": report is not None}
    if report is None:
        note = details / "kernel-report.note"
        entry["reason"] = note.read_text().strip() if note.exists() else "no kernel report"
    else:
        found = {}

        def walk(node, path):
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{path}.{key}" if path else str(key))
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{path}[{i}]")
            elif isinstance(node, (int, float)) and "estimat" in path.lower() and len(found) < 40:
                found[path] = node

        walk(report, "")
        entry["estimates"] = found
    fp32 = _load(results / "bench-retinanet.json")
    entry["measured_ms"] = {
        f"{b} {m}": r["median_ms"]
        for b in FUSED_BACKENDS
        for m in ("fwd", "fwd+bwd")
        if (r := _row(fp32, b, m, "float32")) and "median_ms" in r
    }
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--dry-run", action="store_true", help="a rehearsal: no target is expected to be measured")
    args = parser.parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    details = work / "details"

    steps = []
    if (work / "steps.jsonl").exists():
        steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
    env = _load(details / "env.json") or {}
    sanitizer_target, sanitizer_tools = sanitizer_result(details)
    targets = bench_targets(results) + [sanitizer_target] + check_targets(details) + [test_result(details, steps)]
    build = next((s for s in steps if s["step"] == "build.extension"), None)
    info = _load(details / "info.json") or {}
    # `ssimkd info --json`: without a GPU (a dry run) the build must still have compiled CUDA kernels for
    # sm_90 in; on the GPU the cuda backend must be available.
    extension = info.get("extension") or {}
    arch_list = str((extension.get("built_for") or {}).get("cuda_arch_list", ""))
    if args.dry_run:
        loads = extension.get("gpu_kernels") is True and "9.0" in arch_list.replace("+PTX", "").split(";")
    else:
        loads = ((info.get("backends") or {}).get("cuda") or {}).get("available") is True
    targets.insert(
        0,
        {
            "target": "build: extension with CUDA kernels (sm_90) against this torch",
            "threshold": "builds, CUDA kernels compiled in" + ("" if args.dry_run else ", cuda backend loads"),
            "measured": None
            if build is None
            else {"status": build["status"], "seconds": build["seconds"], "backends": info.get("backends")},
            "pass": None if build is None else (build["status"] == "ok" and loads),
        },
    )
    summary = {
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "device": (env.get("device") or {}).get("name") or "no GPU",
        "environment": env,
        "steps": steps,
        "targets": targets,
        "passed": sum(t["pass"] is True for t in targets),
        "failed": sum(t["pass"] is False for t in targets),
        "not_measured": sum(t["pass"] is None for t in targets),
        "static_estimate_vs_measurement": static_estimate(details, results),
        "ncu": ncu_metrics(details),
        "sanitizer": sanitizer_tools,
    }
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / ".selftest-summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(results / "selftest-summary.json")

    print(
        f"\nGPU self-test summary ({summary['device']}): {summary['passed']} passed, {summary['failed']} failed, "
        f"{summary['not_measured']} not measured"
    )
    for step in steps:
        print(
            f"  step {step['step']:<30} {step['status']:<8} {step['seconds']:>6.1f} s of {step['budget_s']} s"
            + (f"  {step['note']}" if step.get("note") else "")
        )
    for t in targets:
        mark = {True: "PASS", False: "FAIL", None: "----"}[t["pass"]]
        measured = t["measured"]
        shown = f"{measured:.3g}" if isinstance(measured, float) else ("" if measured is None else "see JSON")
        why = f"  ({t['reason']})" if t.get("reason") and not args.dry_run else ""
        print(f"  {mark}  {t['target']:<78.78} {shown:>9} {t['threshold']}{why}"[:200])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
