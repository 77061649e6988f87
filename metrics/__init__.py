"""Metrics: ``evaluate_predictions`` is the one entry point for training, evaluate.py and tools."""
from __future__ import annotations

from metrics.coco import coco_report, group
from metrics.sartorius import sartorius_score
from metrics.validation import InvalidInputError, check_ground_truth, check_results, normalize_ground_truth


def evaluate_predictions(gt: dict, results: list[dict], max_dets: int,
                         iou_types=("segm", "bbox"), class_names: list[str] | None = None,
                         sartorius_score_thresh: float = 0.5, validate: bool = True) -> dict:
    """COCO metrics per IoU type and the Sartorius score of COCO results against COCO GT.

    Returns ``{"coco": {iou_type: {"stats": [12], "AP", "AP50", "AP75", …, "per_class"}},
    "sartorius": {...}, "max_dets": max_dets}`` (``sartorius`` only with "segm"). The COCO
    numbers equal pycocotools' COCOeval (see ``metrics.coco``). Raises ``InvalidInputError``
    naming the entry when the input is malformed (``validate=False`` skips the checks for
    callers that built both sides themselves).
    """
    iou_types = tuple(iou_types)
    gt = normalize_ground_truth(gt)
    if validate:
        check_ground_truth(gt, iou_types)
        check_results(results, gt, iou_types)
    grouped = group(gt, results)
    report: dict = {"coco": {t: coco_report(gt, results, t, max_dets, grouped, class_names) for t in iou_types},
                    "max_dets": max_dets}
    if "segm" in iou_types:
        report["sartorius"] = sartorius_score(gt, results, sartorius_score_thresh, class_names)
    return report


__all__ = ["evaluate_predictions", "InvalidInputError"]
