"""The distribution: `python -m build` makes the sdist and a pure-Python wheel, and the wheel installs
into a new venv (no compiler needed) where the loss and its gradient run.

The new venv is made for the test; torch reaches it from a venv that holds only torch and numpy (and
their dependencies), made once per machine in the cache: pip takes ~3 min on 2 cores to unpack torch's
~5 GB of local wheels, too slow to repeat on every run. A .pth file puts that venv's site-packages on
the new venv's path, so pip sees torch as installed, as in a user's venv that has torch, and nothing
else leaks in (no --system-site-packages, no PYTHONPATH, the working folder is not the checkout).
"""

import fcntl
import json
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch

import ssimkd_kernels as sk
from ssimkd_kernels._cache import cache_root

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
TORCH_RELEASE = torch.__version__.split("+")[0]

# Runs in the new venv; the same seeded inputs in the test process give the expected numbers.
LOSS_SCRIPT = """
import json, torch, ssimkd_kernels as sk
torch.manual_seed(0)
students = [torch.randn(2, 4, 13, 11, requires_grad=True), torch.randn(2, 4, 7, 6, requires_grad=True)]
teachers = [torch.randn(2, 4, 13, 11), torch.randn(2, 4, 7, 6)]
loss = sk.ssim_kd_loss(students, teachers)
loss.backward()
print(json.dumps({"file": sk.__file__, "backends": sk.available_backends(), "loss": loss.item(),
                  "grads": [s.grad.double().norm().item() for s in students]}))
"""


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _site_packages(env: Path) -> Path:
    [site] = env.glob("lib/python*/site-packages")
    return site


def _torch_base_env() -> Path:
    """A venv with only torch (this release) and numpy, made once per machine under the cache."""
    base = cache_root() / "test-envs" / f"torch-{TORCH_RELEASE}-{sys.implementation.cache_tag}"
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.parent / f"{base.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others wait and reuse
        if not (base / "complete").exists():
            subprocess.run(["rm", "-rf", str(base)], check=True)
            venv.create(base, with_pip=True)
            _run([base / "bin" / "python", "-m", "pip", "install", "--quiet", f"torch=={TORCH_RELEASE}", "numpy"])
            (base / "complete").touch()
    return base


def test_sdist_and_pure_wheel_install_and_run_without_a_compiler(tmp_path):
    # The sdist, then the wheel from it, each in pip's isolated build environment (setuptools only).
    _run([sys.executable, "-m", "build", "--outdir", tmp_path / "dist", ROOT], cwd=tmp_path)
    [sdist] = (tmp_path / "dist").glob("*.tar.gz")
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"ssimkd_kernels-{sk.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        wheel_files = archive.namelist()
    assert "ssimkd_kernels/csrc/ops.cpp" in wheel_files and "ssimkd_kernels/_build.py" in wheel_files
    assert not [f for f in wheel_files if f.endswith((".so", ".pyd", ".so.json"))], wheel_files
    with tarfile.open(sdist) as archive:
        sdist_files = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"setup.py", "pyproject.toml", "csrc/ops.cpp", "ssimkd_kernels/_build.py"} <= sdist_files

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    (_site_packages(env) / "torch-only-base.pth").write_text(f"{_site_packages(_torch_base_env())}\n")
    python = env / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SSIMKD_", "PYTHON", "TRITON_"))}
    no_compiler = {**clean, "CC": "/bin/false", "CXX": "/bin/false"}
    _run([python, "-m", "pip", "install", "--quiet", wheel], cwd=tmp_path, env=no_compiler)

    result = _run([python, "-c", LOSS_SCRIPT], cwd=tmp_path, env={**no_compiler, "SSIMKD_NO_JIT": "1"})
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(env), got["file"]  # the installed copy, not the checkout
    assert "cpu" not in got["backends"] and "compiling" not in result.stderr

    torch.manual_seed(0)
    students = [torch.randn(2, 4, 13, 11, requires_grad=True), torch.randn(2, 4, 7, 6, requires_grad=True)]
    teachers = [torch.randn(2, 4, 13, 11), torch.randn(2, 4, 7, 6)]
    loss = sk.ssim_kd_loss(students, teachers, backend="reference")
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert got["grads"] == pytest.approx([s.grad.double().norm().item() for s in students], rel=1e-5)

    info = json.loads(
        _run([env / "bin" / "ssimkd", "info", "--json"], cwd=tmp_path, env={**no_compiler, "SSIMKD_NO_JIT": "1"}).stdout
    )
    assert info["backends"]["reference"]["available"]
    assert not info["backends"]["cpu"]["available"] and "SSIMKD_NO_JIT=1" in info["backends"]["cpu"]["reason"]
