"""Detectors for distillation: torchvision RetinaNet and Faster R-CNN on ResNet-FPN backbones.

Everything is built by torchvision's own classes (ResNet, _resnet_fpn_extractor, RetinaNet,
FasterRCNN) with weights=None: nothing is downloaded. A pretrained ImageNet ResNet can be loaded
from a local file (model.backbone_checkpoint). FPN outputs are read with a forward hook on
`model.backbone` (FeatureTap), so no torchvision code is copied to expose them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import ModelConfig, from_dict

# Anchor aspect ratios of both families (torchvision's defaults).
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# RetinaNet's three anchor scales per level, 2^(0, 1/3, 2/3), as in the paper and torchvision.
RETINANET_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
# Group count of the "group" norm options (Wu & He's default), fewer where channels are fewer.
NORM_GROUPS = 32


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


def _norm_layer(norm: str):
    return {"batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d, "group": _group_norm}[norm]


def build_backbone(model: ModelConfig) -> nn.Module:
    """ResNet-FPN backbone: P3-P7 (with P6, P7 from P5) for RetinaNet, P2-P6 (max-pool P6) for Faster R-CNN.

    Returns:
        torchvision's BackboneWithFPN; its forward returns an OrderedDict of FPN levels.
    """
    resnet = torchvision.models.get_model(f"resnet{model.depth}", weights=None, norm_layer=_norm_layer(model.norm))
    if model.backbone_checkpoint:
        state = torch.load(model.backbone_checkpoint, map_location="cpu", weights_only=True)
        resnet.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)

    def extra_blocks(channels: int):
        return LastLevelP6P7(channels, channels) if model.family == "retinanet" else LastLevelMaxPool()

    returned_layers = [2, 3, 4] if model.family == "retinanet" else [1, 2, 3, 4]
    backbone = _resnet_fpn_extractor(resnet, model.trainable_layers, returned_layers, extra_blocks(256))
    if model.fpn_channels != backbone.out_channels:
        # torchvision fixes the FPN width at 256; a narrower FPN (the CPU presets) keeps the same
        # ResNet stages and replaces only the pyramid on top of them.
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(
            in_channels, model.fpn_channels, extra_blocks=extra_blocks(model.fpn_channels)
        )
        backbone.out_channels = model.fpn_channels
    return backbone


def build_detector(model: ModelConfig, num_classes: int, *, min_size: int, max_size: int) -> nn.Module:
    """A RetinaNet or Faster R-CNN, randomly initialised (or with a local pretrained backbone).

    Args:
        model: family, depth, FPN width, anchors and head options.
        num_classes: classes including background (K + 1).
        min_size, max_size: image sizes of the model's own transform; the loader already resized the
            images to these, so the transform only normalises and batches them.

    Returns:
        The torchvision detector (train mode).
    """
    backbone = build_backbone(model)
    if model.family == "retinanet":
        anchors = AnchorGenerator(
            tuple(tuple(int(round(s * k)) for k in RETINANET_SCALES) for s in model.anchor_sizes),
            (ASPECT_RATIOS,) * len(model.anchor_sizes),
        )
        head = None  # torchvision's default head (v1 recipe)
        if model.head_norm == "group":  # torchvision's v2 recipe: GroupNorm in the heads' convs
            head = RetinaNetHead(
                backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=_group_norm
            )
        return RetinaNet(
            backbone,
            num_classes,
            min_size=min_size,
            max_size=max_size,
            anchor_generator=anchors,
            head=head,
            score_thresh=model.score_threshold,
            nms_thresh=model.nms_threshold,
            detections_per_img=model.detections_per_image,
        )
    anchors = AnchorGenerator(tuple((s,) for s in model.anchor_sizes), (ASPECT_RATIOS,) * len(model.anchor_sizes))
    resolution = 7  # MultiScaleRoIAlign output size of torchvision's default box_roi_pool
    channels = backbone.out_channels
    if model.head_norm == "group":  # as torchvision's v2 recipe (4 normalised convs, one FC), with GroupNorm
        box_head = FastRCNNConvFCHead(
            (channels, resolution, resolution), [channels] * 4, [model.box_head_dim], norm_layer=_group_norm
        )
    else:
        box_head = TwoMLPHead(channels * resolution**2, model.box_head_dim)
    return FasterRCNN(
        backbone,
        None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=model.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=model.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=model.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=model.rpn_post_nms_top_n_test,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(model.box_head_dim, num_classes),
        box_score_thresh=model.score_threshold,
        box_nms_thresh=model.nms_threshold,
        box_detections_per_img=model.detections_per_image,
        box_batch_size_per_image=model.box_batch_size_per_image,
    )


def load_detector(path, device="cpu") -> tuple[nn.Module, dict]:
    """A detector from a `ssimkd train` output (model.pt or checkpoint.pt), built from its saved config.

    Returns:
        (model in eval mode on device, the file's contents: config, categories, ...).

    Raises:
        FileNotFoundError, or ValueError when the file is not a ssimkd detector.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(saved, dict) or not {"model", "config", "categories"} <= set(saved):
        raise ValueError(f"{path} is not a ssimkd detector checkpoint (needs model, config and categories)")
    config = from_dict(saved["config"])
    model = build_detector(
        config.model, len(saved["categories"]) + 1, min_size=config.data.min_size, max_size=config.data.max_size
    )
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), saved


def freeze(model: nn.Module) -> nn.Module:
    """The teacher's state: eval mode (BatchNorm uses its running statistics), no gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class FeatureTap:
    """Records a backbone's input batch and FPN outputs through a forward hook.

    The input is the normalised, padded batch the detector's transform built, so a teacher backbone
    run on it sees exactly what the student saw. Recording happens only while `armed`, so an
    evaluation forward does not keep a batch of features alive.

    Args:
        backbone: the module whose forward to watch (model.backbone of a torchvision detector).
    """

    def __init__(self, backbone: nn.Module):
        self.armed = False
        self.inputs = None
        self.features = None
        self._handle = backbone.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        if self.armed:
            self.inputs, self.features = args[0], output

    def pop(self):
        """(input batch, FPN outputs dict) of the last armed forward; clears them."""
        if self.features is None:
            raise RuntimeError("FeatureTap: the backbone did not run since the last pop")
        inputs, features = self.inputs, self.features
        self.inputs = self.features = None
        return inputs, features

    def remove(self) -> None:
        self._handle.remove()
