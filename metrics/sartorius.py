"""The Sartorius competition score (Kaggle 2021).

Per image, with IoU matrix between predicted and ground-truth masks and thresholds
t ∈ {0.50, 0.55, …, 0.95}: a GT with exactly one prediction of IoU > t is a true positive,
a GT with none a false negative, a prediction matching no GT a false positive;
image score = mean_t TP / (TP + FP + FN); dataset score = mean over images.
Empty cases: GT but no predictions → 0; no GT and no predictions → 1 (nothing to find,
nothing wrongly found); no GT but predictions → 0.
"""
from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def image_scores_per_threshold(iou: np.ndarray) -> np.ndarray:
    """IoU matrix ``P×G`` → TP/(TP+FP+FN) at each threshold (shape ``len(THRESHOLDS)``)."""
    num_pred, num_gt = iou.shape
    if num_gt == 0 and num_pred == 0:
        return np.ones(len(THRESHOLDS))
    out = np.zeros(len(THRESHOLDS))
    for i, t in enumerate(THRESHOLDS):
        hits = iou > t
        tp = int((hits.sum(axis=0) == 1).sum())
        fn = int((hits.sum(axis=0) == 0).sum())
        fp = int((hits.sum(axis=1) == 0).sum())
        out[i] = tp / (tp + fp + fn)
    return out


def _rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def sartorius_score(gt: dict, results: list[dict], score_thresh: float = 0.5,
                    class_names: list[str] | None = None) -> dict:
    """Competition score of COCO results against COCO ground truth.

    Predictions below ``score_thresh`` are ignored. Per class: the same score computed on the
    instances of that class only, averaged over the images that contain the class.
    """
    images = {img["id"]: img for img in gt["images"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    gt_by_image: dict = {i: [] for i in images}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            gt_by_image[ann["image_id"]].append(ann)
    pred_by_image: dict = {i: [] for i in images}
    for r in results:
        if r["score"] >= score_thresh:
            pred_by_image.setdefault(r["image_id"], []).append(r)

    per_image, per_threshold = {}, []
    per_class: dict[str, list[float]] = {n: [] for n in names.values()}
    overlapping = 0
    for image_id, img in images.items():
        h, w = img["height"], img["width"]
        g = [_rle(a["segmentation"], h, w) for a in gt_by_image[image_id]]
        p = [_rle(r["segmentation"], h, w) for r in pred_by_image.get(image_id, [])]
        iou = mask_utils.iou(p, g, [0] * len(g)) if p and g else np.zeros((len(p), len(g)))
        iou = np.asarray(iou).reshape(len(p), len(g))
        # pycocotools' area() of a list overflows under numpy 2, hence one call per mask.
        if len(p) > 1 and mask_utils.area(mask_utils.merge(p)) < sum(int(mask_utils.area(x)) for x in p):
            overlapping += 1
        scores = image_scores_per_threshold(iou)
        per_image[image_id] = float(scores.mean())
        per_threshold.append(scores)
        g_cls = np.array([a["category_id"] for a in gt_by_image[image_id]])
        p_cls = np.array([r["category_id"] for r in pred_by_image.get(image_id, [])])
        for cat_id, name in names.items():
            if (g_cls == cat_id).any():
                sub = iou[np.ix_(p_cls == cat_id, g_cls == cat_id)] if len(p) else np.zeros((0, (g_cls == cat_id).sum()))
                per_class[name].append(float(image_scores_per_threshold(sub).mean()))
    if overlapping:
        warnings.warn(f"{overlapping} image(s) have overlapping predicted masks; the score is computed on the "
                      f"masks as given (a Kaggle submission must not overlap)", stacklevel=2)
    mean_t = np.mean(per_threshold, axis=0) if per_threshold else np.zeros(len(THRESHOLDS))
    return {
        "score": float(np.mean(list(per_image.values()))) if per_image else 0.0,
        "per_class": {n: (float(np.mean(v)) if v else None) for n, v in per_class.items()},
        "per_threshold": {f"{t:.2f}": float(s) for t, s in zip(THRESHOLDS, mean_t)},
        "per_image": per_image,
        "score_thresh": score_thresh,
    }
