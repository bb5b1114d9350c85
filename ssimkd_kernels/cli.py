"""The `ssimkd` command line (also `python -m ssimkd_kernels`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _info(args) -> int:
    from . import __version__, _extension
    from .ops import backend_report, cpu_isa

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    backends = backend_report(build=False)  # reports; compiles nothing (`ssimkd build` does)
    info = {
        "ssimkd_kernels": __version__,
        "backends": backends,
        "available_backends": [name for name, state in backends.items() if state["available"]],
        "extension": _extension.describe(),
        "cpu_isa": cpu_isa(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if key == "backends":
            for name, state in value.items():
                verdict = "available" if state["available"] else f"unavailable: {state['reason']}"
                print(f"{'backend ' + name:<{width}}  {verdict}")
        elif key == "extension":
            where = f"{value['origin']}: {value['path']}" if value["loaded"] else value["reason"]
            print(f"{'extension':<{width}}  {where}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def _build(args) -> int:
    import time

    from . import _extension

    start = time.perf_counter()
    try:
        ext, compiled = _extension.build(force=args.force)
    except _extension.BuildError as error:
        print(f"ssimkd build: {error}", file=sys.stderr)
        return 1
    kernels = "CPU op and GPU kernels" if ext.gpu_kernels else "CPU op"
    if compiled:
        print(f"built the C++ extension ({kernels}) in {time.perf_counter() - start:.0f} s: {ext.path}")
    else:
        print(
            f"the C++ extension ({kernels}) for torch {torch.__version__} is already built: {ext.path}"
            + ("" if ext.origin == "installed" else " (--force compiles it anew)")
        )
    plan = _extension.build_plan(torch)
    if not ext.gpu_kernels and plan.cpu_only_because:
        print(f"no GPU kernels: {plan.cpu_only_because}")
    return 0


def _bench_script(name: str, command: str):
    """The module bench/<name>.py of a source checkout (None, said on stderr, outside one)."""
    import importlib
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    if not (bench_dir / f"{name}.py").exists():
        print(f"ssimkd {command} needs the bench/ folder of a source checkout", file=sys.stderr)
        return None
    sys.path.insert(0, str(bench_dir))
    return importlib.import_module(name)


def _bench(args) -> int:
    bench_ssim = _bench_script("bench_ssim", "bench")
    if bench_ssim is None:
        return 2
    bench_ssim.main(args.bench_args)
    return 0


def _kernels(args) -> int:
    kernel_report = _bench_script("kernel_report", "kernels")
    if kernel_report is None:
        return 2
    argv = ["--arch", args.arch] + (["--default"] if args.default else []) + (["--no-save"] if args.no_save else [])
    result = kernel_report.main(argv)
    return 1 if result["local_memory"] else 0


# Errors of configuration and data that deserve one clear line, not a traceback.
def _user_errors():
    from .distill.data import DataError

    return (ValueError, FileNotFoundError, DataError)


def _run(action) -> int:
    try:
        action()
    except _user_errors() as error:
        print(f"ssimkd: error: {error}", file=sys.stderr)
        return 2
    return 0


def _train(args) -> int:
    from .distill.train import run_train

    return _run(lambda: run_train(args.config, args.overrides, resume=args.resume))


def _eval(args) -> int:
    from .distill.evaluate import format_metrics, run_eval

    def action():
        metrics = run_eval(args.checkpoint, args.overrides, out_json=args.json_out, progress=not args.json)
        print(
            json.dumps(metrics, indent=2) if args.json else f"{format_metrics(metrics)}  ({metrics['images']} images)"
        )

    return _run(action)


def _make_data(args) -> int:
    from .distill.config import load_config
    from .distill.synthetic import run_make_data

    def action():
        files = run_make_data(load_config(args.config, args.overrides).data, args.out)
        for name, path in vars(files).items():
            print(f"{name:<18} {path}")

    return _run(action)


def _demo(args) -> int:
    from .distill.demo import run_demo

    return _run(lambda: run_demo(args.preset, args.out, args.overrides, progress=not args.no_progress))


def _add_overrides(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """--set SECTION.FIELD=VALUE ... into args.overrides (repeatable)."""
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.FIELD=VALUE", help=help_text
    )


def _add_config_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", help=config_help)
    _add_overrides(parser, "override config fields, e.g. --set train.lr=0.01 kd.mode=ssim")


def _add_distill_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: teacher, then students with none / l2 / ssim KD, mAP table")
    demo.add_argument(
        "--preset",
        choices=("smoke", "default", "gpu"),
        default="default",
        help="smoke: ~2 min on 2 CPU cores; default: < 30 min; gpu: larger images and schedule",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="output folder (results.json, results.png, one folder per run)"
    )
    _add_overrides(demo)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a detector, optionally distilled (torchrun for DDP)")
    _add_config_options(train, "TOML file, or a preset name in configs/ (e.g. synthetic-retinanet)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from train.out/checkpoint.pt (or the given file), exactly",
    )
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("eval", help="COCO mAP of a trained detector on its config's val split")
    evaluate.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt of a train run")
    _add_overrides(evaluate, "override the saved config, e.g. data.val_annotations=... eval.max_images=100")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--json-out", help="also write the metrics to this file")
    evaluate.set_defaults(func=_eval)
    make_data = sub.add_parser("make-data", help="write the synthetic shapes dataset in COCO format")
    _add_config_options(make_data, "TOML file or preset whose data.synthetic section to use")
    make_data.add_argument("--out", help="folder to write (default: the cache folder the trainer uses)")
    make_data.set_defaults(func=_make_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssimkd", description="Fused SSIM for Structural Knowledge Distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="each backend, available or why not; the C++ extension; versions")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
    build = sub.add_parser("build", help="compile the C++ extension for this torch now (else: on first use)")
    build.add_argument("--force", action="store_true", help="compile it anew, even where a first-use build exists")
    build.set_defaults(func=_build)
    bench = sub.add_parser("bench", help="speed and memory of every backend and peer (bench/bench_ssim.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench/bench_ssim.py")
    bench.set_defaults(func=_bench)
    kernels = sub.add_parser("kernels", help="static GPU report of the kernels, no GPU needed (bench/kernel_report.py)")
    kernels.add_argument("--arch", default="80,90", help="comma list of SM versions to compile for (80, 90)")
    kernels.add_argument("--default", action="store_true", help="only the default forward and backward")
    kernels.add_argument("--no-save", action="store_true", help="do not write the JSON to bench/results/")
    kernels.set_defaults(func=_kernels)
    _add_distill_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
