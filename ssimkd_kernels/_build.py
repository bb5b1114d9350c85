"""How the C++ extension ssimkd_kernels._C is built: its sources, flags and toolkit, and the build record
written beside every build.

One recipe for both ways of building: ahead of time by setup.py (`SSIMKD_BUILD_EXT=1`, `make setup`)
and on first use by _extension.py (torch.utils.cpp_extension.load). Only the standard library is
imported at module level, so setup.py loads this file without importing torch or the package.

The build record (`<library>.json`) says which torch, C++ ABI, CUDA/ROCm release and Python the library
was built against; the loader compares it with the running torch before it loads the library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# PyInit__C in csrc/ops.cpp fixes the module name.
EXTENSION_NAME = "_C"
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.14's headers need C++20 on both compilers
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
LD_FLAGS = ["-fopenmp"]
CUDA_MACRO = "SSIMKD_WITH_CUDA"  # compiles the CUDA kernels and their registrations into ops.cpp
# Ahead-of-time builds: A100, H100/H200, and PTX for newer GPUs. First-use builds target the GPUs present.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
RECORD_FORMAT = 1
# The files of csrc/ that builds read: what wheels ship and what the source hash covers.
SOURCE_PATTERNS = ("*.h", "*.hpp", "*.cuh", "*.cpp", "*.cu")


def source_dir() -> Path:
    """csrc/: shipped inside the package by wheels (ssimkd_kernels/csrc), beside it in a source checkout."""
    package = Path(__file__).resolve().parent
    shipped = package / "csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


def sources(folder: Path, cuda: bool) -> list[Path]:
    """The translation units: every csrc/*.cpp, and with CUDA every csrc/*.cu, so new files need no edit here."""
    found = sorted(folder.glob("*.cpp"))
    if cuda:
        found += sorted(folder.glob("*.cu"))
    return found


def source_hash(folder: Path) -> str:
    """sha256 over the name and bytes of every source file directly in csrc/ (headers too): a change
    to any of them means a new first-use build."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCE_PATTERNS for p in folder.glob(pattern)}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def toolkit_from_nvcc() -> str | None:
    """The CUDA toolkit folder behind the `nvcc` on PATH.

    torch's builder guesses CUDA_HOME from nvcc's location, which is wrong when nvcc is a wrapper
    script (`exec <toolkit>/bin/nvcc "$@"`): follow the script to the compiler it runs.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        match = re.search(rb"""exec\s+["']?(\S+?/bin/nvcc)\b""", head)
        if match is None:
            return None
        nvcc = match.group(1).decode()
    return str(Path(os.path.realpath(nvcc)).parent.parent)


def find_cuda_toolkit() -> str | None:
    """CUDA_HOME (or CUDA_PATH) when set, else the toolkit behind `nvcc`; None without a usable nvcc.
    SSIMKD_NO_CUDA=1 answers None: build the CPU op only."""
    if os.environ.get("SSIMKD_NO_CUDA", "0") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or toolkit_from_nvcc()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return None
    return home


def cxx_compiler() -> str:
    """The C++ compiler torch's builders run: $CXX, else `c++`."""
    return os.environ.get("CXX") or "c++"


def compiler_id(cxx: str) -> str | None:
    """'gcc 12.2.0', 'clang 16.0.6', ... for the compiler command `cxx`; None when it does not run."""
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    first_line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    if result.returncode != 0 or not first_line:
        return None
    versions = re.findall(r"\b\d+\.\d+(?:\.\d+)?\b", first_line)
    if "clang" in first_line:
        name, version = "clang", versions[0] if versions else ""
    elif "gcc" in first_line.lower() or "g++" in first_line or "Free Software Foundation" in result.stdout:
        name, version = "gcc", versions[-1] if versions else ""
    else:
        name, version = Path(cxx).name, versions[0] if versions else ""
    return f"{name} {version}".strip()


def gpu_runtime(torch) -> str | None:
    """'cuda 13.0', 'hip 6.4', or None for a CPU-only torch: what GPU code built against `torch` targets."""
    if torch.version.hip:
        return f"hip {torch.version.hip}"
    if torch.version.cuda:
        return f"cuda {torch.version.cuda}"
    return None


def runtime_identity(torch) -> dict:
    """The facts about the running torch and Python that a built library must match."""
    return {
        "python": sys.implementation.cache_tag,
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "gpu_runtime": gpu_runtime(torch),
    }


def build_record(
    torch, *, gpu_kernels: bool, cuda_arch_list: str | None, compiler: str | None, source_digest: str, built_by: str
) -> dict:
    """What a build was made against and of (written as `<library>.json`)."""
    return {
        "format": RECORD_FORMAT,
        **runtime_identity(torch),
        "gpu_kernels": gpu_kernels,
        "cuda_arch_list": cuda_arch_list if gpu_kernels else None,
        "compiler": compiler,
        "sources": source_digest,
        "built_by": built_by,
    }


def record_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def write_record(library: Path, record: dict) -> None:
    path = record_path(library)
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(staging, path)  # atomic: a concurrent reader sees the old record or the new one


def read_record(library: Path) -> dict | None:
    """The build record of `library`; None when there is none or it cannot be read."""
    try:
        record = json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None
