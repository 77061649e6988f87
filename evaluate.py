"""Evaluate instance segmentation: COCO mAP (segm, bbox) and the Sartorius competition score.

From files (COCO ground truth + COCO results list):

    python evaluate.py --gt GT.json --pred PRED.json [--max-dets 1000] [--iou-types segm bbox] [--out REPORT.json]

From a checkpoint (inference on the validation split, then the same metrics):

    python evaluate.py --checkpoint PATH --dataset NAME --data-path ROOT [--save-predictions PRED.json]

Post-processing search (per-class score threshold and minimum mask size, with overlap
removal, maximising the Sartorius score; the JSON is what ``predict.py --postprocess`` reads):

    python evaluate.py --gt GT.json --pred PRED.json --search [--search-out postprocess.json] [--nms-iou 0.5]

Scores after that post-processing (what a submission made with ``predict.py --postprocess`` gets):

    python evaluate.py --gt GT.json --pred PRED.json --postprocess postprocess.json

Bad input (malformed JSON, unknown image ids or categories, RLE of the wrong size, NaN
scores) ends with a message naming the entry and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

from metrics import InvalidInputError, evaluate_predictions
from metrics.coco import STAT_NAMES
from metrics.validation import check_ground_truth, check_results, normalize_ground_truth
from utils.io import load_json, write_json_atomic

EXIT_BAD_INPUT = 2


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    files = parser.add_argument_group("from files")
    files.add_argument("--gt", help="COCO ground-truth JSON")
    files.add_argument("--pred", help="COCO results JSON (list of detections with RLE segmentation)")
    model = parser.add_argument_group("from a checkpoint")
    model.add_argument("--checkpoint", help="checkpoint file written by train.py")
    model.add_argument("--dataset", help="dataset name (validation split is evaluated)")
    model.add_argument("--data-path", help="dataset root")
    model.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                       help="extra dataset option (repeatable), e.g. fold=0")
    model.add_argument("--device", default=None, help="cuda, cpu, cuda:1 (default: cuda when present)")
    model.add_argument("--batch-size", type=int, default=2, help="images per inference batch")
    model.add_argument("--save-predictions", default=None, help="write the results list as COCO JSON")
    metric = parser.add_argument_group("metrics")
    metric.add_argument("--max-dets", type=int, default=None,
                        help="COCO maxDets (largest); default 100 from files, the dataset's detections "
                             "per image from a checkpoint. Cells need 1000.")
    metric.add_argument("--iou-types", nargs="+", default=["segm", "bbox"], choices=["segm", "bbox"])
    metric.add_argument("--sartorius-score-thresh", type=float, default=None,
                        help="predictions below this score are left out of the Sartorius score (default 0.5; "
                             "0 with --postprocess, whose per-class thresholds replace it)")
    metric.add_argument("--out", default=None, help="write the report JSON here")
    search = parser.add_argument_group("post-processing search")
    search.add_argument("--search", action="store_true",
                        help="choose per-class score thresholds and minimum sizes for the Sartorius score")
    search.add_argument("--search-out", default="postprocess.json", help="where the chosen parameters go")
    search.add_argument("--nms-iou", type=float, default=None,
                        help="mask-IoU NMS threshold applied before overlap removal (off by default)")
    search.add_argument("--postprocess", metavar="FILE",
                        help="apply these parameters (a --search output) to the predictions, then score them")
    return parser


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def ids_from_file_names(results: list[dict], gt: dict) -> list[dict]:
    """predict.py names images by file stem (it knows no ground truth); a ground truth built by
    tools/masks_to_coco.py or a dataset numbers them. Results whose ``image_id`` is not an id of
    ``gt`` but is the stem of exactly one of its ``file_name``s get that image's id."""
    ids = {img["id"] for img in gt.get("images", [])}
    stems: dict[str, list] = {}
    for img in gt.get("images", []):
        stems.setdefault(os.path.splitext(os.path.basename(str(img.get("file_name", ""))))[0], []).append(img["id"])
    def remap(r):
        image_id = r.get("image_id") if isinstance(r, dict) else None
        if image_id in ids or not isinstance(image_id, str) or len(stems.get(image_id, ())) != 1:
            return r
        return {**r, "image_id": stems[image_id][0]}
    return [remap(r) for r in results]


def evaluate_files(args: argparse.Namespace) -> tuple[dict, dict, list[dict]]:
    """``--gt``/``--pred`` → (report, gt, results)."""
    gt = normalize_ground_truth(load_json(args.gt, "ground truth", InvalidInputError))
    results = load_json(args.pred, "predictions", InvalidInputError)
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        results = results["annotations"]  # a results file saved as a COCO dict
    check_ground_truth(gt, tuple(args.iou_types))
    if isinstance(results, list):
        results = ids_from_file_names(results, gt)
    check_results(results, gt, tuple(args.iou_types))
    results = postprocessed(args, gt, results)
    max_dets = args.max_dets or 100
    per_image: dict = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    crowded = sum(n > max_dets for n in per_image.values())
    if crowded:
        print(f"note: {crowded} image(s) have more than {max_dets} predictions; COCO evaluation keeps the "
              f"{max_dets} best-scored per image and category (raise --max-dets for dense images)", file=sys.stderr)
    report = evaluate_predictions(gt, results, max_dets, tuple(args.iou_types),
                                  sartorius_score_thresh=sartorius_thresh(args), validate=False)
    return report, gt, results


def sartorius_thresh(args: argparse.Namespace) -> float:
    if args.sartorius_score_thresh is not None:
        return args.sartorius_score_thresh
    return 0.0 if args.postprocess else 0.5


def postprocessed(args: argparse.Namespace, gt: dict, results: list[dict]) -> list[dict]:
    """``--postprocess FILE``: the results after per-class thresholds, minimum sizes and overlap
    removal (``metrics.postprocess``, as predict.py applies them); else the results as given."""
    if not args.postprocess:
        return results
    from metrics.postprocess import check_params, postprocess_results

    params = check_params(load_json(args.postprocess, "post-processing parameters"), args.postprocess)
    return postprocess_results(gt, results, params)


def _dataset_options(args: argparse.Namespace) -> dict:
    from datasets.registry import parse_option  # checkpoint mode only: --gt/--pred import no torch

    options: dict[str, Any] = {"data_path": args.data_path}
    for item in args.dataset_option:
        try:
            key, value = parse_option(item)
        except ValueError as e:
            raise InvalidInputError(f"--dataset-option: {e}") from None
        options[key] = value
    return options


def report_from_checkpoint(args: argparse.Namespace) -> tuple[dict, dict | None, list[dict]]:
    """``--checkpoint`` → (report, gt or None, results) via the engine's inference path.

    The engine runs the model over the validation split (batched, on GPU when present, under
    torchrun too), gathers the results across ranks and calls ``metrics.evaluate_predictions``.
    """
    import torch  # noqa: F401  (heavy imports only in this mode)

    from engine.evaluation import evaluate_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = _dataset_options(args)
    # Without --max-dets the checkpoint's own detections per image (what training evaluated at).
    report, results = evaluate_checkpoint(args.checkpoint, args.dataset, options, device,
                                                 args.batch_size, args.max_dets, args.save_predictions)
    gt = None
    if args.search:
        from datasets import build_dataset
        gt = build_dataset(args.dataset, "val", options, None).coco_gt()
    return report, gt, results


def _fmt(x: float | None) -> str:
    return "  -  " if x is None or x < 0 else f"{x:.3f}"


def format_report(report: dict) -> str:
    """A readable table of the report: COCO stats per IoU type, per-class AP, Sartorius score."""
    lines = []
    max_dets = report.get("max_dets")
    names = [n if n != "ARmax" else f"AR{max_dets}" for n in STAT_NAMES]
    for iou_type, r in report.get("coco", {}).items():
        lines.append(f"COCO {iou_type} (maxDets {max_dets})")
        lines.append("  " + " ".join(f"{n:>6}" for n in names))
        lines.append("  " + " ".join(f"{_fmt(v):>6}" for v in r["stats"]))
        if r.get("per_class"):
            lines.append("  AP per class: " + ", ".join(f"{n} {_fmt(v)}" for n, v in r["per_class"].items()))
    s = report.get("sartorius")
    if s:
        lines.append(f"Sartorius score {s['score']:.4f}  (predictions with score ≥ {s['score_thresh']}, "
                     f"{len(s['per_image'])} images)")
        lines.append("  IoU thr " + " ".join(f"{t:>5}" for t in s["per_threshold"]))
        lines.append("  score   " + " ".join(f"{v:5.3f}" for v in s["per_threshold"].values()))
        lines.append("  per class: " + ", ".join(f"{n} {_fmt(v)}" for n, v in s["per_class"].items()))
    return "\n".join(lines)


def run_search(args: argparse.Namespace, gt: dict, results: list[dict]) -> dict:
    """The post-processing search; prints its table and writes the parameters JSON."""
    from metrics.postprocess import format_search_table, search_postprocess

    found = search_postprocess(gt, results, nms_iou=args.nms_iou)
    if _is_main_process():
        print(format_search_table(found))
        write_json_atomic(args.search_out, found["params"])
        print(f"post-processing parameters → {args.search_out}")
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``): print the report, write ``--out`` and
    ``--search-out``. Returns the exit status: 0, or 2 for bad input (the message names the file
    and entry). Scoring files (``--gt``/``--pred``) imports no torch."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    from_files = args.gt is not None or args.pred is not None
    if from_files == (args.checkpoint is not None):
        parser.error("give either --gt and --pred, or --checkpoint with --dataset and --data-path")
    if from_files and not (args.gt and args.pred):
        parser.error("--gt and --pred go together")
    if args.checkpoint and not args.dataset:
        parser.error("--checkpoint needs --dataset (and usually --data-path)")
    if args.max_dets is not None and args.max_dets < 1:
        parser.error("--max-dets must be ≥ 1")
    if args.search and "segm" not in args.iou_types:
        parser.error("--search optimises the Sartorius score, which needs --iou-types segm")
    if args.postprocess and args.search:
        parser.error("--postprocess scores post-processed predictions; --search chooses the parameters from raw "
                     "ones: run them one after the other")
    if args.postprocess and not from_files:
        parser.error("--postprocess works on files: write the predictions with --save-predictions, then run "
                     "--gt GT.json --pred PRED.json --postprocess FILE")
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report, gt, results = evaluate_files(args) if from_files else report_from_checkpoint(args)
        if report is None or not _is_main_process():
            return 0
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(format_report(report))
        print(f"({time.perf_counter() - start:.1f} s)")
        if args.out:
            write_json_atomic(args.out, report)
            print(f"report → {args.out}")
        if args.search:
            if gt is None:
                raise InvalidInputError("--search needs the ground truth")
            run_search(args, gt, results)
    except InvalidInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
