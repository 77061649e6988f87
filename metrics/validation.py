"""Input checks for ground truth and results: a clear message naming the bad entry.

Every check raises ``InvalidInputError`` (a ``ValueError``) whose message starts with the
entry's location, e.g. ``results[17] (image_id 'a1b2'): score is NaN``. The CLI prints it and
exits non-zero; library callers can catch it.
"""
from __future__ import annotations

import math
import re
from numbers import Real
from typing import Any

_RLE_STRING = re.compile(rb"[0-o]*")  # compressed RLE characters: 48 ('0') + 0..63


class InvalidInputError(ValueError):
    """Ground truth or results that cannot be evaluated."""


def _fail(where: str, message: str) -> None:
    raise InvalidInputError(f"{where}: {message}")


def _is_number(x: Any) -> bool:
    t = type(x)
    return t is float or t is int or (isinstance(x, Real) and t is not bool)


def _is_finite_number(x: Any) -> bool:
    t = type(x)
    if t is float:
        return math.isfinite(x)
    return t is int or (isinstance(x, Real) and t is not bool and math.isfinite(x))


def _check_segmentation(where: str, segm: Any, height: int, width: int) -> None:
    if isinstance(segm, list):  # polygons
        for k, poly in enumerate(segm):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                _fail(where, f"segmentation polygon {k} must be a list of ≥ 3 x,y pairs")
            if not all(_is_number(v) and math.isfinite(v) for v in poly):
                _fail(where, f"segmentation polygon {k} has a non-finite coordinate")
        return
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        _fail(where, "segmentation must be polygons or an RLE dict with 'size' and 'counts'")
    size = segm["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and list(size) == [height, width]):
        _fail(where, f"RLE size {size} disagrees with the image's [height, width] = [{height}, {width}]")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            _fail(where, "uncompressed RLE counts must be non-negative integers")
        if sum(counts) != height * width:
            _fail(where, f"uncompressed RLE counts sum to {sum(counts)}, not height·width = {height * width}")
        return
    if isinstance(counts, str):
        counts = counts.encode("ascii", errors="replace")
    if not isinstance(counts, (bytes, bytearray)) or not _RLE_STRING.fullmatch(counts):
        _fail(where, "compressed RLE counts must be a string of characters '0'..'o'")


def _check_bbox(where: str, bbox: Any) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all([_is_finite_number(v) for v in bbox])):
        _fail(where, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")


def annotations_as_list(annotations: Any) -> Any:
    """COCO ``annotations`` stored as a dict keyed by id (a LIVECell mirror's quirk) → the list of
    them, each keeping its own ``id`` or given its key; anything else is returned as is."""
    if isinstance(annotations, dict):
        return [dict(a, id=a.get("id", k)) if isinstance(a, dict) else a for k, a in annotations.items()]
    return annotations


def normalize_ground_truth(gt: Any) -> dict:
    """Accept COCO GT whose ``annotations`` is a dict keyed by id (``annotations_as_list``)."""
    if not isinstance(gt, dict):
        _fail("ground truth", f"must be a COCO dict with images/annotations/categories, got {type(gt).__name__}")
    anns = gt.get("annotations", [])
    if isinstance(anns, dict):
        gt = {**gt, "annotations": annotations_as_list(anns)}
    return gt


def subset_ground_truth(gt: dict, image_ids: set) -> dict:
    """COCO ground truth restricted to ``image_ids`` (their images and annotations; all categories)."""
    return {"images": [im for im in gt["images"] if im["id"] in image_ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids],
            "categories": gt["categories"]}


def check_ground_truth(gt: dict, iou_types=("segm", "bbox")) -> None:
    """COCO ground truth: unique image/annotation/category ids, known references, valid masks."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            _fail("ground truth", f"'{key}' must be a list")
    images: dict = {}
    for i, img in enumerate(gt["images"]):
        where = f"ground truth images[{i}]"
        if not isinstance(img, dict) or "id" not in img:
            _fail(where, "needs an 'id'")
        if img["id"] in images:
            _fail(where, f"duplicate image id {img['id']!r}")
        if not all(isinstance(img.get(k), int) and img.get(k) > 0 for k in ("height", "width")):
            _fail(where, "needs positive integer 'height' and 'width'")
        images[img["id"]] = img
    if len({type(i) for i in images}) > 1:
        _fail("ground truth images", "image ids mix types (e.g. int and str); they must be sortable")
    cats = set()
    for i, cat in enumerate(gt["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            _fail(f"ground truth categories[{i}]", "needs an integer 'id'")
        if cat["id"] in cats:
            _fail(f"ground truth categories[{i}]", f"duplicate category id {cat['id']}")
        cats.add(cat["id"])
    ann_ids = set()
    for i, ann in enumerate(gt["annotations"]):
        where = f"ground truth annotations[{i}]"
        if not isinstance(ann, dict):
            _fail(where, "must be a dict")
        if not isinstance(ann.get("id"), int) or isinstance(ann.get("id"), bool):
            _fail(where, "needs an integer 'id'")
        if ann["id"] in ann_ids:
            _fail(where, f"duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        if ann.get("image_id") not in images:
            _fail(where, f"image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cats:
            _fail(where, f"category_id {ann.get('category_id')!r} is not in 'categories'")
        if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"])):
            _fail(where, f"area must be a finite number, got {ann['area']!r}")
        img = images[ann["image_id"]]
        if "segm" in iou_types or "area" not in ann:
            if "segmentation" not in ann:
                _fail(where, "needs a 'segmentation'")
            _check_segmentation(where, ann["segmentation"], img["height"], img["width"])
        if "bbox" in ann:
            _check_bbox(where, ann["bbox"])
        elif "bbox" in iou_types and "segmentation" not in ann:
            _fail(where, "needs a 'bbox' or a 'segmentation' to derive it from")


def check_results(results: Any, gt: dict, iou_types=("segm", "bbox")) -> None:
    """COCO results list: known image and category ids, finite scores, masks of the image's size.

    pycocotools decides from the *first* entry whether results carry boxes, so either every
    entry has a ``bbox`` or none does.
    """
    if not isinstance(results, list):
        _fail("results", f"must be a list of detections, got {type(results).__name__}")
    images = {img["id"]: img for img in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    has_bbox = bool(results) and isinstance(results[0], dict) and bool(results[0].get("bbox"))
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            _fail(f"results[{i}]", "must be a dict")
        where = f"results[{i}] (image_id {r.get('image_id')!r})"
        if r.get("image_id") not in images:
            _fail(where, "image_id is not in the ground truth images")
        if r.get("category_id") not in cats:
            _fail(where, f"category_id {r.get('category_id')!r} is not in the ground truth categories")
        score = r.get("score")
        if not _is_number(score) or not math.isfinite(score):
            _fail(where, f"score must be a finite number, got {score!r}")
        if bool(r.get("bbox")) != has_bbox:
            _fail(where, "either every result has a 'bbox' or none does (as results[0])")
        if has_bbox:
            _check_bbox(where, r["bbox"])
        if "segmentation" in r or "segm" in iou_types or not has_bbox:
            if "segmentation" not in r:
                _fail(where, "needs a 'segmentation' (segm evaluation, or no 'bbox' to evaluate)")
            segm = r["segmentation"]
            if not isinstance(segm, dict):
                _fail(where, "segmentation must be an RLE dict (results carry RLE, not polygons)")
            img = images[r["image_id"]]
            _check_segmentation(where, segm, img["height"], img["width"])
