"""The GPU self-test's workloads (tools/gpu_selftest.sh runs them; each also runs alone).

    python tools/gpu_selftest_driver.py env --json env.json           # versions, device, copy bandwidth
    python tools/gpu_selftest_driver.py fuzz --backends cuda,triton   # short cases, fwd+bwd (under compute-sanitizer)
    python tools/gpu_selftest_driver.py large --backends cuda,triton  # fwd+bwd on > 2^31 elements, exact check
    python tools/gpu_selftest_driver.py streams --backends cuda,triton  # non-default and concurrent streams
    python tools/gpu_selftest_driver.py profile --backends cuda,triton  # one retinanet fwd+bwd each (under ncu)

fuzz: a fixed list of small cases (every padding, windows 3/11/15, general exponents, float32/bfloat16/
float16, channels_last and sliced inputs, planes from 1x1 to several tiles, with and without a teacher
gradient, the SSIM map) through each fused backend, forward and backward. Its job is to give the
sanitizer every kernel configuration to watch, so the values are checked only coarsely (norm-wise
against the float64 reference on the CPU, which the sanitizer does not instrument); the test suite
checks them tightly.

large: one level of 2 x 16385 planes of 256 x 256 float16 (2^31 + 2^17 elements, 4 GiB per input) whose
planes repeat K = 7 distinct (student, teacher) pairs: plane p holds pair p mod 7. Under the per-plane
normalisation the loss is then exactly the count-weighted mean of 7 per-plane losses, and the gradient of
every plane that of its pair, both computed by the reference in float64 on the CPU: the whole result is
checked against that, not a sample of it. 7 divides neither 2^31 nor 2^32 elements' worth of planes, so
an index that wraps lands on a plane of another pair. The backward's upstream gradient is the element
count, so the float16 gradients are O(1) rather than underflowing.

streams: fwd+bwd on a side stream whose inputs are written there behind a long sleep (an op that
launched on the default stream would read them before they exist), and on two streams at once; both
must equal the default stream's result bit for bit.

Every subcommand prints one line per check and, with --json, writes its results; the exit status is 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ssimkd_kernels as sk  # noqa: E402


def _print(*args):
    print(*args, flush=True)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (norm-wise: rounding noise around 0 does not count)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max()) / max(scale, 1e-30) if want.numel() else 0.0


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------


def _tool_version(name: str, line: int = -1) -> str | None:
    """`name --version`'s line that holds the version (nvcc: the last, compilers: the first)."""
    path = shutil.which(name)
    if path is None:
        return None
    try:
        out = (
            subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        )
    except (OSError, subprocess.TimeoutExpired):
        return path
    return f"{path}: {out[line] if out else ''}".strip()


def copy_bandwidth_tbps(device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written over the median of 10 copies (METHOD.md's ceiling)."""
    src = torch.empty(2**31 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2] / 1e12


def cmd_env(args) -> int:
    from ssimkd_kernels import _extension

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "backends": sk.available_backends(),  # loads the extension (no first-use build: SSIMKD_NO_JIT)
        "extension": _extension.describe(),
        "tools": {
            **{name: _tool_version(name) for name in ("nvcc", "compute-sanitizer", "ncu", "nvidia-smi")},
            "c++": _tool_version("c++", line=0),
        },  # the host compiler: C++20 needs GCC 10 or newer
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for module in (
        "pytest",
        "xdist",
        "hypothesis",
        "torchvision",
        "torchmetrics",
        "pytorch_msssim",
        "kornia",
        "fussim",
        "fused_ssim",
        "tomli_w",
        "faster_coco_eval",
        "skimage",
    ):
        try:
            imported = __import__(module)
            info.setdefault("modules", {})[module] = getattr(imported, "__version__", "present")
        except Exception as error:  # missing, or broken against this torch
            info.setdefault("modules", {})[module] = f"unavailable: {type(error).__name__}: {error}"[:160]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
        info["device"]["copy_bandwidth_tbps"] = round(copy_bandwidth_tbps(torch.device("cuda")), 3)
    width = max(map(len, info))
    for key, value in info.items():
        _print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------
# fuzz
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    planes: tuple
    batch: int = 2
    channels: int = 3
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    teacher_grad: bool = True
    ssim_map: bool = False  # sk.ssim_map with a random cotangent instead of the KD loss
    options: dict = field(default_factory=dict)


# Small enough that racecheck finishes in seconds; together they reach every kernel specialisation:
# paddings, windows, exponent kinds, dtypes, layouts, teacher gradient on/off, the map, several tiles.
FUZZ_CASES = (
    Case(((1, 1), (3, 4), (5, 7), (13, 21), (40, 70))),
    Case(((7, 11), (100, 168)), batch=1, channels=1),  # several tiles in both directions
    Case(((2, 9), (17, 20)), options=dict(padding="zero", window_size=3, sigma=0.8)),
    Case(((15, 15), (31, 45)), options=dict(padding="valid", window_size=15, sigma=2.5)),
    Case(((6, 9), (33, 70)), dtype=torch.bfloat16, layout="channels_last", teacher_grad=False),
    Case(
        ((5, 7), (19, 33)),
        dtype=torch.float16,
        layout="sliced",
        options=dict(exponents=(0.0, 0.0, 1.0), normalize="plane", clamp=False),
    ),
    Case(((9, 13), (25, 42)), options=dict(exponents=(0.5, 1.0, 2.0), normalize="level", level_weights=[0.3, 2.0])),
    Case(((12, 19),), ssim_map=True, options=dict(padding="reflect")),
    Case(((16, 23),), ssim_map=True, options=dict(padding="valid", window_size=7, sigma=1.0)),
    Case(tuple((1 + i % 5, 2 + (3 * i) % 7) for i in range(14)), batch=1, channels=2),  # several launches
)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _levels(case: Case, device, seed: int):
    g = torch.Generator().manual_seed(seed)

    def one(h, w):
        values = torch.randn(case.batch, case.channels * 2, h + 3, w * 2 + 1, generator=g, dtype=torch.float64)
        if case.ssim_map:
            values = values.sigmoid()
        values = values.to(device=device, dtype=case.dtype)
        if case.layout == "sliced":  # a strided view: every other channel and column, an offset row window
            return values[:, ::2, 1 : h + 1, 1 : 2 * w + 1 : 2].detach()
        t = values[:, : case.channels, :h, :w].contiguous()
        return t.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else t

    students = [one(h, w).requires_grad_() for h, w in case.planes]
    teachers = [one(h, w).requires_grad_(case.teacher_grad) for h, w in case.planes]
    return students, teachers


def _run_case(case: Case, backend: str, students, teachers, cotangent=None):
    """(value, gradients of every input that requires one)."""
    inputs = [t for t in students + teachers if t.requires_grad]
    if case.ssim_map:
        options = {k: v for k, v in case.options.items() if k in ("padding", "window_size", "sigma")}
        value = sk.ssim_map(students[0], teachers[0], backend=backend, **options)
        grads = torch.autograd.grad(value, inputs, cotangent.to(device=value.device, dtype=value.dtype))
    else:
        value = sk.ssim_kd_loss(students, teachers, backend=backend, **case.options)
        grads = torch.autograd.grad(value, inputs)
    return value, list(grads)


def cmd_fuzz(args) -> int:
    device = torch.device(args.device)
    cases = FUZZ_CASES[: args.cases] if args.cases else FUZZ_CASES
    results, failures = [], 0
    for index, case in enumerate(cases):
        for backend in args.backends.split(","):
            students, teachers = _levels(case, device, seed=index)
            ref_s = [s.detach().double().cpu().requires_grad_() for s in students]
            ref_t = [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in teachers]
            cotangent = None
            if case.ssim_map:
                shape = sk.ssim_map(
                    ref_s[0].detach(),
                    ref_t[0].detach(),
                    backend="reference",
                    **{k: v for k, v in case.options.items() if k != "normalize"},
                ).shape
                cotangent = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
            start = time.perf_counter()
            try:
                value, grads = _run_case(case, backend, students, teachers, cotangent)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:
                failures += 1
                results.append({"case": index, "backend": backend, "error": f"{type(error).__name__}: {error}"[:300]})
                _print(f"case {index:2d} {backend:<14} FAILED: {type(error).__name__}: {error}"[:300])
                continue
            seconds = time.perf_counter() - start
            want_value, want_grads = _run_case(case, "reference", ref_s, ref_t, cotangent)
            errors = [_relative_error(value, want_value)] + [_relative_error(g, w) for g, w in zip(grads, want_grads)]
            worst = max(errors)
            ok = worst <= TOLERANCE[case.dtype]
            failures += not ok
            results.append(
                {
                    "case": index,
                    "backend": backend,
                    "dtype": str(case.dtype).replace("torch.", ""),
                    "planes": len(case.planes),
                    "worst_relative_error": worst,
                    "ok": ok,
                    "seconds": round(seconds, 3),
                }
            )
            _print(
                f"case {index:2d} {backend:<14} {str(case.dtype).replace('torch.', ''):<9} "
                f"{'ok' if ok else 'MISMATCH'}  worst norm-wise error {worst:.2e} (bound {TOLERANCE[case.dtype]:.0e})"
                f"  {seconds:.2f} s"
            )
    _print(f"fuzz: {len(results) - failures} of {len(results)} case runs passed")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"check": "fuzz", "runs": results, "failures": failures, "complete": True}, indent=2) + "\n"
        )
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# large
# ------------------------------------------------------------------------------------------------

DISTINCT_PAIRS = 7


def _large_check(backend: str, shape, dtype, device, chunk_planes: int) -> dict:
    n, c, h, w = shape
    planes = n * c
    g = torch.Generator().manual_seed(0)
    base_x = torch.rand(DISTINCT_PAIRS, h, w, generator=g, dtype=torch.float64).to(dtype)
    base_y = (base_x.double() + 0.3 * torch.rand(DISTINCT_PAIRS, h, w, generator=g, dtype=torch.float64)).to(dtype)

    # The truth: each distinct pair through the reference, float64, one plane at a time.
    losses, gx_ref, gy_ref = [], [], []
    for k in range(DISTINCT_PAIRS):
        xk = base_x[k].double().view(1, 1, h, w).requires_grad_()
        yk = base_y[k].double().view(1, 1, h, w).requires_grad_()
        loss_k = sk.ssim_kd_loss(xk, yk, normalize="plane", backend="reference")
        gx, gy = torch.autograd.grad(loss_k, [xk, yk])
        losses.append(float(loss_k.detach()))
        gx_ref.append(gx.view(h, w) * (h * w))  # the gradient of plane k's mean, times its pixel count
        gy_ref.append(gy.view(h, w) * (h * w))
    counts = [len(range(k, planes, DISTINCT_PAIRS)) for k in range(DISTINCT_PAIRS)]
    true_loss = sum(cnt * loss for cnt, loss in zip(counts, losses)) / planes

    pair = torch.arange(planes, device=device) % DISTINCT_PAIRS
    x = base_x.to(device).index_select(0, pair).view(n, c, h, w).requires_grad_()
    y = base_y.to(device).index_select(0, pair).view(n, c, h, w).requires_grad_()
    start = time.perf_counter()
    loss = sk.ssim_kd_loss(x, y, normalize="plane", backend=backend)
    # Upstream gradient = element count: each plane's gradient becomes (h w) d(plane mean)/dx, O(1).
    gx, gy = torch.autograd.grad(loss, [x, y], torch.tensor(float(x.numel()), device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del x, y

    want_x = torch.stack(gx_ref).float().to(device)
    want_y = torch.stack(gy_ref).float().to(device)
    worst = {"x": 0.0, "y": 0.0}
    for name, got, want in (("x", gx, want_x), ("y", gy, want_y)):
        got = got.view(planes, h, w)
        scale = float(want.abs().max())
        for first in range(0, planes, chunk_planes):
            rows = torch.arange(first, min(first + chunk_planes, planes), device=device)
            diff = (got[first : first + len(rows)].float() - want.index_select(0, rows % DISTINCT_PAIRS)).abs().max()
            worst[name] = max(worst[name], float(diff) / scale)
    loss = float(loss.detach())
    loss_error = abs(loss - true_loss) / abs(true_loss)
    return {
        "backend": backend,
        "shape": list(shape),
        "elements": n * c * h * w,
        "dtype": str(dtype).replace("torch.", ""),
        "loss": loss,
        "true_loss": true_loss,
        "loss_relative_error": loss_error,
        "grad_x_relative_error": worst["x"],
        "grad_y_relative_error": worst["y"],
        "seconds": round(seconds, 3),
    }


def cmd_large(args) -> int:
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    if elements <= 2**31 and not args.allow_small:
        _print(f"large: {shape} has {elements} elements, not above 2^31 (--allow-small for a rehearsal)")
        return 2
    dtype = getattr(torch, args.dtype)
    # x, y and their gradients, plus the comparison's working chunk: a smaller GPU skips, saying why.
    need = 4 * elements * dtype.itemsize + 2 * args.chunk_planes * shape[2] * shape[3] * 4
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 1.25 * need:
        free = torch.cuda.mem_get_info(device)[0]
        reason = f"needs {1.25 * need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free"
        _print(f"large: skipped: {reason}")
        if args.json:
            runs = [{"backend": b, "skipped": reason, "ok": None} for b in args.backends.split(",")]
            Path(args.json).write_text(json.dumps({"check": "large", "runs": runs, "failures": 0}, indent=2) + "\n")
        return 0
    # float16 gradients carry ~3 significant digits; the loss is summed in float32.
    grad_bound, loss_bound = (2e-3 if dtype != torch.float32 else 1e-4), 1e-4
    runs, failures = [], 0
    for backend in args.backends.split(","):
        try:
            result = _large_check(backend, shape, dtype, device, args.chunk_planes)
        except Exception as error:
            result = {"backend": backend, "error": f"{type(error).__name__}: {error}"[:300], "ok": False}
            _print(f"large {backend:<8} FAILED: {result['error']}")
        else:
            result["ok"] = (
                result["loss_relative_error"] <= loss_bound
                and max(result["grad_x_relative_error"], result["grad_y_relative_error"]) <= grad_bound
            )
            _print(
                f"large {backend:<8} {elements:,} elements {result['dtype']}: "
                f"{'ok' if result['ok'] else 'MISMATCH'}  loss error {result['loss_relative_error']:.1e} "
                f"(bound {loss_bound:.0e}), gradient errors {result['grad_x_relative_error']:.1e} / "
                f"{result['grad_y_relative_error']:.1e} (bound {grad_bound:.0e}), fwd+bwd {result['seconds']:.2f} s"
            )
        failures += not result["ok"]
        runs.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"check": "large", "runs": runs, "failures": failures}, indent=2) + "\n")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# streams
# ------------------------------------------------------------------------------------------------


def _fwd_bwd(students, teachers, backend):
    loss = sk.ssim_kd_loss(students, teachers, backend=backend)
    return [loss] + list(torch.autograd.grad(loss, students))


def cmd_streams(args) -> int:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    planes = [(50, 84), (25, 42), (13, 21), (7, 11)]
    source_s = [torch.randn(2, 16, h, w, generator=g).to(device) for h, w in planes]
    source_t = [torch.randn(2, 16, h, w, generator=g).to(device) for h, w in planes]
    runs, failures = [], 0
    for backend in args.backends.split(","):
        try:
            students = [s.clone().requires_grad_() for s in source_s]
            expected = [r.detach().clone() for r in _fwd_bwd(students, source_t, backend)]
            torch.cuda.synchronize()

            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                # Poison the blocks this stream will hand out next, then write the inputs behind a sleep:
                # an op launched on another stream would read NaN or stale values.
                poison = [torch.full_like(s, float("nan")) for s in source_s + source_t]
                del poison
                torch.cuda._sleep(50_000_000)  # ~25 ms at 2 GHz
                students_side = [(s * 1.0).requires_grad_() for s in source_s]
                teachers_side = [t * 1.0 for t in source_t]
                on_side = _fwd_bwd(students_side, teachers_side, backend)
            torch.cuda.synchronize()
            side_ok = all(torch.equal(a, b) for a, b in zip(on_side, expected))

            streams = [torch.cuda.Stream(), torch.cuda.Stream()]
            concurrent = []
            for stream in streams:
                with torch.cuda.stream(stream):
                    concurrent.append(_fwd_bwd([s.clone().requires_grad_() for s in source_s], source_t, backend))
            torch.cuda.synchronize()
            both_ok = all(torch.equal(a, b) for result in concurrent for a, b in zip(result, expected))
            result = {
                "backend": backend,
                "side_stream_bitwise_equal": side_ok,
                "two_streams_bitwise_equal": both_ok,
                "ok": side_ok and both_ok,
            }
        except Exception as error:
            result = {"backend": backend, "error": f"{type(error).__name__}: {error}"[:300], "ok": False}
        failures += not result["ok"]
        runs.append(result)
        _print(f"streams {backend:<8} " + ("ok" if result["ok"] else f"FAILED: {result}"))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"check": "streams", "runs": runs, "failures": failures}, indent=2) + "\n"
        )
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------------


def cmd_profile(args) -> int:
    from workloads import WORKLOADS

    device = torch.device(args.device)
    workload = WORKLOADS[args.workload]
    for backend in args.backends.split(","):
        students, teachers = workload.make(device, getattr(torch, args.dtype))
        for _ in range(args.repeats):
            loss = sk.ssim_kd_loss(students, teachers, backend=backend)
            loss.backward()
        torch.cuda.synchronize()
        _print(f"profile {backend}: {args.repeats} fwd+bwd of {args.workload} {args.dtype}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="versions, device and tools")
    env.add_argument("--json")

    fuzz = sub.add_parser("fuzz", help="short fwd+bwd cases through the fused backends")
    fuzz.add_argument("--backends", default="cuda,triton")
    fuzz.add_argument("--device", default="cuda")
    fuzz.add_argument("--cases", type=int, default=0, help="the first N cases only (0: all)")
    fuzz.add_argument("--json")

    large = sub.add_parser("large", help="fwd+bwd on a tensor above 2^31 elements, checked exactly")
    large.add_argument("--backends", default="cuda,triton")
    large.add_argument("--device", default="cuda")
    large.add_argument("--shape", default="2,16385,256,256", help="N,C,H,W of the one level")
    large.add_argument("--dtype", default="float16")
    large.add_argument("--chunk-planes", type=int, default=2048, help="planes compared at a time")
    large.add_argument("--allow-small", action="store_true", help="a rehearsal below 2^31 elements")
    large.add_argument("--json")

    streams = sub.add_parser("streams", help="non-default and concurrent streams")
    streams.add_argument("--backends", default="cuda,triton")
    streams.add_argument("--json")

    profile = sub.add_parser("profile", help="fwd+bwd of a bench workload, for ncu")
    profile.add_argument("--backends", default="cuda,triton")
    profile.add_argument("--device", default="cuda")
    profile.add_argument("--workload", default="retinanet")
    profile.add_argument("--dtype", default="float32")
    profile.add_argument("--repeats", type=int, default=1)

    args = parser.parse_args(argv)
    return {"env": cmd_env, "fuzz": cmd_fuzz, "large": cmd_large, "streams": cmd_streams, "profile": cmd_profile}[
        args.command
    ](args)


if __name__ == "__main__":
    sys.exit(main())
