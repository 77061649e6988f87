"""Built-in synthetic cell images: procedurally generated, deterministic by seed, no download.

Each image is a grayscale phase-contrast-like field with blob-shaped "cells" of two kinds:
class 1 ``round`` (near-circular, bright) and class 2 ``elongated`` (rod-like, dimmer, with a
dark rim). Cells vary in size, shape, brightness and noise. Like cells in culture they touch and
press against each other but rarely pile up: a cell may cover only a small part of itself with
cells already drawn (later cells are drawn on top, so instance masks never overlap). Every
``dense_every``-th image is crowded with several hundred small cells so the dense case is
exercised everywhere.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from datasets.registry import register_dataset
from datasets.splits import fold_positions
from datasets.targets import coco_annotation, coco_ground_truth
from utils.box_masks import box_masks_to_coco_rle
from utils.label_images import label_image_to_box_masks, label_image_to_instances

CLASS_NAMES = ["round", "elongated"]


@dataclass(frozen=True)
class SyntheticSpec:
    num_images: int = 64
    height: int = 256
    width: int = 256
    seed: int = 0
    split: str = "train"
    dense_every: int = 8        # every k-th image is dense (several hundred cells)
    min_visible_px: int = 12    # an occluded cell with less visible area than this is dropped
    max_overlap: float = 0.15   # a new cell may cover at most this fraction of itself with others
    placement_tries: int = 8    # positions tried per cell before it is left out


def _image_seed(spec: SyntheticSpec, index: int) -> int:
    # crc32 of split+seed keeps train and val disjoint and stable across Python runs.
    return zlib.crc32(f"{spec.split}:{spec.seed}:{index}".encode()) & 0x7FFFFFFF


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, aspect: float,
                  angle: float, wobble: float) -> np.ndarray:
    """Closed polygon of a wobbly ellipse: radial harmonics on top of an ellipse."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += wobble * rng.uniform(-1, 1) / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    ax, ay = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    x, y = ax * r * np.cos(t), ay * r * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    px, py = cx + ca * x - sa * y, cy + sa * x + ca * y
    return np.round(np.stack([px, py], axis=1) * 16).astype(np.int32)  # 4 fractional bits


def render_image(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of ``spec`` → (image H×W uint8, label image H×W int32, labels K int64).

    ``labels[k-1]`` is the class id (1-based) of instance ``k`` in the label image.
    """
    rng = np.random.default_rng(_image_seed(spec, index))
    h, w = spec.height, spec.width
    dense = spec.dense_every > 0 and index % spec.dense_every == spec.dense_every - 1
    n = int(rng.integers(250, 400)) if dense else int(rng.integers(4, 40))
    scale = np.sqrt(h * w / 256.0 ** 2)
    label_image = np.zeros((h, w), dtype=np.int32)
    intensity = np.zeros((h, w), dtype=np.float32)
    classes = []
    for k in range(1, n + 1):
        cls = 1 if rng.random() < 0.6 else 2
        radius = (rng.uniform(4.5, 7.0) if dense else rng.uniform(6.0, 16.0)) * scale
        aspect = rng.uniform(1.0, 1.4) if cls == 1 else rng.uniform(1.6, 2.4)
        angle, wobble = rng.uniform(0, np.pi), rng.uniform(0.05, 0.25)
        # Cells in culture touch and press against each other but rarely pile up: a cell is
        # re-placed (a few tries, then dropped) while it would cover more than max_overlap of
        # itself with cells already drawn. Touching stays common, slivers of buried cells rare.
        for _ in range(spec.placement_tries):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            cell = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(cell, [_blob_polygon(rng, cx, cy, radius, aspect, angle, wobble)], 1,
                         lineType=cv2.LINE_8, shift=4)
            inside = cell.astype(bool)
            area = int(inside.sum())
            if area and np.count_nonzero(label_image[inside]) <= spec.max_overlap * area:
                break
        else:
            continue
        label_image[inside] = k
        brightness = rng.uniform(0.55, 0.95) if cls == 1 else rng.uniform(0.3, 0.55)
        intensity[inside] = brightness
        classes.append((k, cls))
        # A darker rim, as the halo of phase contrast: touching cells stay separable. Class 2's
        # rim is darker, a cue for the class beyond shape and brightness.
        rim = inside & ~cv2.erode(cell, np.ones((3, 3), np.uint8)).astype(bool)
        intensity[rim] = brightness * (0.75 if cls == 1 else 0.5)
    # Keep instances whose visible part is large enough, relabel 1..K in drawing order.
    visible = np.bincount(label_image.ravel(), minlength=n + 1)
    remap = np.zeros(n + 1, dtype=np.int32)
    labels = []
    for k, cls in classes:
        if visible[k] >= spec.min_visible_px:
            labels.append(cls)
            remap[k] = len(labels)
    label_image = remap[label_image]
    intensity[label_image == 0] = 0.0

    # Background: a smooth illumination gradient, then blur and sensor noise.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-0.1, 0.1, size=2)
    background = 0.15 + gx * xx / w + gy * yy / h
    image = np.where(label_image > 0, intensity, background)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=rng.uniform(0.5, 1.0))
    image = image + rng.normal(0, rng.uniform(0.01, 0.05), size=image.shape).astype(np.float32)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, label_image, np.asarray(labels, dtype=np.int64)


class SyntheticCells(torch.utils.data.Dataset):
    """The built-in dataset. Images are rendered on first use and cached (a 256² image is 64 KB)."""

    def __init__(self, spec: SyntheticSpec, transforms=None, positions: list[int] | None = None):
        self.spec = spec
        self.transforms = transforms
        self.class_names = list(CLASS_NAMES)
        # Image i renders image positions[i] of the spec (a fold's subset); its id is that position.
        self.positions = list(positions) if positions is not None else list(range(spec.num_images))
        self.image_ids = list(self.positions)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def get_image_size(self, index: int) -> tuple[int, int]:
        return self.spec.height, self.spec.width

    def _render(self, index: int):
        p = self.positions[index]
        if p not in self._cache:
            self._cache[p] = render_image(self.spec, p)
        return self._cache[p]

    def __getitem__(self, index: int):
        image, label_image, labels = self._render(index)
        masks, _, boxes, areas = label_image_to_instances(label_image, return_boxes=True)  # values 1..K
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
            "image_id": self.image_ids[index],
            "area": torch.from_numpy(areas.astype(np.float32)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self) -> dict:
        """COCO-format ground truth of this split (compressed RLE masks, xywh boxes)."""
        return coco_ground_truth((self._image_gt(index) for index in range(len(self))), self.class_names)

    def _image_gt(self, index: int) -> tuple[dict, list[dict]]:
        _, label_image, labels = self._render(index)
        masks, _ = label_image_to_box_masks(label_image)   # instance k is label value k
        image = {"id": self.image_ids[index], "height": self.spec.height, "width": self.spec.width,
                 "file_name": f"synthetic_{self.spec.split}_{self.positions[index]:05d}.png"}
        return image, [coco_annotation(int(label), rle, box.tolist(), float(area)) for rle, box, label, area
                       in zip(box_masks_to_coco_rle(masks), masks.tight_boxes(), labels, masks.areas().tolist())]


# Small cells in small images: no resizing, small anchors, room for hundreds of detections;
# a small model and a short cosine schedule so `python train.py` finishes in minutes on a CPU.
# Why these values: docs/benchmarks.md has the runs that chose them.
SYNTHETIC_DEFAULTS = {
    "model": "maskrcnn_resnet18_fpn",
    # From scratch and only ~220 steps: AdamW gets there much sooner than SGD (segm AP 0.47 with
    # SGD lr 0.04 vs 0.56 with AdamW lr 0.002, 14 epochs each).
    "epochs": 12, "batch_size": 4, "opt": "adamw", "lr": 0.002, "weight_decay": 0.05,
    # ...and at most 4½ minutes of wall time, evaluation included: 12 epochs take 2½–3½ minutes
    # on a recent 2-core CPU, but a step costs 2-3× as much on AVX2-only cores, where the budget
    # shortens the schedule instead of the wait (docs/benchmarks.md). --epochs or --max-time
    # replaces both.
    "max_time": 270.0,
    "lr_scheduler": "cosine", "warmup_iters": 20, "clip_grad_norm": 10.0,
    "eval_every": 0, "print_freq": 4,  # one evaluation, at the end: the time goes to training
    # No norm in the FPN and mask head (R18's default is BatchNorm, which real data needs): on
    # these cells, after 192 steps, segm AP 0.537 with it and 0.482 with AVX2 kernels instead of
    # AVX-512, against 0.551 and 0.545 without it.
    "head_norm": "none",
    # 64 sampled RoIs instead of 512 (and RPN top-k 1000 in training) cut the CPU step by ~3×:
    # at 512, torchvision's single-threaded RoIAlign backward dominated it.
    "box_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 1000,
    "input_scale": 1.0,   # native pixels: the cells below are sized for them
    # Predicted at 1.25×: the test-scale search chose it in every quick start measured (e.g.
    # segm AP 0.624 / 0.699 / 0.679 at 1 / 1.25 / 1.5; fp32, AVX2 kernels and 94-176-step runs
    # alike). Fixed here, the quick start spends the search's 20-30 s and its time-budget
    # reserve on training: with AVX2 kernels and 190 s, 106 steps and segm AP 0.561 instead of
    # 94 steps and 0.529 in 206 s with the search (docs/benchmarks.md).
    "input_scale_test": 1.25,
    # Cells are 9-14 px across in the dense images and 12-50 px elsewhere: with 12 px anchors at
    # stride 4 a third of the dense cells have an anchor of IoU ≥ 0.7 (8 px anchors: 6 %).
    "anchor_sizes": (12, 24, 48, 96, 192),
    "detections_per_img": 500,
    "rpn_pre_nms_top_n_test": 2000, "rpn_post_nms_top_n_test": 2000,
}


@register_dataset("synthetic", defaults=SYNTHETIC_DEFAULTS,
                  options={"synthetic_size": int, "synthetic_train_images": int, "synthetic_val_images": int,
                           "synthetic_seed": int, "num_folds": int, "fold": int, "fold_seed": int})
def build_synthetic(split: str, options: dict, transforms=None) -> SyntheticCells:
    """Options: synthetic_{train,val}_images, synthetic_size, synthetic_seed; with ``num_folds`` ≥ 2
    both splits are folds (``fold`` is "val", ``fold_seed`` deals them) of the training images."""
    size = int(options.get("synthetic_size") or 256)
    num_folds = int(options.get("num_folds") or 0)
    source = "train" if num_folds else split
    count = options.get(f"synthetic_{source}_images") or (64 if source == "train" else 16)
    spec = SyntheticSpec(num_images=int(count), height=size, width=size,
                         seed=int(options.get("synthetic_seed") or 0), split=source)
    positions = None
    if num_folds:
        positions = fold_positions(spec.num_images, split, num_folds, int(options.get("fold") or 0),
                                   int(options.get("fold_seed") or 0))
    return SyntheticCells(spec, transforms, positions)
