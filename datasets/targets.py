"""Building the target dict of the sample contract from masks, boxes and labels, and a dataset's
COCO ground truth (``coco_gt()``) from its images' annotations."""
from __future__ import annotations

from typing import Iterable, Sequence

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


def coco_annotation(category_id: int, segmentation, box: Sequence[float], area: float, iscrowd: int = 0) -> dict:
    """One ground-truth annotation of ``coco_ground_truth``: ``box`` is xyxy pixels (stored as COCO's
    xywh ``bbox``), ``segmentation`` compressed RLE or polygons, ``area`` in pixels."""
    x0, y0, x1, y1 = box
    return {"category_id": category_id, "segmentation": segmentation, "area": area,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": iscrowd}


def coco_ground_truth(images: Iterable[tuple[dict, Iterable[dict]]], class_names: Sequence[str]) -> dict:
    """A dataset's ``coco_gt()``: ``images`` yields each image's COCO entry (``id``, ``file_name``,
    ``height``, ``width``, in the dataset's order) with its annotations (``coco_annotation``'s, or
    COCO annotations as read). Each annotation gets its image's ``image_id`` and an ``id``: its own
    when it brings one (a dataset's stable ids; then all of them should), else 1, 2, … in order.
    Categories are ``1..C``, named by ``class_names``."""
    entries, annotations = [], []
    for image, image_annotations in images:
        entries.append(image)
        for a in image_annotations:
            annotations.append({"id": a.get("id", len(annotations) + 1), "image_id": image["id"],
                                **{k: v for k, v in a.items() if k != "id"}})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    return {"images": entries, "annotations": annotations, "categories": categories}


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
