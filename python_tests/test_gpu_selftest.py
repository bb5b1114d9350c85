"""The GPU self-test's parts that run anywhere: the summary's verdicts, the driver's checks on the CPU,
and the script's argument handling. The self-test itself runs on a GPU machine (tools/gpu_selftest.sh);
these keep it from rotting between those runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import backend_available

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_selftest_driver as driver  # noqa: E402
import gpu_selftest_summary as summary  # noqa: E402


def _bench_row(candidate, mode, dtype, ms, **extra):
    return {"candidate": candidate, "mode": mode, "dtype": dtype, "median_ms": ms, **extra}


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _targets(tmp_path) -> dict:
    summary.main(["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    result = json.loads((tmp_path / "results" / "selftest-summary.json").read_text())
    return {t["target"]: t for t in result["targets"]}


def test_summary_judges_each_target_from_the_measurements(tmp_path):
    results, details = tmp_path / "results", tmp_path / "work" / "details"
    _write(
        results / "bench-retinanet.json",
        {
            "rows": [
                _bench_row("reference", "fwd+bwd", "float32", 10.0),
                _bench_row("reference+compile", "fwd+bwd", "float32", 2.0),
                _bench_row("cuda", "fwd+bwd", "float32", 0.25, time_over_floor=2.0, floor_ms=0.125),
                _bench_row("cuda", "fwd+bwd", "bfloat16", 0.2),
                _bench_row("triton", "fwd+bwd", "float32", 0.5, time_over_floor=1.4, floor_ms=0.125),
                {"candidate": "triton", "mode": "fwd+bwd", "dtype": "bfloat16", "error": "RuntimeError: x"},
            ]
        },
    )
    _write(
        results / "bench-image-float32.json",
        {"rows": [_bench_row("cuda", "fwd+bwd", "float32", 0.5), _bench_row("fused-ssim", "fwd+bwd", "float32", 1.0)]},
    )
    _write(
        results / "bench-train-step.json",
        {"rows": [{"mode": "l2", "vs_l2": 1.0}, {"mode": "ssim-fused", "vs_l2": 1.02}]},
    )
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        for backend in ("cuda", "triton"):
            _write(details / "sanitizer" / f"{tool}-{backend}.log", "========= ERROR SUMMARY: 0 errors\n")
            _write(details / "sanitizer" / f"{tool}-{backend}-driver.json", {"complete": True, "failures": 0})
    _write(
        details / "sanitizer" / "racecheck-triton.log",
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n",
    )
    _write(details / "large-cuda.json", {"runs": [{"backend": "cuda", "ok": True, "loss_relative_error": 1e-7}]})
    _write(details / "large-triton.json", {"runs": [{"backend": "triton", "skipped": "needs 20 GiB"}]})
    _write(
        details / "pytest-junit-cuda.xml",
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="a" name="t1"><failure/></testcase></testsuite></testsuites>',
    )
    targets = _targets(tmp_path)

    def verdict(name):
        return targets[name]["pass"], targets[name]["measured"]

    assert verdict("cuda: retinanet fp32 fwd+bwd vs eager reference") == (True, 40.0)
    assert verdict("cuda: retinanet fp32 fwd+bwd vs torch.compile(reference)") == (True, 8.0)
    assert verdict("cuda: retinanet fp32 fwd+bwd time / SPEC floor") == (False, 2.0)
    assert verdict("cuda: retinanet fwd+bwd bf16 speed-up over fp32") == (False, 1.25)
    assert verdict("triton: retinanet fp32 fwd+bwd vs torch.compile(reference)") == (False, 4.0)
    assert verdict("triton: retinanet fp32 fwd+bwd time / SPEC floor") == (True, 1.4)
    bf16 = targets["triton: retinanet fwd+bwd bf16 speed-up over fp32"]
    assert bf16["pass"] is None and "RuntimeError" in bf16["reason"]  # a failed candidate is not a figure
    assert verdict("cuda vs fused-ssim, image 8x3x512x512 fp32 fwd+bwd") == (True, 2.0)
    assert verdict("SSIM-KD (fused) training step / L2-KD step, 800x1333 batch 2") == (True, 1.02)
    sanitizer = targets["compute-sanitizer memcheck, racecheck, initcheck, synccheck: 0 errors"]
    assert sanitizer["pass"] is False and sanitizer["measured"] == 1
    assert targets["cuda: fwd+bwd above 2^31 elements equals the exact result"]["pass"] is True
    large_triton = targets["triton: fwd+bwd above 2^31 elements equals the exact result"]
    assert large_triton["pass"] is None and "needs 20 GiB" in large_triton["reason"]
    assert targets["cuda: non-default and concurrent streams: results bitwise equal"]["pass"] is None
    tests = next(t for name, t in targets.items() if name.startswith("pytest"))
    assert tests["pass"] is False and tests["measured"]["failed"] == ["a::t1"]


def test_summary_of_a_cut_run_passes_nothing_it_did_not_measure(tmp_path):
    # A sanitizer tool stopped at its limit (no summary line, driver incomplete): not clean, not failed.
    details = tmp_path / "work" / "details"
    _write(details / "sanitizer" / "memcheck-cuda.log", "========= ERROR SUMMARY: 0 errors\n")
    _write(details / "sanitizer" / "memcheck-cuda-driver.json", {"complete": True, "failures": 0})
    _write(details / "sanitizer" / "racecheck-cuda.log", "========= partial\n")
    _write(
        tmp_path / "results" / "bench-retinanet.json", {"rows": [_bench_row("reference", "fwd+bwd", "float32", 9.0)]}
    )
    targets = _targets(tmp_path)
    assert all(t["pass"] is None for t in targets.values()), [t for t in targets.values() if t["pass"] is not None]
    assert "racecheck" in targets["compute-sanitizer memcheck, racecheck, initcheck, synccheck: 0 errors"]["reason"]


@pytest.mark.parametrize(
    "dry_run, gpu_kernels, arch_list, cuda_available, expected",
    [
        (True, True, "9.0", False, True),  # a dry run: CUDA kernels for sm_90 compiled in is enough
        (True, True, "8.0;9.0+PTX", False, True),
        (True, False, "", False, False),  # built without CUDA kernels
        (True, True, "8.0", False, False),  # not for sm_90
        (False, True, "9.0", True, True),  # on the GPU the cuda backend must be available
        (False, True, "9.0", False, False),  # listed by `ssimkd info` but unavailable: not a pass
    ],
)
def test_build_target_reads_ssimkd_info(tmp_path, dry_run, gpu_kernels, arch_list, cuda_available, expected):
    work = tmp_path / "work"
    _write(
        work / "steps.jsonl",
        json.dumps({"step": "build.extension", "status": "ok", "rc": 0, "seconds": 1.0, "budget_s": 240, "note": ""})
        + "\n",
    )
    info = {  # the shape of `ssimkd info --json`
        "backends": {"cpu": {"available": True, "reason": None}, "cuda": {"available": cuda_available, "reason": None}},
        "extension": {"gpu_kernels": gpu_kernels, "built_for": {"cuda_arch_list": arch_list}},
    }
    _write(work / "details" / "info.json", info)
    summary.main(["--work", str(work), "--results", str(tmp_path / "results")] + (["--dry-run"] if dry_run else []))
    targets = json.loads((tmp_path / "results" / "selftest-summary.json").read_text())["targets"]
    build = next(t for t in targets if t["target"].startswith("build:"))
    assert build["pass"] is expected


needs_cpu_op = pytest.mark.skipif(not backend_available("cpu"), reason="needs the C++ extension's cpu backend")


@needs_cpu_op
def test_large_check_is_exact_and_catches_a_plane_mix_up(monkeypatch):
    shape, dtype, device = (2, 9, 16, 16), torch.float16, torch.device("cpu")
    result = driver._large_check("cpu", shape, dtype, device, chunk_planes=4)
    assert result["loss_relative_error"] < 1e-5
    assert max(result["grad_x_relative_error"], result["grad_y_relative_error"]) < 2e-3

    real = driver.sk.ssim_kd_loss

    def reads_the_neighbouring_plane(x, y, **options):  # what an index that wraps would do
        return real(torch.roll(x, 1, dims=1), y, **options)

    monkeypatch.setattr(driver.sk, "ssim_kd_loss", reads_the_neighbouring_plane)
    broken = driver._large_check("cpu", shape, dtype, device, chunk_planes=4)
    assert broken["grad_x_relative_error"] > 0.1


@needs_cpu_op
def test_fuzz_cases_run_through_a_fused_backend(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert driver.main(["fuzz", "--device", "cpu", "--backends", "cpu", "--cases", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["failures"] == 0 and len(result["runs"]) == 3
    assert "3 of 3 case runs passed" in capsys.readouterr().out


def test_selftest_script_parses_and_refuses_unknown_steps():
    script = TOOLS / "gpu_selftest.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    refused = subprocess.run(["bash", str(script), "--steps", "env,nope"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown step 'nope'" in refused.stdout
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--dry-run" in usage.stdout
