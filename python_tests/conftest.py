"""Shared fixtures: seeding, the backend under test, and the FPN-like level factory."""

import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. The switch must be set
# before triton.jit decorates the kernels, i.e. before ssimkd_kernels.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from ssimkd_kernels.ops import EMULATED_CUDA, _unavailable  # noqa: E402

# The fused backends under test. "cuda_emulated" is the CUDA kernels' block code compiled for the host
# and run with every thread of each block on CPU tensors, checked for races, out-of-bounds accesses,
# uninitialised shared reads and barrier divergence: how machines without a GPU test the CUDA kernels.
FUSED_BACKENDS = ("cpu", "triton", "cuda", EMULATED_CUDA)


def device_of(backend: str) -> torch.device:
    """Where a backend's inputs live: CUDA for cuda, and for triton when a GPU exists; else CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def case_size(backend: str) -> dict:
    """Batch and channels of the comparison cases: smaller for Triton's interpreter, which runs each
    program's matrix products in numpy, one program at a time."""
    if backend == "triton" and not torch.cuda.is_available():
        return {"batch": 1, "channels": 2}
    return {"batch": 2, "channels": 3}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def backend_available(name: str) -> bool:
    return _unavailable(name) is None  # cuda_emulated: whenever the extension is loaded


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request) -> str:
    """Each fused backend that can run here; a missing one is skipped, with the reason."""
    if not backend_available(request.param):
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param


# Plane sizes of an FPN-like level list: tiny (smaller than the window), odd, and one large.
TINY_PLANES = [(1, 1), (2, 9), (3, 4), (5, 7), (7, 11)]


def sample_levels(
    planes,
    *,
    batch: int = 2,
    channels: int = 3,
    dtype=torch.float32,
    device="cpu",
    layout: str = "contiguous",
    requires_grad: bool = True,
    signed: bool = True,
):
    """Student and teacher level lists for the given (H, W) planes.

    layout: "contiguous", "channels_last", or "sliced" (a strided view into a larger tensor).
    """

    def one(h, w):
        values = torch.randn(batch, channels * 2, h + 3, w * 2 + 1, dtype=torch.float64)
        if not signed:
            values = values.sigmoid()
        values = values.to(dtype=dtype, device=device)
        if layout == "sliced":  # a strided view: every other channel and column, an offset row window
            t = values[:, ::2, 1 : h + 1, 1 : 2 * w + 1 : 2]
            assert t.numel() == 1 or not t.is_contiguous()  # one element is contiguous in any view
        else:
            t = values[:, :channels, :h, :w].contiguous()
            if layout == "channels_last":
                t = t.contiguous(memory_format=torch.channels_last)
        return t.detach().requires_grad_(requires_grad)

    students = [one(h, w) for h, w in planes]
    teachers = [one(h, w) for h, w in planes]
    return students, teachers
