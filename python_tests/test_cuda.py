"""The CUDA backend: that it is compiled in where a toolkit exists, and GPU-only properties.

Values and gradients against the reference run for "cuda" in test_backends.py on a GPU, and for its
block code on every machine as the "cuda_emulated" backend.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import sample_levels
from utils import assert_close_verbose

import ssimkd_kernels as sk

needs_gpu = pytest.mark.skipif(
    "cuda" not in sk.available_backends(), reason="needs a CUDA GPU and an extension built with CUDA kernels"
)


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("SSIMKD_NO_CUDA") == "1",
    reason="no CUDA toolkit on this machine: the extension is CPU-only by design",
)
def test_cuda_kernels_are_compiled_in_where_nvcc_exists():
    out = subprocess.run(
        [sys.executable, "-m", "ssimkd_kernels", "info", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["extension"]["gpu_kernels"] is True


@needs_gpu
def test_non_default_stream_and_two_streams_agree():
    students, teachers = sample_levels([(50, 84), (13, 21)], device="cuda", channels=16)
    expected = sk.ssim_kd_loss(students, teachers, backend="cuda")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = []
    for stream in streams:
        with torch.cuda.stream(stream):
            results.append(sk.ssim_kd_loss(students, teachers, backend="cuda"))
    torch.cuda.synchronize()
    for r in results:
        assert torch.equal(r, expected)


@needs_gpu
def test_tensor_above_two_to_the_31_elements():
    # 2^31 + a plane: int64 indexing; float16 keeps it at ~4 GiB per input.
    n, c, h, w = 1, 32769, 256, 256
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    x = torch.rand(n, c, h, w, device="cuda", dtype=torch.float16)
    y = x.clone()
    y[:, -1] = torch.rand(h, w, device="cuda", dtype=torch.float16)  # only the last plane differs
    assert x.numel() > 2**31
    loss = sk.ssim_kd_loss(x, y, backend="cuda", normalize="none")
    last = sk.ssim_kd_loss(x[:, -1:].float(), y[:, -1:].float(), backend="reference", normalize="none")
    assert_close_verbose(loss * c, last, rtol=1e-3)
