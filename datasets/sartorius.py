"""Sartorius cell instance segmentation (Kaggle 2021): ``train.csv`` + ``train/*.png``.

Layout under ``data_path``: ``train.csv`` (one row per cell: id, annotation, width, height,
cell_type, sample_id, ...) and ``train/<id>.png`` (520×704 grayscale). ``annotation`` is a
Kaggle RLE: "start length" pairs, starts 1-indexed, pixels in row-major (C) order.
Classes: shsy5y, astro, cort → ids 1, 2, 3.

The index (reading the CSV, grouping rows by image, folds) keeps the RLE strings only;
masks are decoded in ``__getitem__``, i.e. in the DataLoader workers.

Option keys (``build_dataset("sartorius", split, options)``):
  data_path        root folder (required)
  train_csv        CSV path; default ``<data_path>/train.csv``
  image_dir        image folder; default ``<data_path>/train``
  num_folds        grouped (by sample_id), cell-type-stratified folds; default 5. 0 or 1: no
                   split, "train" is every image and "val" is an error
  fold             which fold is "val"; default 0
  fold_seed        seed of the fold assignment; default 0 (independent of the training seed,
                   so folds stay fixed across training runs)
  fill_holes       fill enclosed holes in training masks (hollow astro annotations); default
                   True. Never applied to "val", whose targets and ``coco_gt()`` stay as annotated
  drop_duplicates  drop exact duplicate annotations of one image (115 in the real CSV); default True
  skip_bad         skip and count bad rows/images/RLEs instead of stopping; default False
  check_images     read each PNG header at index time (exists, readable, size matches); default True
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from datasets.errors import BadInputLog, DatasetError, as_bool, load_sample
from datasets.imageio import read_image, read_image_size
from datasets.registry import register_dataset
from datasets.splits import fold_positions, grouped_stratified_folds
from datasets.targets import coco_annotation, coco_ground_truth, fill_holes, make_target
from utils.arrays import lazy_zeros
from utils.kaggle_rle import fill_kaggle_runs, kaggle_rle_to_coco_rle, kaggle_runs_box, parse_kaggle_rle

CLASS_NAMES = ["shsy5y", "astro", "cort"]
REQUIRED_COLUMNS = ("id", "annotation", "width", "height", "cell_type", "sample_id")


@dataclass
class SartoriusIndex:
    """Per-image lists built from the CSV; position ``p`` in each list is one image."""
    csv_path: str
    image_dir: str
    names: list[str] = field(default_factory=list)           # image id (file stem)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    cell_types: list[str] = field(default_factory=list)      # per image (its most common type)
    sample_ids: list[str] = field(default_factory=list)
    annotations: list[list[str]] = field(default_factory=list)  # RLE strings
    labels: list[list[int]] = field(default_factory=list)    # class id 1..3 per annotation
    lines: list[list[int]] = field(default_factory=list)     # CSV line number per annotation
    log: BadInputLog = field(default_factory=BadInputLog)

    def image_path(self, p: int) -> str:
        return os.path.join(self.image_dir, self.names[p] + ".png")

    def where(self, p: int, k: int) -> str:
        return f"{self.csv_path} line {self.lines[p][k]} (image {self.names[p]})"


def read_index(csv_path: str, image_dir: str, drop_duplicates: bool = True, skip_bad: bool = False,
               check_images: bool = True) -> SartoriusIndex:
    """Read ``train.csv`` into a ``SartoriusIndex`` (images sorted by id; rows in file order).

    Checks each row's fields (count, integer width/height, known cell type, non-empty RLE,
    one size and one sample per image) and, with ``check_images``, each image's header.
    RLE contents are checked when decoded.
    """
    index = SartoriusIndex(csv_path, image_dir)
    log = index.log
    class_of = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
    per_image: dict[str, dict] = {}
    try:
        f = open(csv_path, newline="")
    except OSError as e:
        raise DatasetError(f"{csv_path}: cannot open ({e.strerror})") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{csv_path}: empty file")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {missing}; found {header}")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        ncols = len(header)
        for row in reader:
            line = reader.line_num
            where = f"{csv_path} line {line}"
            if len(row) != ncols:
                if not any(row):
                    continue  # blank line
                log.skip(where, f"expected {ncols} fields, got {len(row)}", skip_bad)
                continue
            name, ann, cell_type = row[col["id"]], row[col["annotation"]].strip(), row[col["cell_type"]]
            try:
                height, width = int(row[col["height"]]), int(row[col["width"]])
            except ValueError:
                log.skip(where, f"width/height not integers: {row[col['width']]!r}, {row[col['height']]!r}",
                         skip_bad)
                continue
            if cell_type not in class_of:
                log.skip(where, f"unknown cell_type {cell_type!r}; expected one of {CLASS_NAMES}", skip_bad)
                continue
            if not name:
                log.skip(where, "empty image id", skip_bad)
                continue
            if not ann:
                log.skip(where, "empty annotation", skip_bad)
                continue
            entry = per_image.get(name)
            if entry is None:
                entry = per_image[name] = {"size": (height, width), "sample": row[col["sample_id"]],
                                           "anns": [], "labels": [], "lines": [], "seen": set()}
            elif entry["size"] != (height, width):
                log.skip(where, f"size {height}×{width} differs from earlier rows of image {name} "
                                f"({entry['size'][0]}×{entry['size'][1]})", skip_bad)
                continue
            if drop_duplicates:
                if ann in entry["seen"]:
                    log.count("duplicate annotations dropped")
                    continue
                entry["seen"].add(ann)
            entry["anns"].append(ann)
            entry["labels"].append(class_of[cell_type])
            entry["lines"].append(line)

    for name in sorted(per_image):
        entry = per_image[name]
        path = os.path.join(image_dir, name + ".png")
        if check_images:
            try:
                size = read_image_size(path)
            except DatasetError as e:
                log.skip_error(e, skip_bad)
                continue
            if size != entry["size"]:
                log.skip(path, f"image is {size[0]}×{size[1]}, train.csv says "
                               f"{entry['size'][0]}×{entry['size'][1]}", skip_bad)
                continue
        index.names.append(name)
        index.sizes.append(entry["size"])
        labels = entry["labels"]
        index.cell_types.append(CLASS_NAMES[max(set(labels), key=lambda c: (labels.count(c), -c)) - 1])
        index.sample_ids.append(entry["sample"])
        index.annotations.append(entry["anns"])
        index.labels.append(labels)
        index.lines.append(entry["lines"])
    if not index.names:
        raise DatasetError(f"{csv_path}: no usable images")
    return index


def index_folds(index: SartoriusIndex, num_folds: int, seed: int) -> np.ndarray:
    """Fold per image: grouped by sample_id, stratified by cell type."""
    return grouped_stratified_folds(index.sample_ids, index.cell_types, num_folds, seed)


def decode_runs(index: SartoriusIndex, p: int, skip_bad: bool):
    """Parse image ``p``'s RLEs → (kept annotation positions, [(starts, lengths)])."""
    height, width = index.sizes[p]
    kept, runs = [], []
    for k, ann in enumerate(index.annotations[p]):
        try:
            runs.append(parse_kaggle_rle(ann, height, width))
        except ValueError as e:
            if not skip_bad:
                raise DatasetError(f"{index.where(p, k)}: bad RLE: {e}") from None
            index.log.skip(index.where(p, k), f"bad RLE: {e}", True)
            continue
        kept.append(k)
    return kept, runs


class SartoriusDataset(torch.utils.data.Dataset):
    """Images ``positions`` of a ``SartoriusIndex``; samples follow docs/architecture.md."""

    def __init__(self, index: SartoriusIndex, positions: list[int], transforms=None,
                 fill_holes: bool = False, skip_bad: bool = False):
        self.index = index
        self.positions = list(positions)
        self.transforms = transforms
        self.fill_holes = fill_holes
        self.skip_bad = skip_bad
        self.class_names = list(CLASS_NAMES)
        # 1-based positions in the whole CSV: ids agree between folds and with the converter.
        self.image_ids = [p + 1 for p in self.positions]
        self.names = [index.names[p] for p in self.positions]
        self._coco_gt: dict | None = None

    @property
    def log(self) -> BadInputLog:
        """What was skipped (bad rows and RLEs), like the other formats' ``log``."""
        return self.index.log

    def __len__(self) -> int:
        return len(self.positions)

    def get_image_size(self, i: int) -> tuple[int, int]:
        return self.index.sizes[self.positions[i]]

    def image_path(self, i: int) -> str:
        return self.index.image_path(self.positions[i])

    def load(self, i: int) -> tuple[np.ndarray, dict]:
        """Image ``H×W`` uint8 and target (masks uint8 ``N×H×W``) before transforms."""
        p = self.positions[i]
        height, width = self.index.sizes[p]
        image = read_image(self.index.image_path(p), expected_size=(height, width))
        kept, runs = decode_runs(self.index, p, self.skip_bad)
        n = len(runs)
        # Lazily mapped zeros: a 790-instance stack costs only the rows its runs fill.
        masks = lazy_zeros(n, height, width)
        flat = masks.reshape(n, height * width)
        boxes = np.zeros((n, 4), dtype=np.float32)
        area = np.zeros(n, dtype=np.float32)
        for j, (starts, lengths) in enumerate(runs):
            fill_kaggle_runs(flat[j], starts, lengths)
            boxes[j] = kaggle_runs_box(starts, lengths, width)
            area[j] = lengths.sum()
        if self.fill_holes and n:
            fill_holes(masks, boxes)
            for j, (x0, y0, x1, y1) in enumerate(boxes.astype(np.int64)):
                area[j] = np.count_nonzero(masks[j, y0:y1, x0:x1])
        labels = np.asarray(self.index.labels[p], dtype=np.int64)[kept]
        return image, make_target(masks, labels, boxes, self.image_ids[i], area=area)

    def __getitem__(self, i: int):
        return load_sample(self, i)

    def coco_gt(self) -> dict:
        """COCO ground truth of these images, from the RLE strings (compressed RLE masks,
        xywh boxes, pixel areas), without decoding whole images. Cached."""
        if self._coco_gt is None:
            self._coco_gt = coco_ground_truth((self._image_gt(i, p) for i, p in enumerate(self.positions)),
                                              self.class_names)
        return self._coco_gt

    def _image_gt(self, i: int, p: int) -> tuple[dict, list[dict]]:
        height, width = self.index.sizes[p]
        image = {"id": self.image_ids[i], "file_name": self.index.names[p] + ".png", "height": height, "width": width}
        kept, runs = decode_runs(self.index, p, self.skip_bad)
        # Annotation ids are CSV line numbers: unique, the same in every fold, and traceable.
        return image, [{"id": self.index.lines[p][k], **coco_annotation(
                           int(self.index.labels[p][k]), kaggle_rle_to_coco_rle(starts, lengths, height, width),
                           kaggle_runs_box(starts, lengths, width), float(lengths.sum()))}
                       for k, (starts, lengths) in zip(kept, runs)]


def split_positions(index: SartoriusIndex, split: str, num_folds: int, fold: int, seed: int) -> list[int]:
    """Image positions of ``split`` for fold ``fold`` of ``num_folds`` (all images when < 2 folds)."""
    if num_folds < 2:
        if split == "val":
            raise DatasetError("sartorius: the val split needs num_folds ≥ 2 (got "
                               f"{num_folds}); set num_folds/fold or evaluate on another dataset")
        return list(range(len(index.names)))
    return fold_positions(len(index.names), split, num_folds, fold, seed, index.sample_ids, index.cell_types)


# Native resolution (520×704), small anchors for ~15-px cells, and caps above the 790 cells of
# the densest image (RPN pre-NMS top-k is per FPN level in torchvision).
SARTORIUS_DEFAULTS = {
    "min_size": 520, "max_size": 704,
    "anchor_sizes": (8, 16, 32, 64, 128),
    "detections_per_img": 1000,
    "rpn_pre_nms_top_n_train": 4000, "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 4000, "rpn_post_nms_top_n_test": 3000,
    "data_augmentation": "cells",
}


@register_dataset("sartorius", defaults=SARTORIUS_DEFAULTS,
                  options={"data_path": str, "train_csv": str, "image_dir": str, "num_folds": int, "fold": int,
                           "fold_seed": int, "fill_holes": bool, "drop_duplicates": bool, "skip_bad": bool,
                           "check_images": bool})
def build_sartorius(split: str, options: dict, transforms=None) -> SartoriusDataset:
    root = options.get("data_path")
    if not root:
        raise DatasetError("sartorius: data_path (--data-path) is required: the folder with train.csv and train/")
    csv_path = options.get("train_csv") or os.path.join(root, "train.csv")
    image_dir = options.get("image_dir") or os.path.join(root, "train")
    skip_bad = as_bool(options.get("skip_bad"), False)
    index = read_index(csv_path, image_dir, drop_duplicates=as_bool(options.get("drop_duplicates"), True),
                       skip_bad=skip_bad, check_images=as_bool(options.get("check_images"), True))
    num_folds = int(options.get("num_folds") if options.get("num_folds") is not None else 5)
    positions = split_positions(index, split, num_folds, int(options.get("fold") or 0),
                                int(options.get("fold_seed") or 0))
    fill = as_bool(options.get("fill_holes"), True) and split == "train"
    return SartoriusDataset(index, positions, transforms, fill_holes=fill, skip_bad=skip_bad)
