"""Pixel coordinates stay fp32 under mixed precision (``--amp``; bf16 on CPUs with AMX by default).

Autocast runs convolutions and linear layers in bf16 (CPU) or fp16 (CUDA), and torchvision
carries their dtype into coordinates: the anchors are made in the FPN features' dtype, and
``BoxCoder.decode`` casts the boxes it decodes against (anchors, proposals) to the deltas' dtype.
bf16 keeps 8 bits of mantissa, so a coordinate between 256 and 512 px is rounded to 2 px and one
beyond 512 to 4 px: proposals for 10-20 px nuclei become degenerate (zero width), their
regression targets infinite, and the box loss NaN within the first steps (MoNuSeg, 512² crops);
at inference under ``predict.py --amp`` every box, and the mask pasted into it, moves by up to
that much. Here anchors (``ChunkedMatchingRPN.forward`` gives the RPN fp32 features; its
convolutions still run in bf16) and every decoded box (``Float32BoxCoder``) are fp32; the
networks' outputs stay in the reduced precision, which deltas and logits tolerate.
"""

from torch import Tensor
from torchvision.models.detection._utils import BoxCoder


class Float32BoxCoder(BoxCoder):
    """``BoxCoder`` whose ``decode`` works in fp32 whatever the dtype of the predicted deltas."""

    def decode(self, rel_codes: Tensor, boxes):
        return super().decode(rel_codes.float(), boxes)


def use_float32_box_decoding(model) -> None:
    """Give the RPN and the RoI heads of a built Mask R-CNN ``Float32BoxCoder`` (same weights and
    clip; ``models.zoo.with_torchvision_classes`` switches back to ``BoxCoder`` for TorchScript)."""
    for part in (model.rpn, model.roi_heads):
        part.box_coder.__class__ = Float32BoxCoder
