"""Builds ssimkd_kernels._C: the fused CPU op always, the CUDA kernels too when a CUDA toolkit is found.

Environment:
    SSIMKD_NO_CUDA=1        build the CPU op only, even where nvcc exists.
    CUDA_HOME               the toolkit to use; found from `nvcc` on PATH when unset (see below).
    TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer).
"""

import os
import re
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _toolkit_from_nvcc() -> str | None:
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


def _want_cuda() -> bool:
    if os.environ.get("SSIMKD_NO_CUDA", "0") == "1":
        return False
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        toolkit = _toolkit_from_nvcc()
        if toolkit is None or not (Path(toolkit) / "bin" / "nvcc").exists():
            return False
        os.environ["CUDA_HOME"] = toolkit
    return True


WITH_CUDA = _want_cuda()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

# Imported after CUDA_HOME is settled: torch reads it once, at import.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
# torch 2.14's headers need C++20 on both compilers.
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]

sources = ["csrc/ops.cpp", "csrc/ssim_cpu.cpp", "csrc/ssim_cuda_emulated.cpp"]
cuda_sources = ["csrc/ssim_cuda.cu", "csrc/minmax_cuda.cu"]
if WITH_CUDA and all((ROOT / s).exists() for s in cuda_sources):
    extension = CUDAExtension(
        "ssimkd_kernels._C",
        sources + cuda_sources,
        define_macros=[("SSIMKD_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "ssimkd_kernels._C",
        sources,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
