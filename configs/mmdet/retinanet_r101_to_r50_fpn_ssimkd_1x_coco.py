# SSIM-KD (de Rijk & Schneider, NeurIPS 2022) in mmdetection 3.x: a RetinaNet R-50 FPN student distilled
# from a RetinaNet R-101 FPN teacher on the five FPN levels (P3-P7), COCO, 1x schedule (12 epochs).
#
#   make setup-mmdet
#   MMDET=$(.venv/bin/python -c 'import mmdet, os; print(os.path.dirname(mmdet.__file__))')
#   .venv/bin/python "$MMDET/.mim/tools/train.py" configs/mmdet/retinanet_r101_to_r50_fpn_ssimkd_1x_coco.py
#   (mmdet's tools/train.py, as shipped in its wheel)
#
# Data, schedule, optimizer and runtime are mmdet's own RetinaNet R-50 1x config; only the model changes.
# The loss is the fused SSIM-KD loss of ssimkd_kernels (C++ on the CPU, Triton/CUDA on the GPU):
#   L = L_det + lambda * sum over levels of mean (1 - SSIM(psi(F_S), psi(F_T))) / 2
# with psi = min-max normalisation per sample, reflect padding, exponents (alpha, beta, gamma) = (1, 1, 1),
# an 11x11 Gaussian window (sigma 1.5) and no adapter (student and teacher FPNs both have 256 channels).
_base_ = ["mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"]

custom_imports = dict(imports=["ssimkd_kernels.integrations.mmdet"], allow_failed_imports=False)

# lambda: 4, a starting point (not checked against the paper's text here); tune it for your setting.
ssimkd_weight = 4.0
# The teacher: mmdet model zoo's RetinaNet R-101 FPN 1x (38.5 box AP). Any trained checkpoint of the
# teacher config below works (a path or a URL).
teacher_ckpt = (
    "https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r101_fpn_1x_coco/"
    "retinanet_r101_fpn_1x_coco_20200130-7a93545f.pth"
)

model = dict(
    _delete_=True,
    type="SSIMKDDistiller",
    student={{_base_.model}},
    teacher="mmdet::retinanet/retinanet_r101_fpn_1x_coco.py",
    teacher_ckpt=teacher_ckpt,
    distill_loss=dict(
        type="SSIMKDLoss",
        loss_weight=ssimkd_weight,
        normalize="sample",
        padding="reflect",
        exponents=(1.0, 1.0, 1.0),
        window_size=11,
        sigma=1.5,
    ),
)
