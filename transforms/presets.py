"""Named augmentation presets for ``--data-augmentation``."""
from __future__ import annotations

from transforms.core import Compose, RandomHorizontalFlip, ToFloatImage

PRESETS = ("none", "hflip")


def build_transforms(preset: str, train: bool) -> Compose:
    """Training transforms for ``preset``; evaluation always gets the deterministic part only."""
    if preset not in PRESETS:
        raise ValueError(f"unknown --data-augmentation {preset!r}; choose one of: {', '.join(PRESETS)}")
    steps = [ToFloatImage()]
    if train and preset == "hflip":
        steps.append(RandomHorizontalFlip(0.5))
    return Compose(steps)
