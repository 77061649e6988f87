"""Paired image/target transforms. Each takes and returns ``(image, target)``.

Datasets hand over the image as a numpy array (H×W or H×W×C, as stored) and the target as
tensors; ``ToFloatImage`` (always first in a preset) applies the preprocessing contract
(``transforms.preprocess``) to make a float32 ``3×H×W`` tensor in [0, 1], so every later
transform works on tensors only.

Targets keep the contract of docs/architecture.md through every transform: ``masks`` uint8
``N×H×W`` matching the image size, ``boxes`` float32 ``N×4`` xyxy (exclusive max edge),
``labels``/``area``/``iscrowd`` of length ``N``. Flips and rotations move boxes exactly;
crops and resizes recompute boxes and areas from the masks and drop instances left empty.
Randomness comes from torch's global generator only, which the training loader seeds per
(seed, epoch, index), so augmentation is reproducible and worker-count independent.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from transforms.preprocess import Preprocessing, to_model_input
from utils.arrays import lazy_zeros, nearest_source_index
from utils.box_masks import tight_box

# Target entries with one row per instance; transforms that drop instances index all of them.
INSTANCE_KEYS = ("boxes", "labels", "masks", "area", "iscrowd")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,)).item())


def select_instances(target: dict, keep: torch.Tensor) -> dict:
    """Copy of ``target`` with only the instances ``keep`` selects (bool ``N`` or int64 indices)."""
    target = dict(target)
    for key in INSTANCE_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


# Dense cell images carry hundreds of full-size masks (790 × 520 × 704 uint8 = 290 MB), so the
# geometric transforms below work per instance inside its box and write into a lazily zeroed
# array: pages no instance touches are never materialised, and no full-stack copy is made.
# They assume every mask lies inside its box grown by BOX_MARGIN pixels — true for the boxes
# the loaders here produce (tight from masks, or COCO boxes of rasterised polygons).
BOX_MARGIN = 1


def integer_boxes(boxes: torch.Tensor, h: int, w: int, margin: int = BOX_MARGIN) -> np.ndarray:
    """float xyxy boxes → int64 ``N×4`` pixel ranges grown by ``margin`` and clipped to the image."""
    b = boxes.detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
    out = np.empty(b.shape, dtype=np.int64)
    out[:, 0] = np.clip(np.floor(b[:, 0]) - margin, 0, w)
    out[:, 1] = np.clip(np.floor(b[:, 1]) - margin, 0, h)
    out[:, 2] = np.clip(np.ceil(b[:, 2]) + margin, 0, w)
    out[:, 3] = np.clip(np.ceil(b[:, 3]) + margin, 0, h)
    return out


def _region_box(region: np.ndarray, top: int, left: int) -> tuple[list[float], int]:
    """Tight xyxy box of a binary ``region`` placed at (top, left), and its pixel count."""
    return tight_box(region, top, left).tolist(), int(np.count_nonzero(region))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(t).__name__ for t in self.transforms)})"


class ToFloatImage:
    """numpy/tensor image → float32 ``3×H×W`` in [0, 1] by the preprocessing contract
    (``transforms.preprocess``): the same conversion at training, validation and prediction."""

    def __init__(self, contract: Preprocessing | None = None):
        self.contract = contract if contract is not None else Preprocessing()

    def __call__(self, image, target):
        return to_model_input(image, self.contract), target


def _flip_masks(masks: torch.Tensor, boxes: torch.Tensor, axis: int) -> torch.Tensor:
    """Flip masks ``N×H×W`` along ``axis`` (1: vertical, 2: horizontal), instance by instance."""
    n, h, w = masks.shape
    src = masks.numpy()
    dst = lazy_zeros(n, h, w)
    for k, (x0, y0, x1, y1) in enumerate(integer_boxes(boxes, h, w)):
        if axis == 2:
            dst[k, y0:y1, w - x1:w - x0] = src[k, y0:y1, x0:x1][:, ::-1]
        else:
            dst[k, h - y1:h - y0, x0:x1] = src[k, y0:y1, x0:x1][::-1]
    return torch.from_numpy(dst)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1).item() < self.p:
            image = image.flip(-1)
            width = image.shape[-1]
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["masks"] = _flip_masks(target["masks"], target["boxes"], axis=2)
            target["boxes"] = boxes
        return image, target


class RandomVerticalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1).item() < self.p:
            image = image.flip(-2)
            height = image.shape[-2]
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [1, 3]] = height - target["boxes"][:, [3, 1]]
            target["masks"] = _flip_masks(target["masks"], target["boxes"], axis=1)
            target["boxes"] = boxes
        return image, target


class RandomRot90:
    """Rotate by ``k × 90°`` counter-clockwise, ``k`` uniform in 0..3 (H and W swap for odd k)."""

    def __call__(self, image, target):
        k = _randint(0, 3)
        if k == 0:
            return image, target
        boxes = target["boxes"].clone()
        height, width = image.shape[-2:]
        for _ in range(k):
            # One CCW turn maps pixel (y, x) to (W-1-x, y): box (x0,y0,x1,y1) → (y0, W-x1, y1, W-x0).
            x0, y0, x1, y1 = boxes.unbind(1)
            boxes = torch.stack([y0, width - x1, y1, width - x0], dim=1)
            height, width = width, height
        masks = target["masks"]
        n, h, w = masks.shape
        src = masks.numpy()
        dst = lazy_zeros(n, height, width)
        for j, region_box in enumerate(integer_boxes(target["boxes"], h, w)):
            rx0, ry0, rx1, ry1 = region_box.tolist()
            ch, cw = h, w
            for _ in range(k):   # the integer region moves like the box
                rx0, ry0, rx1, ry1 = ry0, cw - rx1, ry1, cw - rx0
                ch, cw = cw, ch
            x0, y0, x1, y1 = region_box.tolist()
            dst[j, ry0:ry1, rx0:rx1] = np.rot90(src[j, y0:y1, x0:x1], k)
        target = dict(target)
        target["boxes"] = boxes
        target["masks"] = torch.from_numpy(dst)
        return torch.rot90(image, k, dims=(-2, -1)).contiguous(), target


class RandomScaleCrop:
    """Random scale, then a random crop of at most ``output_size``, optionally padded to it.

    ``scale`` is drawn from ``scale_range``; with ``relative_to="native"`` it multiplies the
    image's own size (cell data: native resolution ± jitter), with ``"output"`` it multiplies
    the factor that fits the image into ``output_size`` (large-scale jitter, as in
    torchvision's ScaleJitter + FixedSizeCrop). The crop window is chosen first and only that
    window is resized, so dense images never materialise upscaled full-size mask stacks.
    Instances partly inside the window are kept with their visible part; boxes and areas are
    recomputed from the masks and instances left empty are dropped. Masks are resampled
    nearest-exact, one instance box at a time.
    """

    def __init__(self, output_size, scale_range=(0.75, 1.5), relative_to: str = "native", pad: bool = False):
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.scale_range = tuple(scale_range)
        if relative_to not in ("native", "output"):
            raise ValueError(f"relative_to must be 'native' or 'output', got {relative_to!r}")
        self.relative_to = relative_to
        self.pad = pad

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        out_h, out_w = self.output_size
        r = _uniform(*self.scale_range)
        if self.relative_to == "output":
            r *= min(out_h / h, out_w / w)
        scaled_h, scaled_w = max(1, round(h * r)), max(1, round(w * r))
        crop_h, crop_w = min(out_h, scaled_h), min(out_w, scaled_w)
        top, left = _randint(0, scaled_h - crop_h), _randint(0, scaled_w - crop_w)
        # Window in original pixels; rounding may shift the effective scale by < 1 pixel.
        y0, x0 = min(int(top / r), h - 1), min(int(left / r), w - 1)
        y1, x1 = min(h, max(y0 + 1, round((top + crop_h) / r))), min(w, max(x0 + 1, round((left + crop_w) / r)))

        image = image[:, y0:y1, x0:x1]
        if (y1 - y0, x1 - x0) != (crop_h, crop_w):
            image = F.interpolate(image[None], size=(crop_h, crop_w), mode="bilinear", align_corners=False,
                                  antialias=r < 1)[0].clamp_(0, 1)
        # Source pixel of each output row/column: nearest-exact, the same pixel-centre
        # convention as the bilinear image resize above.
        ys = y0 + nearest_source_index(crop_h, y1 - y0)
        xs = x0 + nearest_source_index(crop_w, x1 - x0)
        masks = target["masks"].numpy()
        kept, regions, boxes, areas = [], [], [], []
        for k, (bx0, by0, bx1, by1) in enumerate(integer_boxes(target["boxes"], h, w)):
            oy0, oy1 = np.searchsorted(ys, [by0, by1])
            ox0, ox1 = np.searchsorted(xs, [bx0, bx1])
            if oy1 <= oy0 or ox1 <= ox0:
                continue
            region = masks[k][np.ix_(ys[oy0:oy1], xs[ox0:ox1])]
            box, area = _region_box(region, int(oy0), int(ox0))
            if area:
                kept.append(k)
                regions.append((region, oy0, oy1, ox0, ox1))
                boxes.append(box)
                areas.append(area)
        out_h, out_w = (out_h, out_w) if self.pad else (crop_h, crop_w)
        if self.pad and (crop_h, crop_w) != (out_h, out_w):
            image = F.pad(image, (0, out_w - crop_w, 0, out_h - crop_h))
        dst = lazy_zeros(len(kept), out_h, out_w)
        for j, (region, oy0, oy1, ox0, ox1) in enumerate(regions):
            dst[j, oy0:oy1, ox0:ox1] = region
        target = select_instances({key: v for key, v in target.items() if key != "masks"},
                                  torch.as_tensor(kept, dtype=torch.int64))
        target["masks"] = torch.from_numpy(dst)
        target["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        target["area"] = torch.tensor(areas, dtype=torch.float32)
        return image.contiguous(), target


class ColorJitter:
    """Photometric jitter of a float image in [0, 1]: gamma, then contrast, then brightness.

    gamma ``g`` ∈ [1-gamma, 1+gamma] (``x^g``); contrast ``c`` ∈ [1-contrast, 1+contrast]
    around the image mean; brightness adds ``b`` ∈ [-brightness, brightness]. Applied with
    probability ``p``; the result is clamped to [0, 1]. Geometry and targets are untouched.
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, gamma: float = 0.2, p: float = 0.8):
        self.brightness, self.contrast, self.gamma, self.p = brightness, contrast, gamma, p

    def __call__(self, image, target):
        if torch.rand(1).item() >= self.p:
            return image, target
        g = _uniform(1 - self.gamma, 1 + self.gamma)
        c = _uniform(1 - self.contrast, 1 + self.contrast)
        b = _uniform(-self.brightness, self.brightness)
        image = image.clamp(0, 1).pow(g)
        mean = image.mean()
        image = ((image - mean) * c + mean + b).clamp_(0, 1)
        return image, target


__all__ = ["BOX_MARGIN", "Compose", "ToFloatImage", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90",
           "RandomScaleCrop", "ColorJitter", "select_instances",
           "INSTANCE_KEYS"]
