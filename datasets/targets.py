"""Building the target dict of the sample contract from masks, boxes and labels."""
from __future__ import annotations

import numpy as np
import torch

from utils.box_masks import masks_to_boxes


def make_target(masks: np.ndarray, labels: np.ndarray, boxes: np.ndarray, image_id: int,
                area: np.ndarray | None = None, iscrowd: np.ndarray | None = None) -> dict:
    """Target dict: ``boxes`` float32 N×4 xyxy, ``labels`` int64 N, ``masks`` uint8 N×H×W,
    ``image_id`` int, ``area`` float32 N (mask pixels unless given), ``iscrowd`` int64 N."""
    n = len(labels)
    if area is None:
        area = masks.reshape(n, -1).sum(1) if n else np.zeros(0)
    return {
        "boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(n, 4)),
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(n)),
        "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
        "image_id": int(image_id),
        "area": torch.from_numpy(np.asarray(area, dtype=np.float32).reshape(n)),
        "iscrowd": torch.from_numpy(np.zeros(n, dtype=np.int64) if iscrowd is None
                                    else np.asarray(iscrowd, dtype=np.int64).reshape(n)),
    }


def valid_boxes(boxes: np.ndarray, min_size: float = 1.0) -> np.ndarray:
    """Bool ``N``: boxes (xyxy) at least ``min_size`` wide and high — torchvision rejects the rest."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def fill_holes(masks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """Fill enclosed holes of each binary mask ``N×H×W`` uint8 (in place; also returned).

    A hole is a background region (4-connected) that does not reach the mask's bounding box
    border. Works on each box plus a 1-pixel border, so dense images stay cheap; pass tight
    xyxy ``boxes`` (``N×4``) when known to skip computing them from the masks.
    """
    import cv2
    if boxes is None:
        boxes = masks_to_boxes(masks)
    boxes = np.asarray(boxes).astype(np.int64)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue  # too small to enclose anything
        padded = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=np.uint8)
        padded[1:-1, 1:-1] = mask[y0:y1, x0:x1]
        cv2.floodFill(padded, None, (0, 0), 1)   # everything reachable from outside becomes 1
        mask[y0:y1, x0:x1][padded[1:-1, 1:-1] == 0] = 1
    return masks
