"""COCO-format instance segmentation: COCO 2017, LIVECell and any other COCO JSON.

Layout under ``data_path`` (COCO 2017): ``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``. Other data (e.g. LIVECell) passes the JSON and
image folder of each split explicitly. Handled: polygons, compressed and uncompressed RLE,
``iscrowd`` (out of training targets, kept in ``coco_gt()``), images without annotations,
degenerate boxes (dropped from targets and counted), string or int image ids, ``annotations``
stored as a list or a dict keyed by id (a LIVECell mirror's quirk), categories of any ids
remapped to contiguous 1..C in id order with their names kept.

Option keys (``build_dataset("coco", split, options)``):
  data_path      COCO root (for the default layout; optional when both paths below are given)
  train_ann      training JSON; default ``<data_path>/annotations/instances_train2017.json``
  val_ann        validation JSON; default ``<data_path>/annotations/instances_val2017.json``
  train_images   training image folder; default ``<data_path>/train2017``
  val_images     validation image folder; default ``<data_path>/val2017``
  keep_empty     keep training images with no usable annotation as negatives; default False
                 (the val split always keeps every image, as COCO evaluation does)
  skip_bad       skip and count bad annotations/images instead of stopping; default False
  num_folds      k-fold split of the training JSON (k ≥ 2; cross-validation): "train" and "val"
                 both come from train_ann/train_images, "val" being fold ``fold``; default 0 (off)
  fold           which fold is "val"; default 0
  fold_seed      seed of the fold assignment; default 0
  fold_group     an image field (e.g. ``sample_id``) whose images always share a fold; default
                 none (every image on its own)
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from datasets.errors import BadInputLog, DatasetError, as_bool, load_sample
from datasets.imageio import read_image, read_image_size
from datasets.registry import register_dataset
from datasets.splits import fold_positions
from datasets.targets import coco_ground_truth, make_target
from metrics.validation import annotations_as_list
from utils.coco_rle import coco_rles_to_masks, segmentation_to_rle
from utils.io import load_json


class CocoDataset(torch.utils.data.Dataset):
    """One COCO JSON + image folder; samples follow docs/architecture.md."""

    def __init__(self, ann_path: str, image_dir: str, transforms=None, keep_empty: bool = False,
                 skip_bad: bool = False, fold_group: str | None = None):
        self.ann_path = ann_path
        self.image_dir = image_dir
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.log = BadInputLog()
        data = load_json(ann_path, "annotation", DatasetError)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{ann_path}: no {key!r} key; is this a COCO instances file?")
        self._read_categories(data["categories"])
        self._read_images(data["images"], fold_group)
        self._read_annotations(data["annotations"])
        # Training uses images with at least one usable (non-crowd, non-degenerate) instance.
        self.positions = [p for p in range(len(self._images))
                          if keep_empty or any(not a["iscrowd"] and a["valid"] for a in self._anns[p])]
        self.log.count("images without usable annotations left out", len(self._images) - len(self.positions))
        self.image_ids = [self._images[p]["id"] for p in self.positions]
        self._coco_gt: dict | None = None

    # -- index ---------------------------------------------------------------------------------
    def _read_categories(self, categories: list) -> None:
        ids = [c.get("id") for c in categories]
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
            raise DatasetError(f"{self.ann_path}: category ids must be unique integers, got {ids}")
        ordered = sorted(categories, key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in ordered]          # contiguous id k+1 → original id
        self.class_names = [str(c.get("name", c["id"])) for c in ordered]
        self._contiguous = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        if not ordered:
            raise DatasetError(f"{self.ann_path}: no categories")

    def _read_images(self, images: list, fold_group: str | None = None) -> None:
        raw_ids = [im.get("id") for im in images]
        if len(set(map(repr, raw_ids))) != len(raw_ids):
            raise DatasetError(f"{self.ann_path}: duplicate image ids")
        # Integer ids are kept so results match the original file; other ids become 1..N.
        keep_ids = all(isinstance(i, int) and not isinstance(i, bool) for i in raw_ids)
        self._images: list[dict] = []
        self._position_of: dict = {}
        for n, im in enumerate(images):
            where = f"{self.ann_path}: image {im.get('id')!r}"
            if "file_name" not in im:
                self.log.skip(where, "no file_name", self.skip_bad)
                continue
            path = os.path.join(self.image_dir, im["file_name"])
            height, width = im.get("height"), im.get("width")
            if not (isinstance(height, int) and isinstance(width, int)):
                try:
                    height, width = read_image_size(path)
                except DatasetError as e:
                    self.log.skip_error(e, self.skip_bad)
                    continue
            entry = {"id": im["id"] if keep_ids else n + 1, "file_name": im["file_name"],
                     "height": height, "width": width}
            if not keep_ids:
                entry["original_id"] = im["id"]
            if fold_group:
                if fold_group not in im:
                    raise DatasetError(f"{where}: no {fold_group!r} field to group folds by (fold_group)")
                entry[fold_group] = im[fold_group]
            self._position_of[im["id"]] = len(self._images)
            self._images.append(entry)

    def _read_annotations(self, annotations) -> None:
        annotations = annotations_as_list(annotations)
        self._anns: list[list[dict]] = [[] for _ in self._images]
        degenerate = 0
        for n, a in enumerate(annotations):
            where = f"{self.ann_path}: annotation {a.get('id', f'#{n}')!r}"
            p = self._position_of.get(a.get("image_id"))
            if p is None:
                self.log.skip(where, f"unknown or skipped image_id {a.get('image_id')!r}", self.skip_bad)
                continue
            if a.get("category_id") not in self._contiguous:
                self.log.skip(where, f"unknown category_id {a.get('category_id')!r}", self.skip_bad)
                continue
            if "segmentation" not in a:
                self.log.skip(where, "no segmentation", self.skip_bad)
                continue
            im = self._images[p]
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                self.log.skip(where, f"bbox must be [x, y, w, h], got {bbox!r}", self.skip_bad)
                continue
            x, y, w, h = (float(v) for v in bbox)
            box = [max(x, 0.0), max(y, 0.0), min(x + w, im["width"]), min(y + h, im["height"])]
            valid = box[2] > box[0] and box[3] > box[1]   # torchvision rejects the rest
            iscrowd = int(a.get("iscrowd", 0))
            degenerate += (not valid) and not iscrowd
            self._anns[p].append({"id": a.get("id"), "category_id": self._contiguous[a["category_id"]],
                                  "segmentation": a["segmentation"], "bbox": [x, y, w, h], "box": box,
                                  "area": float(a.get("area", w * h)), "iscrowd": iscrowd, "valid": valid})
        self.log.count("degenerate boxes dropped from targets", degenerate)

    def keep_only(self, positions: list[int]) -> None:
        """Restrict the dataset to these positions of the JSON's (readable) images, e.g. one fold."""
        allowed = set(positions)
        self.positions = [p for p in self.positions if p in allowed]
        self.image_ids = [self._images[p]["id"] for p in self.positions]
        self._coco_gt = None

    @property
    def num_images_read(self) -> int:
        """Images of the JSON that were read (before leaving out empty or other folds' images)."""
        return len(self._images)

    def image_field(self, position: int, key: str):
        return self._images[position][key]

    # -- dataset API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.positions)

    def get_image_size(self, i: int) -> tuple[int, int]:
        im = self._images[self.positions[i]]
        return im["height"], im["width"]

    def image_path(self, i: int) -> str:
        return os.path.join(self.image_dir, self._images[self.positions[i]]["file_name"])

    def load(self, i: int) -> tuple[np.ndarray, dict]:
        """Image as stored and target (non-crowd, non-degenerate instances) before transforms."""
        im = self._images[self.positions[i]]
        path = self.image_path(i)
        image = read_image(path, expected_size=(im["height"], im["width"]))
        rles, labels, boxes, areas = [], [], [], []
        for a in self._anns[self.positions[i]]:
            if a["iscrowd"] or not a["valid"]:
                continue
            try:
                rles.append(segmentation_to_rle(a["segmentation"], im["height"], im["width"]))
            except (ValueError, TypeError) as e:
                message = f"{self.ann_path}: annotation {a['id']!r} of {path}: bad segmentation: {e}"
                if not self.skip_bad:
                    raise DatasetError(message) from None
                self.log.skipped.append(message)
                continue
            labels.append(a["category_id"])
            boxes.append(a["box"])
            areas.append(a["area"])
        masks = coco_rles_to_masks(rles, im["height"], im["width"])
        return image, make_target(masks, np.asarray(labels), np.asarray(boxes), im["id"], area=np.asarray(areas))

    def __getitem__(self, i: int):
        return load_sample(self, i)

    def coco_gt(self) -> dict:
        """COCO ground truth of the kept images, all their annotations (crowd and degenerate
        included, as the official evaluation has them), categories renumbered 1..C. Cached."""
        if self._coco_gt is None:
            keys = ("category_id", "segmentation", "area", "bbox", "iscrowd")
            self._coco_gt = coco_ground_truth(
                ((dict(self._images[p]), ({k: a[k] for k in keys} for a in self._anns[p])) for p in self.positions),
                self.class_names)
        return self._coco_gt


def coco_paths(split: str, options: dict) -> tuple[str, str]:
    """(annotation JSON, image folder) of ``split`` from explicit options or the COCO 2017 layout."""
    root = options.get("data_path")
    ann = options.get(f"{split}_ann")
    images = options.get(f"{split}_images")
    if (not ann or not images) and not root:
        raise DatasetError(f"coco: give data_path (--data-path) for the COCO 2017 layout, or both "
                           f"{split}_ann and {split}_images")
    ann = ann or os.path.join(root, "annotations", f"instances_{split}2017.json")
    images = images or os.path.join(root, f"{split}2017")
    return ann, images


# torchvision's Mask R-CNN defaults, stated so that `--dataset coco` never inherits cell settings.
COCO_DEFAULTS = {
    "model": "maskrcnn_resnet50_fpn",
    "min_size": 800, "max_size": 1333,
    "anchor_sizes": (32, 64, 128, 256, 512),
    "detections_per_img": 100,
    "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000,
}


# Cells and other own data in COCO format: sizes and caps from its annotations, microscopy
# training settings (the folder format's; see datasets/folder.py).
OWN_COCO_DEFAULTS = {"data_augmentation": "cells", "opt": "adamw", "lr": 0.002, "lr_scheduler": "cosine",
                     "box_batch_size_per_image": 128}


def coco_defaults(options: dict) -> dict:
    """COCO 2017 (``data_path`` layout) follows torchvision's recipe; annotation files given
    explicitly are a user's own data, whose sizes come from its annotations."""
    own = options.get("train_ann") and not options.get("data_path")
    return dict(OWN_COCO_DEFAULTS if own else COCO_DEFAULTS)


COCO_OPTIONS = {"data_path": str, "train_ann": str, "val_ann": str, "train_images": str, "val_images": str,
                "keep_empty": bool, "skip_bad": bool, "num_folds": int, "fold": int, "fold_seed": int,
                "fold_group": str}


@register_dataset("coco", defaults=coco_defaults, options=COCO_OPTIONS)
def build_coco(split: str, options: dict, transforms=None) -> CocoDataset:
    num_folds = int(options.get("num_folds") or 0)
    # k-fold: both splits are parts of the training JSON; the val split keeps empty images, as always.
    ann, images = coco_paths("train" if num_folds else split, options)
    keep_empty = split == "val" or as_bool(options.get("keep_empty"), False)
    group = options.get("fold_group") or None
    dataset = CocoDataset(ann, images, transforms, keep_empty=keep_empty,
                          skip_bad=as_bool(options.get("skip_bad"), False), fold_group=group if num_folds else None)
    if num_folds:
        n = dataset.num_images_read
        groups = [json.dumps(dataset.image_field(p, group), sort_keys=True, default=str) for p in range(n)] if group else None
        try:
            positions = fold_positions(n, split, num_folds, int(options.get("fold") or 0),
                                       int(options.get("fold_seed") or 0), groups)
        except DatasetError as exc:
            raise DatasetError(f"{ann}: {exc}") from None
        dataset.keep_only(positions)
    return dataset


# LIVECell (Edlund et al. 2021) is COCO-format: 520×704 phase-contrast images with up to
# thousands of small cells, evaluated at maxDets up to 2000; same loader, cell-sized defaults.
LIVECELL_DEFAULTS = {
    "min_size": 520, "max_size": 704,
    "anchor_sizes": (8, 16, 32, 64, 128),
    "detections_per_img": 2000,
    "rpn_pre_nms_top_n_train": 4000, "rpn_post_nms_top_n_train": 3000,
    "rpn_pre_nms_top_n_test": 6000, "rpn_post_nms_top_n_test": 4000,
    "data_augmentation": "cells",
}


@register_dataset("livecell", defaults=LIVECELL_DEFAULTS, options=COCO_OPTIONS)
def build_livecell(split: str, options: dict, transforms=None) -> CocoDataset:
    """LIVECell: give ``train_ann``/``val_ann`` and ``train_images``/``val_images`` explicitly."""
    return build_coco(split, options, transforms)
