"""ssimkd_kernels: fused, differentiable SSIM over feature maps for Structural Knowledge Distillation.

    import ssimkd_kernels as sk
    loss = sk.ssim_kd_loss(student_fpn, teacher_fpn)          # sum over levels of mean (1 - SSIM) / 2
    value = sk.ssim(x, y)                                     # mean SSIM, differentiable
    criterion = sk.SSIMKDLoss(loss_weight=1.0)                # nn.Module form, optional 1x1 adapters
    loss = 1 - sk.fused_ssim(render, gt)                      # image losses: fused_ssim, l1_ssim_loss,
    value = sk.ms_ssim(x, y, data_range=1.0)                  #   ms_ssim, MSSSIMLoss

Backends: "reference" (plain PyTorch), "cpu" (C++), "triton", "cuda"; "auto" picks the fastest here.
"""

from .image import MSSSIMLoss, fused_ssim, l1_ssim_loss, ms_ssim
from .loss import SSIMKDLoss, ssim, ssim_kd_loss, ssim_map
from .ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "ssim",
    "ssim_map",
    "ssim_kd_loss",
    "SSIMKDLoss",
    "fused_ssim",
    "l1_ssim_loss",
    "ms_ssim",
    "MSSSIMLoss",
    "available_backends",
    "__version__",
]
