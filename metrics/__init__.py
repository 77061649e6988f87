"""Metrics: ``evaluate_predictions`` is the one entry point for training, evaluate.py and tools."""
from __future__ import annotations

from metrics.coco import coco_evaluate, load_coco
from metrics.sartorius import sartorius_score


def evaluate_predictions(gt: dict, results: list[dict], max_dets: int,
                         iou_types=("segm", "bbox"), class_names: list[str] | None = None,
                         sartorius_score_thresh: float = 0.5) -> dict:
    """COCO metrics per IoU type and the Sartorius score for COCO results against COCO GT."""
    coco_gt = load_coco(gt)
    report = {"coco": {t: coco_evaluate(coco_gt, results, t, max_dets, class_names) for t in iou_types},
              "max_dets": max_dets}
    if "segm" in iou_types:
        report["sartorius"] = sartorius_score(gt, results, sartorius_score_thresh, class_names)
    return report


__all__ = ["evaluate_predictions"]
