"""Mask R-CNN inference that stops before torchvision pastes masks onto full-image canvases.

torchvision's ``GeneralizedRCNN.forward`` ends with ``transform.postprocess``, which resizes
the boxes to the original image and pastes every ``28×28`` mask into an ``H×W`` float canvas
(``N×1×H×W``: 1.2 GB for 800 detections at 520×704). ``detect`` runs the same modules in the
same order but only rescales the boxes; masks stay in their box frame and are pasted box by
box by ``utils.box_masks.paste_masks_in_boxes`` (pixel-aligned: the inverse of the training targets' sampling).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torchvision
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.transform import resize_boxes

MASK_CHUNK = 100     # detections per pass of the mask head


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
        self.mask_chunk = MASK_CHUNK

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        original_sizes: list[tuple[int, int]] = []
        for img in images:
            original_sizes.append((img.shape[-2], img.shape[-1]))
        image_list, _ = self.transform(images, None)
        features = self.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(image_list, features, None)
        detections = self._roi_heads(features, proposals, image_list.image_sizes)
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

    def _roi_heads(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                   image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """torchvision's ``RoIHeads`` eval path, with the mask branch run ``MASK_CHUNK`` (``self.mask_chunk``) detections
        at a time: the mask head's ``256×28×28`` features of every detection at once are the
        largest tensor of the forward (640 MB for 800 detections). Same numbers per detection."""
        heads = self.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        results: list[dict[str, torch.Tensor]] = []
        for i in range(len(boxes)):
            # One pass under the ONNX tracer (a loop over detections would be unrolled at the traced count).
            step = boxes[i].shape[0] if torchvision._is_tracing() else self.mask_chunk
            probs: list[torch.Tensor] = []
            for first in range(0, max(int(boxes[i].shape[0]), 1), max(int(step), 1)):
                # Boxes per image of the batch (the pooler takes the image index from the list position).
                chunk = [boxes[j][first:first + step] if j == i else boxes[j][:0] for j in range(len(boxes))]
                logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, chunk, image_sizes)))
                probs.append(maskrcnn_inference(logits, [labels[i][first:first + step]])[0])
            results.append({"boxes": boxes[i], "scores": scores[i], "labels": labels[i], "masks": torch.cat(probs)})
        return results


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
