"""Whole-dataset checks for tools/check_dataset.py: load everything once, report every problem.

Each ``check_<format>(options)`` returns a ``CheckReport``: problems (severity, where, what)
and per-instance statistics. Errors are what the loader would stop on (or skip with
``skip_bad``); warnings are what it handles by design (duplicates, degenerate boxes, empty
mask files) but a user may want to know about.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from datasets.coco import CocoDataset, coco_paths
from datasets.errors import BadInputLog, DatasetError
from datasets.folder import load_instances, scan_folder
from datasets.imageio import read_image
from datasets.sartorius import CLASS_NAMES as SARTORIUS_CLASSES
from datasets.sartorius import read_index
from utils.coco_rle import segmentation_to_rle
from utils.kaggle_rle import parse_kaggle_rle


@dataclass
class CheckReport:
    class_names: list[str]
    problems: list[tuple[str, str, str]] = field(default_factory=list)   # (severity, where, what)
    instances_per_image: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)                      # class id per instance
    areas: list[float] = field(default_factory=list)                     # mask pixels per instance

    def error(self, where: str, what: str) -> None:
        self.problems.append(("error", where, what))

    def warning(self, where: str, what: str) -> None:
        self.problems.append(("warning", where, what))

    def add_error(self, e: DatasetError) -> None:
        where, _, what = str(e).partition(": ")
        self.error(where, what or str(e))

    @property
    def num_errors(self) -> int:
        return sum(1 for p in self.problems if p[0] == "error")

    @property
    def num_warnings(self) -> int:
        return sum(1 for p in self.problems if p[0] == "warning")

    def summary_lines(self) -> list[str]:
        counts = np.asarray(self.instances_per_image, dtype=np.int64)
        areas = np.asarray(self.areas, dtype=np.float64)
        labels = np.asarray(self.labels, dtype=np.int64)
        lines = [f"images: {len(counts)}", f"instances: {int(counts.sum()) if len(counts) else 0}"]
        for k, name in enumerate(self.class_names):
            lines.append(f"  {name}: {int((labels == k + 1).sum())}")
        if len(counts):
            lines.append(f"instances per image: min {counts.min()}, mean {counts.mean():.1f}, max {counts.max()}")
        if len(areas):
            p = np.percentile(areas, [1, 5, 25, 50, 75, 95, 99])
            lines.append("mask area px percentiles 1/5/25/50/75/95/99: " + " / ".join(f"{v:.0f}" for v in p))
        lines.append(f"errors: {self.num_errors}, warnings: {self.num_warnings}")
        return lines


def _skipped(report: CheckReport, skipped: list[str]) -> None:
    for message in skipped:
        where, _, what = message.partition(": ")
        report.error(where, what)


def check_sartorius(options: dict) -> CheckReport:
    root = options.get("data_path")
    if not root:
        raise DatasetError("sartorius: data_path (--data-path) is required")
    csv_path = options.get("train_csv") or os.path.join(root, "train.csv")
    index = read_index(csv_path, options.get("image_dir") or os.path.join(root, "train"),
                       drop_duplicates=False, skip_bad=True, check_images=True)
    report = CheckReport(list(SARTORIUS_CLASSES))
    _skipped(report, index.log.skipped)
    for p, name in enumerate(index.names):
        height, width = index.sizes[p]
        try:
            read_image(index.image_path(p), expected_size=(height, width))
        except DatasetError as e:
            report.add_error(e)
        first_line: dict[str, int] = {}
        kept = 0
        for k, ann in enumerate(index.annotations[p]):
            line = index.lines[p][k]
            where = f"{csv_path} line {line} (image {name})"
            if ann in first_line:
                report.warning(where, f"duplicate of line {first_line[ann]}")
                continue
            first_line[ann] = line
            try:
                starts, lengths = parse_kaggle_rle(ann, height, width)
            except ValueError as e:
                report.error(where, f"bad RLE: {e}")
                continue
            kept += 1
            report.labels.append(index.labels[p][k])
            report.areas.append(float(lengths.sum()))
        report.instances_per_image.append(kept)
    return report


def check_coco(options: dict) -> CheckReport:
    report: CheckReport | None = None
    seen = set()
    for split in ("train", "val"):
        try:
            ann, images = coco_paths(split, options)
        except DatasetError:
            continue
        if (ann, images) in seen or not os.path.exists(ann):
            continue
        seen.add((ann, images))
        ds = CocoDataset(ann, images, keep_empty=True, skip_bad=True)
        if report is None:
            report = CheckReport(list(ds.class_names))
        _skipped(report, ds.log.skipped)
        for p, im in enumerate(ds._images):
            path = os.path.join(images, im["file_name"])
            try:
                read_image(path, expected_size=(im["height"], im["width"]))
            except DatasetError as e:
                report.add_error(e)
            count, seen_segs = 0, {}
            for a in ds._anns[p]:
                where = f"{ann}: annotation {a['id']!r} (image {path})"
                if not a["valid"]:
                    # The loader drops these from targets; their masks are usually empty too.
                    report.warning(where, f"degenerate box {a['bbox']}")
                    continue
                key = (a["category_id"], a["iscrowd"], repr(a["segmentation"]))
                if key in seen_segs:
                    report.warning(where, f"duplicate of annotation {seen_segs[key]!r}")
                seen_segs.setdefault(key, a["id"])
                try:
                    rle = segmentation_to_rle(a["segmentation"], im["height"], im["width"])
                except (ValueError, TypeError) as e:
                    report.error(where, f"bad segmentation: {e}")
                    continue
                area = float(mask_utils.area(rle))
                if area == 0:
                    report.error(where, "empty mask")
                    continue
                if not a["iscrowd"]:
                    count += 1
                    report.labels.append(a["category_id"])
                    report.areas.append(area)
            report.instances_per_image.append(count)
    if report is None:
        raise DatasetError("coco: no annotation file found; give --data-path or --train-ann/--val-ann")
    return report


def check_folder(options: dict) -> CheckReport:
    report = CheckReport([options.get("class_name") or "cell"])
    roots = [options.get("data_path")] + ([options["val_path"]] if options.get("val_path") else [])
    for root in roots:
        if not root:
            raise DatasetError("folder: data_path (--data-path) is required")
        log = BadInputLog()
        items = scan_folder(root, skip_bad=True, log=log)
        _skipped(report, log.skipped)
        for item in items:
            try:
                read_image(item.image_path, expected_size=item.size)
                masks = load_instances(item)
            except DatasetError as e:
                report.add_error(e)
                continue
            if not item.label_image and len(masks) < len(item.mask_paths):
                report.warning(os.path.dirname(item.mask_paths[0]),
                               f"{len(item.mask_paths) - len(masks)} empty mask file(s)")
            if len(masks) == 0:
                report.warning(item.image_path, "no instances")
            report.instances_per_image.append(len(masks))
            report.labels += [1] * len(masks)
            report.areas += masks.reshape(len(masks), -1).sum(1).astype(float).tolist() if len(masks) else []
    return report


CHECKS = {"sartorius": check_sartorius, "coco": check_coco, "folder": check_folder}
