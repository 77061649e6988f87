"""Predictions kept between requests, their views at a score threshold, and the downloads.

A result keeps every detection of the model (score ≥ its ``box_score_thresh``), so moving the
page's score slider re-selects instances without running the model again: the instances at
threshold ``t`` are the detections with score ≥ ``t`` with overlaps removed by score, exactly
what ``Predictor`` (and so predict.py) does with ``score_thresh=t``. The downloads are written
by the writers predict.py uses (``utils.writers``), so they are the same files.
"""
from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.writers import (
    instance_table,
    render_overlay,
    write_instance_table,
    write_label_image,
    write_png,
    write_predictions_json,
    write_submission_csv,
)


@dataclass(frozen=True)
class ViewSettings:
    """What the page shows: instances with score ≥ ``score``; masks tinted (``fill``),
    outlined (``outline``), and ``text``: class and score written at each box (predict.py's
    ``--overlay-text``)."""
    score: float = 0.5
    fill: bool = True
    outline: bool = True
    text: bool = False


@dataclass(eq=False)
class Result:
    id: str
    display_name: str                  # the client's file name (shown escaped, never a path)
    stem: str                          # output name in downloads
    tta: bool
    prediction: object                 # engine.predictor.Prediction (all detections kept)
    nbytes: int
    _views: dict = field(default_factory=dict, repr=False)   # score → Prediction at that threshold
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def at(self, score: float):
        """The prediction with the instances of threshold ``score`` (cached per threshold)."""
        score = float(score)
        with self._lock:
            if score not in self._views:
                if len(self._views) >= 4:
                    self._views.pop(next(iter(self._views)))
                self._views[score] = at_threshold(self.prediction, score)
            return self._views[score]


def at_threshold(prediction, score: float):
    """``Prediction`` → the same with its final instances re-selected at ``score`` from its
    detections (``Predictor``'s rule without post-processing: threshold, then overlaps removed
    by score)."""
    final = prediction.detections.above(score).non_overlapping()
    return dataclasses.replace(prediction, instances=final, _cache={})


def prediction_bytes(prediction) -> int:
    """Rough memory held by a prediction: its view and its box-crop masks."""
    total = prediction.view.nbytes if prediction.view is not None else 0
    for instances in (prediction.detections, prediction.instances):
        total += sum(crop.nbytes for crop in instances.masks.crops) + 64 * len(instances)
    return total


class ResultStore:
    """Results by id, the oldest dropped once their total size passes ``max_bytes`` (the page
    then says the result expired and asks to upload again)."""

    def __init__(self, max_bytes: int = 1024 ** 3):
        self.max_bytes = max_bytes
        self._results: collections.OrderedDict[str, Result] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, display_name: str, stem: str, tta: bool, prediction) -> Result:
        result = Result(secrets.token_hex(8), display_name, stem, tta, prediction, prediction_bytes(prediction))
        with self._lock:
            self._results[result.id] = result
            while len(self._results) > 1 and sum(r.nbytes for r in self._results.values()) > self.max_bytes:
                self._results.popitem(last=False)
        return result

    def get(self, result_id: str) -> Result | None:
        with self._lock:
            result = self._results.get(result_id)
            if result is not None:
                self._results.move_to_end(result_id)
            return result

    def __len__(self) -> int:
        return len(self._results)


# ----------------------------------------------------------------------------- page data


def summary(result: Result, settings: ViewSettings) -> dict:
    """JSON for the page: counts per class and the instance table at ``settings.score``."""
    prediction = result.at(settings.score)
    height, width = prediction.image_size
    table = instance_table(prediction.instances, prediction.class_names)
    per_class = collections.Counter(row["class"] for row in table)
    detections = prediction.detections.scores
    return {
        "id": result.id, "name": result.display_name, "stem": result.stem, "tta": result.tta,
        "width": width, "height": height, "tiles": prediction.tiles, "score": settings.score,
        "count": len(table),
        "per_class": {name: per_class.get(name, 0) for name in class_list(prediction)},
        "instances": table,
        "detections": int(len(detections)),
        "max_score": round(float(detections.max()), 4) if len(detections) else None,
    }


def class_list(prediction) -> list[str]:
    """Every class name of the checkpoint, plus ids without a name that occur here."""
    names = list(prediction.class_names)
    for row in instance_table(prediction.instances, prediction.class_names):
        if row["class"] not in names:
            names.append(row["class"])
    return names


def overlay(result: Result, settings: ViewSettings) -> np.ndarray:
    """``H×W×3`` uint8: what the model saw with the instances of ``settings`` drawn on it; with
    fill and outline on, the same picture as predict.py's ``NAME_overlay.png``."""
    prediction = result.at(settings.score)
    return render_overlay(prediction.view, prediction.label_image, prediction.instances if settings.text else None,
                          prediction.class_names, fill=settings.fill, outline=settings.outline)


# ----------------------------------------------------------------------------- downloads


def write_outputs(results: list[Result], stems: list[str], settings: ViewSettings, out_dir: Path) -> list[Path]:
    """predict.py's outputs for ``results`` at ``settings`` into ``out_dir`` (the same writers
    and names: ``STEM_overlay.png``, ``STEM_labels.png`` (``.tif`` above 65535 instances),
    ``predictions.json`` with every detection, ``submission.csv``), plus ``STEM_instances.csv``
    (the page's instance table). Returns the files in a stable order."""
    files: list[Path] = []
    coco: list[dict] = []
    rows: list[str] = []
    for result, stem in zip(results, stems):
        prediction = result.at(settings.score)
        files.append(write_label_image(out_dir / f"{stem}_labels", prediction.label_image))
        write_png(out_dir / f"{stem}_overlay.png", overlay(result, settings))
        write_instance_table(out_dir / f"{stem}_instances.csv",
                             instance_table(prediction.instances, prediction.class_names))
        files += [out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_instances.csv"]
        coco += prediction.to_coco(image_id=stem, every_detection=True)
        rows += prediction.to_kaggle_rows(image_id=stem)
    write_predictions_json(out_dir / "predictions.json", coco)
    write_submission_csv(out_dir / "submission.csv", rows)
    return files + [out_dir / "predictions.json", out_dir / "submission.csv"]


def write_zip(files: list[Path], path: Path) -> Path:
    """``files`` → one zip at ``path`` (entries named by file name only)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, arcname=file.name)
    return path
