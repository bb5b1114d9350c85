"""The C++ extension ssimkd_kernels._C: found, checked against the running torch, or compiled on first use.

Nothing here runs at `import ssimkd_kernels` (a first-use build takes minutes): the first call that needs
the extension (the "cpu" or "cuda" backend, available_backends) runs load(), which settles once per
process, in this order:

    1. the library built ahead beside the package (`make setup`, `SSIMKD_BUILD_EXT=1 pip install`),
       when its build record matches the running torch (release, C++ ABI, CUDA/ROCm release, Python);
    2. a library that an earlier first-use build left in the cache, under the same conditions, built from
       the same csrc/ (and with kernels for the GPUs here, when a GPU build is wanted);
    3. a first-use build: torch.utils.cpp_extension.load into a cache folder named by Python, torch, the
       GPU build, the compiler and a hash of csrc/, announced on stderr with how long it took.
       SSIMKD_NO_JIT=1 turns it off; `ssimkd build` runs it ahead (build()).

A library built for another torch is skipped, never loaded (loading one fails with an undefined symbol
at best); an import error of one without a build record is caught and explained. When no extension can
be had, reason() says why (`ssimkd info`, backend errors) and take_notice() hands ops.py one warning.

The cache: $SSIMKD_CACHE/extensions (default ~/.cache/ssimkd/extensions, or under $XDG_CACHE_HOME).
A failed first-use build leaves failed.log in its folder and is not retried by later processes (a
compile that fails takes minutes to do so); `ssimkd build` retries it.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from . import _build
from ._cache import cache_root

NO_JIT_VARIABLE = "SSIMKD_NO_JIT"
FAILED_LOG = "failed.log"


@dataclass(frozen=True)
class Extension:
    """A loaded extension library."""

    module: ModuleType
    path: Path
    origin: str  # "installed" (built ahead, beside the package) or "cache" (a first-use build)
    record: dict | None  # its build record; None for an installed library built before records existed

    @property
    def gpu_kernels(self) -> bool:
        """Whether CUDA (on ROCm's torch: HIP) kernels were compiled in."""
        return bool(self.module.CUDA_COMPILED)


@dataclass(frozen=True)
class BuildPlan:
    """What a first-use build here compiles: the CPU op, and the CUDA kernels when cuda_home is set."""

    cuda_home: str | None
    cuda_arch_list: str | None
    cpu_only_because: str | None  # why no CUDA kernels, for `ssimkd build` and `ssimkd info`

    @property
    def gpu_kernels(self) -> bool:
        return self.cuda_home is not None

    def describe(self) -> str:
        return f"CPU op and CUDA kernels for {self.cuda_arch_list}" if self.gpu_kernels else "CPU op"


class BuildError(RuntimeError):
    """A first-use build that cannot run or failed; the message is the reason, in one line."""


class ExtensionWarning(UserWarning):
    """The C++ extension could not be had: the other backends still work."""


_lock = threading.RLock()
_loaded: Extension | None = None
_failure: str | None = None  # set once loading and building were tried and failed: settled for this process
_pending: str | None = None  # why load(build=False) found nothing (not settled: a build may follow)
_notice: str | None = None  # a warning for the user, handed out once


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def loaded() -> Extension | None:
    """The extension if it is loaded; never loads or builds."""
    return _loaded


def load(build: bool = True) -> Extension | None:
    """The extension, loading it (and with build=True compiling it, unless SSIMKD_NO_JIT=1) on first call.

    Returns None when there is none; reason() says why.
    """
    global _loaded, _failure, _pending, _notice
    if _loaded is not None or _failure is not None or (_pending is not None and not build):
        return _loaded  # settled, or looked already without building (ROCm asks on every GPU call)
    with _lock:
        if _loaded is not None or _failure is not None:
            return _loaded
        import torch

        notes: list[str] = []
        found = _load_installed(torch, notes) or _load_cached(torch, notes)
        if found is None and not build:
            if os.environ.get(NO_JIT_VARIABLE, "0") == "1":
                notes.append(f"no first-use build: {NO_JIT_VARIABLE}=1")
            else:
                notes.append(
                    f"not compiled for torch {torch.__version__} yet: it compiles on first use, or ahead "
                    "with `ssimkd build`"
                )
            _pending = "; ".join(notes)
            return None
        if found is None:
            if os.environ.get(NO_JIT_VARIABLE, "0") == "1":
                problems = bool(notes)  # a library was there but unusable: say so, even though no build was asked
                notes.append(
                    f"no extension was built ahead for torch {torch.__version__}, and {NO_JIT_VARIABLE}=1 "
                    "turns the first-use build off"
                )
                _failure = "; ".join(notes)
                _notice = f"the C++ extension is not available: {_failure}" if problems else None
                return None
            try:
                found = _compile(torch, build_plan(torch), why=" ".join(notes))
            except BuildError as error:
                notes.append(str(error))
                _failure = "; ".join(notes)
                _notice = f"the C++ extension is not available: {_failure}"
                return None
        _loaded, _pending = found, None
        return _loaded


def reason() -> str | None:
    """Why no extension is loaded (None when one is)."""
    return None if _loaded is not None else (_failure or _pending)


def take_notice() -> str | None:
    """A message the user should see once (a failed first-use build), then None."""
    global _notice
    notice, _notice = _notice, None
    return notice


def describe() -> dict:
    """The extension's state, for `ssimkd info --json`."""
    ext = _loaded
    return {
        "loaded": ext is not None,
        "origin": ext.origin if ext else None,
        "path": str(ext.path) if ext else None,
        "gpu_kernels": ext.gpu_kernels if ext else False,
        "built_for": ext.record if ext else None,
        "reason": reason(),
        "cache": str(cache_dir()),
    }


def _load_installed(torch, notes: list[str]) -> Extension | None:
    """The library beside the package, if there is one and it matches the running torch."""
    package = Path(__file__).resolve().parent
    # This package's folder only: not a module of that name that another finder maps elsewhere.
    found = [package / f"{_build.EXTENSION_NAME}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    record = _build.read_record(path)
    if record is not None:
        mismatch = _mismatch(torch, record)
        if mismatch:
            notes.append(
                f"the installed extension {path} {mismatch}: not loaded (rebuild it: `make setup`, or "
                "`SSIMKD_BUILD_EXT=1 pip install --no-build-isolation .`)"
            )
            return None
    try:
        module = _import_library(path)
    except (ImportError, OSError) as error:
        notes.append(_explain_import_error(path, error))
        return None
    return Extension(module, path, "installed", record)


def _load_cached(torch, notes: list[str]) -> Extension | None:
    """The newest usable library an earlier first-use build left in the cache."""
    library = _find_cached(torch)
    if library is None:
        return None
    try:
        module = _import_library(library)
    except (ImportError, OSError) as error:
        notes.append(_explain_import_error(library, error))
        return None
    return Extension(module, library, "cache", _build.read_record(library))


def _find_cached(torch) -> Path | None:
    folder = _build.source_dir()
    if not folder.is_dir():
        return None
    digest = _build.source_hash(folder)
    wants_gpu = build_plan(torch).gpu_kernels
    capabilities = _device_capabilities(torch)
    candidates = sorted(
        cache_dir().glob(f"{_cache_prefix(torch)}-*/{_build.EXTENSION_NAME}*.so"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for library in candidates:
        record = _build.read_record(library)
        if record is None or record.get("sources") != digest or _mismatch(torch, record):
            continue
        arch_list = record.get("cuda_arch_list") or ""
        if wants_gpu and not (record.get("gpu_kernels") and all(covers(arch_list, c) for c in capabilities)):
            continue  # a GPU build is wanted here: not one without kernels for these GPUs
        return library
    return None


def _import_library(library: Path) -> ModuleType:
    """Import a built library as ssimkd_kernels._C (its init function, PyInit__C, fixes the last part)."""
    spec = importlib.util.spec_from_file_location(f"{__package__}.{_build.EXTENSION_NAME}", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


def _mismatch(torch, record: dict) -> str | None:
    """'was built for torch X ..., this is torch Y ...' when the record does not fit the running torch."""
    current = _build.runtime_identity(torch)
    if all(record.get(key) == value for key, value in current.items()):
        return None
    return f"was built for {_describe_identity(record)}, but this is {_describe_identity(current)}"


def _describe_identity(identity: dict) -> str:
    abi = "C++11 ABI" if identity.get("cxx11_abi") else "pre-C++11 ABI"
    return (
        f"torch {identity.get('torch')} ({identity.get('gpu_runtime') or 'no GPU runtime'}, {abi}, "
        f"{identity.get('python')})"
    )


def _explain_import_error(path: Path, error: Exception) -> str:
    message = str(error).strip()
    if "undefined symbol" in message:
        return (
            f"the extension {path} failed to load ({message}): it was built against another torch; rebuild "
            "it (`make setup`, or `ssimkd build` for a first-use build)"
        )
    return f"the extension {path} failed to load ({message})"


# ------------------------------------------------------------------------------------------------
# GPU architectures
# ------------------------------------------------------------------------------------------------


def _device_capabilities(torch) -> list[tuple[int, int]]:
    """Compute capabilities of the CUDA GPUs here; none on CPU-only machines and on ROCm."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST `arch_list` ("8.0;9.0+PTX") runs on a GPU of `capability`.

    Binary code for X.Y runs on X.Z with Z >= Y (not on 9.0a-style arch-specific targets other than their
    own); PTX for X.Y is compiled by the driver for any newer GPU. A name torch expands itself ("Hopper")
    is taken as covering: only the launch can tell.
    """
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            return True
        built = (int(match[1]), int(match[2]))
        if match[4] and built <= capability:
            return True
        if match[3] and built == capability:
            return True
        if not match[3] and built[0] == capability[0] and built[1] <= capability[1]:
            return True
    return False


# ------------------------------------------------------------------------------------------------
# First-use builds
# ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return cache_root() / "extensions"


def build_plan(torch) -> BuildPlan:
    """The CPU op always; CUDA kernels with a CUDA torch, a toolkit, and GPUs here or TORCH_CUDA_ARCH_LIST
    set (for the GPUs present, or the listed architectures). ROCm: the CPU op only (no HIP build here)."""
    if torch.version.hip:
        return BuildPlan(None, None, "first-use builds compile no HIP kernels (ROCm's torch uses the Triton backend)")
    if torch.version.cuda is None:
        return BuildPlan(None, None, "this torch is built without CUDA")
    toolkit = _build.find_cuda_toolkit()
    if toolkit is None:
        why = (
            "SSIMKD_NO_CUDA=1"
            if os.environ.get("SSIMKD_NO_CUDA", "0") == "1"
            else "no CUDA toolkit found (nvcc on PATH, or CUDA_HOME)"
        )
        return BuildPlan(None, None, why)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
        f"{major}.{minor}" for major, minor in _device_capabilities(torch)
    )
    if not arch_list:
        return BuildPlan(None, None, "no CUDA device here and TORCH_CUDA_ARCH_LIST is not set")
    return BuildPlan(toolkit, arch_list, None)


def _cache_prefix(torch) -> str:
    return _slug(f"{sys.implementation.cache_tag}-torch{torch.__version__}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text)


def _build_folder(torch, plan: BuildPlan, compiler: str, digest: str) -> Path:
    """<cache>/<python>-torch<release>-<cpu|cudaX.Y-archs>-<compiler>-<hash>: the hash covers csrc/, the
    flags, the C++ ABI and the compiler's full version line, so any change gets its own folder."""
    import hashlib

    variant = "cpu"
    if plan.gpu_kernels:
        archs = plan.cuda_arch_list.replace(";", "-").replace(" ", "-")
        variant = f"cuda{torch.version.cuda}-sm{archs}"
    key = repr(
        (
            digest,
            _build.CXX_FLAGS,
            _build.NVCC_FLAGS,
            _build.LD_FLAGS,
            _build.runtime_identity(torch),
            plan.cuda_home,
            plan.cuda_arch_list,
            compiler,
        )
    )
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / _slug(f"{_cache_prefix(torch)}-{variant}-{compiler.replace(' ', '')}-{short}")


def _check_build_tools(folder: Path) -> str:
    """The compiler's id; BuildError naming what is missing for a build."""
    if not folder.is_dir():
        raise BuildError(f"the extension's sources (csrc/) are not where the package expects them: {folder}")
    cxx = _build.cxx_compiler()
    compiler = _build.compiler_id(cxx)
    if compiler is None:
        where = f"CXX={cxx}" if os.environ.get("CXX") else "the default compiler"
        raise BuildError(f"no working C++ compiler: `{cxx} --version` failed ({where})")
    from torch.utils.cpp_extension import is_ninja_available  # after the compiler: its import logs about CUDA

    if not is_ninja_available():
        raise BuildError("ninja is not installed (`pip install ninja`)")
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not python_h.exists():
        raise BuildError(
            f"Python's C headers are missing ({python_h}): install the python{sys.version_info.major}."
            f"{sys.version_info.minor}-dev package"
        )
    return compiler


@contextlib.contextmanager
def _toolkit_environment(plan: BuildPlan):
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST of the plan, for the duration of a build."""
    from torch.utils import cpp_extension

    saved_env = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    # torch.utils.cpp_extension reads CUDA_HOME once, at import, and guesses it wrong behind an nvcc
    # wrapper script: give it the toolkit _build found.
    saved_home = cpp_extension.CUDA_HOME
    if plan.gpu_kernels:
        os.environ.update(CUDA_HOME=plan.cuda_home, TORCH_CUDA_ARCH_LIST=plan.cuda_arch_list)
        cpp_extension.CUDA_HOME = plan.cuda_home
    try:
        yield cpp_extension
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_error_line(log: str) -> str:
    """The compiler's first diagnostic ("file:line:col: error: ...") in a build's output, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\b(fatal )?error:", line, re.IGNORECASE):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def _compile(torch, plan: BuildPlan, *, why: str = "", asked: bool = False, fresh: bool = False) -> Extension:
    """Compile the extension into its cache folder and load it; BuildError says why it could not.

    asked: an explicit `ssimkd build`, which retries a failed build; fresh: delete the folder first.
    """
    folder = _build.source_dir()
    compiler = _check_build_tools(folder)
    digest = _build.source_hash(folder)
    build_folder = _build_folder(torch, plan, compiler, digest)
    if fresh:
        shutil.rmtree(build_folder, ignore_errors=True)
    failed_log = build_folder / FAILED_LOG
    if failed_log.exists() and not asked:
        first_error = _first_error_line(failed_log.read_text())
        raise BuildError(
            f"an earlier first-use build in {build_folder} failed ({first_error}; log: {failed_log}); "
            "`ssimkd build` tries again"
        )
    build_folder.mkdir(parents=True, exist_ok=True)
    defines = [f"-D{_build.CUDA_MACRO}"] if plan.gpu_kernels else []
    print(
        f"ssimkd_kernels: {why + ' ' if why else ''}compiling the C++ extension ({plan.describe()}, {compiler}, "
        f"torch {torch.__version__}) into {build_folder}, once; this takes minutes ...",
        end=" ",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        with _toolkit_environment(plan) as cpp_extension:
            library = cpp_extension.load(
                name=_build.EXTENSION_NAME,
                sources=[str(p) for p in _build.sources(folder, cuda=plan.gpu_kernels)],
                extra_cflags=_build.CXX_FLAGS + defines,
                extra_cuda_cflags=_build.NVCC_FLAGS + defines,
                extra_ldflags=_build.LD_FLAGS,
                build_directory=str(build_folder),
                with_cuda=plan.gpu_kernels,
                is_python_module=False,  # only the file's path: _import_library imports it as ssimkd_kernels._C
                verbose=False,
            )
    except Exception as error:  # a compiler error, a crash of ninja, a library that does not load: all a reason
        seconds = time.perf_counter() - start
        print(f"failed after {seconds:.0f} s", file=sys.stderr, flush=True)
        failed_log.write_text(f"{type(error).__name__}: {error}\n")
        raise BuildError(
            f"the first-use build failed after {seconds:.0f} s: {_first_error_line(str(error))} (log: {failed_log})"
        ) from error
    seconds = time.perf_counter() - start
    failed_log.unlink(missing_ok=True)
    # Recent torch returns the library's path (named _C_v<N> after an in-process rebuild); 2.4 returns None.
    library = Path(library) if library else build_folder / f"{_build.EXTENSION_NAME}.so"
    _build.write_record(
        library,
        _build.build_record(
            torch,
            gpu_kernels=plan.gpu_kernels,
            cuda_arch_list=plan.cuda_arch_list,
            compiler=compiler,
            source_digest=digest,
            built_by="first use",
        ),
    )
    try:
        module = _import_library(library)
    except (ImportError, OSError) as error:
        raise BuildError(_explain_import_error(library, error)) from error
    print(f"done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return Extension(module, library, "cache", _build.read_record(library))


def build(force: bool = False) -> tuple[Extension, bool]:
    """`ssimkd build`: the extension for this torch, compiled now into the cache unless one is already
    usable (force: compile the cache's anew). SSIMKD_NO_JIT does not apply: this is the asked-for build.

    Returns (extension, compiled now); raises BuildError with the reason.
    """
    global _loaded, _failure, _pending
    import torch

    with _lock:
        if _loaded is not None and not (force and _loaded.origin == "cache"):
            return _loaded, False
        if _loaded is not None:
            # One copy of the library per process: a second would register the ssimkd ops twice.
            raise BuildError("the extension is already loaded in this process; run `ssimkd build --force` on its own")
        notes: list[str] = []
        found = _load_installed(torch, notes)
        if found is None and not force:
            found = _load_cached(torch, notes)
        compiled = found is None
        if compiled:
            found = _compile(torch, build_plan(torch), why=" ".join(notes), asked=True, fresh=force)
        _loaded, _failure, _pending = found, None, None
        return found, compiled
