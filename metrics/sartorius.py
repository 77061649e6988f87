"""The Sartorius competition score (Kaggle 2021), from COCO RLEs.

Per image, with the IoU matrix ``P×G`` between predicted and GT masks (all classes together)
and thresholds t ∈ {0.50, 0.55, …, 0.95}: a hit is IoU > t;
a GT with exactly one hit is a true positive, a GT with none a false negative, a prediction
with no hit a false positive (a GT with two or more hits is neither, as in the competition's
reference kernel);

    image score = mean_t TP(t) / (TP(t) + FP(t) + FN(t)),   dataset score = mean over images.

Empty cases: GT but no predictions → 0; no GT but predictions → 0; no GT and no predictions
→ 1 (nothing to find, nothing wrongly found); TP + FP + FN = 0 with GT present (every GT hit
twice or more, every prediction hitting) → 0 at that threshold. Crowd GT annotations are left out.
Per class: an image whose class is known — its ``cell_type`` (a category name) or, failing
that, the one category of all its GT — adds its image score to that class; an image with GT
of several classes adds, per class present, the score of that class's GT and predictions
alone. The per-class score is the mean over the images that added to it.
Predictions are used as given; when they overlap (a Kaggle submission may not) a warning
says how many images do.
"""
from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils

from metrics.coco import category_names, det_rle, gt_rle

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def image_scores_per_threshold(iou: np.ndarray) -> np.ndarray:
    """IoU matrix ``P×G`` → TP/(TP+FP+FN) at each threshold (shape ``len(THRESHOLDS)``)."""
    num_pred, num_gt = iou.shape
    pred, gt = np.nonzero(iou > THRESHOLDS[0])
    return scores_from_hits(pred, gt, iou[pred, gt], num_pred, num_gt)


def scores_from_hits(pred: np.ndarray, gt: np.ndarray, values: np.ndarray, num_pred: int,
                     num_gt: int) -> np.ndarray:
    """Per-threshold image score from the sparse pairs ``(pred, gt, iou)`` with IoU > 0.5.

    Pairs with IoU ≤ 0.5 are never hits, so the sparse list is all the formula needs.
    """
    if num_gt == 0 and num_pred == 0:
        return np.ones(len(THRESHOLDS))
    out = np.zeros(len(THRESHOLDS))
    for i, t in enumerate(THRESHOLDS):
        hit = values > t
        hits_per_gt = np.bincount(gt[hit], minlength=num_gt)
        pred_hit = np.bincount(pred[hit], minlength=num_pred) > 0
        tp = int((hits_per_gt == 1).sum())
        fn = int((hits_per_gt == 0).sum())
        fp = int(num_pred - pred_hit.sum())
        out[i] = tp / max(tp + fp + fn, 1)  # 0/0 only when every GT has ≥ 2 hits: TP = 0
    return out


def _sparse_iou(preds: list[dict], gts: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs with IoU > 0.5 between prediction and GT RLEs → (pred index, gt index, iou)."""
    if not preds or not gts:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0)
    iou = np.asarray(mask_utils.iou(preds, gts, np.zeros(len(gts), dtype=np.uint8))).reshape(len(preds), len(gts))
    p, g = np.nonzero(iou > THRESHOLDS[0])
    return p, g, iou[p, g]


def masks_overlap(rles: list[dict]) -> bool:
    """Whether any two masks share a pixel (pycocotools' C IoU of the masks with themselves)."""
    if len(rles) < 2:
        return False
    iou = np.asarray(mask_utils.iou(rles, rles, np.zeros(len(rles), dtype=np.uint8))).reshape(len(rles), len(rles))
    np.fill_diagonal(iou, 0.0)
    return bool((iou > 0).any())


def image_class(image: dict, gt_cats: np.ndarray, names: dict[int, str]) -> str | None:
    """An image's class: its ``cell_type`` if that names a category, else its GT's single category."""
    cell_type = image.get("cell_type")
    if cell_type in names.values():
        return cell_type
    unique = np.unique(gt_cats)
    return names[int(unique[0])] if len(unique) == 1 else None


def sartorius_score(gt: dict, results: list[dict], score_thresh: float = 0.5,
                    class_names: list[str] | None = None, check_overlap: bool = True) -> dict:
    """Competition score of COCO results against COCO ground truth (see the module docstring).

    Predictions with score < ``score_thresh`` are left out. Returns
    ``{"score", "per_class": {name: score | None}, "per_threshold": {"0.50": …}, "per_image":
    {image_id: score}, "score_thresh", "overlapping_images"}``.
    """
    names = category_names(gt, class_names)
    gt_by_image: dict = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            gt_by_image[ann["image_id"]].append(ann)
    pred_by_image: dict = {img["id"]: [] for img in gt["images"]}
    for r in results:
        if r["score"] >= score_thresh:
            pred_by_image[r["image_id"]].append(r)

    per_image, per_threshold, overlapping = {}, [], 0
    per_class: dict[str, list[float]] = {n: [] for n in names.values()}
    for img in gt["images"]:
        image_id, h, w = img["id"], img["height"], img["width"]
        g_anns, p_res = gt_by_image[image_id], pred_by_image[image_id]
        g = [gt_rle(a, h, w) for a in g_anns]
        p = [det_rle(r["segmentation"]) for r in p_res]
        if check_overlap and masks_overlap(p):
            overlapping += 1
        pi, gi, vals = _sparse_iou(p, g)
        scores = scores_from_hits(pi, gi, vals, len(p), len(g))
        per_image[image_id] = float(scores.mean())
        per_threshold.append(scores)
        g_cls = np.array([a["category_id"] for a in g_anns], dtype=np.int64)
        known = image_class(img, g_cls, names)
        if known is not None:
            per_class[known].append(per_image[image_id])
            continue
        p_cls = np.array([r["category_id"] for r in p_res], dtype=np.int64)
        for cat_id in np.unique(g_cls):
            p_in, g_in = p_cls == cat_id, g_cls == cat_id
            # Restrict the sparse pairs to this class and renumber them.
            keep = p_in[pi] & g_in[gi]
            p_new = np.cumsum(p_in) - 1
            g_new = np.cumsum(g_in) - 1
            sub = scores_from_hits(p_new[pi[keep]], g_new[gi[keep]], vals[keep], int(p_in.sum()), int(g_in.sum()))
            per_class[names[int(cat_id)]].append(float(sub.mean()))
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
        "overlapping_images": overlapping,
    }
