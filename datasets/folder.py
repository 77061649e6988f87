"""Images with instance masks in folders (cellpose/stardist and DSB-2018/MoNuSeg layouts).

Two layouts under ``data_path``, detected automatically:
  label images    ``images/NAME.(png|tif|tiff|jpg)`` + ``masks/NAME.(png|tif|tiff)`` (or
                  ``masks/NAME_masks.*``, cellpose's naming): 0 is background, every other value
                  one instance; 8-, 16- or 32-bit.
  one file each   ``ID/images/ID.png`` + ``ID/masks/*.png``: one binary mask per instance
                  (DSB-2018, MoNuSeg exports); any non-zero pixel belongs to the instance.
All instances get one class (``class_name``).

Option keys (``build_dataset("folder", split, options)``):
  data_path     root folder (required)
  val_path      a second root (either layout) used as the val split; "train" then uses all
                of data_path
  val_fraction  without val_path: fraction of data_path's images held out as "val"; default 0.2
  split_seed    seed of that random hold-out; default 0
  num_folds     k-fold split of data_path instead of val_fraction (k ≥ 2; cross-validation);
                default 0 (off)
  fold          which fold is "val"; default 0
  fold_seed     seed of the fold assignment; default 0
  class_name    name of the single class; default "cell"
  skip_bad      skip and count images whose files are missing/unreadable; default False
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from datasets.errors import BadInputLog, DatasetError, as_bool, load_sample
from datasets.imageio import read_image, read_image_size, read_label_image
from datasets.registry import register_dataset
from datasets.splits import fold_positions, random_split
from datasets.targets import coco_annotation, coco_ground_truth, make_target
from utils.box_masks import box_masks_to_coco_rle, masks_to_boxes
from utils.coco_rle import encode_coco_rle
from utils.image_files import IMAGE_EXTENSIONS
from utils.label_images import label_image_to_box_masks, label_image_to_instances

MASK_SUFFIXES = ("", "_masks", "_mask", "_label", "_labels")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderItem:
    name: str                 # image stem (label layout) or sample ID (one-file-each layout)
    image_path: str
    mask_paths: tuple[str, ...]
    label_image: bool         # True: one label image; False: one binary file per instance
    size: tuple[int, int]     # (height, width) from the image header
    root: str = ""            # the folder scanned; COCO file names are relative to it


def _files_with_ext(folder: str, extensions) -> list[str]:
    return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in extensions
                  and not f.startswith("."))


def scan_folder(root: str, skip_bad: bool = False, log: BadInputLog | None = None) -> list[FolderItem]:
    """Index ``root`` (either layout) → items sorted by name; checks files exist and headers read."""
    log = log if log is not None else BadInputLog()
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder")
    items: list[FolderItem] = []
    image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    if os.path.isdir(image_dir) and os.path.isdir(mask_dir):
        masks_by_stem = {os.path.splitext(f)[0]: os.path.join(mask_dir, f)
                         for f in _files_with_ext(mask_dir, MASK_EXTENSIONS)}
        for f in _files_with_ext(image_dir, IMAGE_EXTENSIONS):
            stem = os.path.splitext(f)[0]
            mask = next((masks_by_stem[stem + s] for s in MASK_SUFFIXES if stem + s in masks_by_stem), None)
            path = os.path.join(image_dir, f)
            if mask is None:
                log.skip(path, f"no label image masks/{stem}.(png|tif) for it", skip_bad)
                continue
            _add(items, log, skip_bad, stem, path, (mask,), True)
    else:
        for sample in sorted(os.listdir(root)):
            sample_dir = os.path.join(root, sample)
            if not os.path.isdir(os.path.join(sample_dir, "images")):
                continue
            images = _files_with_ext(os.path.join(sample_dir, "images"), IMAGE_EXTENSIONS)
            if len(images) != 1:
                log.skip(os.path.join(sample_dir, "images"), f"expected one image, found {len(images)}", skip_bad)
                continue
            masks_dir = os.path.join(sample_dir, "masks")
            masks = (tuple(os.path.join(masks_dir, f) for f in _files_with_ext(masks_dir, MASK_EXTENSIONS))
                     if os.path.isdir(masks_dir) else ())
            _add(items, log, skip_bad, sample, os.path.join(sample_dir, "images", images[0]), masks, False)
    if not items and not log.skipped:
        if os.path.isdir(image_dir):
            raise DatasetError(f"{root}: has images/ but no masks/ folder: put one label image per image in "
                               f"{mask_dir} (same name, 0 background, 1..N one object each)")
        raise DatasetError(f"{root}: found neither images/ + masks/ nor ID/images/ID.png + ID/masks/*.png")
    return items


def _add(items, log, skip_bad, name, image_path, mask_paths, label_image) -> None:
    try:
        size = read_image_size(image_path)
    except DatasetError as e:
        log.skip_error(e, skip_bad)
        return
    root = os.path.dirname(os.path.dirname(image_path))
    if not label_image:
        root = os.path.dirname(root)
    items.append(FolderItem(name, image_path, tuple(mask_paths), label_image, size, root))


def load_instances(item: FolderItem, with_boxes: bool = False):
    """Instance masks ``N×H×W`` uint8 of ``item`` (empty ones removed), checked against its size;
    ``with_boxes``: ``(masks, boxes, areas)``, the boxes tight xyxy."""
    if item.label_image:
        label = read_label_image(item.mask_paths[0])
        _check_size(item, item.mask_paths[0], label.shape)
        masks, _, boxes, areas = label_image_to_instances(label, return_boxes=True)
        return (masks, boxes, areas) if with_boxes else masks
    h, w = item.size
    masks = np.zeros((len(item.mask_paths), h, w), dtype=np.uint8)
    for k, path in enumerate(item.mask_paths):
        m = read_label_image(path)
        _check_size(item, path, m.shape)
        masks[k] = m != 0
    nonempty = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, dtype=bool)
    masks = masks[nonempty] if not nonempty.all() else masks
    return (masks, masks_to_boxes(masks), None) if with_boxes else masks


def instance_annotations(item: FolderItem) -> list[tuple[dict, np.ndarray, float]]:
    """(COCO RLE, xyxy box, area) per instance of ``item``, in ``load_instances`` order.

    A label image is encoded box by box (its 1,800 nuclei never become full-size masks: 3 s
    → 0.1 s per 1000² image); one-file-per-instance masks go through the dense path.
    """
    if not item.label_image:
        masks = load_instances(item)
        return [(rle, box, float(mask.sum()))
                for rle, box, mask in zip(encode_coco_rle(masks), masks_to_boxes(masks), masks)]
    label = read_label_image(item.mask_paths[0])
    _check_size(item, item.mask_paths[0], label.shape)
    masks, _ = label_image_to_box_masks(label)
    return list(zip(box_masks_to_coco_rle(masks), masks.tight_boxes(), masks.areas().astype(float).tolist()))


def _check_size(item: FolderItem, path: str, shape) -> None:
    if tuple(shape[:2]) != item.size:
        raise DatasetError(f"{path}: mask is {shape[0]}×{shape[1]}, image {item.image_path} is "
                           f"{item.size[0]}×{item.size[1]}")


class FolderDataset(torch.utils.data.Dataset):
    """A list of ``FolderItem``; samples follow docs/architecture.md (labels all 1)."""

    def __init__(self, items: list[FolderItem], transforms=None, class_name: str = "cell",
                 log: BadInputLog | None = None, image_ids: list[int] | None = None):
        self.items = list(items)
        self.transforms = transforms
        self.class_names = [class_name]
        # Folds pass the 1-based positions in the whole folder: ids then agree across folds.
        self.image_ids = list(image_ids) if image_ids is not None else list(range(1, len(self.items) + 1))
        self.names = [it.name for it in self.items]
        self.log = log or BadInputLog()
        self._coco_gt: dict | None = None

    def __len__(self) -> int:
        return len(self.items)

    def get_image_size(self, i: int) -> tuple[int, int]:
        return self.items[i].size

    def image_path(self, i: int) -> str:
        return self.items[i].image_path

    def load(self, i: int) -> tuple[np.ndarray, dict]:
        item = self.items[i]
        image = read_image(item.image_path, expected_size=item.size)
        masks, boxes, areas = load_instances(item, with_boxes=True)
        return image, make_target(masks, np.ones(len(masks), dtype=np.int64), boxes, self.image_ids[i], areas)

    def __getitem__(self, i: int):
        return load_sample(self, i)

    def coco_gt(self) -> dict:
        """COCO ground truth (compressed RLE). The annotations here are mask files, so this
        reads them — but not the images. Cached."""
        if self._coco_gt is None:
            self._coco_gt = coco_ground_truth((self._image_gt(i) for i in range(len(self.items))), self.class_names)
        return self._coco_gt

    def _image_gt(self, i: int) -> tuple[dict, list[dict]]:
        item = self.items[i]
        h, w = item.size
        image = {"id": self.image_ids[i], "file_name": os.path.relpath(item.image_path, item.root), "height": h, "width": w}
        return image, [coco_annotation(1, rle, box.tolist(), area) for rle, box, area in instance_annotations(item)]


# A scientist's own images: input scale, anchors and detection caps come from the data's object
# sizes and counts (datasets/statistics.py); training settings that work from scratch on a few
# images within minutes (docs/benchmarks.md, MoNuSeg): random crops at one scale with flips,
# rotations and intensity jitter; AdamW with a cosine curve; 128 sampled RoIs per image.
FOLDER_DEFAULTS = {
    "data_augmentation": "cells",
    "opt": "adamw", "lr": 0.002, "lr_scheduler": "cosine",   # 0.002: MoNuSeg AP 0.171 vs 0.151 at 0.001 (8 min)
    "box_batch_size_per_image": 128,
}


@register_dataset("folder", defaults=FOLDER_DEFAULTS,
                  options={"data_path": str, "val_path": str, "val_fraction": float, "split_seed": int,
                           "class_name": str, "skip_bad": bool, "num_folds": int, "fold": int, "fold_seed": int})
def build_folder(split: str, options: dict, transforms=None) -> FolderDataset:
    root = options.get("data_path")
    if not root:
        raise DatasetError("folder: data_path (--data-path) is required")
    skip_bad = as_bool(options.get("skip_bad"), False)
    class_name = options.get("class_name") or "cell"
    log = BadInputLog()
    val_path = options.get("val_path")
    num_folds = int(options.get("num_folds") or 0)
    if num_folds and val_path:
        raise DatasetError("folder: give num_folds (k-fold split of data_path) or val_path, not both")
    if num_folds:
        items = scan_folder(root, skip_bad, log)
        positions = fold_positions(len(items), split, num_folds, int(options.get("fold") or 0),
                                   int(options.get("fold_seed") or 0))
        return FolderDataset([items[p] for p in positions], transforms, class_name, log, [p + 1 for p in positions])
    if val_path:
        items = scan_folder(val_path if split == "val" else root, skip_bad, log)
    else:
        items = scan_folder(root, skip_bad, log)
        fraction = float(options.get("val_fraction") if options.get("val_fraction") is not None else 0.2)
        is_val = random_split(len(items), fraction, int(options.get("split_seed") or 0))
        if split == "val" and not is_val.any():
            raise DatasetError(f"folder: no val images (val_fraction={fraction}, {len(items)} images); "
                               "set val_fraction > 0 or val_path")
        items = [it for it, v in zip(items, is_val) if v == (split == "val")]
    return FolderDataset(items, transforms, class_name, log)
