"""Predictions: ``Instances`` (one image's detections with their masks kept in box crops) and
COCO results entries.

``Instances`` is the container predict.py, TTA and the writers pass around; mask conversions go
through ``utils.box_masks``/``utils.coco_rle`` so there is one implementation of each mask form.
``detections_to_coco_results`` is the one conversion of model output to COCO results, shared by
evaluation and predict.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from utils.box_masks import (
    BoxMasks,
    box_masks_to_coco_rle,
    coco_rle_to_box_masks,
    paste_masks_in_boxes,
    resolve_overlaps,
)
from utils.coco_rle import encode_coco_rle


@dataclass
class Instances:
    """``boxes`` float32 ``N×4`` xyxy pixels, ``scores`` float32 ``N``, ``labels`` int64 ``N``
    (class ids 1..C), ``masks`` the ``N`` binary masks as box crops of the image."""
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: BoxMasks

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.masks.height, self.masks.width

    @classmethod
    def from_detections(cls, det: dict[str, Any], mask_threshold: float = 0.5) -> "Instances":
        """A ``engine.inference.detect`` output → instances (masks pasted into their boxes)."""
        height, width = (int(v) for v in det["image_size"])
        boxes = torch.as_tensor(det["boxes"]).detach().cpu().float().numpy().reshape(-1, 4)
        masks = paste_masks_in_boxes(det["mask_probs"], boxes, height, width, mask_threshold)
        return cls(boxes, torch.as_tensor(det["scores"]).detach().cpu().float().numpy(),
                   torch.as_tensor(det["labels"]).detach().cpu().numpy().astype(np.int64), masks)

    @classmethod
    def from_coco_results(cls, results: list[dict], height: int, width: int) -> "Instances":
        """COCO results entries of one image (RLE segmentations) → instances."""
        boxes = np.array([r["bbox"] for r in results], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = coco_rle_to_box_masks([r["segmentation"] for r in results], height, width)
        return cls(boxes, np.array([r["score"] for r in results], dtype=np.float32),
                   np.array([r["category_id"] for r in results], dtype=np.int64), masks)

    def select(self, indices: np.ndarray | list[int]) -> "Instances":
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Instances(self.boxes[indices].reshape(-1, 4), self.scores[indices], self.labels[indices],
                         self.masks.select(indices))

    def above(self, score_thresh: float) -> "Instances":
        return self.select(np.flatnonzero(self.scores >= score_thresh))

    def non_overlapping(self) -> "Instances":
        """Descending score; each pixel kept by the highest-scoring mask; masks left empty or with
        less than half their pixels dropped (``utils.box_masks.resolve_overlaps``); boxes
        tightened to the remaining pixels."""
        kept, resolved = resolve_overlaps(self.masks, self.scores)
        return Instances(resolved.tight_boxes(), self.scores[kept], self.labels[kept], resolved)

    def to_coco_results(self, image_id: Any) -> list[dict]:
        return coco_result_entries(image_id, self.boxes, self.scores, self.labels,
                                   box_masks_to_coco_rle(self.masks))


def coco_result_entries(image_id: Any, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                        rles: list[dict] | None) -> list[dict]:
    """COCO results entries: ``bbox`` xywh (from xyxy ``boxes``), ``score``, ``category_id``,
    and ``segmentation`` (compressed RLE) when ``rles`` is given."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    results = []
    for k, (box, score, label) in enumerate(zip(xywh.tolist(), np.asarray(scores).tolist(),
                                                np.asarray(labels).tolist())):
        entry = {"image_id": image_id, "category_id": int(label), "bbox": [round(v, 2) for v in box],
                 "score": float(score)}
        if rles is not None:
            entry["segmentation"] = rles[k]
        results.append(entry)
    return results


def detections_to_coco_results(output: dict[str, Any], image_id: Any,
                               mask_threshold: float = 0.5) -> list[dict]:
    """One image's Mask R-CNN output → COCO results entries.

    Two forms are accepted: the fast one from ``engine.inference.detect`` (``mask_probs``
    ``N×M×M`` box-frame probabilities and ``image_size`` (H, W): pasted box by box), or
    torchvision's (``masks`` ``N×1×H×W`` full-canvas probabilities). Both threshold with
    ``> mask_threshold`` and give identical RLEs for the same detections.
    """
    boxes = torch.as_tensor(output["boxes"]).detach().cpu().float().numpy()
    scores = torch.as_tensor(output["scores"]).detach().cpu().float().numpy()
    labels = torch.as_tensor(output["labels"]).detach().cpu().numpy()
    rles: list[dict] | None = None
    if "mask_probs" in output:
        height, width = (int(v) for v in output["image_size"])
        rles = box_masks_to_coco_rle(paste_masks_in_boxes(output["mask_probs"], boxes, height, width,
                                                          mask_threshold))
    elif "masks" in output:
        binary = (output["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()
        rles = encode_coco_rle(binary)
    return coco_result_entries(image_id, boxes, scores, labels, rles)

