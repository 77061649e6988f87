"""The one place where instance masks change form: binary arrays, COCO RLE, Kaggle RLE, label images.

Shapes: a stack of binary masks is ``N×H×W`` uint8; a label image is ``H×W`` with 0 for
background and ``k`` for the k-th instance.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_coco_rle(masks: np.ndarray) -> list[dict]:
    """Binary masks ``N×H×W`` (any integer/bool dtype) → compressed COCO RLEs with str counts."""
    if masks.ndim != 3:
        raise ValueError(f"expected N×H×W masks, got shape {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_coco_rle(rles: list[dict], height: int, width: int) -> np.ndarray:
    """Compressed or uncompressed COCO RLEs → binary masks ``N×H×W`` uint8."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    fixed = [mask_utils.frPyObjects(r, r["size"][0], r["size"][1]) if isinstance(r["counts"], list) else r
             for r in rles]
    return np.ascontiguousarray(mask_utils.decode(fixed).transpose(2, 0, 1))


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (float32 ``N×4``, exclusive max edge) of binary masks ``N×H×W``.

    Empty masks give an all-zero box (degenerate; callers drop them).
    """
    n = len(masks)
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def detections_to_coco_results(output: dict[str, torch.Tensor], image_id: Any,
                               mask_threshold: float = 0.5) -> list[dict]:
    """One image's torchvision Mask R-CNN output → COCO results entries.

    ``output["masks"]`` is ``N×1×H×W`` float probabilities (as torchvision returns them);
    ``bbox`` is written as xywh and ``segmentation`` as compressed RLE.
    """
    boxes = output["boxes"].detach().cpu()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    results = []
    rles: list[dict] = []
    if "masks" in output:
        binary = (output["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()
        rles = encode_coco_rle(binary)
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    for k, (box, score, label) in enumerate(zip(xywh.tolist(), scores, labels)):
        entry = {"image_id": image_id, "category_id": int(label), "bbox": [round(v, 2) for v in box],
                 "score": float(score)}
        if rles:
            entry["segmentation"] = rles[k]
        results.append(entry)
    return results
