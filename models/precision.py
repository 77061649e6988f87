"""Pixel coordinates stay fp32 under mixed precision (``--amp``; bf16 by default on CPUs with bf16 units).

Autocast runs convolutions and linear layers in bf16 (CPU) or fp16 (CUDA), and torchvision
carries their dtype into coordinates: the anchors are made in the FPN features' dtype, and
``BoxCoder.decode`` casts the boxes it decodes against (anchors, proposals) to the deltas' dtype.
bf16 keeps 8 bits of mantissa, so a coordinate between 256 and 512 px is rounded to 2 px and one
beyond 512 to 4 px: proposals for 10-20 px nuclei become degenerate (zero width), their
regression targets infinite, and the box loss NaN within the first steps (MoNuSeg, 512² crops);
at inference under ``predict.py --amp`` every box, and the mask pasted into it, moves by up to
that much. Here anchors (``Float32AnchorGenerator``) and every decoded box (``Float32BoxCoder``)
are fp32; the networks' features and outputs stay in the reduced precision, which deltas and
logits tolerate (casting the FPN features to fp32 instead cost a copy of each level per step).
"""

from typing import List

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


class Float32AnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` whose anchors are fp32 whatever the features' dtype. It reads only the
    feature maps' sizes, dtype and device, so it is shown fp32 stand-ins of their shapes
    (a zero-stride view of one number: no copy)."""

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        shapes = [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class Float32BoxCoder(BoxCoder):
    """``BoxCoder`` whose ``decode`` works in fp32 whatever the dtype of the predicted deltas."""

    def decode(self, rel_codes: Tensor, boxes):
        return super().decode(rel_codes.float(), boxes)


def use_float32_coordinates(model) -> None:
    """Give a built Mask R-CNN ``Float32AnchorGenerator`` and, in the RPN and the RoI heads,
    ``Float32BoxCoder`` (no state of their own; ``models.zoo.with_torchvision_classes`` switches
    back to torchvision's classes for TorchScript)."""
    model.rpn.anchor_generator.__class__ = Float32AnchorGenerator
    for part in (model.rpn, model.roi_heads):
        part.box_coder.__class__ = Float32BoxCoder
