"""pycocotools' COCOeval on in-memory dicts: the reference the fast code is tested and timed against."""
from __future__ import annotations

import contextlib
import copy
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from metrics.coco import max_dets_list


def load_coco(gt: dict) -> COCO:
    """A pycocotools COCO object from an in-memory dict, without its chatter."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.dataset.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pycocotools_eval(coco_gt: COCO, results: list[dict], iou_type: str, max_dets: int = 100,
                     summarize: bool = False) -> COCOeval:
    """``COCOeval`` after evaluate() and accumulate() (and summarize() if asked), quietly."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        E = COCOeval(coco_gt, coco_dt, iou_type)
        E.params.maxDets = max_dets_list(max_dets)
        E.evaluate()
        E.accumulate()
        if summarize:
            E.summarize()
    return E
