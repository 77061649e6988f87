"""Scores of two label images: the Aggregated Jaccard Index and the DSB/Sartorius score.

A label image is ``H×W`` of any integer dtype: 0 is background, every other value one
instance (instances cannot overlap). Both scores start from one sparse table of how many
pixels each (GT instance, predicted instance) pair shares, built by counting the pairs of
labels over the pixels where both images are non-zero — never one full-image mask per
instance, so a 1000×1000 image with 2,000 instances on each side costs a few sorts of 10⁶
integers.

AJI (Kumar et al., IEEE TMI 2017; the MoNuSeg challenge metric): every GT instance G_i takes
the predicted instance P_j(i) with the largest IoU among those overlapping it (ties: the lowest
predicted label); a GT overlapping nothing has no partner.

    AJI = Σ_i |G_i ∩ P_j(i)| / (Σ_i |G_i ∪ P_j(i)| + Σ_{P never chosen} |P|)

with |G_i ∪ ∅| = |G_i|. A prediction chosen by several GTs adds its pixels to each of their
unions (the published definition; it penalises merged nuclei). Empty cases: no GT and no
predictions → 1.0; GT but no predictions, or predictions but no GT → 0.0.

The DSB/Sartorius score of two label images is ``metrics.sartorius``' image score (mean over
IoU thresholds 0.50:0.05:0.95 of TP/(TP+FP+FN)), fed the same sparse IoU pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metrics.sartorius import THRESHOLDS, scores_from_hits


@dataclass(frozen=True)
class LabelOverlap:
    """The pixel overlap of a GT and a predicted label image.

    ``gt_values`` (G) and ``pred_values`` (P) are the instance labels present, ascending;
    ``gt_area`` (G) and ``pred_area`` (P) their pixel counts. The pairs that share at least
    one pixel are ``pair_gt`` (indices into the GT arrays), ``pair_pred`` (indices into the
    predicted arrays) and ``pair_inter`` (shared pixels), sorted by (GT, prediction); all int64.
    """
    gt_values: np.ndarray
    pred_values: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def pair_iou(self) -> np.ndarray:
        """IoU of every overlapping pair (float64, aligned with ``pair_gt``)."""
        union = self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter
        return self.pair_inter / union


def _instances(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label image → (instance values ascending, their areas, per-pixel index into them; −1 on
    background), the index flattened."""
    flat = labels.ravel()
    values, index, area = np.unique(flat, return_inverse=True, return_counts=True)
    index = index.astype(np.int64)
    if len(values) and values[0] == 0:
        values, area = values[1:], area[1:]
        index -= 1                               # background (value 0, index 0) becomes −1
    return values.astype(np.int64), area.astype(np.int64), index


def label_overlap(gt: np.ndarray, pred: np.ndarray) -> LabelOverlap:
    """The sparse intersection table of two label images of the same shape (see ``LabelOverlap``)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"expected two H×W label images of the same shape, got {gt.shape} and {pred.shape}")
    for name, labels in (("GT", gt), ("predicted", pred)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise ValueError(f"{name} label image must have integer pixels, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name} label image has negative labels (0 is background, > 0 an instance)")
    gt_values, gt_area, gt_index = _instances(gt)
    pred_values, pred_area, pred_index = _instances(pred)
    both = (gt_index >= 0) & (pred_index >= 0)
    # One integer per overlapping pixel names its (GT, prediction) pair; counting the distinct
    # integers gives every non-empty cell of the G×P table at once.
    keys = gt_index[both] * len(pred_values) + pred_index[both]
    pairs, inter = np.unique(keys, return_counts=True)
    num_pred = max(len(pred_values), 1)
    return LabelOverlap(gt_values, pred_values, gt_area, pred_area,
                        pairs // num_pred, pairs % num_pred, inter.astype(np.int64))


def aggregated_jaccard_index(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI of a predicted label image against a GT label image (see the module docstring)."""
    return aji_from_overlap(label_overlap(gt, pred))


def aji_from_overlap(overlap: LabelOverlap) -> float:
    """AJI from a precomputed ``LabelOverlap``."""
    num_gt, num_pred = len(overlap.gt_values), len(overlap.pred_values)
    if num_gt == 0 and num_pred == 0:
        return 1.0
    g, p, inter = overlap.pair_gt, overlap.pair_pred, overlap.pair_inter
    iou = overlap.pair_iou
    # Best partner of each GT: sort by GT, then IoU descending, then prediction ascending (the
    # tie rule), and keep the first pair of every GT.
    order = np.lexsort((p, -iou, g))
    first = order[np.r_[True, g[order][1:] != g[order][:-1]]] if len(order) else order
    chosen = np.zeros(num_pred, dtype=bool)
    chosen[p[first]] = True
    matched_gt = np.zeros(num_gt, dtype=bool)
    matched_gt[g[first]] = True
    total_inter = int(inter[first].sum())
    total_union = (int(overlap.gt_area.sum())                        # every GT's own pixels
                   + int(overlap.pred_area[p[first]].sum()) - total_inter  # its partner's other pixels
                   + int(overlap.pred_area[~chosen].sum()))          # predictions nobody chose
    return total_inter / total_union if total_union else 0.0


def label_image_scores(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """DSB/Sartorius score of two label images at each IoU threshold (``metrics.sartorius.THRESHOLDS``).

    A hit is IoU > t; the per-threshold TP/(TP+FP+FN) and the empty cases are those of
    ``metrics.sartorius.scores_from_hits``.
    """
    return _scores_from_overlap(label_overlap(gt, pred))


def _scores_from_overlap(overlap: LabelOverlap) -> np.ndarray:
    iou = overlap.pair_iou
    hit = iou > THRESHOLDS[0]   # pairs at IoU ≤ 0.5 are hits at no threshold
    return scores_from_hits(overlap.pair_pred[hit], overlap.pair_gt[hit], iou[hit],
                            len(overlap.pred_values), len(overlap.gt_values))


def label_image_sartorius_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """DSB/Sartorius image score of a predicted label image against a GT one (mean over thresholds)."""
    return float(label_image_scores(gt, pred).mean())


def score_label_images(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Both scores and the instance counts from one overlap table:
    ``{"aji", "sartorius", "num_gt", "num_pred"}``."""
    overlap = label_overlap(gt, pred)
    return {"aji": aji_from_overlap(overlap), "sartorius": float(_scores_from_overlap(overlap).mean()),
            "num_gt": len(overlap.gt_values), "num_pred": len(overlap.pred_values)}
