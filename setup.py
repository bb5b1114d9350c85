"""Builds ssimkd-kernels: by default a pure-Python wheel (py3-none-any) that installs without a compiler.

The reference and Triton backends need nothing more; the C++ extension ssimkd_kernels._C (the CPU op,
and the CUDA kernels where a toolkit is found) is compiled on first use or by `ssimkd build`, from the
csrc/ that the wheel carries as ssimkd_kernels/csrc.

Environment:
    SSIMKD_BUILD_EXT=1      also build the extension now, against the torch installed in the running
                            environment: `SSIMKD_BUILD_EXT=1 pip install --no-build-isolation .`
                            (`make setup` does this, editable). The wheel is then platform-specific.
    SSIMKD_NO_CUDA=1        build the CPU op only, even where nvcc exists.
    CUDA_HOME               the toolkit to use; found from `nvcc` on PATH when unset.
    TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_recipe():
    """ssimkd_kernels/_build.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_ssimkd_build", ROOT / "ssimkd_kernels" / "_build.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def _extension_options(recipe) -> dict:
    toolkit = recipe.find_cuda_toolkit()
    if toolkit is not None:
        os.environ["CUDA_HOME"] = toolkit
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", recipe.DEFAULT_CUDA_ARCH_LIST)
    try:
        # Imported after CUDA_HOME is settled: torch reads it once, at import.
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        raise SystemExit(
            "SSIMKD_BUILD_EXT=1 builds the extension against the torch of this environment, and none is "
            f"importable ({error}): install torch first and build with `pip install --no-build-isolation`"
        ) from error

    folder = ROOT / "csrc"
    with_cuda = toolkit is not None
    source_files = [str(p.relative_to(ROOT)) for p in recipe.sources(folder, cuda=with_cuda)]
    if with_cuda:
        extension = CUDAExtension(
            f"ssimkd_kernels.{recipe.EXTENSION_NAME}",
            source_files,
            define_macros=[(recipe.CUDA_MACRO, None)],
            extra_compile_args={"cxx": recipe.CXX_FLAGS, "nvcc": recipe.NVCC_FLAGS},
            extra_link_args=recipe.LD_FLAGS,
        )
    else:
        extension = CppExtension(
            f"ssimkd_kernels.{recipe.EXTENSION_NAME}",
            source_files,
            extra_compile_args={"cxx": recipe.CXX_FLAGS},
            extra_link_args=recipe.LD_FLAGS,
        )

    class BuildWithRecord(BuildExtension):
        """torch's builder, plus the build record beside the library (read by ssimkd_kernels/_extension.py)."""

        def run(self):
            super().run()
            record = recipe.build_record(
                torch,
                gpu_kernels=with_cuda,
                cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"],
                compiler=recipe.compiler_id(recipe.cxx_compiler()),
                source_digest=recipe.source_hash(folder),
                built_by="setup.py",
            )
            for ext in self.extensions:
                # The final location: in the source tree for in-place and editable builds.
                recipe.write_record(Path(self.get_ext_fullpath(ext.name)), record)

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithRecord}}


RECIPE = _load_recipe()
setup(
    # csrc/ travels inside the package as ssimkd_kernels/csrc: the first-use build compiles it.
    packages=find_packages(include=["ssimkd_kernels", "ssimkd_kernels.*"]) + ["ssimkd_kernels.csrc"],
    package_dir={"ssimkd_kernels.csrc": "csrc"},
    package_data={"ssimkd_kernels.csrc": list(RECIPE.SOURCE_PATTERNS)},
    **(_extension_options(RECIPE) if os.environ.get("SSIMKD_BUILD_EXT", "0") == "1" else {}),
)
