"""Mask R-CNN inference that stops before torchvision pastes masks onto full-image canvases.

torchvision's ``GeneralizedRCNN.forward`` ends with ``transform.postprocess``, which resizes
the boxes to the original image and pastes every ``28×28`` mask into an ``H×W`` float canvas
(``N×1×H×W``: 1.2 GB for 800 detections at 520×704). ``detect`` runs the same modules in the
same order but only rescales the boxes; masks stay in their box frame and are pasted box by
box by ``utils.box_masks.paste_masks_in_boxes`` (which reproduces torchvision's arithmetic).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torchvision.models.detection.transform import resize_boxes


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


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
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = net.transform(images)
    features = net.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = net.rpn(image_list, features)
    detections, _ = net.roi_heads(features, proposals, image_list.image_sizes)
    outputs = []
    for det, resized, original in zip(detections, image_list.image_sizes, original_sizes):
        masks = det["masks"]
        outputs.append({
            "boxes": resize_boxes(det["boxes"].float(), list(resized), list(original)),
            "scores": det["scores"].float(),
            "labels": det["labels"],
            "mask_probs": masks[:, 0].float() if masks.ndim == 4 else masks.float(),
            "image_size": original,
        })
    return outputs
