"""The bench workloads of SPEC section 4 (and the single-level image case of the bench suite)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    channels: int
    planes: tuple[tuple[int, int], ...]
    description: str

    @property
    def elements(self) -> int:
        """Elements of one input (student or teacher), all levels."""
        return sum(self.batch * self.channels * h * w for h, w in self.planes)

    def make(self, device, dtype=torch.float32, requires_grad=True, seed=0, unit_range=False):
        """Student and teacher level lists; the student requires grad, the teacher does not.

        Features are standard normal (FPN-like, signed); unit_range=True gives images in [0, 1].
        """
        g = torch.Generator().manual_seed(seed)
        draw = torch.rand if unit_range else torch.randn
        shape = lambda h, w: (self.batch, self.channels, h, w)  # noqa: E731
        students = [draw(shape(h, w), generator=g).to(device=device, dtype=dtype) for h, w in self.planes]
        teachers = [draw(shape(h, w), generator=g).to(device=device, dtype=dtype) for h, w in self.planes]
        for s in students:
            s.requires_grad_(requires_grad)
        return students, teachers


WORKLOADS = {
    # COCO 800x1333 input, FPN P3-P7 of RetinaNet, batch 2, 256 channels.
    "retinanet": Workload(
        "retinanet",
        2,
        256,
        ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11)),
        "RetinaNet P3-P7 at 800x1333, batch 2, C=256",
    ),
    # Small enough for CPU runs.
    "small": Workload(
        "small", 1, 64, ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4)), "5 levels 64x64..4x4, batch 1, C=64"
    ),
    # One level, image-like: where the image-SSIM peers (fused-ssim, pytorch-msssim, ...) compete.
    "image": Workload("image", 8, 3, ((512, 512),), "one level 8x3x512x512"),
}

# SPEC section 4 floors, per element of one fp32 input: bytes moved and fp32 FLOPs (2 per FMA).
FLOOR_BYTES = {"fwd": 8, "fwd+bwd": 20}
FLOOR_FLOPS = {"fwd": 2 * 110, "fwd+bwd": 2 * 290}
# Peak memory bandwidth (B/s) and fp32 FMA throughput (FLOP/s) of the GPUs the floors are quoted for.
DEVICE_PEAKS = {
    "H100": (3.35e12, 67e12),
    "H200": (4.8e12, 67e12),
}


def device_peaks(device_name: str):
    for key, peaks in DEVICE_PEAKS.items():
        if key in device_name:
            return peaks
    return None
