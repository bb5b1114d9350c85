"""The C++ test of csrc/ssim_math.h, built with CMake and run by ctest (no torch needed)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_ssim_math_ctest(tmp_path):
    build = tmp_path / "build"
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DSSIMKD_BUILD_TORCH_LIB=OFF"], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(build), "--target", "test_ssim_math"], check=True, capture_output=True)
    result = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
