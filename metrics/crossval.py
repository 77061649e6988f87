"""Cross-validation scores from out-of-fold (OOF) predictions.

Each fold's model predicts the validation split it did not train on; ``merge_folds`` joins
those splits into one ground truth and one results list in which every image appears once,
with the fold that predicted it. ``cv_report`` scores them:

- **CV raw**: the OOF results as the models gave them (Sartorius score at the training
  evaluation's score cut, segm AP);
- **CV post-processed**: after ``metrics.postprocess`` with the given parameters (per-class
  score thresholds and minimum sizes, overlap removal) — the number closest to a leaderboard's,
  since a submission is post-processed the same way; the Sartorius score then counts every
  kept prediction (score cut 0: the per-class thresholds replace it).

Both over all OOF images (the dataset score: mean over images) and per fold, with the mean
and standard deviation (ddof 0) of the fold scores; per class and per IoU threshold.
"""
from __future__ import annotations

import warnings

import numpy as np

from metrics import evaluate_predictions
from metrics.postprocess import postprocess_results
from metrics.validation import InvalidInputError


def merge_folds(fold_gts: dict[int, dict], fold_results: dict[int, list[dict]]) -> tuple[dict, list[dict], dict]:
    """Per-fold validation GT and results → (OOF GT, OOF results, ``{image_id: fold}``).

    Images keep their ids (datasets number images the same in every fold); annotations are
    renumbered ``1..N``. Raises ``InvalidInputError`` when an image is in two folds' validation
    splits, a result names an image outside its fold, or the folds' categories differ.
    """
    folds = sorted(fold_gts)
    if set(fold_results) != set(folds):
        raise InvalidInputError(f"folds with ground truth {folds} and with predictions {sorted(fold_results)} differ")
    categories = fold_gts[folds[0]]["categories"]
    fold_of: dict = {}
    images, annotations, results = [], [], []
    for k in folds:
        gt = fold_gts[k]
        if [(c["id"], c.get("name")) for c in gt["categories"]] != [(c["id"], c.get("name")) for c in categories]:
            raise InvalidInputError(f"fold {k} has categories {gt['categories']}, fold {folds[0]} {categories}")
        for img in gt["images"]:
            if img["id"] in fold_of:
                raise InvalidInputError(f"image {img['id']!r} is in the validation split of folds {fold_of[img['id']]} "
                                        f"and {k}: the folds overlap, so out-of-fold predictions are not defined")
            fold_of[img["id"]] = k
            images.append(img)
        for a in gt["annotations"]:
            annotations.append({**a, "id": len(annotations) + 1})
        for r in fold_results[k]:
            if fold_of.get(r["image_id"]) != k:
                raise InvalidInputError(f"fold {k}'s predictions name image {r['image_id']!r}, which is not in its "
                                        f"validation split")
            results.append(r)
    return {"images": images, "annotations": annotations, "categories": categories}, results, fold_of


def subset(gt: dict, results: list[dict], image_ids) -> tuple[dict, list[dict]]:
    """The GT and results of ``image_ids`` only."""
    keep = set(image_ids)
    return ({**gt, "images": [i for i in gt["images"] if i["id"] in keep],
             "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]},
            [r for r in results if r["image_id"] in keep])


def summarize(report: dict) -> dict:
    """The numbers a CV table shows, from an ``evaluate_predictions`` report (with segm)."""
    s = report["sartorius"]
    segm = report["coco"]["segm"]
    return {"score": float(s["score"]), "segm_AP": float(segm["AP"]), "segm_AP50": float(segm["AP50"]),
            "per_class": dict(s["per_class"]), "per_threshold": dict(s["per_threshold"]),
            "num_images": len(s["per_image"])}


def _score(gt: dict, results: list[dict], max_dets: int, score_thresh: float, class_names) -> dict:
    with warnings.catch_warnings():
        # Raw Mask R-CNN masks overlap by nature (post-processed ones never do).
        warnings.filterwarnings("ignore", message=".*overlapping predicted masks.*")
        return summarize(evaluate_predictions(gt, results, max_dets, ("segm",), class_names,
                                              sartorius_score_thresh=score_thresh, validate=False))


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else {"mean": None, "std": None}


def cv_report(gt: dict, results: list[dict], fold_of: dict, params: dict | None, max_dets: int,
              score_thresh: float = 0.5, class_names: list[str] | None = None) -> dict:
    """CV raw and post-processed (``params``: a ``metrics.postprocess`` parameters dict, or None
    for raw only), over all OOF images and per fold.

    Returns ``{"cv_raw": summary, "cv_pp": summary | None, "folds": {k: {"raw", "pp",
    "num_images"}}, "fold_mean_std": {"raw": {metric: {mean, std}}, "pp": ...}}`` where a
    summary is ``summarize``'s dict.
    """
    pp_results = postprocess_results(gt, results, params) if params is not None else None
    report: dict = {"cv_raw": _score(gt, results, max_dets, score_thresh, class_names),
                    "cv_pp": _score(gt, pp_results, max_dets, 0.0, class_names) if params is not None else None,
                    "folds": {}, "fold_mean_std": {}}
    for k in sorted(set(fold_of.values())):
        ids = [i for i, f in fold_of.items() if f == k]
        fold_gt, fold_results = subset(gt, results, ids)
        entry = {"num_images": len(ids), "raw": _score(fold_gt, fold_results, max_dets, score_thresh, class_names)}
        if pp_results is not None:
            entry["pp"] = _score(fold_gt, subset(gt, pp_results, ids)[1], max_dets, 0.0, class_names)
        report["folds"][str(k)] = entry
    for kind in ("raw", "pp") if params is not None else ("raw",):
        report["fold_mean_std"][kind] = {m: _mean_std([f[kind][m] for f in report["folds"].values()])
                                         for m in ("score", "segm_AP", "segm_AP50")}
    return report


def _f(x) -> str:
    return "   -  " if x is None else f"{x:6.4f}"


def format_cv_report(report: dict) -> str:
    """The CV report as a text table: overall, per fold with mean ± std, per class, per IoU threshold."""
    raw, pp = report["cv_raw"], report.get("cv_pp")
    pp = pp or {}
    lines = [f"cross-validation, out of fold: {raw['num_images']} images, {len(report['folds'])} folds",
             f"{'':28}{'raw':>10}{'post-processed':>16}",
             f"  {'Sartorius score (CV)':26}{_f(raw['score']):>10}{_f(pp.get('score')):>16}",
             f"  {'segm AP':26}{_f(raw['segm_AP']):>10}{_f(pp.get('segm_AP')):>16}",
             f"  {'segm AP50':26}{_f(raw['segm_AP50']):>10}{_f(pp.get('segm_AP50')):>16}",
             "per fold (Sartorius score / segm AP):",
             f"  {'fold':8}{'images':>8}{'raw score':>12}{'pp score':>12}{'raw AP':>10}{'pp AP':>10}"]
    for k, f in report["folds"].items():
        fp = f.get("pp") or {}
        lines.append(f"  {k:8}{f['num_images']:>8}{_f(f['raw']['score']):>12}{_f(fp.get('score')):>12}"
                     f"{_f(f['raw']['segm_AP']):>10}{_f(fp.get('segm_AP')):>10}")
    ms = report["fold_mean_std"]

    def pm(kind: str, metric: str) -> str:
        v = ms.get(kind, {}).get(metric)
        return "-" if not v or v["mean"] is None else f"{v['mean']:.4f} ± {v['std']:.4f}"
    lines.append(f"  {'mean ± std':16}{pm('raw', 'score'):>18}{pm('pp', 'score'):>18}"
                 f"{pm('raw', 'segm_AP'):>18}{pm('pp', 'segm_AP'):>18}")
    lines.append("per class (Sartorius score, OOF):")
    for name, value in raw["per_class"].items():
        lines.append(f"  {name:26}{_f(value):>10}{_f((pp.get('per_class') or {}).get(name)):>16}")
    thresholds = list(raw["per_threshold"])
    lines.append("per IoU threshold (Sartorius score, OOF):")
    lines.append("  IoU  " + " ".join(f"{t:>6}" for t in thresholds))
    lines.append("  raw  " + " ".join(f"{raw['per_threshold'][t]:6.3f}" for t in thresholds))
    if pp:
        lines.append("  pp   " + " ".join(f"{pp['per_threshold'][t]:6.3f}" for t in thresholds))
    return "\n".join(lines)
