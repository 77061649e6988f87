"""Test-time augmentation and model ensembles (e.g. the fold models of a cross-validation),
fused by weighted segments fusion.

Each image is predicted by every model, as is and (with TTA) flipped horizontally, vertically
and both ways; the detections of a flipped copy are mapped back (box mirrored, box-frame mask
mirrored). The ``T = models × flips`` detection sets are then fused:

1. Clustering (weighted box fusion): detections in descending score order join the cluster of
   the same class whose fused box overlaps theirs most, if that IoU exceeds ``iou_thresh``;
   otherwise they start a cluster. A cluster's box is the score-weighted mean of its members'.
2. Mask: the members' soft masks are pasted into image space (each into its own box) and
   averaged with the scores as weights, then thresholded at ``mask_threshold``.
3. Score: the members' mean score × min(n, T) / T, for n members and T augmentations, so an
   object found by one flip in four keeps a quarter of its score.

With a single model and no flip every cluster is one detection (NMS already separated them)
and the result equals plain prediction; a model fused with itself gives its own predictions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.evaluation import autocast_context
from engine.inference import detect, unwrap
from utils.box_masks import BoxMasks, paste_masks_in_boxes
from utils.instances import Instances

FLIPS = ("none", "h", "v", "hv")


def flip_image(image: torch.Tensor, flip: str) -> torch.Tensor:
    """``C×H×W`` image flipped: ``h`` mirrors columns, ``v`` rows, ``hv`` both, ``none`` nothing."""
    dims = [d for axis, d in (("v", -2), ("h", -1)) if axis in flip]
    return image.flip(dims) if dims else image


def unflip_detections(det: dict, flip: str) -> dict:
    """Detections of a flipped image (``engine.inference.detect`` form) → original image frame."""
    height, width = det["image_size"]
    boxes = det["boxes"].clone()
    probs = det["mask_probs"]
    if "h" in flip:
        boxes[:, 0], boxes[:, 2] = width - det["boxes"][:, 2], width - det["boxes"][:, 0]
        probs = probs.flip(-1)
    if "v" in flip:
        boxes[:, 1], boxes[:, 3] = height - det["boxes"][:, 3], height - det["boxes"][:, 1]
        probs = probs.flip(-2)
    return {**det, "boxes": boxes, "mask_probs": probs}


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def cluster_boxes(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  iou_thresh: float) -> list[list[int]]:
    """Weighted-box-fusion clustering → member indices of each cluster (highest score first)."""
    fused = np.zeros((len(boxes), 4), dtype=np.float64)
    weighted = np.zeros((len(boxes), 4), dtype=np.float64)   # Σ score · box per cluster
    weight = np.zeros(len(boxes), dtype=np.float64)
    cluster_labels = np.zeros(len(boxes), dtype=np.int64)
    members: list[list[int]] = []
    for i in np.argsort(-scores, kind="stable").tolist():
        c = len(members)
        best = -1
        if c:
            iou = _iou_one_to_many(boxes[i], fused[:c])
            iou[cluster_labels[:c] != labels[i]] = -1.0
            j = int(np.argmax(iou))
            if iou[j] > iou_thresh:
                best = j
        if best < 0:
            best = c
            members.append([])
            cluster_labels[best] = labels[i]
        members[best].append(i)
        weighted[best] += scores[i] * boxes[i]
        weight[best] += scores[i]
        fused[best] = weighted[best] / max(weight[best], 1e-12)
    return members


def weighted_segments_fusion(detections: list[dict], iou_thresh: float = 0.55, mask_threshold: float = 0.5,
                             max_detections: int | None = None) -> Instances:
    """Fuse one image's detections from ``T = len(detections)`` augmentations (each already in the
    original frame, ``engine.inference.detect`` form) → ``Instances``, score-descending."""
    height, width = (int(v) for v in detections[0]["image_size"])
    num_aug = len(detections)
    boxes = torch.cat([d["boxes"].detach().cpu().float() for d in detections]).numpy().reshape(-1, 4)
    scores = torch.cat([d["scores"].detach().cpu().float() for d in detections]).numpy()
    labels = torch.cat([d["labels"].detach().cpu() for d in detections]).numpy().astype(np.int64)
    probs = torch.cat([d["mask_probs"].detach().cpu().float() for d in detections])
    if len(scores) == 0:
        return Instances(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                         BoxMasks.empty(height, width))
    soft = paste_masks_in_boxes(probs, boxes, height, width, threshold=None)

    clusters = cluster_boxes(boxes.astype(np.float64), scores.astype(np.float64), labels, iou_thresh)
    n = len(clusters)
    out_boxes = np.zeros((n, 4), dtype=np.float32)
    out_scores = np.zeros(n, dtype=np.float32)
    out_labels = np.zeros(n, dtype=np.int64)
    offsets = np.zeros((n, 2), dtype=np.int64)
    crops: list[np.ndarray] = []
    for c, members in enumerate(clusters):
        w = scores[members].astype(np.float64)
        # One member: its own box and mask, bit for bit (s·p/s can round across the threshold).
        out_boxes[c] = boxes[members[0]] if len(members) == 1 else (w[:, None] * boxes[members]).sum(0) / w.sum()
        out_scores[c] = w.mean() * min(len(members), num_aug) / num_aug
        out_labels[c] = labels[members[0]]
        present = [m for m in members if soft.crops[m].size]
        if not present:
            crops.append(np.zeros((0, 0), dtype=bool))
            continue
        y0 = min(int(soft.offsets[m, 0]) for m in present)
        x0 = min(int(soft.offsets[m, 1]) for m in present)
        y1 = max(int(soft.offsets[m, 0]) + soft.crops[m].shape[0] for m in present)
        x1 = max(int(soft.offsets[m, 1]) + soft.crops[m].shape[1] for m in present)
        offsets[c] = (y0, x0)
        if len(present) == 1:
            crops.append(soft.crops[present[0]] > mask_threshold)
            continue
        acc = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        for m in present:
            my, mx = int(soft.offsets[m, 0]) - y0, int(soft.offsets[m, 1]) - x0
            h, wd = soft.crops[m].shape
            acc[my:my + h, mx:mx + wd] += scores[m] * soft.crops[m]
        acc /= float(scores[present].sum())
        crops.append(acc > mask_threshold)
    order = np.argsort(-out_scores, kind="stable")
    if max_detections is not None:
        order = order[:max_detections]
    fused = Instances(out_boxes, out_scores, out_labels, BoxMasks(height, width, offsets, crops))
    return fused.select(order)


def predict_ensemble(models: Sequence[torch.nn.Module], images: list[torch.Tensor], amp: bool = False,
                     mask_threshold: float = 0.5, flips: tuple[str, ...] = ("none",),
                     iou_thresh: float = 0.55) -> list[Instances]:
    """Predict ``images`` (float ``3×H×W`` on the models' device) with every model under every
    flip and fuse the ``len(models) × len(flips)`` detection sets of each image.

    The models must share classes and input preprocessing (the caller checks their
    checkpoints). At most the largest of the models' detections per image are kept.
    """
    device = images[0].device
    runs = []
    for model in models:
        scales = None     # a model's per-image scales (engine.inference.detect), from its first flip
        for flip in flips:
            with autocast_context(device, amp):
                outputs = detect(model, [flip_image(img, flip) for img in images], scales)
            if outputs and outputs[0]["input_scale"] is not None:
                scales = [out["input_scale"] for out in outputs]
            runs.append([unflip_detections(out, flip) for out in outputs])
    caps = [getattr(getattr(unwrap(m), "roi_heads", None), "detections_per_img", None) for m in models]
    cap = max((c for c in caps if c is not None), default=None)
    return [weighted_segments_fusion([run[i] for run in runs], iou_thresh, mask_threshold, cap)
            for i in range(len(images))]


def predict_tta(model: torch.nn.Module, images: list[torch.Tensor], amp: bool = False,
                mask_threshold: float = 0.5, flips: tuple[str, ...] = FLIPS,
                iou_thresh: float = 0.55) -> list[Instances]:
    """Predict ``images`` (float ``3×H×W`` on the model's device) under every flip and fuse."""
    return predict_ensemble([model], images, amp, mask_threshold, flips, iou_thresh)
