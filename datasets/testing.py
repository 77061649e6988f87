"""Writers of small, valid datasets in each supported format, for tests, benches and demos.

Everything is generated (no download) and deterministic by seed. Cells are ellipses; the
Sartorius writer produces RLEs straight from per-row runs (row-major, 1-indexed), the way the
real ``train.csv`` is laid out, so even the real-size bench CSV is written in seconds.
"""
from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np

from utils.box_masks import masks_to_boxes
from utils.coco_rle import encode_coco_rle

SARTORIUS_COLUMNS = ["id", "annotation", "width", "height", "cell_type", "plate_time", "sample_date",
                     "sample_id", "elapsed_timedelta"]
# Mean mask area (px) per cell type in the real data (DOMAIN.md): ellipse radii follow from it.
SARTORIUS_AREA = {"shsy5y": 225, "astro": 906, "cort": 240}


def ellipse_runs(cy: float, cx: float, ry: float, rx: float, height: int, width: int) -> np.ndarray:
    """Row-major runs of a filled ellipse clipped to the image → int64 ``K×2`` (0-indexed start, length)."""
    ys = np.arange(max(0, int(np.ceil(cy - ry))), min(height, int(np.floor(cy + ry)) + 1))
    half = rx * np.sqrt(np.clip(1 - ((ys - cy) / ry) ** 2, 0, None))
    x0 = np.clip(np.ceil(cx - half), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(cx + half) + 1, 0, width).astype(np.int64)
    ok = x1 > x0
    return np.stack([ys[ok] * width + x0[ok], (x1 - x0)[ok]], axis=1)


def runs_to_rle(runs: np.ndarray) -> str:
    """0-indexed runs ``K×2`` → Kaggle RLE string (1-indexed starts)."""
    out = runs.copy()
    out[:, 0] += 1
    return " ".join(map(str, out.reshape(-1).tolist()))


def write_sartorius(root: str, counts: list[int], cell_types: list[str], frames_per_sample: int = 3,
                    height: int = 520, width: int = 704, seed: int = 0, write_images: bool = True) -> str:
    """Write ``root/train.csv`` and ``root/train/<id>.png``: image ``i`` has ``counts[i]`` cells of
    type ``cell_types[i]``; consecutive groups of ``frames_per_sample`` images of one type share a
    sample_id. Returns the CSV path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    csv_path = os.path.join(root, "train.csv")
    samples: dict[str, int] = {}
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SARTORIUS_COLUMNS)
        for i, (n, cell_type) in enumerate(zip(counts, cell_types)):
            name = f"{i:012x}"
            k = samples.get(cell_type, 0)
            samples[cell_type] = k + 1
            sample_id = f"{cell_type}[x]_{k // frames_per_sample:03d}"
            mean_r = np.sqrt(SARTORIUS_AREA[cell_type] / np.pi)
            for _ in range(n):
                while True:
                    ry, rx = mean_r * rng.uniform(0.6, 1.4, size=2)
                    runs = ellipse_runs(rng.uniform(0, height), rng.uniform(0, width), ry, rx, height, width)
                    if len(runs):
                        break
                writer.writerow([name, runs_to_rle(runs), width, height, cell_type, "11h30m00s",
                                 "2019-06-16", sample_id, "0 days 11:30:00"])
            if write_images:
                yy, xx = np.mgrid[0:height, 0:width]
                image = (96 + 32 * np.sin(xx / 37.0 + i) * np.cos(yy / 53.0)).astype(np.uint8)
                cv2.imwrite(os.path.join(root, "train", name + ".png"), image)
    return csv_path


def random_label_image(rng: np.random.Generator, height: int, width: int, count: int,
                       dtype=np.uint16) -> np.ndarray:
    """Label image with up to ``count`` ellipses (later ones drawn over earlier ones), values 1..count."""
    label = np.zeros((height, width), dtype=dtype)
    for k in range(1, count + 1):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(3, max(4, width // 6))), int(rng.integers(3, max(4, height // 6))))
        cv2.ellipse(label, center, axes, float(rng.uniform(0, 180)), 0, 360, int(k), -1)
    return label


def write_label_folder(root: str, num_images: int, height: int = 64, width: int = 80, count: int = 6,
                       seed: int = 0, mask_dtype=np.uint16) -> list[np.ndarray]:
    """``root/images/img_XX.png`` + ``root/masks/img_XX.(png|tif)`` label images. Returns the labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    labels = []
    for i in range(num_images):
        label = random_label_image(rng, height, width, count, mask_dtype)
        image = (rng.integers(0, 60, size=(height, width)) + 120 * (label > 0)).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "images", f"img_{i:02d}.png"), image)
        ext = ".tif" if i % 2 else ".png"
        cv2.imwrite(os.path.join(root, "masks", f"img_{i:02d}{ext}"), label)
        labels.append(label)
    return labels


def write_instance_folder(root: str, num_images: int, height: int = 64, width: int = 80, count: int = 5,
                          seed: int = 0) -> list[np.ndarray]:
    """DSB-2018 layout ``root/ID/images/ID.png`` + ``root/ID/masks/k.png`` (0/255). Returns mask stacks."""
    rng = np.random.default_rng(seed)
    stacks = []
    for i in range(num_images):
        sample = f"sample{i:02d}"
        os.makedirs(os.path.join(root, sample, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, sample, "masks"), exist_ok=True)
        label = random_label_image(rng, height, width, count, np.uint8)
        masks = np.stack([(label == k) for k in range(1, count + 1) if (label == k).any()]).astype(np.uint8)
        image = np.stack([(rng.integers(0, 60, size=(height, width)) + 120 * (label > 0))] * 3, -1).astype(np.uint8)
        cv2.imwrite(os.path.join(root, sample, "images", f"{sample}.png"), image)
        for k, m in enumerate(masks):
            cv2.imwrite(os.path.join(root, sample, "masks", f"{k:03d}.png"), m * 255)
        stacks.append(masks)
    return stacks


def write_coco(root: str, num_images: int = 4, height: int = 60, width: int = 70, seed: int = 0,
               string_ids: bool = False, annotations_as_dict: bool = False, empty_images: int = 1) -> str:
    """A small COCO instances file mixing polygons, compressed and uncompressed RLE, a crowd
    annotation and a degenerate box; categories with non-contiguous ids (3 "cat", 7 "dog").
    Images live in ``root/images``; the last ``empty_images`` images have no annotations.
    Returns the JSON path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = f"img-{i}" if string_ids else 100 + i
        file_name = f"im{i}.jpg" if i % 2 else f"im{i}.png"
        picture = rng.integers(0, 255, size=(height, width, 3)).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "images", file_name), picture)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if i >= num_images - empty_images:
            continue
        # polygon (a rectangle 10..30 × 5..25)
        annotations.append({"image_id": image_id, "category_id": 3, "iscrowd": 0,
                            "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]], "bbox": [10, 5, 20, 20], "area": 400})
        # compressed RLE (a disc)
        disc = np.zeros((1, height, width), np.uint8)
        cv2.circle(disc[0], (45, 35), 8, 1, -1)
        annotations.append({"image_id": image_id, "category_id": 7, "iscrowd": 0,
                            "segmentation": encode_coco_rle(disc)[0],
                            "bbox": [float(v) for v in _xywh(disc)], "area": float(disc.sum())})
        # uncompressed RLE (column-major counts) of a small square
        square = np.zeros((height, width), np.uint8)
        square[40:50, 5:15] = 1
        annotations.append({"image_id": image_id, "category_id": 7, "iscrowd": 0,
                            "segmentation": {"size": [height, width], "counts": _uncompressed(square)},
                            "bbox": [5, 40, 10, 10], "area": 100})
        # crowd region
        annotations.append({"image_id": image_id, "category_id": 3, "iscrowd": 1,
                            "segmentation": {"size": [height, width], "counts": _uncompressed(square)},
                            "bbox": [5, 40, 10, 10], "area": 100})
        # degenerate box (zero width)
        annotations.append({"image_id": image_id, "category_id": 3, "iscrowd": 0,
                            "segmentation": [[50, 5, 50, 5, 50, 9, 50, 9]], "bbox": [50, 5, 0, 4], "area": 0})
    for k, a in enumerate(annotations):
        a["id"] = k + 1
    anns = {str(a["id"]): a for a in annotations} if annotations_as_dict else annotations
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    path = os.path.join(root, "annotations.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _xywh(mask: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = masks_to_boxes(mask)[0].tolist()
    return [x0, y0, x1 - x0, y1 - y0]


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = np.concatenate([[0], mask.reshape(-1, order="F"), [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat))
    bounds = np.concatenate([[0], edges, [mask.size]])
    return np.diff(bounds).tolist()
