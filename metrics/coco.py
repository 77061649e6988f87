"""COCO bbox/segm evaluation with pycocotools, summarised at the configured maxDets.

pycocotools' ``summarize()`` hard-codes 100 detections for the AP rows, so with maxDets of
1000 it reports -1; here the 12 stats are read from the same ``eval`` arrays with the largest
maxDets for the AP rows (identical to pycocotools when maxDets is [1, 10, 100]).
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "ARmax", "ARs", "ARm", "ARl"]


def max_dets_list(max_dets: int) -> list[int]:
    """pycocotools' ``[1, 10, 100]`` with the last entry replaced by ``max_dets``."""
    return [1, 10, max_dets] if max_dets > 10 else [1, max_dets, max_dets]


def load_coco(gt: dict) -> COCO:
    """A pycocotools COCO object from an in-memory dict, without its chatter."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def summarize(E: COCOeval) -> list[float]:
    """The 12 COCO stats in pycocotools' order, AP rows at the largest maxDets."""
    p = E.params
    precision, recall = E.eval["precision"], E.eval["recall"]  # T×R×K×A×M, T×K×A×M

    def ap(iou=None, area="all"):
        s = precision[:, :, :, p.areaRngLbl.index(area), -1]
        if iou is not None:
            s = s[np.isclose(p.iouThrs, iou)]
        return _mean_valid(s)

    def ar(max_det_index, area="all"):
        return _mean_valid(recall[:, :, p.areaRngLbl.index(area), max_det_index])

    return [ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
            ar(0), ar(1), ar(2), ar(2, "small"), ar(2, "medium"), ar(2, "large")]


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_type: str, max_dets: int,
                  class_names: list[str] | None = None) -> dict:
    """COCO metrics for one IoU type → ``{"stats", "AP", "AP50", "AP75", "per_class"}``."""
    if not results:
        stats = [0.0] * 12
        names = class_names or [c["name"] for c in coco_gt.dataset["categories"]]
        return {"stats": stats, **dict(zip(STAT_NAMES, stats)), "per_class": {n: 0.0 for n in names}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        E = COCOeval(coco_gt, coco_dt, iou_type)
        E.params.maxDets = max_dets_list(max_dets)
        E.evaluate()
        E.accumulate()
    stats = summarize(E)
    per_class = {}
    for k, cat_id in enumerate(E.params.catIds):
        name = coco_gt.cats[cat_id]["name"]
        per_class[name] = _mean_valid(E.eval["precision"][:, :, k, 0, -1])
    return {"stats": stats, **dict(zip(STAT_NAMES, stats)), "per_class": per_class}
