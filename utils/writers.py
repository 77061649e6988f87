"""Prediction outputs: overlay PNG, label image, COCO results JSON, Kaggle submission CSV.

Every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written output that looks complete.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path

import cv2
import numpy as np

from utils.box_masks import box_masks_to_kaggle_rles
from utils.instances import Instances
from utils.io import atomic_path, write_json_atomic, write_text_atomic

UINT16_MAX_LABELS = np.iinfo(np.uint16).max


def display_image(image: np.ndarray) -> np.ndarray:
    """Any image from ``utils.image_files.decode_image`` → ``H×W×3`` uint8 RGB for viewing.

    uint8 is shown as is; 16-bit and float images are stretched between their 0.5th and 99.5th
    percentiles (microscopes rarely fill the 16-bit range). Alpha is dropped.
    """
    if image.ndim == 3:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        values = image.astype(np.float32)
        lo, hi = np.percentile(values, (0.5, 99.5))
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max()) or 1.0
        image = np.clip((values - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


def instance_colours(count: int) -> np.ndarray:
    """``count×3`` uint8 RGB colours, well separated in hue (golden-ratio steps)."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for k in range(count):
        hue = (k * 0.618033988749895) % 1.0
        sat = 0.65 + 0.35 * ((k // 7) % 2)
        colours[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, 1.0)) * 255)
    return colours


def render_overlay(image: np.ndarray, labels: np.ndarray, instances: Instances | None = None,
                   class_names: list[str] | None = None, alpha: float = 0.4, fill: bool = True,
                   outline: bool = True) -> np.ndarray:
    """Image with instance ``k`` of ``labels`` (``H×W``, 0 background) tinted (``fill``) and
    outlined (``outline``) in its own colour → ``H×W×3`` uint8 RGB. With ``instances`` (in label
    order), each instance also gets ``"class score"`` written at its box corner."""
    out = display_image(image).astype(np.float32)
    count = int(labels.max()) if labels.size else 0
    if count and (fill or outline):
        lut = np.zeros((count + 1, 3), dtype=np.float32)
        lut[1:] = instance_colours(count)
        fg = labels > 0
        if fill:
            out[fg] = (1 - alpha) * out[fg] + alpha * lut[labels[fg]]
        if outline:
            # Outline: pixels whose 4-neighbour belongs to another label (or background).
            edge = np.zeros(labels.shape, dtype=bool)
            edge[1:] |= labels[1:] != labels[:-1]
            edge[:-1] |= labels[:-1] != labels[1:]
            edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
            edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
            edge &= fg
            out[edge] = lut[labels[edge]]
    out = np.clip(out, 0, 255).astype(np.uint8)
    if instances is not None and len(instances):
        colours = instance_colours(len(instances))
        for k, (box, score, label) in enumerate(zip(instances.boxes, instances.scores, instances.labels)):
            name = class_names[label - 1] if class_names and 0 < label <= len(class_names) else str(label)
            x0, y0 = int(box[0]), max(int(box[1]) - 2, 8)
            cv2.putText(out, f"{name} {score:.2f}", (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                        tuple(int(c) for c in colours[k]), 1, cv2.LINE_AA)
    return out


def encode_png(image: np.ndarray, what: str = "image") -> bytes:
    """``H×W`` (uint8/uint16) or ``H×W×3`` RGB uint8 array → PNG bytes (``what`` names it in errors)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {what} as PNG")
    return data.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """``H×W`` (uint8/uint16) or ``H×W×3`` RGB uint8 array → PNG, atomically."""
    data = encode_png(image, str(path))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_label_image(path_without_suffix: str | os.PathLike, labels: np.ndarray) -> Path:
    """Label image → 16-bit PNG (``.png``), or 32-bit TIFF (``.tif``) above 65535 instances;
    ``datasets.imageio.read_label_image`` reads either back.

    Returns the path written. 0 is background, ``k`` is instance ``k``.
    """
    base = Path(path_without_suffix)
    if int(labels.max(initial=0)) <= UINT16_MAX_LABELS:
        path = base.with_name(base.name + ".png")
        write_png(path, labels.astype(np.uint16))
        return path
    from PIL import Image

    path = base.with_name(base.name + ".tif")
    with atomic_path(path) as tmp:
        Image.fromarray(labels.astype(np.int32)).save(tmp, format="TIFF", compression="tiff_deflate")
    return path


def submission_rows(image_id: str, instances: Instances) -> list[str]:
    """Kaggle ``id,predicted`` rows for one image's non-overlapping instances (one per instance;
    a single row with an empty prediction when there is none). Empty masks are skipped."""
    rles = [r for r in box_masks_to_kaggle_rles(instances.masks) if r]
    return [f"{image_id},{rle}" for rle in rles] or [f"{image_id},"]


def write_submission_csv(path: str | os.PathLike, rows: list[str]) -> None:
    write_text_atomic(path, "id,predicted\n" + "".join(row + "\n" for row in rows))


INSTANCE_TABLE_COLUMNS = ("id", "class", "score", "area_px", "equivalent_diameter_px")


def instance_table(instances: Instances, class_names: list[str] | None = None) -> list[dict]:
    """One row per instance (in label-image order, so ``id`` is the instance's label value):
    ``class`` name, ``score``, ``area_px`` (mask pixels) and ``equivalent_diameter_px``
    (the diameter of a disc of that area, √(4·area/π))."""
    areas = instances.masks.areas()
    rows = []
    for k, (label, score, area) in enumerate(zip(instances.labels.tolist(), instances.scores.tolist(),
                                                 areas.tolist()), start=1):
        name = class_names[label - 1] if class_names and 0 < label <= len(class_names) else str(label)
        rows.append({"id": k, "class": name, "score": round(float(score), 4), "area_px": int(area),
                     "equivalent_diameter_px": round(float(np.sqrt(4.0 * area / np.pi)), 2)})
    return rows


def write_instance_table(path: str | os.PathLike, rows: list[dict]) -> None:
    """``instance_table`` rows → CSV with a header (class names quoted where CSV needs it)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INSTANCE_TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write_predictions_json(path: str | os.PathLike, results: list[dict]) -> None:
    """COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, RLE)."""
    write_json_atomic(path, results, indent=None)


# ------------------------------------------------------------------------ per-image records

RECORDS_DIR = ".records"


def image_record_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"{name}.json"


def write_image_record(out_dir: str | os.PathLike, name: str, source: str | os.PathLike, formats: list[str],
                       files: list[str], instances: int, coco: list[dict] | None, rows: list[str] | None) -> None:
    """Mark image ``name`` done: written last, atomically, after every one of its own outputs.

    "Done" for ``predict.py --skip-existing`` means: this record exists and parses, names the same
    source image, covers the formats asked for, and every file it lists exists. Since each output
    is written atomically and the record only after all of them, a run killed at any moment
    leaves an image either done (all its outputs complete) or not done (it is predicted again).
    The record also keeps the image's share of the aggregates (its COCO results for
    ``predictions.json``, its rows for ``submission.csv``), so a resumed run rebuilds those files
    from the records in input order, identical to an uninterrupted run's.
    """
    write_json_atomic(image_record_path(out_dir, name),
                      {"source": str(Path(source).absolute()), "formats": sorted(formats), "files": files,
                       "instances": instances, "coco": coco, "rows": rows}, indent=None)


def load_image_record(out_dir: str | os.PathLike, name: str, source: str | os.PathLike,
                      formats: list[str]) -> dict | None:
    """The record of a done image (see ``write_image_record``), or ``None`` when it must be predicted."""
    import json

    path = image_record_path(out_dir, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("source") != str(Path(source).absolute()):
        return None
    if not set(formats) <= set(record.get("formats", [])):
        return None
    if not all((Path(out_dir) / f).is_file() for f in record.get("files", [])):
        return None
    return record
