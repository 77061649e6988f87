"""Named augmentation presets for ``--data-augmentation``.

  none   no augmentation
  hflip  horizontal flip (torchvision's detection reference default)
  cells  microscopy: scale jitter 0.75–1.5 at native resolution with a random crop of up to
         ``crop_size`` (partly visible cells kept), h/v flips, 90° rotations, and
         gamma/contrast/brightness jitter. train.py sets ``crop_size`` so that the crop is
         ``CROP_MODEL_PIXELS`` as the model sees it (``crop_size_for``)
  lsj    large-scale jitter (COCO): scale 0.1–2.0 of a ``lsj_size`` square, crop/pad to it, hflip
Evaluation always gets the deterministic part only: the preprocessing contract
(``transforms.preprocess``), which is the same whatever the preset.
"""
from __future__ import annotations

from transforms.core import (
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomRot90,
    RandomScaleCrop,
    RandomVerticalFlip,
    ToFloatImage,
)
from transforms.preprocess import Preprocessing

PRESETS = ("none", "hflip", "cells", "lsj")
CROP_MODEL_PIXELS = 512     # side of a ``cells`` training crop in model-input pixels


def crop_size_for(input_scale: float | None) -> int:
    """The ``cells`` crop side in image pixels for a model that resizes its input by
    ``input_scale``: ``CROP_MODEL_PIXELS`` after the resize, so a step costs the same at any
    scale (a 512-px crop at --input-scale 1.5 was a 768² input, 2.2× the step) and objects
    enlarged for the model come with less of the image, not more pixels. ``None``
    (torchvision's min/max-size resize, which sets the input size itself): 512 image pixels."""
    if input_scale is None:
        return CROP_MODEL_PIXELS
    return max(32, int(round(CROP_MODEL_PIXELS / input_scale)))


def build_transforms(preset: str, train: bool, contract: Preprocessing | None = None,
                     crop_size: int = CROP_MODEL_PIXELS, lsj_size: int = 1024) -> Compose:
    """Transforms for ``preset``; ``train=False`` gives the evaluation transforms of that preset.

    ``contract`` is the preprocessing the model is trained with (default: ``Preprocessing()``);
    ``crop_size``: the ``cells`` crop side in image pixels (``crop_size_for``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown --data-augmentation {preset!r}; choose one of: {', '.join(PRESETS)}")
    steps = [ToFloatImage(contract)]
    if not train:
        return Compose(steps)
    if preset == "hflip":
        steps.append(RandomHorizontalFlip(0.5))
    elif preset == "cells":
        # Crop first: flipping a 790-instance full-size mask stack would copy 290 MB.
        steps += [RandomScaleCrop(crop_size, scale_range=(0.75, 1.5), relative_to="native"),
                  RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5), RandomRot90(),
                  ColorJitter(brightness=0.1, contrast=0.2, gamma=0.2, p=0.8)]
    elif preset == "lsj":
        steps += [RandomHorizontalFlip(0.5),
                  RandomScaleCrop(lsj_size, scale_range=(0.1, 2.0), relative_to="output", pad=True)]
    return Compose(steps)
