"""A generated Sartorius-shaped evaluation workload: dense cell images, GT and predictions.

``make_workload`` returns COCO ground truth and a COCO results list. Each image has one cell
type (category) and ``min_cells..max_cells`` non-overlapping GT cells (ellipses drawn in order,
later ones on top, as a label image); predictions are jittered copies of most cells (size,
centre and angle noise, so IoUs spread over 0.5–0.95), duplicates and false positives, about
``pred_ratio`` × as many as GT, scores correlated with quality, a few with the wrong class.
Predictions overlap each other, as raw Mask R-CNN output does. Deterministic in ``seed``.
"""
from __future__ import annotations

import numpy as np

from utils.coco_rle import fortran_indices_to_rle

CELL_TYPES = ("shsy5y", "astro", "cort")


def ellipse_indices(cy: float, cx: float, ry: float, rx: float, angle: float,
                    height: int, width: int) -> np.ndarray:
    """Column-major pixel indices (ascending) of a filled rotated ellipse clipped to the image."""
    r = int(np.ceil(max(ry, rx))) + 1
    y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r + 1)
    if y0 >= y1 or x0 >= x1:
        return np.zeros(0, dtype=np.int64)
    xs, ys = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), indexing="ij")  # column-major walk
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    inside = (u * u + v * v) <= 1.0
    return (xs[inside] * height + ys[inside]).astype(np.int64)


def _box(idx: np.ndarray, height: int) -> list[float]:
    ys, xs = idx % height, idx // height
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def make_workload(num_images: int = 100, height: int = 520, width: int = 704, min_cells: int = 30,
                  max_cells: int = 800, pred_ratio: float = 1.2, seed: int = 0,
                  min_px: int = 10) -> tuple[dict, list[dict]]:
    """(COCO GT dict, COCO results list) of a dense cell workload; see the module docstring."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CELL_TYPES)]
    for image_id in range(1, num_images + 1):
        cat = int(rng.integers(1, len(CELL_TYPES) + 1))
        n = int(rng.integers(min_cells, max_cells + 1))
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"img{image_id:04d}.png",
                       "cell_type": CELL_TYPES[cat - 1]})
        # Cell size shrinks with density: ~ 30 % coverage, from ~225 px (800 cells) upwards.
        mean_area = min(2500.0, 0.3 * height * width / n)
        cells = []
        label = np.zeros(height * width, dtype=np.int32)  # column-major label image
        for k in range(1, n + 1):
            area = mean_area * rng.uniform(0.5, 1.5)
            aspect = rng.uniform(1.0, 2.5)
            ry = np.sqrt(area / np.pi / aspect)
            params = (rng.uniform(0, height), rng.uniform(0, width), ry, ry * aspect, rng.uniform(0, np.pi))
            idx = ellipse_indices(*params, height, width)
            label[idx] = k
            cells.append(params)
        order = np.argsort(label, kind="stable")
        bounds = np.searchsorted(label[order], np.arange(n + 2))
        for k in range(1, n + 1):
            idx = order[bounds[k]:bounds[k + 1]]  # ascending: stable sort of a column-major walk
            if len(idx) < min_px:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "segmentation": fortran_indices_to_rle(idx, height, width),
                                "area": float(len(idx)), "bbox": _box(idx, height), "iscrowd": 0})
        # Predictions: jittered cells (quality q ∈ [0, 1] drives the jitter and the score).
        num_pred = int(round(pred_ratio * n))
        for j in range(num_pred):
            kind = rng.random()
            if kind < 0.85:        # a cell, found with some error
                cy, cx, ry, rx, ang = cells[int(rng.integers(0, n))] if j >= n else cells[j]
                q = rng.beta(5, 1.5)
                jitter = (1 - q) * 0.35
                cy, cx = cy + rng.normal(0, jitter * ry), cx + rng.normal(0, jitter * rx)
                ry, rx = ry * (1 + rng.normal(0, jitter)), rx * (1 + rng.normal(0, jitter))
                ang = ang + rng.normal(0, jitter)
                score = float(np.clip(0.25 + 0.7 * q + rng.normal(0, 0.1), 0.01, 1.0))
            else:                  # a false positive: a blob somewhere
                ry = np.sqrt(mean_area * rng.uniform(0.3, 1.2) / np.pi)
                cy, cx, rx, ang = rng.uniform(0, height), rng.uniform(0, width), ry * rng.uniform(1, 2), 0.0
                score = float(rng.uniform(0.01, 0.6))
            idx = ellipse_indices(cy, cx, max(ry, 1.0), max(rx, 1.0), ang, height, width)
            if len(idx) == 0:
                continue
            label_pred = cat if rng.random() > 0.05 else int(rng.integers(1, len(CELL_TYPES) + 1))
            results.append({"image_id": image_id, "category_id": label_pred, "bbox": _box(idx, height),
                            "score": round(score, 5), "segmentation": fortran_indices_to_rle(idx, height, width)})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def make_random_case(rng: np.random.Generator, num_images: int = 3, height: int = 60, width: int = 80,
                     max_gt: int = 25, num_cats: int = 2, string_ids: bool = False,
                     with_bbox: bool = True) -> tuple[dict, list[dict]]:
    """A small adversarial case for exactness tests: overlapping and duplicated GT, crowd GT,
    polygon and uncompressed-RLE GT, an annotation id 0, tied scores and IoUs, images without
    GT or without predictions, masks in all three COCO area ranges."""
    images, annotations, results = [], [], []
    categories = [{"id": k + 1, "name": f"class{k + 1}"} for k in range(num_cats)]
    ids = rng.permutation(1000)[:num_images]
    next_ann = 0 if rng.random() < 0.5 else 1
    for n in range(num_images):
        image_id = f"im{ids[n]:03d}" if string_ids else int(ids[n])
        images.append({"id": image_id, "height": height, "width": width})
        gts = []
        num_gt = 0 if rng.random() < 0.15 else int(rng.integers(1, max_gt + 1))
        for _ in range(num_gt):
            big = rng.random() < 0.15
            ry = rng.uniform(12, 30) if big else rng.uniform(1.5, 8)
            params = (rng.uniform(0, height), rng.uniform(0, width), ry, ry * rng.uniform(0.6, 2), rng.uniform(0, np.pi))
            if gts and rng.random() < 0.15:  # a (near-)duplicate of an earlier GT
                p = gts[int(rng.integers(len(gts)))][0]
                params = p if rng.random() < 0.5 else (p[0] + 1, p[1], p[2], p[3], p[4])
            idx = ellipse_indices(*params, height, width)
            if len(idx) == 0:
                continue
            cat = int(rng.integers(1, num_cats + 1))
            gts.append((params, cat))
            ann = {"id": next_ann, "image_id": image_id, "category_id": cat, "area": float(len(idx)),
                   "bbox": _box(idx, height), "iscrowd": int(rng.random() < 0.1)}
            next_ann += 1
            form = rng.random()
            if form < 0.15 and not ann["iscrowd"]:  # a polygon (its box), area as given
                x, y, w, h = ann["bbox"]
                ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            elif form < 0.3:                        # uncompressed RLE
                rle = fortran_indices_to_rle(idx, height, width)
                from pycocotools import mask as mask_utils
                m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
                flat = m.ravel(order="F")
                change = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
                ann["segmentation"] = {"size": [height, width], "counts": np.diff(np.concatenate(([0], change))).tolist()}
            else:
                ann["segmentation"] = fortran_indices_to_rle(idx, height, width)
            annotations.append(ann)
        if rng.random() < 0.1:
            continue  # an image without predictions
        for params, cat in gts + [(None, None)] * int(rng.integers(0, 6)):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):
                if params is None:  # false positive
                    ry = rng.uniform(1.5, 10)
                    p = (rng.uniform(0, height), rng.uniform(0, width), ry, ry, 0.0)
                    cat = int(rng.integers(1, num_cats + 1))
                else:
                    s = rng.choice([0.0, 0.05, 0.2, 0.5])
                    p = (params[0] + rng.normal(0, s * params[2]), params[1] + rng.normal(0, s * params[3]),
                         params[2] * (1 + rng.normal(0, s)), params[3] * (1 + rng.normal(0, s)), params[4])
                idx = ellipse_indices(p[0], p[1], max(p[2], 0.8), max(p[3], 0.8), p[4], height, width)
                if len(idx) == 0:
                    continue
                entry = {"image_id": image_id, "category_id": cat if rng.random() > 0.1 else int(rng.integers(1, num_cats + 1)),
                         "score": float(rng.choice([0.3, 0.5, 0.9])) if rng.random() < 0.3 else float(rng.random()),
                         "segmentation": fortran_indices_to_rle(idx, height, width)}
                if with_bbox:
                    entry["bbox"] = _box(idx, height)
                results.append(entry)
    order = rng.permutation(len(results))
    return {"images": images, "annotations": annotations, "categories": categories}, [results[i] for i in order]
