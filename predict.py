"""Images in, instance masks out.

    python predict.py IMG [IMG | DIR | GLOB ...] [--checkpoint PATH [PATH ...]] [--output-dir DIR]
                      [--device auto|cpu|cuda] [--batch-size N] [--score-thresh X]
                      [--postprocess FILE] [--tta] [--tile SIZE --tile-overlap PX]
                      [--formats overlay labels json csv table] [--skip-existing]

Without ``--checkpoint`` the newest ``best.pth`` under ``runs/`` is used (else the newest
``last.pth``). Several checkpoints (``--checkpoint exp/fold*/best.pth``, the fold models of
tools/cross_validate.py) are ensembled by weighted segments fusion. Outputs, in
``--output-dir``: ``NAME_overlay.png``, ``NAME_labels.png`` (16-bit; ``.tif`` above 65535
instances), ``predictions.json`` (COCO results of every detection, for evaluate.py) and, with
``--formats csv`` ``submission.csv`` (Kaggle Sartorius) and with ``--formats table``
``NAME_instances.csv`` (id, class, score, area, equivalent diameter).
Each image done also gets a record in ``--output-dir/.records/`` (written after its outputs);
``--skip-existing`` keeps the images whose record is complete and predicts only the others,
so a run interrupted at any moment and started again finishes the folder with the same
``predictions.json`` / ``submission.csv`` as an uninterrupted run.
An image that cannot be read is reported by name; the others are still processed and the
exit status is 1. Exit status 2: nothing could be done (no checkpoint, no images, bad flag).
The work is done by ``engine.predictor.Predictor`` (the Python API); this file only parses
flags and writes files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.predictor import (
    AUTO_TILE_PIXELS,
    DEFAULT_TILE,
    DEFAULT_TILE_OVERLAP,
    PredictError,
    Predictor,
    load_postprocess,
    resolve_checkpoint,
    unique_names,
)

FORMATS = ("overlay", "labels", "json", "csv", "table")
DEFAULT_FORMATS = ("overlay", "labels", "json")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Mask R-CNN prediction: images in, instance masks out.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files (PNG/JPEG/TIFF, 8/16-bit, gray/RGB/RGBA), folders, or glob patterns")
    parser.add_argument("--checkpoint", nargs="+",
                        help="checkpoint file or run folder (default: newest best.pth under --runs-dir); several "
                             "(e.g. exp/fold*/best.pth) are ensembled by weighted segments fusion")
    parser.add_argument("--runs-dir", default="runs", help="where training writes runs; searched without --checkpoint")
    parser.add_argument("--output-dir", default="predictions", help="folder for all outputs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="minimum score of the instances drawn, labelled and written to the CSV "
                             "(predictions.json keeps every detection)")
    parser.add_argument("--mask-thresh", type=float, default=0.5, help="mask probability threshold")
    parser.add_argument("--detections-per-img", type=int, default=None,
                        help="override the checkpoint's cap on detections per image")
    parser.add_argument("--postprocess", metavar="FILE",
                        help="JSON of per-class score thresholds and minimum sizes chosen by evaluate.py; "
                             "replaces --score-thresh")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: flips (h, v, hv) fused by weighted segments fusion")
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), choices=FORMATS,
                        help="outputs to write")
    parser.add_argument("--overlay-text", action="store_true", help="write class and score on the overlay")
    parser.add_argument("--amp", action="store_true", help="mixed precision inference")
    parser.add_argument("--tile", type=int, default=None, metavar="SIZE",
                        help=f"predict in overlapping SIZE×SIZE tiles merged across seams (default: "
                             f"{DEFAULT_TILE} px tiles when the model would see more than "
                             f"{AUTO_TILE_PIXELS // 1024 ** 2} Mpx; 0: never tile)")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP, metavar="PX",
                        help="overlap of neighbouring tiles; more than the largest object's diameter")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep the images already done in --output-dir (by an interrupted run) and predict "
                             "only the others; the aggregate files still cover every image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    """Predict every image ``args`` (from ``get_args_parser``) names and write the ``--formats``
    outputs into ``--output-dir`` (module docstring). Returns the exit status: 0 all done, 1 some
    inputs failed (each named on stderr; the others are written), 2 nothing could be done (no
    checkpoint or images, a bad flag or ``--postprocess`` file: the message names it)."""
    import cv2

    from utils.image_files import expand_inputs
    from utils.io import remove_stale_temp_files
    from utils.writers import (
        instance_table,
        load_image_record,
        write_image_record,
        write_instance_table,
        write_label_image,
        write_png,
        write_predictions_json,
        write_submission_csv,
    )

    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is not None:          # our message names a corrupt file; silence OpenCV's own
        logging_api.setLogLevel(logging_api.LOG_LEVEL_SILENT)
    failures: list[str] = []
    formats = set(args.formats)
    try:
        if args.batch_size < 1:
            raise PredictError(f"--batch-size must be ≥ 1, got {args.batch_size}")
        if not 0 <= args.score_thresh <= 1 or not 0 < args.mask_thresh < 1:
            raise PredictError("--score-thresh must be in [0, 1] and --mask-thresh in (0, 1)")
        paths, problems = expand_inputs(args.inputs)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        failures += problems
        if not paths:
            raise PredictError("no images to predict on")
        postprocess = load_postprocess(args.postprocess) if args.postprocess else None
        checkpoints = []
        for given in args.checkpoint or [None]:
            checkpoint, how = resolve_checkpoint(given, args.runs_dir)
            print(how, file=sys.stderr)
            checkpoints.append(checkpoint)
        predictor = Predictor.from_checkpoint(
            checkpoints if len(checkpoints) > 1 else checkpoints[0], device=args.device, tta=args.tta, postprocess=postprocess, score_thresh=args.score_thresh,
            detections_per_img=args.detections_per_img, mask_thresh=args.mask_thresh, batch_size=args.batch_size,
            amp=args.amp, tile=args.tile, tile_overlap=args.tile_overlap, keep_view="overlay" in formats)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    transform = predictor.model.transform
    if getattr(transform, "object_diameter", None) is not None:
        print(f"each image is resized so that its objects' median diameter (measured at scale "
              f"{transform.test_scale:g}) is {transform.object_diameter:.1f} px", file=sys.stderr)

    def report(message: str) -> None:
        print(f"\nerror: {message}", file=sys.stderr)
        failures.append(message)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = unique_names(paths)
    records: dict[str, dict] = {}           # name → its record (utils.writers.write_image_record)
    if args.skip_existing:
        remove_stale_temp_files(out_dir)     # of a run killed mid-write
        for path, name in zip(paths, names):
            record = load_image_record(out_dir, name, path, args.formats)
            if record is not None:
                records[name] = record
        if records:
            print(f"--skip-existing: {len(records)} of {len(paths)} image(s) already done in {out_dir}/",
                  file=sys.stderr)
    todo = [(path, name) for path, name in zip(paths, names) if name not in records]
    sources = dict((name, path) for path, name in todo)
    predicted = 0
    for prediction in predictor.predict_paths([p for p, _ in todo], [n for _, n in todo], on_error=report,
                                              progress=not args.quiet):
        name = prediction.name
        files = []
        if "labels" in formats:
            files.append(write_label_image(out_dir / f"{name}_labels", prediction.label_image).name)
        if "overlay" in formats:             # drawn on what the model saw
            write_png(out_dir / f"{name}_overlay.png", prediction.overlay(text=args.overlay_text))
            files.append(f"{name}_overlay.png")
        if "table" in formats:
            write_instance_table(out_dir / f"{name}_instances.csv",
                                 instance_table(prediction.instances, prediction.class_names))
            files.append(f"{name}_instances.csv")
        coco = prediction.to_coco(every_detection=True) if "json" in formats else None
        rows = prediction.to_kaggle_rows() if "csv" in formats else None
        write_image_record(out_dir, name, sources[name], args.formats, files, len(prediction), coco, rows)
        records[name] = {"instances": len(prediction), "coco": coco, "rows": rows}
        predicted += 1

    # The aggregates, in input order, from every done image's record: a resumed run writes the same.
    done_names = [name for name in names if name in records]
    if "json" in formats:
        write_predictions_json(out_dir / "predictions.json",
                               [entry for name in done_names for entry in records[name]["coco"]])
    if "csv" in formats:
        write_submission_csv(out_dir / "submission.csv", [row for name in done_names for row in records[name]["rows"]])
    total_instances = sum(records[name].get("instances", 0) for name in done_names)
    skipped = len(done_names) - predicted
    print(f"{len(done_names)} image(s){f' ({skipped} done before)' if skipped else ''}, {total_instances} instance(s) "
          f"→ {out_dir}/", file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
