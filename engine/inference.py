"""Mask R-CNN inference that stops before torchvision pastes masks onto full-image canvases.

torchvision's ``GeneralizedRCNN.forward`` ends with ``transform.postprocess``, which resizes
the boxes to the original image and pastes every ``28×28`` mask into an ``H×W`` float canvas
(``N×1×H×W``: 1.2 GB for 800 detections at 520×704). ``detect`` runs the same modules in the
same order but only rescales the boxes; masks stay in their box frame and are pasted box by
box by ``utils.box_masks.paste_masks_in_boxes`` (pixel-aligned: the inverse of the training targets' sampling).

A model whose ``ScaleTransform`` has an ``object_diameter`` resizes each image by its own factor:
``detect`` predicts at the test scale, measures the median diameter of the objects it found, and
predicts again at the scale that shows them at ``object_diameter`` model pixels (as cellpose
rescales each image to its model's cell diameter). Nuclei of one stain differ 2× in size between
tissues, and their best test scale with them (docs/benchmarks.md, MoNuSeg).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import torch
import torchvision
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.transform import resize_boxes

MASK_CHUNK = 100     # detections per pass of the mask head
# The per-image scale: estimated from the detections scoring at least this (the final instances'
# default threshold), from at least this many of them, and predicted again only when it differs
# from the first pass's by more than the tolerance; kept within this range of factors of the
# training scale. Never below it: shrunk to 0.75× every MoNuSeg validation image lost DSB (0.03-0.13),
# enlarged past its best they lose slowly; and ×2 at most (the kidney's 12-px nuclei gain
# 0.006 more at ×2.5 for 1.6× the pixels).
DIAMETER_MIN_SCORE = 0.5
DIAMETER_MIN_OBJECTS = 5
SCALE_TOLERANCE = 0.1
OBJECT_SCALE_RANGE = (1.0, 2.0)


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


def median_diameter(output: dict[str, torch.Tensor], min_score: float = DIAMETER_MIN_SCORE,
                    min_objects: int = DIAMETER_MIN_OBJECTS) -> float | None:
    """Median equivalent diameter (``2·sqrt(area/π)``, in the output's pixels) of the detections
    scoring ``min_score`` or more, their areas read in the box frame (the mask's share of its box
    times the box's area); ``None`` with fewer than ``min_objects`` of them."""
    keep = output["scores"] >= min_score
    if int(keep.sum()) < min_objects:
        return None
    boxes = output["boxes"][keep]
    share = (output["mask_probs"][keep] >= 0.5).flatten(1).float().mean(1)
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0) * share
    return float(2.0 * torch.sqrt(areas.float().quantile(0.5) / torch.pi))   # np.median's middle


def object_scale(transform: torch.nn.Module, diameter: float | None, target: float | None = None) -> float:
    """The input scale that shows objects of median ``diameter`` (image pixels) at ``target``
    model pixels (default: the transform's ``object_diameter``), within ``OBJECT_SCALE_RANGE``
    of its training scale; its test scale (the first pass's) when there is no estimate or that
    is close enough."""
    first = float(transform.test_scale)
    target = transform.object_diameter if target is None else target
    if diameter is None or diameter <= 0:
        return first
    low, high = (transform.scale * f for f in OBJECT_SCALE_RANGE)
    scale = min(max(target / diameter, low), high)
    return first if abs(scale / first - 1.0) <= SCALE_TOLERANCE else scale


@contextmanager
def test_scale(transform: torch.nn.Module, scale: float):
    """Within the block ``transform`` resizes every eval-mode input by ``scale``."""
    saved = transform.test_scale
    transform.test_scale = scale
    try:
        yield
    finally:
        transform.test_scale = saved


@torch.inference_mode()
def detect(model: torch.nn.Module, images: list[torch.Tensor],
           scales: list[float] | None = None) -> list[dict[str, Any]]:
    """Run a torchvision Mask R-CNN in eval mode on ``images`` (each float ``3×H×W`` in [0, 1]).

    Returns one dict per image:
      ``boxes`` float32 ``N×4`` xyxy in original-image pixels, ``scores`` float32 ``N``,
      ``labels`` int64 ``N``, ``mask_probs`` float32 ``N×M×M`` (the mask head's probabilities
      for the predicted class, in the box frame; M = 28), ``image_size`` ``(H, W)``,
      ``input_scale`` (the factor the image was resized by; ``None`` for torchvision's
      min/max-size resize) and ``object_diameter`` (``median_diameter`` of the pass at the test
      scale, image pixels; ``None`` without it).
    ``scales``: each image's input scale (a ``ScaleTransform`` model), instead of the test scale
    or, where the transform has an ``object_diameter``, the scale chosen from a first pass.
    Tensors stay on the model's device. Callers choose the autocast context; outputs are float32.
    """
    net = unwrap(model)
    if net.training:
        raise RuntimeError("detect() needs the model in eval mode (call model.eval())")
    detector, transform = BoxFrameDetector(net), net.transform
    outputs: list[dict[str, Any] | None] = [None] * len(images)
    if scales is None:
        outputs = _run(detector, images, getattr(transform, "test_scale", None))
        if getattr(transform, "object_diameter", None) is None:
            return outputs
        scales = [object_scale(transform, out["object_diameter"]) for out in outputs]
    elif not hasattr(transform, "test_scale"):
        raise ValueError("detect(scales=...) needs a model with a fixed input scale (ScaleTransform)")
    for scale in dict.fromkeys(scales):     # images that share a scale are predicted together
        todo = [i for i, s in enumerate(scales) if s == scale
                and (outputs[i] is None or outputs[i]["input_scale"] != scale)]
        if not todo:
            continue
        with test_scale(transform, scale):
            again = _run(detector, [images[i] for i in todo], scale)
        for i, out in zip(todo, again):
            if outputs[i] is not None:          # the first pass's estimate chose this scale
                out["object_diameter"] = outputs[i]["object_diameter"]
            outputs[i] = out
    return outputs


def _run(detector: BoxFrameDetector, images: list[torch.Tensor], scale: float | None) -> list[dict[str, Any]]:
    outputs = detector(images)
    for out, img in zip(outputs, images):
        out["image_size"] = (int(img.shape[-2]), int(img.shape[-1]))
        out["input_scale"] = scale
        out["object_diameter"] = median_diameter(out)
    return outputs
