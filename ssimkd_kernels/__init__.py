"""ssimkd_kernels: fused, differentiable SSIM over feature maps for Structural Knowledge Distillation.

    import ssimkd_kernels as sk
    loss = sk.ssim_kd_loss(student_fpn, teacher_fpn)          # sum over levels of mean (1 - SSIM) / 2
    value = sk.ssim(x, y)                                     # mean SSIM, differentiable
    criterion = sk.SSIMKDLoss(loss_weight=1.0)                # nn.Module form, optional 1x1 adapters

Backends: "reference" (plain PyTorch), "cpu" (C++), "triton", "cuda"; "auto" picks the fastest here.
"""

from .loss import SSIMKDLoss, ssim, ssim_kd_loss, ssim_map
from .ops import available_backends

__version__ = "0.1.0"

__all__ = ["ssim", "ssim_map", "ssim_kd_loss", "SSIMKDLoss", "available_backends", "__version__"]
