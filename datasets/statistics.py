"""Object and image statistics of a dataset, and the model sizes they recommend.

Everything comes from the annotations (``coco_gt()``: areas, boxes, image sizes), never from
decoding the images, so it takes seconds even for thousands of images. train.py applies the
recommendation to every size option the user and the dataset's defaults left open, and
tools/check_dataset.py prints the same recommendation.

The rules, in model-input pixels (after ``input_scale``):
  scale    objects whose median equivalent diameter is 16–64 px train at native resolution
           (1.0): Mask R-CNN's stride-4 level and 14×14 RoIs resolve them, and every resampling
           loses detail. Smaller objects are enlarged to a median of 24 px, larger ones shrunk to
           a median of 48 px (compute grows with the square of the scale).
  anchors  the smallest anchor is the 10th percentile of the object sizes (√(box w·h)), at
           least 8 and at most 32 px, and each of the 5 FPN levels doubles it: the synthetic
           set showed 12 px anchors matching its 9–14 px cells 6× more often than 8 px ones.
  caps     detections per image: 1.5× the densest training image, rounded up to 100 (at least
           100); the RPN keeps at least twice that many proposals at test time, so the
           evaluator's maxDets, the model's cap and the proposals agree. Those proposal caps
           are for a median training image at the input scale (``rpn_test_pixels``): a larger
           input keeps proportionally more, a smaller one fewer (``models.rpn.area_cap``),
           so a whole image and its tiles, or an image shown at a larger test scale, keep as
           many proposals per object. Training keeps torchvision's 2000 proposals: the heads
           sample 128–512 RoIs from them (and the ground-truth boxes), and NMS over more cost
           15 % of a MoNuSeg step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datasets.errors import DatasetError

NATIVE_DIAMETER = (16.0, 64.0)   # median object diameters trained at native resolution
ENLARGE_TO, SHRINK_TO = 24.0, 48.0
SCALE_LIMITS = (0.25, 4.0)
ANCHOR_LIMITS = (8, 32)
TINY_OBJECT_PX = 4.0             # an object this small (diameter) cannot be learned


@dataclass(frozen=True)
class DataStatistics:
    num_images: int
    image_sizes: np.ndarray          # K×2 (height, width)
    objects_per_image: np.ndarray    # K
    diameters: np.ndarray            # N, equivalent diameter √(4·area/π) of each object's mask
    box_sizes: np.ndarray            # N, √(box width · box height)
    box_extents: np.ndarray          # N×2 (box height, box width)

    @property
    def num_objects(self) -> int:
        return len(self.diameters)

    def describe(self) -> str:
        if not self.num_objects:
            return f"{self.num_images} images, no objects"
        d = np.percentile(self.diameters, (5, 50, 95))
        h, w = np.median(self.image_sizes, axis=0)
        return (f"{self.num_images} images (median {int(h)}×{int(w)} px), {self.num_objects} objects "
                f"({int(self.objects_per_image.max())} in the densest image); object diameter "
                f"5th/50th/95th percentile {d[0]:.1f}/{d[1]:.1f}/{d[2]:.1f} px")


def statistics_from_coco(gt: dict) -> DataStatistics:
    """Statistics of a COCO-format ground truth (the contract's ``coco_gt()``)."""
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in gt["images"]}
    counts = {image_id: 0 for image_id in sizes}
    areas, boxes = [], []
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        x, y, w, h = (float(v) for v in ann["bbox"])
        area = float(ann["area"]) if ann.get("area") else w * h
        areas.append(area)
        boxes.append((h, w))
    extents = np.asarray(boxes, dtype=np.float64).reshape(-1, 2)
    return DataStatistics(
        num_images=len(sizes),
        image_sizes=np.asarray(list(sizes.values()), dtype=np.int64).reshape(-1, 2),
        objects_per_image=np.asarray(list(counts.values()), dtype=np.int64),
        diameters=np.sqrt(4 * np.asarray(areas, dtype=np.float64) / math.pi),
        box_sizes=np.sqrt(extents[:, 0] * extents[:, 1]),
        box_extents=extents)


def check_objects(stats: DataStatistics, where: str) -> None:
    """Stop before training on data no model can learn from; the message says what to do."""
    if stats.num_images == 0:
        raise DatasetError(f"{where}: no training images")
    if stats.num_objects == 0:
        raise DatasetError(f"{where}: the training images hold no annotated objects; check that the masks "
                           "are label images (0 background, 1..N one object each) or one binary file per object")
    if (stats.diameters < TINY_OBJECT_PX).all():
        raise DatasetError(
            f"{where}: every object is smaller than {TINY_OBJECT_PX:.0f} px across (largest "
            f"{stats.diameters.max():.1f} px): the masks may be scaled down, or a binary mask was read as one "
            "label per pixel; if the objects really are this small, enlarge the images (--input-scale 4)")
    image_extent = np.repeat(stats.image_sizes, stats.objects_per_image, axis=0) if len(stats.image_sizes) else None
    if image_extent is not None and len(image_extent) == stats.num_objects:
        covers = (stats.box_extents >= image_extent - 1).all(axis=1)
        if covers.all():
            raise DatasetError(
                f"{where}: every object spans its whole image: the masks are probably inverted (background "
                "labelled as the object) or semantic (one value for all foreground); save label images with "
                "0 for background and one value per object")


def _nice(value: float) -> float:
    """Round a scale factor to two significant digits (logs and configs stay readable)."""
    return float(f"{value:.2g}")


def resize_factor(stats: DataStatistics, min_size: int, max_size: int) -> float:
    """The typical factor of torchvision's min/max-size resize on these images."""
    short, long = float(np.median(stats.image_sizes.min(axis=1))), float(np.median(stats.image_sizes.max(axis=1)))
    return min(min_size / short, max_size / long)


def recommend_sizes(stats: DataStatistics, scale: float | None = None) -> tuple[dict, list[str]]:
    """Model options for this data and one line per choice saying why (see the module docstring).
    ``scale``: the input scale already fixed (by a flag); anchors and caps follow it."""
    median = float(np.median(stats.diameters))
    low, high = NATIVE_DIAMETER
    if scale is not None:
        why = f"given (median object diameter {median:.1f} px → {median * scale:.1f} px)"
    elif low <= median <= high:
        scale, why = 1.0, f"median object diameter {median:.1f} px is within {low:.0f}–{high:.0f} px: native resolution"
    else:
        target = ENLARGE_TO if median < low else SHRINK_TO
        scale = _nice(min(max(target / median, SCALE_LIMITS[0]), SCALE_LIMITS[1]))
        why = f"median object diameter {median:.1f} px → ×{scale} for a median near {target:.0f} px"
    sizes = stats.box_sizes * scale
    smallest = int(round(min(max(float(np.percentile(sizes, 10)), ANCHOR_LIMITS[0]), ANCHOR_LIMITS[1])))
    anchors = tuple(smallest * 2 ** k for k in range(5))
    covered = float((sizes <= anchors[-1] * 1.5).mean())
    densest = int(stats.objects_per_image.max())
    detections = max(100, int(math.ceil(1.5 * densest / 100) * 100))
    pixels = int(round(float(np.median(stats.image_sizes.prod(axis=1))) * scale * scale))
    options = {
        "input_scale": scale,
        "anchor_sizes": anchors,
        "detections_per_img": detections,
        "rpn_pre_nms_top_n_test": max(1000, 2 * detections),
        "rpn_post_nms_top_n_test": max(1000, 2 * detections),
        "rpn_test_pixels": pixels,
    }
    reasons = [
        f"input scale {scale}: {why}",
        f"anchors {', '.join(map(str, anchors))} px: 10th percentile of object size "
        f"{np.percentile(sizes, 10):.1f} px (clamped to {ANCHOR_LIMITS[0]}–{ANCHOR_LIMITS[1]}), doubling per FPN "
        f"level; {covered:.0%} of objects within 1.5× the largest",
        f"detections per image {detections}: densest training image has {densest} objects (+50 %); RPN keeps "
        f"{options['rpn_post_nms_top_n_test']} proposals at test time per {pixels:,} model-input pixels (a median "
        "training image; other inputs in proportion)",
    ]
    return options, reasons
