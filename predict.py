"""Images in, instance masks out.

    python predict.py IMG [IMG | DIR | GLOB ...] [--checkpoint PATH [PATH ...]] [--output-dir DIR]
                      [--device auto|cpu|cuda] [--batch-size N] [--score-thresh X]
                      [--postprocess FILE] [--tta] [--formats overlay labels json csv]

Without ``--checkpoint`` the newest ``best.pth`` under ``runs/`` is used (else the newest
``last.pth``). Several checkpoints (``--checkpoint exp/fold*/best.pth``, the fold models of
tools/cross_validate.py) are ensembled by weighted segments fusion. Outputs, in
``--output-dir``: ``NAME_overlay.png``, ``NAME_labels.png`` (16-bit; ``.tif`` above 65535
instances), ``predictions.json`` (COCO results of every detection, for evaluate.py) and, with
``--formats csv``, ``submission.csv`` (Kaggle Sartorius).
An image that cannot be read is reported by name; the others are still processed and the
exit status is 1. Exit status 2: nothing could be done (no checkpoint, no images, bad flag).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

FORMATS = ("overlay", "labels", "json", "csv")
DEFAULT_FORMATS = ("overlay", "labels", "json")


class PredictError(Exception):
    """A problem that stops the whole run; the message says what to do."""


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------------------- set-up


def resolve_checkpoint(checkpoint: str | None, runs_dir: str) -> tuple[Path, str]:
    """The checkpoint file to load and a sentence saying how it was chosen."""
    from engine.checkpoint import find_latest

    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            for name in ("best.pth", "last.pth"):
                if (path / name).is_file():
                    return path / name, f"using checkpoint {path / name}"
            raise PredictError(f"--checkpoint {checkpoint}: folder has no best.pth or last.pth")
        if not path.is_file():
            raise PredictError(f"--checkpoint {checkpoint}: no such file")
        return path, f"using checkpoint {path}"
    for name in ("best.pth", "last.pth"):
        found = find_latest(runs_dir, name)
        if found is not None:
            return found, f"using checkpoint {found} (newest {name} under {runs_dir}/; choose with --checkpoint)"
    raise PredictError(f"no checkpoint found under {runs_dir}/: train a model first (python train.py) "
                       f"or pass --checkpoint PATH")


def load_model(path: Path, device: torch.device, box_score_thresh: float, detections_per_img: int | None):
    """Checkpoint → (eval-mode model on ``device``, class names, preprocessing contract)."""
    from engine.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
    from transforms.preprocess import Preprocessing

    try:
        state = load_checkpoint(path)
        overrides = {}
        if box_score_thresh < float(state["config"].get("box_score_thresh", 0.05)):
            overrides["box_score_thresh"] = box_score_thresh    # keep low-score detections if asked
        if detections_per_img:
            overrides["detections_per_img"] = detections_per_img
        model, _ = build_model_from_checkpoint(state, **overrides)
    except CheckpointError as exc:
        raise PredictError(str(exc)) from exc
    except (KeyError, RuntimeError, ValueError) as exc:
        raise PredictError(f"checkpoint {path} does not match this code's models "
                           f"({type(exc).__name__}: {exc})") from exc
    class_names = list(state.get("class_names") or [])
    return model.to(device).eval(), class_names, Preprocessing.from_config(state["config"])


def load_postprocess(path: str) -> Callable[[list[dict], int, int], list[dict]]:
    """``--postprocess FILE`` → function(results_of_one_image, height, width) → results."""
    try:
        params = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PredictError(f"--postprocess {path}: cannot read JSON ({exc})") from exc
    from metrics.postprocess import apply_postprocess
    return lambda results, height, width: apply_postprocess(results, params, height, width)


def unique_names(paths: list[Path]) -> list[str]:
    """Output names (file stems), made unique by prefixing parent folders where stems collide."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name, parents = path.stem, list(path.resolve().parents)
        level = 0
        while name in used:
            if level < len(parents) and parents[level].name:
                name = f"{parents[level].name}_{name}"
                level += 1
            else:
                name = f"{name}_{len(used)}"
        used.add(name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10 % otherwise)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.enabled, self.stream = total, 0, enabled and total > 3, stream
        self.start = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_decile = -1

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} images  "
                f"{rate:.2f} img/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif self.done * 10 // self.total != self._last_decile:
            self._last_decile = self.done * 10 // self.total
            self.stream.write(line + "\n")


# ------------------------------------------------------------------------------- run


def model_view(image: torch.Tensor):
    """Model input ``3×H×W`` in [0, 1] → ``H×W×3`` uint8 for the overlay."""
    return (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def predict_batch(model, images: list[torch.Tensor], device: torch.device, amp: bool, tta: bool,
                  mask_thresh: float):
    """Float ``3×H×W`` images → one ``Instances`` per image (all detections, score-descending).
    ``model`` may be a list of models: their predictions are fused (``engine.tta``)."""
    from engine.evaluation import autocast_context
    from engine.inference import detect
    from utils.instances import Instances

    images = [img.to(device) for img in images]
    models = model if isinstance(model, (list, tuple)) else [model]
    if tta or len(models) > 1:
        from engine.tta import FLIPS, predict_ensemble

        return predict_ensemble(models, images, amp=amp, mask_threshold=mask_thresh,
                                flips=FLIPS if tta else ("none",))
    model = models[0]
    with autocast_context(device, amp):
        outputs = detect(model, images)
    return [Instances.from_detections(out, mask_thresh) for out in outputs]


def main(args: argparse.Namespace) -> int:
    import cv2

    from engine.distributed import resolve_device
    from transforms.preprocess import to_model_input
    from utils.image_files import ImageReadError, decode_image, expand_inputs
    from utils.instances import Instances
    from utils.label_images import box_masks_to_label_image
    from utils.writers import (
        render_overlay,
        submission_rows,
        write_label_image,
        write_png,
        write_predictions_json,
        write_submission_csv,
    )

    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is not None:          # our message names a corrupt file; silence OpenCV's own
        logging_api.setLogLevel(logging_api.LOG_LEVEL_SILENT)
    failures: list[str] = []
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
        try:
            device = resolve_device(args.device, 0)
        except RuntimeError as exc:
            raise PredictError(str(exc)) from exc
        models = []
        for checkpoint in checkpoints:
            model, names, preprocessing = load_model(checkpoint, device, args.score_thresh, args.detections_per_img)
            if models and (names, preprocessing) != (class_names, contract):
                raise PredictError(f"--checkpoint {checkpoint}: classes {names} / input {preprocessing} differ from "
                                   f"{checkpoints[0]}'s ({class_names} / {contract}); an ensemble needs models of "
                                   f"one task and one preprocessing")
            models.append(model)
            class_names, contract = names, preprocessing
        model = models if len(models) > 1 else models[0]
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = set(args.formats)
    names = unique_names(paths)
    results: list[dict] = []
    rows: list[str] = []
    progress = Progress(len(paths), enabled=not args.quiet)
    total_instances = 0
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path, name in zip(paths[start:start + args.batch_size], names[start:start + args.batch_size]):
            try:
                # The checkpoint's preprocessing contract: the input its training and validation saw.
                batch.append((name, to_model_input(decode_image(path), contract)))
            except ValueError as exc:     # ImageReadError names the file; the contract's errors don't
                message = str(exc) if isinstance(exc, ImageReadError) else f"{path}: {exc}"
                print(f"\nerror: {message}", file=sys.stderr)
                failures.append(message)
                progress.update()
        if not batch:
            continue
        predictions = predict_batch(model, [image for _, image in batch], device, args.amp, args.tta,
                                    args.mask_thresh)
        for (name, image), instances in zip(batch, predictions):
            height, width = instances.image_size
            if "json" in formats or postprocess is not None:
                image_results = instances.to_coco_results(name)
                results += image_results
            if postprocess is not None:
                final = Instances.from_coco_results(postprocess(image_results, height, width), height, width)
            else:
                final = instances.above(args.score_thresh)
            final = final.non_overlapping()
            total_instances += len(final)
            labels = box_masks_to_label_image(final.masks) if formats & {"overlay", "labels"} else None
            if "labels" in formats:
                write_label_image(out_dir / f"{name}_labels", labels)
            if "overlay" in formats:
                write_png(out_dir / f"{name}_overlay.png",    # drawn on what the model saw
                          render_overlay(model_view(image), labels, final if args.overlay_text else None, class_names))
            if "csv" in formats:
                rows += submission_rows(name, final)
            progress.update()

    if "json" in formats:
        write_predictions_json(out_dir / "predictions.json", results)
    if "csv" in formats:
        write_submission_csv(out_dir / "submission.csv", rows)
    done = len(paths) - sum(1 for f in failures if f not in problems)
    print(f"{done} image(s), {total_instances} instance(s) → {out_dir}/", file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
