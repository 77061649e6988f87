"""Paired image/target transforms. Each takes and returns ``(image, target)``.

Datasets hand over the image as a numpy array (H×W or H×W×C, uint8/uint16/float) and the
target as tensors; ``ToFloatImage`` (always first in a preset) turns the image into a float32
``3×H×W`` tensor in [0, 1], so every later transform works on tensors only.

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

# Target entries with one row per instance; transforms that drop instances index all of them.
INSTANCE_KEYS = ("boxes", "labels", "masks", "area", "iscrowd")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,)).item())


def select_instances(target: dict, keep: torch.Tensor) -> dict:
    """Copy of ``target`` with only the instances where ``keep`` (bool ``N``) is True."""
    target = dict(target)
    for key in INSTANCE_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (float32 ``N×4``, exclusive max edge) of uint8/bool masks ``N×H×W``;
    all-zero rows for empty masks."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows = masks.any(dim=2).bool()                # N×H (any() keeps uint8 for uint8 input)
    cols = masks.any(dim=1).bool()                # N×W
    y0 = rows.to(torch.uint8).argmax(dim=1)
    y1 = h - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    x1 = w - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    boxes[~rows.any(dim=1)] = 0
    return boxes


def refresh_from_masks(target: dict) -> dict:
    """Recompute boxes and areas from masks and drop instances whose mask became empty."""
    masks = target["masks"]
    target = dict(target)
    target["boxes"] = boxes_from_masks(masks)
    area = masks.flatten(1).sum(1, dtype=torch.int64).to(torch.float32) if len(masks) else torch.zeros(0)
    target["area"] = area
    return select_instances(target, area > 0)


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
    """numpy/tensor image → float32 ``3×H×W`` in [0, 1]; grayscale repeated to 3 channels.

    uint8 is divided by 255. uint16 is divided by 65535 (``uint16="full"``) or, with
    ``uint16="percentile"``, mapped per image from its 0.5th..99.5th percentile to [0, 1] —
    microscopy cameras often fill only 12 of the 16 bits, which "full" leaves near black.
    float input is assumed to be in [0, 1] already.
    """

    def __init__(self, uint16: str = "full"):
        if uint16 not in ("full", "percentile"):
            raise ValueError(f"uint16 must be 'full' or 'percentile', got {uint16!r}")
        self.uint16 = uint16

    def __call__(self, image, target):
        if isinstance(image, torch.Tensor):
            array = image.numpy() if image.ndim == 2 else image.permute(1, 2, 0).numpy()
        else:
            array = np.asarray(image)
        if array.dtype == np.uint8:
            out = torch.from_numpy(array.astype(np.float32) / 255.0)
        elif array.dtype == np.uint16:
            out = torch.from_numpy(self._scale_uint16(array))
        else:
            out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if out.ndim == 2:
            out = out[None].expand(3, -1, -1)
        else:
            out = out.permute(2, 0, 1)
            if out.shape[0] == 1:
                out = out.expand(3, -1, -1)
            elif out.shape[0] == 4:  # RGBA: drop alpha
                out = out[:3]
        return out.contiguous(), target

    def _scale_uint16(self, array: np.ndarray) -> np.ndarray:
        if self.uint16 == "full":
            return array.astype(np.float32) / 65535.0
        low, high = np.percentile(array, (0.5, 99.5))
        if high <= low:
            high = low + 1.0
        return np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0)


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
            target["boxes"] = boxes
            target["masks"] = target["masks"].flip(-1)
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
            target["boxes"] = boxes
            target["masks"] = target["masks"].flip(-2)
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
        target = dict(target)
        target["boxes"] = boxes
        target["masks"] = torch.rot90(target["masks"], k, dims=(-2, -1)).contiguous()
        return torch.rot90(image, k, dims=(-2, -1)).contiguous(), target


class RandomScaleCrop:
    """Random scale, then a random crop of at most ``output_size``, optionally padded to it.

    ``scale`` is drawn from ``scale_range``; with ``relative_to="native"`` it multiplies the
    image's own size (cell data: native resolution ± jitter), with ``"output"`` it multiplies
    the factor that fits the image into ``output_size`` (large-scale jitter, as in
    torchvision's ScaleJitter + FixedSizeCrop). The crop window is chosen first and only that
    window is resized, so dense images never materialise upscaled full-size mask stacks.
    Instances partly inside the window are kept with their visible part; boxes and areas are
    recomputed from the masks and instances left empty are dropped.
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

        # Cheap pre-filter on boxes (1-px margin) before touching masks.
        b = target["boxes"]
        near = (b[:, 0] < x1 + 1) & (b[:, 2] > x0 - 1) & (b[:, 1] < y1 + 1) & (b[:, 3] > y0 - 1)
        masks = target["masks"][:, y0:y1, x0:x1]   # a view: only the window is ever copied
        if not bool(near.all()):
            masks = masks[near]
        target = select_instances({k: v for k, v in target.items() if k != "masks"}, near)
        image = image[:, y0:y1, x0:x1]
        if (y1 - y0, x1 - x0) != (crop_h, crop_w):
            image = F.interpolate(image[None], size=(crop_h, crop_w), mode="bilinear", align_corners=False,
                                  antialias=r < 1)[0].clamp_(0, 1)
            if len(masks):
                masks = F.interpolate(masks[:, None], size=(crop_h, crop_w), mode="nearest-exact")[:, 0]
            else:
                masks = masks.new_zeros((0, crop_h, crop_w))
        if self.pad and (crop_h, crop_w) != (out_h, out_w):
            image = F.pad(image, (0, out_w - crop_w, 0, out_h - crop_h))
            masks = F.pad(masks, (0, out_w - crop_w, 0, out_h - crop_h))
        target["masks"] = masks.contiguous()
        return image.contiguous(), refresh_from_masks(target)


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


__all__ = ["Compose", "ToFloatImage", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90",
           "RandomScaleCrop", "ColorJitter", "boxes_from_masks", "refresh_from_masks", "select_instances",
           "INSTANCE_KEYS"]
