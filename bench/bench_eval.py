"""Benchmark: COCO segm+bbox evaluation and the Sartorius score against pycocotools, same run.

    python bench/bench_eval.py [--images 100] [--max-dets 1000] [--out bench_eval.json]

Workload: ``tests.fixtures.workload.make_workload`` — images of 520×704 with 30–800 GT cells each and
about 1.2× as many predictions (jittered cells, duplicates, false positives).
Timed: pycocotools ``COCOeval.evaluate() + accumulate()`` per IoU type (``loadRes`` and JSON
loading not timed) versus ``metrics.coco.evaluate_coco`` from the in-memory dicts (input
validation and grouping included). The precision/recall/scores arrays must be identical.
pycocotools takes minutes on the default workload; ``--images 10`` is a quick look.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import sys
import time
import warnings

import numpy as np
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics.coco import (  # noqa: E402
    evaluate_coco,
    group,
    max_dets_list,  # noqa: E402
)
from metrics.reference import load_coco  # noqa: E402
from metrics.sartorius import sartorius_score  # noqa: E402
from metrics.validation import check_ground_truth, check_results  # noqa: E402
from tests.fixtures.workload import make_workload  # noqa: E402
from utils.io import write_json_atomic  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="COCO/Sartorius evaluation speed versus pycocotools")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--height", type=int, default=520)
    p.add_argument("--width", type=int, default=704)
    p.add_argument("--min-cells", type=int, default=30)
    p.add_argument("--max-cells", type=int, default=800)
    p.add_argument("--pred-ratio", type=float, default=1.2)
    p.add_argument("--max-dets", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="runs of the fast path (the median is reported)")
    p.add_argument("--out", default=None, help="write the numbers as JSON")
    return p


def time_fast(gt: dict, results: list[dict], max_dets: int) -> tuple[float, dict]:
    start = time.perf_counter()
    check_ground_truth(gt, ("segm", "bbox"))
    check_results(results, gt, ("segm", "bbox"))
    grouped = group(gt, results)
    out = {t: evaluate_coco(gt, results, t, max_dets, grouped) for t in ("segm", "bbox")}
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    gt, results = make_workload(args.images, args.height, args.width, args.min_cells, args.max_cells,
                                args.pred_ratio, args.seed)
    per_image = np.bincount([a["image_id"] for a in gt["annotations"]])[1:]
    print(f"workload: {len(gt['images'])} images {args.height}×{args.width}, {len(gt['annotations'])} GT "
          f"({per_image.min()}–{per_image.max()} per image), {len(results)} predictions "
          f"({len(results) / len(gt['annotations']):.2f}×); generated in {time.perf_counter() - start:.1f} s")

    fast_times, fast = [], None
    for _ in range(args.repeat):
        t, fast = time_fast(gt, results, args.max_dets)
        fast_times.append(t)
    fast_s = float(np.median(fast_times))
    print(f"ours (validate + segm + bbox, maxDets {args.max_dets}): {fast_s:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in fast_times)})")

    coco_gt = load_coco(gt)
    ref_s, identical = 0.0, True
    for iou_type in ("segm", "bbox"):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # not timed
            E = COCOeval(coco_gt, coco_dt, iou_type)
            E.params.maxDets = max_dets_list(args.max_dets)
            t0 = time.perf_counter()
            E.evaluate()
            E.accumulate()
            t = time.perf_counter() - t0
        ref_s += t
        same = all(np.array_equal(getattr(fast[iou_type], k), E.eval[k]) for k in ("precision", "recall", "scores"))
        identical &= same
        print(f"pycocotools {iou_type}: {t:.1f} s; arrays identical: {same}; "
              f"AP@{args.max_dets} {fast[iou_type].stats[0]:.4f}")
    ratio = ref_s / fast_s
    print(f"COCO segm+bbox: pycocotools {ref_s:.1f} s / ours {fast_s:.2f} s = {ratio:.0f}× faster; identical: {identical}")

    sart_times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = sartorius_score(gt, results)
        sart_times.append(time.perf_counter() - t0)
    sart_s = float(np.median(sart_times))
    print(f"Sartorius score {s['score']:.4f} in {sart_s:.2f} s (median of {args.repeat}; "
          f"overlap check included)")
    if args.out:
        write_json_atomic(args.out, {
            "args": vars(args), "gt": len(gt["annotations"]), "predictions": len(results),
            "ours_s": fast_s, "pycocotools_s": ref_s, "ratio": ratio, "identical": identical,
            "sartorius_s": sart_s, "sartorius_score": s["score"], "python": platform.python_version(),
            "cpu_count": os.cpu_count()})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
