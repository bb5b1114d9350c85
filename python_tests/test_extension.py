"""The C++ extension's loading (ssimkd_kernels/_extension.py) and the choice of backend by device.

First-use builds run in subprocesses (one copy of the library per process) on a copy of the package
without its built library, compiling a stand-in for csrc/ that takes a second: the real csrc/ takes
minutes. Devices this machine lacks (ROCm, mps, xpu, other GPU generations) are mocked.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import ssimkd_kernels as sk
from ssimkd_kernels import _build, _extension, ops
from ssimkd_kernels.cli import main

PACKAGE = Path(sk.__file__).resolve().parent

# A stand-in for csrc/: the module the loader expects (PyInit__C, CUDA_COMPILED), no torch headers.
STAND_IN_SOURCE = r"""
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddIntConstant(module, "CUDA_COMPILED", 0);
  return module;
}
"""

# Runs in the subprocess: point the loader at the stand-in sources, do `action`, print the outcome.
LOAD_SCRIPT = r"""
import json, sys, warnings
from pathlib import Path
import ssimkd_kernels._build as build
build.source_dir = lambda: Path(sys.argv[1])
from ssimkd_kernels import _extension, ops
action = sys.argv[2]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if action == "ops":  # as the backends do: warns when the build fails
        ops._native_extension()
    elif action == "build":  # as `ssimkd build` does
        try:
            _extension.build()
        except _extension.BuildError as error:
            print("build error:", error, file=sys.stderr)
    else:
        _extension.load(build=action == "load")
state = _extension.describe()
state["warnings"] = [str(w.message) for w in caught if issubclass(w.category, _extension.ExtensionWarning)]
print(json.dumps(state))
"""


def _package_copy(root: Path) -> Path:
    """ssimkd_kernels without its built library, importable from `root`."""
    shutil.copytree(
        PACKAGE, root / "ssimkd_kernels", ignore=shutil.ignore_patterns("_C*.so", "_C*.so.json", "__pycache__", "csrc")
    )
    return root


def _run_loader(tmp_path: Path, sources: Path, action: str = "load", **env_overrides) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSIMKD_NO_JIT", "CXX", "PYTHONPATH")}
    env.update(
        PYTHONPATH=str(tmp_path / "pkg"), SSIMKD_CACHE=str(tmp_path / "cache"), SSIMKD_NO_CUDA="1", **env_overrides
    )
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(sources), action],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture
def stand_in(tmp_path) -> Path:
    _package_copy(tmp_path / "pkg")
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "ops.cpp").write_text(STAND_IN_SOURCE)
    return sources


def _ninja_module() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


needs_compiler = pytest.mark.skipif(
    _build.compiler_id(_build.cxx_compiler()) is None or not _ninja_module(), reason="needs a C++ compiler and ninja"
)


@needs_compiler
def test_first_use_build_compiles_once_then_loads_from_the_cache(tmp_path, stand_in):
    state, stderr = _run_loader(tmp_path, stand_in)
    assert state["loaded"] and state["origin"] == "cache", state
    assert "compiling the C++ extension (CPU op" in stderr and "done in" in stderr, stderr
    library = Path(state["path"])
    record = _build.read_record(library)
    assert record["torch"] == torch.__version__ and record["sources"] == _build.source_hash(stand_in)
    assert library.parent.parent == tmp_path / "cache" / "extensions"
    assert library.parent.name.startswith(f"{sys.implementation.cache_tag}-torch{torch.__version__}-cpu-")

    # Later processes load it without a compiler.
    state, stderr = _run_loader(tmp_path, stand_in, CXX="/bin/false")
    assert state["loaded"] and state["path"] == str(library), state
    assert "compiling" not in stderr

    # Any change to csrc/ (a header too) means a new build: here, one without a compiler, which fails.
    (stand_in / "extra.h").write_text("// changed\n")
    state, stderr = _run_loader(tmp_path, stand_in, CXX="/bin/false")
    assert not state["loaded"]
    assert "no working C++ compiler: `/bin/false --version` failed" in state["reason"], state


def test_no_jit_turns_the_first_use_build_off(tmp_path, stand_in):
    state, stderr = _run_loader(tmp_path, stand_in, SSIMKD_NO_JIT="1")
    assert not state["loaded"] and "compiling" not in stderr
    assert "SSIMKD_NO_JIT=1 turns the first-use build off" in state["reason"], state
    assert not state["warnings"]  # asked for: no warning


@needs_compiler
def test_failed_build_warns_once_with_what_remains_and_is_not_retried(tmp_path, stand_in):
    (stand_in / "ops.cpp").write_text("this is not C++;\n")
    state, stderr = _run_loader(tmp_path, stand_in, action="ops")
    assert not state["loaded"] and "failed after" in stderr
    [warning] = state["warnings"]
    assert "the first-use build failed after" in warning and "error" in warning, warning
    assert "Backends that remain: reference" in warning
    [log] = (tmp_path / "cache" / "extensions").glob("*/failed.log")
    assert "this is not C++" in log.read_text()

    # The next process does not spend minutes failing again; `ssimkd build` does try again.
    state, stderr = _run_loader(tmp_path, stand_in, action="ops")
    assert "compiling" not in stderr
    assert "an earlier first-use build" in state["reason"] and "`ssimkd build` tries again" in state["reason"]
    state, stderr = _run_loader(tmp_path, stand_in, action="build")
    assert "compiling the C++ extension" in stderr and "build error: the first-use build failed" in stderr


def test_library_built_for_another_torch_is_skipped_unloaded(tmp_path, stand_in):
    installed = tmp_path / "pkg" / "ssimkd_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    installed.write_bytes(b"not a library: loading it would fail")
    record = _build.build_record(
        torch, gpu_kernels=False, cuda_arch_list=None, compiler="gcc 12", source_digest="0", built_by="setup.py"
    )
    _build.write_record(installed, {**record, "torch": "1.0.0", "cxx11_abi": not record["cxx11_abi"]})
    state, _ = _run_loader(tmp_path, stand_in, action="ops", SSIMKD_NO_JIT="1")
    assert not state["loaded"]
    assert f"the installed extension {installed} was built for torch 1.0.0" in state["reason"], state
    assert f"but this is torch {torch.__version__}" in state["reason"] and "not loaded" in state["reason"]
    assert "failed to load" not in state["reason"]  # never opened
    [warning] = state["warnings"]  # skipped with a message, not silently
    assert "was built for torch 1.0.0" in warning and "Backends that remain: reference" in warning


@needs_compiler
def test_undefined_symbol_is_caught_and_explained(tmp_path, stand_in):
    """A library without a build record (built before records, or by hand) against another torch."""
    source = tmp_path / "stale.cpp"
    source.write_text(
        "#include <Python.h>\nvoid symbol_of_another_torch();\n"
        'extern "C" PyObject* PyInit__C(void) { symbol_of_another_torch(); return nullptr; }\n'
    )
    installed = tmp_path / "pkg" / "ssimkd_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            _build.cxx_compiler(),
            "-shared",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            str(source),
            "-o",
            str(installed),
        ],
        check=True,
        capture_output=True,
    )
    state, _ = _run_loader(tmp_path, stand_in, SSIMKD_NO_JIT="1")
    assert not state["loaded"]
    assert "undefined symbol" in state["reason"] and "it was built against another torch" in state["reason"], state


@pytest.mark.parametrize(
    "arch_list, capability, runs",
    [
        ("8.0;9.0+PTX", (8, 0), True),
        ("8.0;9.0+PTX", (8, 6), True),  # sm_80 code runs on later 8.x
        ("8.0;9.0+PTX", (9, 0), True),
        ("8.0;9.0+PTX", (10, 0), True),  # PTX of 9.0, compiled by the driver
        ("8.0;9.0+PTX", (7, 5), False),
        ("8.0 9.0", (12, 0), False),
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),  # arch-specific code runs on its own GPU only
        ("8.6", (8, 0), False),
        ("Hopper", (9, 0), True),  # a name torch expands: only the launch can tell
    ],
)
def test_cuda_arch_list_coverage(arch_list, capability, runs):
    assert _extension.covers(arch_list, capability) is runs


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_auto_sends_other_devices_to_the_reference(device, monkeypatch):
    monkeypatch.delenv("SSIMKD_BACKEND", raising=False)
    assert ops.resolve_backend("auto", torch.device(device)) == "reference"


class _FakeModule:
    def __init__(self, cuda_compiled: bool):
        self.CUDA_COMPILED = int(cuda_compiled)


def _mock_gpu_machine(monkeypatch, *, hip=None, capability=(9, 0), gpu_kernels=True, arch_list="8.0;9.0+PTX"):
    """A machine with one GPU (mocked) and an extension (mocked); returns the build flags asked of it."""
    monkeypatch.delenv("SSIMKD_BACKEND", raising=False)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", None if hip else "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    record = {"cuda_arch_list": arch_list if gpu_kernels else None, "gpu_runtime": f"hip {hip}" if hip else "cuda 13.0"}
    extension = _extension.Extension(_FakeModule(gpu_kernels), Path("_C.so"), "installed", record)
    asked = []
    monkeypatch.setattr(ops, "_native_extension", lambda build=True: asked.append(build) or extension)
    return asked


@pytest.mark.skipif(ops._triton_version() is None, reason="needs triton")
def test_rocm_uses_triton_unless_the_extension_has_hip_kernels(monkeypatch):
    asked = _mock_gpu_machine(monkeypatch, hip="6.4", gpu_kernels=False)
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert asked and not any(asked)  # no first-use build just to look for HIP kernels it never compiles
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*built without GPU kernels"):
        ops.resolve_backend("cuda", torch.device("cuda"))
    _mock_gpu_machine(monkeypatch, hip="6.4", gpu_kernels=True)  # built ahead on that machine: HIP kernels
    assert ops.resolve_backend("auto", torch.device("cuda")) == "cuda"


@pytest.mark.skipif(ops._triton_version() is None, reason="needs triton")
def test_cuda_kernels_for_other_gpus_are_not_used(monkeypatch):
    _mock_gpu_machine(monkeypatch, capability=(7, 5))
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(RuntimeError, match=r"built for 8\.0;9\.0\+PTX, and GPU 0 has compute capability 7\.5"):
        ops.resolve_backend("cuda", torch.device("cuda"))
    _mock_gpu_machine(monkeypatch, capability=(9, 0))
    assert ops.resolve_backend("auto", torch.device("cuda")) == "cuda"


def test_old_triton_is_reported_not_used(monkeypatch):
    monkeypatch.setattr(ops, "_triton_version", lambda: (3, 0))
    assert "triton 3.0 is older than the kernels need (>= 3.2)" in ops.backend_report()["triton"]["reason"]


def test_info_json_reports_each_backend_and_why(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == {"reference", "cpu", "triton", "cuda"}
    for name, state in info["backends"].items():
        assert state["available"] == (name in sk.available_backends())
        assert (state["reason"] is None) == state["available"], (name, state)
    assert info["extension"]["loaded"] == ("cpu" in sk.available_backends())
