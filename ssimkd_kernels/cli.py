"""The `ssimkd` command line (also `python -m ssimkd_kernels`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _info(args) -> int:
    from . import __version__
    from .ops import CUDA_COMPILED, EXTENSION_ERROR, available_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "ssimkd_kernels": __version__,
        "backends": available_backends(),
        "cuda_compiled": CUDA_COMPILED,
        "extension_error": None if EXTENSION_ERROR is None else str(EXTENSION_ERROR),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _bench(args) -> int:
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    if not (bench_dir / "bench_ssim.py").exists():
        print("ssimkd bench needs the bench/ folder of a source checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir))
    import bench_ssim

    bench_ssim.main(args.bench_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssimkd", description="Fused SSIM for Structural Knowledge Distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, versions and whether CUDA kernels were compiled in")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="speed and memory of every backend and peer (bench/bench_ssim.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench/bench_ssim.py")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
