"""Post-processing of one image's predictions, and the search for its parameters.

The pipeline, per image (``apply_postprocess``; predict.py calls it with the JSON that
``evaluate.py --search`` writes):

1. optional mask-IoU NMS, class-agnostic: in descending score order, a prediction whose mask
   IoU with an already kept one exceeds ``nms_iou`` is dropped;
2. per-class score threshold: keep score ≥ ``score_thresh[class]``;
3. overlap removal with minimum size, in descending score order:
   ``visible_j = mask_j \\ (union of kept masks before j)``; keep j (with mask ``visible_j``) iff
   ``|visible_j| ≥ max(min_size[class], 1)`` and at least half of ``mask_j`` is visible
   (``utils.overlap.MIN_VISIBLE_SHARE``). A dropped mask claims no pixels, so the higher
   score wins each pixel and the result never overlaps (as a Kaggle submission must not).

The search (``search_postprocess``) maximises the Sartorius score over a grid, one class at a
time (coordinate ascent, classes in id order): the score threshold with the current minimum
size, then the minimum size at the chosen threshold, then the threshold once more. Each
candidate is scored by running the very pipeline above on the validation predictions, so the
printed scores are the ones ``apply_postprocess`` will give.

Parameters JSON::

    {"version": 1, "nms_iou": null | float, "remove_overlap": true,
     "classes": {"<category_id>": {"name": str, "score_thresh": float, "min_size": int}, ...},
     "default": {"score_thresh": float, "min_size": int},
     "search": {"score": float, "baseline_score": float, ...}}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from metrics.coco import det_rle, gt_rle
from metrics.sartorius import scores_from_hits
from utils.coco_rle import fortran_indices_to_rle, rle_to_fortran_indices
from utils.overlap import remove_overlap

SCORE_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist())
MIN_SIZE_GRID = (0, 10, 25, 50, 75, 100, 150, 200, 300)
DEFAULT_PARAMS = {"score_thresh": 0.5, "min_size": 0}


def _class_params(params: dict, category_id: int) -> tuple[float, int]:
    p = params.get("classes", {}).get(str(category_id)) or params.get("default", DEFAULT_PARAMS)
    return float(p["score_thresh"]), int(p["min_size"])


def mask_nms(rles: list[dict], iou_thresh: float) -> np.ndarray:
    """Greedy mask-IoU NMS over RLEs already in descending score order → kept indices.

    A mask is dropped when IoU(mask, kept mask) > ``iou_thresh`` for some kept mask before it.
    """
    n = len(rles)
    if n < 2:
        return np.arange(n)
    iou = np.asarray(mask_utils.iou(rles, rles, np.zeros(n, dtype=np.uint8))).reshape(n, n)
    suppressed = np.zeros(n, dtype=bool)
    for i in range(n):
        if not suppressed[i]:
            later = iou[i, i + 1:] > iou_thresh
            suppressed[i + 1:] |= later
    return np.flatnonzero(~suppressed)


def apply_postprocess(results_for_one_image: list[dict], params: dict, height: int, width: int) -> list[dict]:
    """One image's COCO results → post-processed results (see the module docstring).

    Entries are copied; a mask cut by overlap removal gets a new RLE and box. The output is
    in descending score order.
    """
    order = sorted(range(len(results_for_one_image)), key=lambda i: -results_for_one_image[i]["score"])
    entries = [results_for_one_image[i] for i in order]
    if params.get("nms_iou") is not None and entries:
        keep = mask_nms([det_rle(e["segmentation"]) for e in entries], float(params["nms_iou"]))
        entries = [entries[i] for i in keep]
    thr_size = [_class_params(params, e["category_id"]) for e in entries]
    entries = [e for e, (t, _) in zip(entries, thr_size) if e["score"] >= t]
    min_sizes = np.array([_class_params(params, e["category_id"])[1] for e in entries], dtype=np.int64)
    pixels = [rle_to_fortran_indices(det_rle(e["segmentation"])) for e in entries]
    kept, visible = remove_overlap(pixels, min_sizes, height * width, params.get("remove_overlap", True))
    out = []
    for j, vis in zip(kept, visible):
        entry = dict(entries[j])
        if len(vis) != len(pixels[j]):
            entry["segmentation"] = fortran_indices_to_rle(vis, height, width)
            ys, xs = vis % height, vis // height
            entry["bbox"] = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                             float(ys.max() - ys.min() + 1)]
        out.append(entry)
    return out


def postprocess_results(gt: dict, results: list[dict], params: dict) -> list[dict]:
    """A whole results list post-processed image by image (``apply_postprocess``), images in
    the order of ``gt["images"]`` (whose heights and widths the masks have)."""
    by_image: dict = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out: list[dict] = []
    for img in gt["images"]:
        out += apply_postprocess(by_image.get(img["id"], []), params, img["height"], img["width"])
    return out


def check_params(params, where: str) -> dict:
    """Parameters JSON (``evaluate.py --search`` output) checked → itself; ``InvalidInputError``
    naming ``where`` and the entry otherwise."""
    from metrics.validation import InvalidInputError

    def bad(message: str):
        return InvalidInputError(f"{where}: {message}; write it with evaluate.py --search")

    if not isinstance(params, dict):
        raise bad("not a JSON object of post-processing parameters")
    entries = dict(params.get("classes") or {})
    if "default" in params:
        entries["default"] = params["default"]
    if not entries:
        raise bad("no 'classes' or 'default' parameters")
    for key, p in entries.items():
        try:
            ok = 0 <= float(p["score_thresh"]) <= 1 and int(p["min_size"]) >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"entry {key!r} needs score_thresh in [0, 1] and min_size ≥ 0, got {p!r}")
    if params.get("nms_iou") is not None and not 0 < float(params["nms_iou"]) <= 1:
        raise bad(f"nms_iou must be in (0, 1], got {params['nms_iou']!r}")
    return params


# --- search ----------------------------------------------------------------------------------

@dataclass
class _Image:
    """One validation image, decoded once: predictions by descending score (after NMS)."""
    num_pixels: int
    scores: np.ndarray          # P
    classes: np.ndarray         # P
    pixels: list[np.ndarray]    # P column-major index arrays
    gt_pix: np.ndarray          # all GT pixels (column-major), concatenated
    gt_of_pix: np.ndarray       # which GT each of those pixels belongs to
    gt_area: np.ndarray         # G


def _prepare(gt: dict, results: list[dict], nms_iou: float | None) -> list[_Image]:
    by_image: dict = {img["id"]: [] for img in gt["images"]}
    for r in results:
        by_image[r["image_id"]].append(r)
    gts: dict = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            gts[a["image_id"]].append(a)
    out = []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        preds = sorted(by_image[img["id"]], key=lambda r: -r["score"])
        if nms_iou is not None and preds:
            preds = [preds[i] for i in mask_nms([det_rle(r["segmentation"]) for r in preds], nms_iou)]
        g_pix = [rle_to_fortran_indices(gt_rle(a, h, w)) for a in gts[img["id"]]]
        out.append(_Image(
            num_pixels=h * w,
            scores=np.array([r["score"] for r in preds], dtype=np.float64),
            classes=np.array([r["category_id"] for r in preds], dtype=np.int64),
            pixels=[rle_to_fortran_indices(det_rle(r["segmentation"])) for r in preds],
            gt_pix=np.concatenate(g_pix) if g_pix else np.zeros(0, dtype=np.int64),
            gt_of_pix=np.repeat(np.arange(len(g_pix)), [len(p) for p in g_pix]).astype(np.int64),
            gt_area=np.array([len(p) for p in g_pix], dtype=np.int64)))
    return out


def _image_score(image: _Image, thresh: dict[int, float], min_size: dict[int, int], default: tuple[float, int]) -> float:
    """Sartorius score of one image after threshold, overlap removal and minimum size."""
    thr = np.array([thresh.get(int(c), default[0]) for c in image.classes])
    ms = np.array([min_size.get(int(c), default[1]) for c in image.classes], dtype=np.int64)
    sel = np.flatnonzero(image.scores >= thr) if len(thr) else np.zeros(0, dtype=np.int64)
    kept, visible = remove_overlap([image.pixels[j] for j in sel], ms[sel], image.num_pixels)
    num_p, num_g = len(kept), len(image.gt_area)
    if num_p == 0 or num_g == 0:
        return float(scores_from_hits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), num_p, num_g).mean())
    # The kept masks no longer overlap, so one label image holds them; GT may overlap, hence
    # the intersections are counted over the GT pixels (each GT's own list).
    label = np.zeros(image.num_pixels, dtype=np.int64)
    for n, vis in enumerate(visible):
        label[vis] = n + 1
    owner = label[image.gt_pix]
    hit = owner > 0
    pairs, inter = np.unique(image.gt_of_pix[hit] * (num_p + 1) + owner[hit], return_counts=True)
    g, p = pairs // (num_p + 1), pairs % (num_p + 1) - 1
    p_area = np.array([len(v) for v in visible], dtype=np.int64)
    iou = inter / (p_area[p] + image.gt_area[g] - inter)
    big = iou > 0.5
    return float(scores_from_hits(p[big], g[big], iou[big], num_p, num_g).mean())


def _dataset_score(images: list[_Image], thresh: dict, min_size: dict, default: tuple[float, int]) -> np.ndarray:
    return np.array([_image_score(im, thresh, min_size, default) for im in images])


def search_postprocess(gt: dict, results: list[dict], nms_iou: float | None = None,
                       score_grid: tuple[float, ...] = SCORE_GRID, min_size_grid: tuple[int, ...] = MIN_SIZE_GRID) -> dict:
    """Choose per-class score thresholds and minimum sizes maximising the Sartorius score.

    Returns ``{"params": <parameters JSON>, "baseline_score", "score", "tables": {class name:
    {"score_thresh": {thr: score}, "min_size": {size: score}}}}``; baseline = threshold 0.5,
    no minimum size, same NMS and overlap removal.
    """
    images = _prepare(gt, results, nms_iou)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    thresh = {c: DEFAULT_PARAMS["score_thresh"] for c in names}
    min_size = {c: DEFAULT_PARAMS["min_size"] for c in names}
    default = (DEFAULT_PARAMS["score_thresh"], DEFAULT_PARAMS["min_size"])
    current = _dataset_score(images, thresh, min_size, default)
    baseline = float(current.mean()) if len(current) else 0.0
    tables: dict = {}
    for cat in sorted(names):
        affected = [n for n, im in enumerate(images) if (im.classes == cat).any()]
        sub = [images[n] for n in affected]
        table = {"score_thresh": {}, "min_size": {}}

        def total(th: float, ms: int) -> float:
            trial_t, trial_m = {**thresh, cat: th}, {**min_size, cat: ms}
            scores = current.copy()
            if sub:
                scores[affected] = _dataset_score(sub, trial_t, trial_m, default)
            return float(scores.mean()) if len(scores) else 0.0

        for step in ("score_thresh", "min_size", "score_thresh"):
            # The current value is a candidate too, so no step can end below where it started
            # (the baseline's 0.5 need not be on the grid).
            grid = sorted({*score_grid, thresh[cat]} if step == "score_thresh" else {*min_size_grid, min_size[cat]})
            # A later grid value must beat the best so far by > 1e-12: ties keep the earlier value.
            best_value, best_score = None, -1.0
            for value in grid:
                s = total(value, min_size[cat]) if step == "score_thresh" else total(thresh[cat], value)
                table[step][value] = s
                if s > best_score + 1e-12:
                    best_value, best_score = value, s
            if step == "score_thresh":
                thresh[cat] = float(best_value)
            else:
                min_size[cat] = int(best_value)
            if sub:
                current[affected] = _dataset_score(sub, thresh, min_size, default)
        tables[names[cat]] = table
    score = float(current.mean()) if len(current) else 0.0
    params = {
        "version": 1,
        "nms_iou": nms_iou,
        "remove_overlap": True,
        "classes": {str(c): {"name": names[c], "score_thresh": thresh[c], "min_size": min_size[c]} for c in sorted(names)},
        "default": dict(DEFAULT_PARAMS),
        "search": {"score": score, "baseline_score": baseline, "num_images": len(images)},
    }
    return {"params": params, "score": score, "baseline_score": baseline, "tables": tables}


def format_search_table(found: dict) -> str:
    """The search as text: per class, the Sartorius score at each score threshold and min size."""
    lines = [f"post-processing search: Sartorius score {found['baseline_score']:.4f} (threshold 0.5, no min size)"
             f" → {found['score']:.4f}"]
    classes = found["params"]["classes"]
    for cid, p in classes.items():
        table = found["tables"][p["name"]]
        lines.append(f"  {p['name']}: score_thresh {p['score_thresh']:.2f}, min_size {p['min_size']}")
        thr = table["score_thresh"]
        lines.append("    score thr " + " ".join(f"{t:>5.2f}" for t in thr))
        lines.append("    score     " + " ".join(f"{v:>5.3f}" for v in thr.values()))
        ms = table["min_size"]
        lines.append("    min size  " + " ".join(f"{m:>5d}" for m in ms))
        lines.append("    score     " + " ".join(f"{v:>5.3f}" for v in ms.values()))
    return "\n".join(lines)
