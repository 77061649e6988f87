"""Mask R-CNN variants assembled from torchvision parts.

Every variant is built the same way (ResNet body → FPN → MaskRCNN) so that one weight-loading
path serves them all: ``pretrained`` only decides the normalisation (frozen BN statistics, as
torchvision does for pretrained backbones, or trainable BN from scratch) and how many backbone
stages train by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from models.pooling import use_gather_roi_align
from models.precision import use_float32_coordinates
from models.roi_heads import use_matched_mask_targets
from models.rpn import use_chunked_anchor_matching
from models.scale import ScaleTransform


@dataclass(frozen=True)
class ModelOptions:
    """Options that shape the detector; dense cell images need the caps raised together.

    The one declaration of these fields (type, default) and, in ``check``, their one validation:
    ``engine.config.TrainConfig`` inherits them, each set by the train.py flag of its name
    (``--min-size`` for ``min_size``; ``anchor_ratios`` has no flag).
    """
    min_size: int = 800               # torchvision's resize, when input_scale is None
    max_size: int = 1333
    input_scale: float | None = None  # set: resize every input by this factor (min/max_size unused)
    input_scale_test: float | None = None  # the factor at evaluation and prediction; None: input_scale
    # Set: each image at evaluation and prediction is resized so that its objects' median diameter
    # (measured at input_scale_test) becomes this many model pixels (engine.inference.detect).
    object_diameter_test: float | None = None
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # one per FPN level
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_test_pixels: int | None = None  # model-input pixels the test caps are for (others: per area); None: per input
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box/mask losses
    trainable_backbone_layers: int | None = None  # None: 3 when pretrained, else all 5
    head_norm: str | None = None      # "batch"/"none": BatchNorm in the FPN and mask head; None: the variant's

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag and the valid range of the first option that cannot work."""
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        need(self.input_scale is None or 0.05 <= self.input_scale <= 20,
             f"--input-scale must be a factor in 0.05..20, got {self.input_scale}")
        need(self.input_scale_test is None or 0.05 <= self.input_scale_test <= 20,
             f"--input-scale-test must be a factor in 0.05..20, got {self.input_scale_test}")
        need(self.object_diameter_test is None or self.object_diameter_test > 0,
             f"--object-diameter-test must be a diameter in model pixels > 0, got {self.object_diameter_test}")
        need(self.object_diameter_test is None or self.input_scale is not None,
             "--object-diameter-test needs a fixed input scale (--input-scale), not --min-size/--max-size")
        need(self.detections_per_img >= 1, f"--detections-per-img must be ≥ 1, got {self.detections_per_img}")
        need(0 < self.min_size <= self.max_size,
             f"--min-size must be in 1..--max-size, got {self.min_size} > {self.max_size}"
             if self.min_size > self.max_size else f"--min-size must be ≥ 1, got {self.min_size}")
        need(len(self.anchor_sizes) == 5 and all(a > 0 for a in self.anchor_sizes),
             f"--anchor-sizes needs 5 positive sizes (one per FPN level), got {list(self.anchor_sizes)}")
        need(len(self.anchor_ratios) >= 1 and all(r > 0 for r in self.anchor_ratios),
             f"anchor_ratios must be positive aspect ratios, got {list(self.anchor_ratios)}")
        for name in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                     "rpn_post_nms_top_n_test"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        need(self.rpn_test_pixels is None or self.rpn_test_pixels >= 1,
             f"--rpn-test-pixels must be ≥ 1, got {self.rpn_test_pixels}")
        need(0 <= self.box_score_thresh < 1, f"--box-score-thresh must be in [0, 1), got {self.box_score_thresh}")
        need(self.box_batch_size_per_image >= 1,
             f"--box-batch-size-per-image must be ≥ 1, got {self.box_batch_size_per_image}")
        need(0 < self.box_nms_thresh <= 1, f"--box-nms-thresh must be in (0, 1], got {self.box_nms_thresh}")
        need(self.trainable_backbone_layers is None or 0 <= self.trainable_backbone_layers <= 5,
             f"--trainable-backbone-layers must be in 0..5, got {self.trainable_backbone_layers}")
        need(self.head_norm in (None, *HEAD_NORMS), f"--head-norm must be one of {', '.join(HEAD_NORMS)}, "
             f"got {self.head_norm!r}")


HEAD_NORMS = ("batch", "none")


@dataclass(frozen=True)
class Variant:
    backbone: str                 # torchvision.models.resnet builder name
    v2: bool                      # the improved heads of maskrcnn_resnet50_fpn_v2
    weights_enum: str | None      # full-model torchvision weights enum, where one exists
    description: str = field(default="")
    width: int = 256              # FPN and head channels; the small variants use 128
    head_norm: str = "none"       # default --head-norm: "batch" where no pretrained heads exist


VARIANTS: dict[str, Variant] = {
    "maskrcnn_resnet50_fpn": Variant("resnet50", False, "MaskRCNN_ResNet50_FPN_Weights",
                                     "torchvision's Mask R-CNN R50-FPN (default for real data)"),
    "maskrcnn_resnet50_fpn_v2": Variant("resnet50", True, "MaskRCNN_ResNet50_FPN_V2_Weights",
                                        "R50-FPN with BN heads and 4-conv RPN/box heads"),
    "maskrcnn_resnet34_fpn": Variant("resnet34", False, None, "small: R34-FPN, 128-channel neck and heads",
                                     width=128, head_norm="batch"),
    "maskrcnn_resnet18_fpn": Variant("resnet18", False, None,
                                     "small, CPU friendly: R18-FPN, 128-channel neck and heads (quick start)",
                                     width=128, head_norm="batch"),
}


def model_names() -> list[str]:
    return list(VARIANTS)


def check_model_name(name: str) -> Variant:
    if name not in VARIANTS:
        listing = "\n".join(f"  {n:26s} {v.description}" for n, v in VARIANTS.items())
        raise ValueError(f"unknown --model {name!r}; valid models:\n{listing}")
    return VARIANTS[name]


def assemble_model(name: str, num_classes: int, options: ModelOptions, pretrained: bool) -> MaskRCNN:
    """Build variant ``name`` with ``num_classes`` (background included) and random weights."""
    variant = check_model_name(name)
    options.check()
    trainable = options.trainable_backbone_layers
    if trainable is None:
        trainable = 3 if pretrained else 5

    # v2 always trains BN (as torchvision's v2); v1 freezes BN statistics when pretrained.
    norm: Callable[..., nn.Module] = nn.BatchNorm2d if (variant.v2 or not pretrained) else FrozenBatchNorm2d
    body = getattr(torchvision.models, variant.backbone)(weights=None, norm_layer=norm)
    # BatchNorm in the FPN and the mask head (v2 always has it): R18-FPN from scratch on
    # MoNuSeg reached segm AP 0.212 in 228 steps with it, 0.124 without (docs/benchmarks.md);
    # the R50 default keeps torchvision's layout, which its COCO weights fit.
    head_norm = variant.v2 or (options.head_norm or variant.head_norm) == "batch"
    head_norm_layer = nn.BatchNorm2d if head_norm else None
    if variant.width == 256:
        backbone = _resnet_fpn_extractor(body, trainable, norm_layer=head_norm_layer)
    else:
        backbone = _narrow_fpn(body, trainable, variant.width, head_norm_layer)

    anchors = AnchorGenerator(tuple((s,) for s in options.anchor_sizes),
                              (tuple(options.anchor_ratios),) * len(options.anchor_sizes))
    extra: dict[str, nn.Module] = {}
    if variant.width != 256:
        # At 256 channels the stride-4 FPN level and the 1024-wide box MLP cost more than an
        # R18 body; halving the width keeps CPU steps short at a small cost in accuracy.
        w = variant.width
        extra = {
            "box_head": TwoMLPHead(w * 7 * 7, 4 * w),
            "box_predictor": FastRCNNPredictor(4 * w, num_classes),
            "mask_head": MaskRCNNHeads(w, [w] * 4, 1, norm_layer=head_norm_layer),
            "mask_predictor": MaskRCNNPredictor(w, w, num_classes),
        }
        num_classes = None  # the predictors above carry it
    elif variant.v2:
        extra = {
            "rpn_head": RPNHead(backbone.out_channels, len(options.anchor_ratios), conv_depth=2),
            "box_head": FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
            "mask_head": MaskRCNNHeads(backbone.out_channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
        }
    elif head_norm:
        extra = {"mask_head": MaskRCNNHeads(backbone.out_channels, [256] * 4, 1, norm_layer=head_norm_layer)}
    model = MaskRCNN(
        backbone, num_classes=num_classes, min_size=options.min_size, max_size=options.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=options.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=options.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=options.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=options.rpn_post_nms_top_n_test,
        box_score_thresh=options.box_score_thresh, box_nms_thresh=options.box_nms_thresh,
        box_detections_per_img=options.detections_per_img,
        box_batch_size_per_image=options.box_batch_size_per_image, **extra)
    use_matched_mask_targets(model.roi_heads)
    use_chunked_anchor_matching(model.rpn, options.rpn_test_pixels)
    use_float32_coordinates(model)
    use_gather_roi_align(model.roi_heads)
    if options.input_scale is not None:
        model.transform = ScaleTransform(options.input_scale, model.transform.image_mean, model.transform.image_std,
                                         test_scale=options.input_scale_test,
                                         object_diameter=options.object_diameter_test)
    # Channels-last weights make every convolution run channels-last (oneDNN's native layout).
    # In bf16 on CPU a contiguous convolution is computed channels-last anyway and its input and
    # output are converted at each layer: a MoNuSeg training step took 1.04 s contiguous, 0.88 s
    # channels-last; fp32 steps cost the same either way (bench/profile_step.py). Every model is
    # built so, for training and inference alike, so the trainer's validation, evaluate.py and
    # predict.py run the same kernels and give identical predictions.
    return model.to(memory_format=torch.channels_last)


def with_torchvision_classes(model: MaskRCNN) -> MaskRCNN:
    """Switch the RPN and RoI heads back to torchvision's classes in place, for TorchScript.

    ``build_model`` gives them subclasses that change only how training targets are built
    (``models/rpn.py``, ``models/roi_heads.py``), keep coordinates fp32 under autocast
    (``models/precision.py``) and pool RoIs in training by a gather on CPU (``models/pooling.py``);
    they hold no state of their own and infer with torchvision's
    code, but TorchScript compiles every ``forward`` it meets and cannot compile their
    ``super()`` calls. The model still trains afterwards, with torchvision's targets.
    """
    fix_rpn_test_caps(model)
    model.rpn.__class__ = RegionProposalNetwork
    model.roi_heads.__class__ = RoIHeads
    model.rpn.anchor_generator.__class__ = AnchorGenerator
    for part in (model.rpn, model.roi_heads):
        part.box_coder.__class__ = BoxCoder
    for pooler in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        if isinstance(pooler, MultiScaleRoIAlign):
            pooler.__class__ = MultiScaleRoIAlign
    return model


def fix_rpn_test_caps(model: MaskRCNN) -> int:
    """Make test caps that follow the input's area (``ModelOptions.rpn_test_pixels``) fixed, at
    their value for a median training image at the test scale → that value (post-NMS). Exported
    models need one value: TorchScript runs torchvision's RPN, and an ONNX trace keeps the caps
    of its example input."""
    rpn, transform = model.rpn, model.transform
    if getattr(rpn, "test_pixels", None) is not None:
        growth = (transform.test_scale / transform.scale) ** 2 if hasattr(transform, "test_scale") else 1.0
        rpn.fix_test_caps(int(round(rpn.test_pixels * growth)))
    return int(rpn._post_nms_top_n["testing"])


def _narrow_fpn(body: nn.Module, trainable_layers: int, width: int,
                norm_layer: Callable[..., nn.Module] | None) -> BackboneWithFPN:
    """ResNet body with an FPN of ``width`` channels over stages 1-4 plus a max-pool level."""
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(stage) for stage in stages):
            parameter.requires_grad_(False)
    stage_channels = [body.layer1[-1].conv2.out_channels * (2 ** i) for i in range(4)]
    return BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, stage_channels, width,
                           extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
