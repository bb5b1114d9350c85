"""A small detection-distillation trainer around SSIM-KD (SPEC section 6).

torchvision RetinaNet / Faster R-CNN teachers and students on ResNet-FPN backbones, feature KD on the
FPN outputs (none, l2, l1, ssim), COCO-format data (a synthetic shapes set is the embedded default),
COCO mAP, checkpoint/resume, DDP through torchrun. Commands: `ssimkd demo | train | eval | make-data`.

Modules: config (TOML configs and overrides), synthetic (the shapes dataset), data (COCO loader),
models (detectors, FPN hooks), kd (feature losses, Distiller), train (the loop), checkpoint,
evaluate (COCO mAP), plots, demo.
"""

from .config import Config, load_config
from .demo import run_demo
from .evaluate import run_eval
from .train import run_train, train

__all__ = ["Config", "load_config", "train", "run_train", "run_eval", "run_demo"]
