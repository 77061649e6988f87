"""Paired image/target transforms. Each takes and returns ``(image, target)``.

Datasets hand over the image as a numpy array (H×W or H×W×C, uint8/uint16/float) and the
target as tensors; ``ToFloatImage`` (always first in a preset) turns the image into a float32
``3×H×W`` tensor in [0, 1], so every later transform works on tensors only.
"""
from __future__ import annotations

import numpy as np
import torch


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

    uint8 is divided by 255, uint16 by 65535; float input is assumed to be in [0, 1] already.
    """

    def __call__(self, image, target):
        if isinstance(image, torch.Tensor):
            array = image.numpy() if image.ndim == 2 else image.permute(1, 2, 0).numpy()
        else:
            array = np.asarray(image)
        if array.dtype == np.uint8:
            out = torch.from_numpy(array.astype(np.float32) / 255.0)
        elif array.dtype == np.uint16:
            out = torch.from_numpy(array.astype(np.float32) / 65535.0)
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
