"""Evaluation loop: model → COCO results per image → gathered over ranks → ``metrics``.

The distributed sampler pads the last batch by repeating images; results are merged by
unique image id, so those repeats never count twice and 1 or N processes give one answer.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Subset

from engine import distributed
from engine.data import eval_loader
from engine.inference import DIAMETER_MIN_OBJECTS, detect, object_scale
from metrics import evaluate_predictions
from utils.instances import detections_to_coco_results
from utils.io import write_json_atomic

log = logging.getLogger(__name__)


def autocast_context(device: torch.device, enabled: bool | None):
    """Mixed precision: fp16 on CUDA, bf16 on CPU (where fp16 kernels are missing). ``enabled``
    None (a ``TrainConfig`` built directly, its default not resolved for a device) is off."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(enabled))


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, amp: bool = False,
                   print_freq: int = 50, diameters: dict | None = None) -> dict[Any, list[dict]]:
    """Run ``model`` over ``loader`` → ``{image_id: [COCO result, ...]}`` for this rank's images.
    ``diameters``: filled with each image's median object diameter (``detect``'s
    ``object_diameter``, image pixels, ``None`` where too few objects were found)."""
    model.eval()
    per_image: dict[Any, list[dict]] = {}
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        images = [img.to(device, non_blocking=True) for img in images]
        with autocast_context(device, amp):
            # Stops before torchvision's full-canvas paste; masks are pasted box by box below.
            outputs = detect(model, images)
        for target, output in zip(targets, outputs):
            per_image[target["image_id"]] = detections_to_coco_results(output, target["image_id"])
            if diameters is not None:
                diameters[target["image_id"]] = output["object_diameter"]
        if print_freq and (step + 1) % print_freq == 0:
            log.info("eval: %d/%d batches, %.2f s/batch", step + 1, len(loader),
                     (time.perf_counter() - start) / (step + 1))
    return per_image


def time_one_evaluation(model: torch.nn.Module, dataset, coco_gt: dict, device: torch.device, max_dets: int,
                        amp: bool = False, index: int = 0) -> tuple[float, int]:
    """Seconds to load, predict, convert and score ``dataset[index]`` — what evaluation pays per
    image (workers, the loop and the merge add to it) — and the number of detections the model
    kept; leaves ``model`` in eval mode."""
    start = time.perf_counter()
    image, target = dataset[index]
    model.eval()
    with torch.inference_mode(), autocast_context(device, amp):
        output = detect(model, [image.to(device)])[0]
    results = detections_to_coco_results(output, target["image_id"])
    one = {**coco_gt, "images": [i for i in coco_gt["images"] if i["id"] == target["image_id"]],
           "annotations": [a for a in coco_gt["annotations"] if a["image_id"] == target["image_id"]]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_predictions(one, results, max_dets, validate=False)
    return time.perf_counter() - start, len(results)


def gather_per_image(per_image: dict[Any, Any]) -> dict[Any, Any]:
    """All ranks' ``{image_id: value}``, one entry per image id (the first rank's wins), on every rank."""
    merged: dict[Any, Any] = {}
    for part in distributed.all_gather_objects(per_image):
        for image_id, value in part.items():
            merged.setdefault(image_id, value)
    return merged


def gather_results(per_image: dict[Any, list[dict]]) -> list[dict]:
    """All ranks' results, one entry per image id (the first rank's copy wins), on every rank."""
    merged = gather_per_image(per_image)
    return [r for image_id in sorted(merged, key=str) for r in merged[image_id]]


def evaluate_model(model: torch.nn.Module, loader, coco_gt: dict, device: torch.device, max_dets: int,
                   amp: bool = False, sartorius_score_thresh: float = 0.5,
                   class_names: list[str] | None = None,
                   diameters: dict | None = None) -> tuple[dict, list[dict]]:
    """Predict, gather and score. Every rank gets the same ``(report, results)``; ``diameters``:
    filled with every image's median object diameter (``predict_loader``), on every rank."""
    found: dict[Any, float | None] = {}
    per_image = predict_loader(model, loader, device, amp, diameters=found)
    results = gather_results(per_image)
    if diameters is not None:
        diameters.update(gather_per_image(found))
    report = None
    if not distributed.is_distributed() or torch.distributed.get_rank() == 0:
        with warnings.catch_warnings():
            # Raw Mask R-CNN masks overlap by nature; the report carries the count instead.
            warnings.filterwarnings("ignore", message=".*overlapping predicted masks.*")
            report = evaluate_predictions(coco_gt, results, max_dets, class_names=class_names,
                                          sartorius_score_thresh=sartorius_score_thresh, validate=False)
    report = distributed.broadcast_object(report)
    return report, results


class Validation:
    """The trainer's evaluation (Detectron2's EvalHook shape), built by train.py from the validation
    split: ``validation(epoch) -> report`` runs ``model`` over ``loader`` and scores it against
    ``coco_gt`` (the same report on every rank); ``estimate_seconds()`` is what one call will take
    on this rank (``dist_info``: its share of the split). ``predictions_path``: rank 0 also writes
    the COCO results there."""

    def __init__(self, model: torch.nn.Module, loader, coco_gt: dict, device: torch.device, max_dets: int,
                 amp: bool = False, sartorius_score_thresh: float = 0.5, class_names: list[str] | None = None,
                 predictions_path: Path | None = None, dist_info: distributed.DistInfo | None = None):
        self.dist = dist_info or distributed.DistInfo()
        self.model, self.loader, self.coco_gt, self.device = model, loader, coco_gt, device
        self.max_dets, self.amp, self.sartorius_score_thresh = max_dets, amp, sartorius_score_thresh
        self.class_names = class_names
        self.predictions_path = predictions_path
        self.last_seconds = 0.0   # wall time of the latest call
        self.last_diameters: dict[Any, float | None] = {}   # the latest call's median object diameter per image

    def __call__(self, epoch: int) -> dict:
        started = time.time()
        self.last_diameters = {}
        report, results = evaluate_model(self.model, self.loader, self.coco_gt, self.device, self.max_dets,
                                         amp=self.amp, sartorius_score_thresh=self.sartorius_score_thresh,
                                         class_names=self.class_names, diameters=self.last_diameters)
        self.last_seconds = time.time() - started
        if self.predictions_path is not None and self.dist.is_main:
            write_json_atomic(self.predictions_path, results, indent=None)
            log.info("predictions (COCO results) written to %s", self.predictions_path)
        return report

    def subset(self, max_images: int) -> "Validation":
        """The same validation on at most ``max_images`` evenly spaced images of the split (``self``
        when the split is no larger)."""
        dataset = self.loader.dataset
        if len(dataset) <= max_images:
            return self
        indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, max_images).round()})
        ids = {dataset.image_ids[i] for i in indices}
        gt = {**self.coco_gt, "images": [i for i in self.coco_gt["images"] if i["id"] in ids],
              "annotations": [a for a in self.coco_gt["annotations"] if a["image_id"] in ids]}
        loader = eval_loader(Subset(dataset, indices), self.loader.batch_size, self.loader.num_workers,
                             self.dist.rank, self.dist.world_size)
        return Validation(self.model, loader, gt, self.device, self.max_dets, self.amp, self.sartorius_score_thresh,
                          self.class_names, dist_info=self.dist)

    def estimate_seconds(self, evaluations: float = 1.0) -> float:
        """What ``evaluations`` calls (1 + the test-scale search's ``TestScaleSearch.cost()``)
        will take on this rank, estimated from the validation image with the most objects
        (loaded, predicted and scored; leaves the model in eval mode).

        The estimate is made after the first training steps, when few detections clear the score
        threshold, while a trained model keeps about ``DETECTIONS_PER_OBJECT`` per object (up to
        the cap), and the mask head, the paste and the scoring grow with them. So the densest
        image is timed with the score threshold at 0 (twice: the first call pays one-off
        start-up costs) and once more with a single detection; the difference prices one
        detection, the single-detection time prices the image's pixels. Every image is then
        costed by its own pixels and objects, with a quarter more for what varies and a fixed
        ``EVAL_FIXED_SECONDS`` for the loader start-up and the merge. (Costing every image as the
        densest, with half more, reserved 5 min 20 s of a 20-minute MoNuSeg budget for 2 min 43 s
        of evaluation and search, and 3 of the quick start's minutes for half a minute; costed
        by image, the validation's 33 s was estimated at 35 s.)"""
        dataset = self.loader.dataset
        n = math.ceil(len(dataset) / self.dist.world_size)
        if n == 0:
            return 0.0
        objects = Counter(a["image_id"] for a in self.coco_gt.get("annotations", []))
        ids = list(getattr(dataset, "image_ids", []))
        known = len(ids) == len(dataset)
        densest = max(range(len(ids)), key=lambda i: objects.get(ids[i], 0)) if known else 0
        heads = getattr(self.model, "roi_heads", None)
        score_thresh = getattr(heads, "score_thresh", None)
        cap = getattr(heads, "detections_per_img", None)

        def timed(index: int) -> tuple[float, int]:
            return time_one_evaluation(self.model, dataset, self.coco_gt, self.device, self.max_dets, self.amp, index)
        try:
            if score_thresh is not None:
                heads.score_thresh = 0.0
            full, kept = min(timed(densest) for _ in range(2))
            if cap is not None and known and kept > 1:
                heads.detections_per_img = 1
                one, _ = timed(densest)
            else:
                one = None
        finally:
            if score_thresh is not None:
                heads.score_thresh = score_thresh
            if cap is not None:
                heads.detections_per_img = cap
        if one is None:   # no per-image object counts or detections to go by: every image as the densest
            return n * full * evaluations * EVAL_MARGIN + EVAL_FIXED_SECONDS
        per_detection = max(full - one, 0.0) / (kept - 1)
        pixels = {i["id"]: i.get("width", 0) * i.get("height", 0) for i in self.coco_gt.get("images", [])}
        reference = pixels.get(ids[densest]) or 1
        seconds = sum(one * (pixels.get(i) or reference) / reference
                      + per_detection * min(cap, DETECTIONS_PER_OBJECT * objects.get(i, 0)) for i in ids)
        return seconds / self.dist.world_size * evaluations * EVAL_MARGIN + EVAL_FIXED_SECONDS


# Detections a trained model keeps per validation image (score ≥ the box head's threshold), per
# ground-truth object, up to the cap: the quick start's checkpoint keeps 1.6× on its two dense
# images and about 2× on the sparse ones; MoNuSeg's 20-minute model 4–7× on its sparse images
# and the cap (2,800) on the dense ones. Too few would leave the test-scale search no time for
# its largest scale, too many cost training steps.
DETECTIONS_PER_OBJECT = 5.0
EVAL_MARGIN = 1.25          # on the estimated prediction time
EVAL_FIXED_SECONDS = 5.0    # loader start-up, gathering the results, the report


# Test scales tried at the end of a run, as factors of the training scale. Small objects
# (cells and nuclei of 10-20 px) are found and outlined better when shown somewhat larger than
# in training, up to a point that depends on the data and on the scale jitter the model was
# trained with: MoNuSeg (``cells`` crops, jitter 0.75-1.5×) segm AP 0.276 → 0.334 and DSB 0.230
# → 0.265 at 1.5×; the synthetic cells (no jitter) 0.566 → 0.643 at 1.25× but 0.629 at 1.5×
# (docs/benchmarks.md). Hence a choice on the validation images, not a constant.
TEST_SCALE_FACTORS = (1.0, 1.25, 1.5)
TEST_SCALE_IMAGES = 32        # validation images the choice is made on (evenly spaced), at most
# A larger factor costs its square in compute and must beat the best smaller one by this share
# of its value: on the quick start's 8-epoch checkpoint ×1.5 scored segm AP 0.5799 against
# ×1.25's 0.5781 (+0.3 %) but its Sartorius score fell from 0.704 to 0.587.
TEST_SCALE_MIN_GAIN = 0.01
# The best factor follows the size of an image's objects (MoNuSeg: ×2 for the kidney's 12-px
# nuclei, ×1-1.25 for the prostate's 26-px ones), so a scale per image (``engine.inference.detect``
# with an ``object_diameter``) is tried as well when the validation images' objects differ in
# size by at least this ratio (medians of their ground truth; below it the per-image scales would
# all be one factor). Objects are then shown at the best-scoring factor times the median image's
# objects, and the per-image scales are kept unless they score PER_IMAGE_TOLERANCE of the best
# single factor's value below it: they carry to images whose objects are unlike the validation's,
# which one factor cannot, and on a handful of validation images whose objects are alike the two
# differ by noise (MoNuSeg, 5 sparse images: segm AP 0.244 per image against 0.248 at ×1.25;
# 5 mixed ones: 0.408 against 0.392), while a failed size estimate costs far more.
PER_IMAGE_MIN_SPREAD = 1.25
PER_IMAGE_TOLERANCE = 0.05


class TestScaleChoice(NamedTuple):
    __test__ = False                # not a pytest class
    scale: float                    # the test scale (the first pass's, with an object diameter)
    object_diameter: float | None   # per-image scales: the objects' median diameter in model pixels
    report: dict                    # the choice's report on the whole validation split
    numbers: dict[float, dict]      # {factor: headline numbers on the images searched}
    per_image: dict | None          # the per-image scales' headline numbers, when tried


def median_diameters(coco_gt: dict, min_objects: int = DIAMETER_MIN_OBJECTS) -> dict[Any, float]:
    """``{image_id: median equivalent diameter of its annotated objects}`` (pixels), for the
    images with at least ``min_objects`` of them."""
    areas: dict[Any, list[float]] = {}
    for a in coco_gt.get("annotations", []):
        if not a.get("iscrowd", 0) and a.get("area"):
            areas.setdefault(a["image_id"], []).append(float(a["area"]))
    return {i: float(2 * np.sqrt(np.median(v) / np.pi)) for i, v in areas.items() if len(v) >= min_objects}


class TestScaleSearch:
    """Choose the model's test scale (``ScaleTransform.test_scale``) on validation images, and
    whether each image gets its own (``ScaleTransform.object_diameter``).

    ``validation``: the run's ``Validation`` (whose report at the training scale the search
    reuses when it covers at most ``max_images``; else the search runs on ``max_images`` evenly
    spaced images and the chosen scale is then scored on all of them)."""
    __test__ = False                # not a pytest class

    def __init__(self, validation: "Validation", transform, metric: str, factors=TEST_SCALE_FACTORS,
                 max_images: int = TEST_SCALE_IMAGES):
        self.validation, self.transform, self.metric = validation, transform, metric
        self.factors, self.base = tuple(factors), float(transform.scale)
        self.subset = validation.subset(max_images)
        sizes = list(median_diameters(getattr(self.subset, "coco_gt", {})).values())
        self.tries_per_image = len(sizes) >= 2 and max(sizes) >= PER_IMAGE_MIN_SPREAD * min(sizes)

    def cost(self) -> float:
        """Seconds of the search, in units of one validation at the training scale (pixels grow
        with the square of the factor; the per-image scales: a first pass and at most the largest
        factor)."""
        share = len(self.subset.loader.dataset) / max(len(self.validation.loader.dataset), 1)
        extra = sum(f * f for f in self.factors if f != 1.0) + (0.0 if self.subset is self.validation else 1.0)
        if self.tries_per_image:
            extra += 1.0 + max(self.factors) ** 2
        rescore = 0.0 if self.subset is self.validation else (1.0 if self.tries_per_image else 0.0) + max(self.factors) ** 2
        return share * extra + rescore

    def __call__(self, epoch: int, report: dict, deadline: float | None = None) -> TestScaleChoice:
        """``report``: the validation at the training scale just done → a ``TestScaleChoice``; the
        transform is left as chosen. A larger factor is chosen only when it beats the best
        smaller one by ``TEST_SCALE_MIN_GAIN`` of its value; the per-image scales (objects shown
        at the best-scoring factor times the validation images' median object diameter, measured
        at the training scale) unless they fall ``PER_IMAGE_TOLERANCE`` of its value below it. ``deadline`` (a time
        budget's end, ``time.time()``): an evaluation that would end after it is not tried, nor
        any after it; its cost is the last evaluation's per pixel (the first: the validation at
        the training scale, ``Validation.last_seconds``)."""
        reports = {1.0: report} if self.subset is self.validation else {}
        diameters = dict(getattr(self.subset, "last_diameters", {})) if reports else {}
        share = len(self.subset.loader.dataset) / max(len(self.validation.loader.dataset), 1)
        per_unit = self.validation.last_seconds * share   # seconds of the subset at factor 1
        rescore_unit = 0.0 if self.subset is self.validation else self.validation.last_seconds

        def fits(what: str, units: float, rescore_units: float) -> bool:
            needed = per_unit * units + rescore_unit * rescore_units
            if deadline is None or per_unit <= 0 or not distributed.broadcast_object(time.time() + needed > deadline):
                return True
            log.warning("%s not tried: about %.0f s, and the time budget has %.0f s left", what, needed,
                        max(deadline - time.time(), 0.0))
            return False

        try:
            for factor in self.factors:
                if factor in reports:
                    continue
                if not fits(f"test scale ×{factor:g} and larger", factor ** 2, 0.0 if factor == 1.0 else factor ** 2):
                    break
                self.transform.test_scale = self.base * factor
                started = time.time()
                reports[factor] = self.subset(epoch)
                per_unit = (time.time() - started) / factor ** 2
                if factor == 1.0:
                    diameters = dict(getattr(self.subset, "last_diameters", {}))
        finally:
            self.transform.test_scale = self.base
        numbers = {f: headline(r) for f, r in reports.items()}
        if not numbers:
            return TestScaleChoice(self.base, None, report, {1.0: headline(report)}, None)
        best = None
        for factor in sorted(numbers):
            value = numbers[factor].get(self.metric, float("-inf"))
            if best is None or value > best[1] + TEST_SCALE_MIN_GAIN * abs(best[1]):
                best = (factor, value)
        factor, value = best
        per_image, per_image_report, target = None, None, None
        found = [d for d in diameters.values() if d]
        if self.tries_per_image and len(found) >= 2:
            # The size to show objects at: the best-scoring factor's (no gain asked: it sets a size,
            # not a cost) times the median image's objects.
            aim = max(numbers, key=lambda f: numbers[f].get(self.metric, float("-inf")))
            target = aim * self.base * float(np.median(found))
            scales = [object_scale(self.transform, d, target) / self.base for d in diameters.values()]
            units = 1.0 + float(np.mean([f * f for f in scales]))
            if fits("per-image test scales", units, units):
                self.transform.object_diameter = target
                try:
                    per_image_report = self.subset(epoch)
                finally:
                    self.transform.object_diameter = None
                per_image = headline(per_image_report)
        if per_image is not None and per_image.get(self.metric, float("-inf")) >= value - PER_IMAGE_TOLERANCE * abs(value):
            self.transform.object_diameter = target
            final = per_image_report if self.subset is self.validation else self.validation(epoch)
            return TestScaleChoice(self.base, target, final, numbers, per_image)
        self.transform.test_scale = self.base * factor
        if self.subset is self.validation:
            final = reports[factor]
        else:
            final = report if factor == 1.0 else self.validation(epoch)
        return TestScaleChoice(self.base * factor, None, final, numbers, per_image)


def headline(report: dict) -> dict[str, float]:
    """The flat numbers a run is judged by: segm/bbox AP, AP50, AP75, and the Sartorius score."""
    flat = {}
    for iou_type, r in report.get("coco", {}).items():
        for key in ("AP", "AP50", "AP75"):
            flat[f"{iou_type}_{key}"] = r[key]
    if "sartorius" in report:
        flat["sartorius"] = report["sartorius"]["score"]
    return flat


def evaluate_checkpoint(checkpoint_path: str, dataset_name: str, dataset_options: dict, device: str,
                        batch_size: int, max_dets: int | None, save_predictions: str | None = None,
                        workers: int = 2) -> tuple[dict, list[dict]]:
    """Evaluate a training checkpoint on the validation split of ``dataset_name`` (evaluate.py's model mode).

    Runs under torchrun as well: each rank predicts its shard, rank 0 scores and writes.
    The model's detections per image is set to ``max_dets`` so model and evaluator agree
    (``None``: the checkpoint's own).
    """
    from datasets import build_dataset
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.data import eval_loader
    from transforms import build_transforms
    from transforms.preprocess import Preprocessing

    info, dev = distributed.init_distributed(device)
    state = load_checkpoint(checkpoint_path)
    model, config = build_model_from_checkpoint(state, **({"detections_per_img": max_dets} if max_dets else {}))
    max_dets = config.detections_per_img
    model.to(dev)
    options = {**config.dataset_options, **dataset_options}
    # The checkpoint's preprocessing contract, exactly as the trainer's validation applied it.
    dataset = build_dataset(dataset_name, "val", options,
                            build_transforms("none", False, Preprocessing.from_config(state["config"])))
    if list(dataset.class_names) != list(state["class_names"]):
        raise ValueError(f"checkpoint {checkpoint_path} was trained on classes {state['class_names']}, but "
                         f"--dataset {dataset_name} has {list(dataset.class_names)}")
    loader = eval_loader(dataset, batch_size, workers, info.rank, info.world_size)
    report, results = evaluate_model(model, loader, dataset.coco_gt(), dev, max_dets, amp=False,
                                     sartorius_score_thresh=config.sartorius_score_thresh,
                                     class_names=list(dataset.class_names))
    if save_predictions and info.is_main:
        write_json_atomic(save_predictions, results, indent=None)
    return report, results
