"""Mask R-CNN inference that stops before torchvision pastes masks onto full-image canvases.

torchvision's ``GeneralizedRCNN.forward`` ends with ``transform.postprocess``, which resizes
the boxes to the original image and pastes every ``28×28`` mask into an ``H×W`` float canvas
(``N×1×H×W``: 1.2 GB for 800 detections at 520×704). ``detect`` runs the same modules in the
same order but only rescales the boxes; masks stay in their box frame and are pasted box by
box by ``utils.masks.paste_masks_in_boxes`` (which reproduces torchvision's arithmetic).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torchvision.models.detection.transform import resize_boxes


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class BoxFrameDetector(torch.nn.Module):
    """The eval-mode forward of a torchvision Mask R-CNN without the full-canvas mask paste.

    ``forward(images)`` takes a list of float ``3×H×W`` images in [0, 1] and returns one dict per
    image: ``boxes`` float32 ``N×4`` xyxy in input pixels, ``scores`` float32 ``N``, ``labels``
    int64 ``N`` and ``mask_probs`` float32 ``N×M×M`` (M = 28, the predicted class's mask
    probabilities in the box frame). Shares the model's modules (no copy); TorchScript-able, so
    ``tools/export.py`` exports exactly this computation.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        net = unwrap(model)
        self.transform = net.transform
        self.backbone = net.backbone
        self.rpn = net.rpn
        self.roi_heads = net.roi_heads

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        original_sizes: list[tuple[int, int]] = []
        for img in images:
            original_sizes.append((img.shape[-2], img.shape[-1]))
        image_list, _ = self.transform(images, None)
        features = self.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(image_list, features, None)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes, None)
        outputs: list[dict[str, torch.Tensor]] = []
        for i, det in enumerate(detections):
            masks = det["masks"]
            resized = image_list.image_sizes[i]
            original = original_sizes[i]
            outputs.append({
                "boxes": resize_boxes(det["boxes"].float(), [resized[0], resized[1]], [original[0], original[1]]),
                "scores": det["scores"].float(),
                "labels": det["labels"],
                "mask_probs": masks[:, 0].float(),
            })
        return outputs


@torch.inference_mode()
def detect(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Run a torchvision Mask R-CNN in eval mode on ``images`` (each float ``3×H×W`` in [0, 1]).

    Returns one dict per image:
      ``boxes`` float32 ``N×4`` xyxy in original-image pixels, ``scores`` float32 ``N``,
      ``labels`` int64 ``N``, ``mask_probs`` float32 ``N×M×M`` (the mask head's probabilities
      for the predicted class, in the box frame; M = 28) and ``image_size`` ``(H, W)``.
    Tensors stay on the model's device. Callers choose the autocast context; outputs are float32.
    """
    net = unwrap(model)
    if net.training:
        raise RuntimeError("detect() needs the model in eval mode (call model.eval())")
    outputs = BoxFrameDetector(net)(images)
    for out, img in zip(outputs, images):
        out["image_size"] = (int(img.shape[-2]), int(img.shape[-1]))
    return outputs
