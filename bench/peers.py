"""The SSIM implementations a user would pick instead of ssimkd_kernels, as bench candidates.

Each is imported only if installed (they are bench-only, not runtime dependencies: see
requirements/bench.txt). On the FPN workloads a peer computes the same SSIM-KD loss as the project,
sum over levels of mean((1 - SSIM(psi(s), psi(t))) / 2), with psi the reference's min-max
normalisation in eager PyTorch and the peer's SSIM; on the "image" workload, 1 - SSIM(x, y).
A peer that cannot run a case (planes smaller than its window, a CPU tensor) is reported as failed.
"""

from __future__ import annotations

import importlib

import torch

from ssimkd_kernels.reference import normalize_reference


def _kd_loss(ssim_fn):
    def loss(students, teachers):
        total = 0.0
        for s, t in zip(students, teachers):
            total = total + (1 - ssim_fn(normalize_reference(s, "sample"), normalize_reference(t, "sample"))) / 2
        return total

    return loss


def _image_loss(ssim_fn):
    return lambda students, teachers: 1 - ssim_fn(students[0], teachers[0])


def _pytorch_msssim():
    module = importlib.import_module("pytorch_msssim")
    return lambda x, y: module.ssim(x, y, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)


def _kornia():
    losses = importlib.import_module("kornia.losses")
    # kornia's ssim_loss is mean((1 - SSIM) / 2); undo the mapping to get mean SSIM.
    return lambda x, y: 1 - 2 * losses.ssim_loss(x, y, window_size=11, max_val=1.0, padding="same")


def _torchmetrics():
    image = importlib.import_module("torchmetrics.functional.image")
    return lambda x, y: image.structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0
    )


def _fused_ssim():
    module = importlib.import_module("fused_ssim")
    return lambda x, y: module.fused_ssim(x.float().contiguous(), y.float().contiguous(), padding="same", train=True)


def _fussim():
    module = importlib.import_module("fussim")
    fn = getattr(module, "fussim", None) or module.fused_ssim
    return lambda x, y: fn(x.float().contiguous(), y.float().contiguous())


PEERS = {
    "pytorch_msssim": (_pytorch_msssim, ("cpu", "cuda")),
    "kornia": (_kornia, ("cpu", "cuda")),
    "torchmetrics": (_torchmetrics, ("cpu", "cuda")),
    "fused-ssim": (_fused_ssim, ("cuda",)),
    "fussim": (_fussim, ("cuda",)),
}


def _image_entry_point_peers(device: torch.device) -> dict:
    """Peers of sk.ms_ssim and sk.l1_ssim_loss on the "image" workload (pytorch-msssim's, as users
    call them: data_range 1, its 11x11 window)."""
    if device.type not in ("cpu", "cuda"):
        return {}
    try:
        module = importlib.import_module("pytorch_msssim")
    except ImportError:
        return {}

    def l1_ssim(students, teachers):
        x, y = students[0], teachers[0]
        return 0.8 * (x - y).abs().mean() + 0.2 * (1 - module.ssim(x, y, data_range=1.0))

    return {
        "pytorch_msssim.ms_ssim": lambda s, t: 1 - module.ms_ssim(s[0], t[0], data_range=1.0),
        "L1 + pytorch_msssim.ssim": l1_ssim,
    }


def peer_candidates(device: torch.device, workload: str) -> dict:
    found = {}
    for name, (factory, devices) in PEERS.items():
        if device.type not in devices:
            continue
        try:
            ssim_fn = factory()
        except Exception:  # not installed, or does not import here
            continue
        found[name] = _image_loss(ssim_fn) if workload == "image" else _kd_loss(ssim_fn)
    if workload == "image":
        found.update(_image_entry_point_peers(device))
    return found
