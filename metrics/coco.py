"""Exact COCO bbox/segm evaluation: pycocotools' COCOeval numbers, without its Python loops.

What pycocotools does (and this module reproduces bit for bit):

* per (image, category): detections sorted by score (stable), cut to ``maxDets[-1]``; IoU
  matrix ``D×G`` (pycocotools' own C ``iou``, so the IoU values are identical);
* per area range a and IoU threshold t: greedy matching in score order — each detection
  takes the still-free GT with the largest IoU ≥ min(t, 1−1e−10) (ties → later GT), preferring
  GTs that are not ignored (ignored = crowd or area outside a); crowd GTs can be taken many
  times;
* accumulate: per (category, area, maxDet) the detections of all images by score,
  precision ``tp / (tp + fp + eps)`` made monotone from the right, read at the 101 recall
  thresholds; recall = ``tp / #non-ignored GT``.

The matching is where pycocotools spends its time: a Python loop over D × G × T × A. Here,
the candidate pairs (IoU ≥ t) are few because cells barely overlap. A detection with a single
candidate GT is settled in bulk (the first such detection takes the GT); only the connected
groups where some detection has several candidates are replayed with the exact greedy loop.

Quirks kept for identical numbers: a detection's area (for the area ranges) is its box
``w·h`` when the results carry boxes (pycocotools' ``loadRes`` decides from the first result),
else its mask area; a GT whose annotation id is 0 can be matched but never counts as a match.
Extensions: a GT annotation without ``area`` gets its mask area, without ``bbox`` the mask's box.
``summarize`` reports the AP rows at the largest maxDets (pycocotools hard-codes 100 there and
prints −1 when maxDets is larger, cocoapi issue 584); at maxDets [1, 10, 100] the 12 stats are
pycocotools' own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from utils.coco_rle import rle_area, segmentation_to_rle

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "ARmax", "ARs", "ARm", "ARl"]
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
AREA_RANGES = [[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]]
AREA_LABELS = ["all", "small", "medium", "large"]


def max_dets_list(max_dets: int) -> list[int]:
    """pycocotools' ``[1, 10, 100]`` with the last entry replaced by ``max_dets``."""
    return [1, 10, max_dets] if max_dets > 10 else [1, max_dets, max_dets]


# --- preparation: group GT and detections by (image, category) ------------------------------

def gt_rle(ann: dict, height: int, width: int) -> dict:
    """A GT annotation's segmentation as a compressed RLE (``utils.coco_rle.segmentation_to_rle``)."""
    return segmentation_to_rle(ann["segmentation"], height, width)


def det_rle(segm: dict) -> dict:
    """A result's RLE segmentation as a compressed RLE of its own ``size``."""
    return segmentation_to_rle(segm, *segm["size"])


@dataclass
class Grouped:
    """GT and results split by (image, category), in pycocotools' orders.

    ``img_ids`` and ``cat_ids`` are sorted; ``gt_groups[(i, k)]`` holds GT annotation indices in
    file order, ``det_groups[(i, k)]`` result indices sorted by score (stable), uncut.
    """
    img_ids: list
    cat_ids: list[int]
    images: list[dict]
    gt_groups: dict = field(default_factory=dict)
    det_groups: dict = field(default_factory=dict)


def _split(keys_img: np.ndarray, keys_cat: np.ndarray, order: np.ndarray) -> dict:
    """Indices ``order`` (already sorted by image then category) → {(img, cat): indices}."""
    if len(order) == 0:
        return {}
    ki, kc = keys_img[order], keys_cat[order]
    cut = np.flatnonzero((np.diff(ki) != 0) | (np.diff(kc) != 0)) + 1
    starts = np.concatenate(([0], cut))
    return {(int(ki[s]), int(kc[s])): part for s, part in zip(starts, np.split(order, cut))}


def group(gt: dict, results: list[dict]) -> Grouped:
    """Group GT annotations and results by (image index, category index)."""
    images = sorted(gt["images"], key=lambda img: img["id"])
    img_ids = [img["id"] for img in images]
    img_index = {i: n for n, i in enumerate(img_ids)}
    cat_ids = sorted(c["id"] for c in gt["categories"])
    cat_index = {c: n for n, c in enumerate(cat_ids)}
    anns = gt["annotations"]
    g_img = np.array([img_index[a["image_id"]] for a in anns], dtype=np.int64)
    g_cat = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
    d_img = np.array([img_index[r["image_id"]] for r in results], dtype=np.int64)
    d_cat = np.array([cat_index[r["category_id"]] for r in results], dtype=np.int64)
    d_score = np.array([r["score"] for r in results], dtype=np.float64)
    out = Grouped(img_ids, cat_ids, images)
    # np.lexsort is stable: file order within a GT group, file order among equal scores.
    out.gt_groups = _split(g_img, g_cat, np.lexsort((g_cat, g_img)))
    out.det_groups = _split(d_img, d_cat, np.lexsort((-d_score, d_cat, d_img)))
    return out


# --- matching ------------------------------------------------------------------------------

def _greedy_component(m_idx: np.ndarray, d: np.ndarray, g: np.ndarray, v: np.ndarray, cap: float,
                      gt_crowd: np.ndarray, gt_ig: np.ndarray) -> None:
    """pycocotools' greedy loop on candidate pairs ``(d, g, iou)`` of one area and threshold.

    GTs are visited in pycocotools' order (not-ignored first, stable); ``m_idx[d]`` receives
    the matched GT index. Only candidates (IoU ≥ cap) can ever be chosen, so the others are
    skipped without changing the outcome.
    """
    pos = np.empty(len(gt_ig), dtype=np.int64)
    pos[np.argsort(gt_ig, kind="mergesort")] = np.arange(len(gt_ig))
    order = np.lexsort((pos[g], d))
    d, g, v = d[order].tolist(), g[order].tolist(), v[order].tolist()
    crowd, ig = gt_crowd.tolist(), gt_ig.tolist()
    taken: set[int] = set()
    n, j = len(d), 0
    while j < n:
        det, best, best_iou = d[j], -1, cap
        while j < n and d[j] == det:
            gi = g[j]
            j += 1
            if gi in taken and not crowd[gi]:
                continue
            if best > -1 and not ig[best] and ig[gi]:
                while j < n and d[j] == det:  # break: skip this detection's remaining candidates
                    j += 1
                break
            if v[j - 1] < best_iou:
                continue
            best_iou, best = v[j - 1], gi
        if best > -1:
            taken.add(best)
            m_idx[det] = best


def match_group(ious: np.ndarray, gt_crowd: np.ndarray, gt_ig: np.ndarray,
                iou_thrs: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """Matched GT index (−1: none) of each detection, shape ``A×T×D``.

    ``ious`` is ``D×G`` (detections by descending score, GT in file order), ``gt_crowd`` ``G``
    bool, ``gt_ig`` ``A×G`` bool (ignored per area range).
    """
    num_d, num_g = ious.shape
    num_a, num_t = gt_ig.shape[0], len(iou_thrs)
    m_idx = np.full((num_a, num_t, num_d), -1, dtype=np.int64)
    if num_d == 0 or num_g == 0:
        return m_idx
    caps = np.minimum(iou_thrs, 1 - 1e-10)
    d_all, g_all = np.nonzero(ious >= caps.min())  # row-major: ascending detection index
    v_all = ious[d_all, g_all]
    for ti, cap in enumerate(caps):
        sel = v_all >= cap
        d, g, v = d_all[sel], g_all[sel], v_all[sel]
        if len(d) == 0:
            break  # thresholds increase: no candidates at higher ones either
        hard = np.zeros(len(d), dtype=bool)
        several = np.bincount(d, minlength=num_d) > 1
        if several.any():
            # Connected groups (via shared GTs) of detections with several candidates.
            in_group = several
            while True:
                g_touched = np.zeros(num_g, dtype=bool)
                g_touched[g[in_group[d]]] = True
                grown = in_group.copy()
                grown[d[g_touched[g]]] = True
                if (grown == in_group).all():
                    break
                in_group = grown
            hard = in_group[d]
        de, ge = d[~hard], g[~hard]
        crowd = gt_crowd[ge]
        m_idx[:, ti, de[crowd]] = ge[crowd]          # a crowd GT takes every candidate
        dn, gn = de[~crowd], ge[~crowd]
        _, first = np.unique(gn, return_index=True)  # the best-scored detection takes the GT
        m_idx[:, ti, dn[first]] = gn[first]
        if hard.any():
            for a in range(num_a):
                _greedy_component(m_idx[a, ti], d[hard], g[hard], v[hard], float(cap), gt_crowd, gt_ig[a])
    return m_idx


# --- evaluation ----------------------------------------------------------------------------

@dataclass
class CocoEvalResult:
    """pycocotools' ``eval`` arrays: precision/scores ``T×R×K×A×M``, recall ``T×K×A×M``."""
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    max_dets: list[int]
    cat_ids: list[int]
    stats: list[float] = field(default_factory=list)


def _group_arrays(gt: dict, results: list[dict], grouped: Grouped, iou_type: str, has_bbox: bool):
    """Per-annotation and per-result arrays both IoU types need (areas, boxes, masks)."""
    images = {img["id"]: img for img in grouped.images}
    anns = gt["annotations"]
    need_masks = iou_type == "segm"
    gt_rles: list = [None] * len(anns)
    if need_masks or any("area" not in a or "bbox" not in a for a in anns):
        for n, a in enumerate(anns):
            img = images[a["image_id"]]
            gt_rles[n] = gt_rle(a, img["height"], img["width"]) if "segmentation" in a else None
    gt_area = np.array([a["area"] if "area" in a else rle_area(gt_rles[n]) for n, a in enumerate(anns)],
                       dtype=np.float64)
    gt_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    gt_ids = np.array([a["id"] for a in anns], dtype=np.int64)
    det_rles = [det_rle(r["segmentation"]) if "segmentation" in r else None for r in results]
    if has_bbox:
        det_boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
        det_area = det_boxes[:, 2] * det_boxes[:, 3]
    else:
        det_boxes = (mask_utils.toBbox(det_rles).reshape(-1, 4) if det_rles else np.zeros((0, 4)))
        det_area = np.array([rle_area(r) for r in det_rles], dtype=np.float64)
    gt_boxes = None
    if iou_type == "bbox":
        gt_boxes = np.array([a["bbox"] if "bbox" in a else mask_utils.toBbox(gt_rles[n]).tolist()
                             for n, a in enumerate(anns)], dtype=np.float64).reshape(-1, 4)
    return gt_rles, gt_area, gt_crowd, gt_ids, det_rles, det_boxes, det_area, gt_boxes


def evaluate_coco(gt: dict, results: list[dict], iou_type: str = "segm", max_dets: int = 100,
                  grouped: Grouped | None = None) -> CocoEvalResult:
    """Exact equivalent of ``COCOeval(gt, gt.loadRes(results), iou_type)`` evaluate+accumulate.

    ``gt``/``results`` must have passed ``metrics.validation``; ``maxDets`` is
    ``max_dets_list(max_dets)``. Returns the arrays and the 12 summary stats.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    grouped = grouped or group(gt, results)
    has_bbox = bool(results) and bool(results[0].get("bbox"))
    (gt_rles, gt_area, gt_crowd, gt_ids, det_rles, det_boxes, det_area,
     gt_boxes) = _group_arrays(gt, results, grouped, iou_type, has_bbox)
    all_scores = np.array([r["score"] for r in results], dtype=np.float64)
    mdets = max_dets_list(max_dets)
    max_det = mdets[-1]
    lo = np.array([r[0] for r in AREA_RANGES], dtype=np.float64)[:, None]
    hi = np.array([r[1] for r in AREA_RANGES], dtype=np.float64)[:, None]
    num_t, num_a, num_k = len(IOU_THRESHOLDS), len(AREA_RANGES), len(grouped.cat_ids)
    # Per category, per image (in id order): scores, matched, ignored, count of non-ignored GT.
    per_cat: list[list] = [[] for _ in range(num_k)]
    keys = sorted(set(grouped.gt_groups) | set(grouped.det_groups))
    empty = np.zeros(0, dtype=np.int64)
    for i, k in keys:
        gi = grouped.gt_groups.get((i, k), empty)
        di = grouped.det_groups.get((i, k), empty)[:max_det]
        crowd = gt_crowd[gi]
        g_area = gt_area[gi]
        gt_ig = crowd[None] | (g_area[None] < lo) | (g_area[None] > hi)           # A×G
        det_out = (det_area[di][None] < lo) | (det_area[di][None] > hi)           # A×D
        if len(gi) and len(di):
            if iou_type == "segm":
                ious = mask_utils.iou([det_rles[n] for n in di], [gt_rles[n] for n in gi], crowd.astype(np.uint8))
            else:
                ious = mask_utils.iou(det_boxes[di], gt_boxes[gi], crowd.astype(np.uint8))
            ious = np.asarray(ious, dtype=np.float64).reshape(len(di), len(gi))
        else:
            ious = np.zeros((len(di), len(gi)))
        m_idx = match_group(ious, crowd, gt_ig)                                    # A×T×D
        has_m = m_idx >= 0
        m_safe = np.where(has_m, m_idx, 0)
        ids = gt_ids[gi][m_safe] if len(gi) else np.zeros_like(m_idx)
        matched = has_m & (ids != 0)
        m_ig = gt_ig[np.arange(num_a)[:, None, None], m_safe] if len(gi) else np.zeros_like(has_m)
        ignored = (has_m & m_ig) | (~matched & det_out[:, None, :])
        npig = (~gt_ig).sum(axis=1)
        per_cat[k].append((np.arange(len(di)), all_scores[di], matched, ignored, npig))
    precision = -np.ones((num_t, len(RECALL_THRESHOLDS), num_k, num_a, len(mdets)))
    recall = -np.ones((num_t, num_k, num_a, len(mdets)))
    scores = -np.ones_like(precision)
    for k in range(num_k):
        if not per_cat[k]:
            continue
        rank = np.concatenate([e[0] for e in per_cat[k]])
        sc = np.concatenate([e[1] for e in per_cat[k]])
        matched = np.concatenate([e[2] for e in per_cat[k]], axis=2)
        ignored = np.concatenate([e[3] for e in per_cat[k]], axis=2)
        npig_all = np.sum([e[4] for e in per_cat[k]], axis=0)
        for mi, m in enumerate(mdets):
            sel = np.flatnonzero(rank < m)
            inds = sel[np.argsort(-sc[sel], kind="mergesort")]
            ss = sc[inds]
            for a in range(num_a):
                npig = int(npig_all[a])
                if npig == 0:
                    continue
                _precision_at(matched[a][:, inds], ignored[a][:, inds], ss, npig,
                              precision[:, :, k, a, mi], recall[:, k, a, mi], scores[:, :, k, a, mi])
    out = CocoEvalResult(precision, recall, scores, mdets, list(grouped.cat_ids))
    out.stats = summarize(out)
    return out


def _precision_at(dtm: np.ndarray, dtig: np.ndarray, det_scores: np.ndarray, npig: int,
                  precision: np.ndarray, recall: np.ndarray, scores: np.ndarray) -> None:
    """Fill precision/scores ``T×R`` and recall ``T`` for one (category, area, maxDet).

    ``dtm``/``dtig`` are ``T×N`` bool over detections sorted by descending score:
    ``rc = cumsum(tp) / npig``, ``pr = cumsum(tp) / (cumsum(tp) + cumsum(fp) + eps)``,
    precision made non-increasing from the right, then read at ``searchsorted(rc, R)``.
    """
    tps = dtm & ~dtig
    fps = ~dtm & ~dtig
    tp_sum = np.cumsum(tps, axis=1).astype(float)
    fp_sum = np.cumsum(fps, axis=1).astype(float)
    nd = tp_sum.shape[1]
    precision[:] = 0.0
    scores[:] = 0.0
    if nd == 0:
        recall[:] = 0.0
        return
    rc = tp_sum / npig
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    recall[:] = rc[:, -1]
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    for t in range(len(rc)):
        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
        ok = inds < nd
        precision[t, ok] = pr[t, inds[ok]]
        scores[t, ok] = det_scores[inds[ok]]


# --- summary -------------------------------------------------------------------------------

def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def summarize(result: CocoEvalResult) -> list[float]:
    """The 12 COCO stats in pycocotools' order, AP rows at the largest maxDets.

    AP = mean of precision over IoU thresholds, recall thresholds and categories (entries −1,
    categories without GT, left out); AR = mean of recall over IoU thresholds and categories.
    """
    precision, recall = result.precision, result.recall

    def ap(iou: float | None = None, area: str = "all") -> float:
        s = precision[:, :, :, AREA_LABELS.index(area), -1]
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        return _mean_valid(s)

    def ar(max_det_index: int, area: str = "all") -> float:
        return _mean_valid(recall[:, :, AREA_LABELS.index(area), max_det_index])

    return [ap(), ap(.5), ap(.75), ap(area="small"), ap(area="medium"), ap(area="large"),
            ar(0), ar(1), ar(2), ar(2, "small"), ar(2, "medium"), ar(2, "large")]


def per_class_ap(result: CocoEvalResult) -> list[float]:
    """AP of each category (area all, largest maxDets); −1 for a category without GT."""
    return [_mean_valid(result.precision[:, :, k, 0, -1]) for k in range(len(result.cat_ids))]


def category_names(gt: dict, class_names: list[str] | None = None) -> dict[int, str]:
    """Category id → name: the GT's names, or ``class_names`` (in id order) when it has one per category."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    if class_names and len(class_names) == len(names):
        names = {cid: class_names[n] for n, cid in enumerate(sorted(names))}
    return names


def coco_report(gt: dict, results: list[dict], iou_type: str, max_dets: int,
                grouped: Grouped | None = None, class_names: list[str] | None = None) -> dict:
    """``{"stats": [12], "AP", "AP50", "AP75", …, "per_class": {name: AP}}`` for one IoU type."""
    result = evaluate_coco(gt, results, iou_type, max_dets, grouped)
    names = category_names(gt, class_names)
    per_class = {names[c]: ap for c, ap in zip(result.cat_ids, per_class_ap(result))}
    return {"stats": result.stats, **dict(zip(STAT_NAMES, result.stats)), "per_class": per_class}
