"""The preprocessing contract: how a stored image becomes the model's input, decided once at
training time, written into the checkpoint, and applied by ``to_model_input`` everywhere an
image enters a model (training transforms, the trainer's validation, ``evaluate.py
--checkpoint``, ``predict.py`` plain and ``--tta``).

Intensity, by input dtype:
  uint8             ÷ 255 (8-bit data is displayed and annotated as is).
  bool              0 / 1.
  everything else   uint16, other integers, float: ``intensity="percentile"`` maps each channel
                    from its 0.5th..99.5th percentile to [0, 1] per image (microscopy cameras
                    fill 12 of 16 bits, float TIFFs come in any range); ``"full"`` divides
                    unsigned integers by their dtype maximum and clips floats to [0, 1].
Channels: the model always sees 3. ``channels="gray"`` (the training images were gray):
one channel is repeated, a colour image is averaged to gray first. ``"rgb"``: gray is
repeated, RGB kept, alpha dropped, two channels (e.g. nucleus + cytoplasm) become
``(c0, c1, 0)``. Non-finite pixels become 0.

Geometry (the resize) is the model's own ``transform``, built from the same checkpoint
config (``input_scale`` or ``min_size``/``max_size``), so it needs nothing here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

INTENSITY_POLICIES = ("percentile", "full")
CHANNEL_MODES = ("gray", "rgb")
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Preprocessing:
    intensity: str = "percentile"
    channels: str = "rgb"

    def __post_init__(self):
        if self.intensity not in INTENSITY_POLICIES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_POLICIES)}, got {self.intensity!r}")
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {', '.join(CHANNEL_MODES)}, got {self.channels!r}")

    @classmethod
    def from_config(cls, config: dict) -> "Preprocessing":
        """The contract a training config (``TrainConfig.to_dict()``, or a checkpoint's) records.

        Checkpoints written before the contract existed lack ``intensity``/``channels``: they
        get what their training transforms did (percentiles for 16-bit only with the ``cells``
        preset, channels as stored) and a warning.
        """
        if "intensity" in config and config.get("channels") in CHANNEL_MODES:
            return cls(config["intensity"], config["channels"])
        legacy = cls("percentile" if config.get("data_augmentation") == "cells" else "full", "rgb")
        log.warning("this checkpoint predates the stored preprocessing contract: using what its training "
                    "transforms did (16-bit/float intensity %r, channels as stored); retrain or fine-tune to "
                    "record it", legacy.intensity)
        return legacy


def image_channels(image: np.ndarray) -> str:
    """``"gray"`` for single-channel images and colour images whose channels are equal, else ``"rgb"``."""
    array = np.asarray(image)
    if array.ndim == 2 or array.shape[-1] == 1:
        return "gray"
    colour = array[..., :3]
    return "gray" if colour.shape[-1] == 3 and (colour == colour[..., :1]).all() else "rgb"


def _channels_last(array: np.ndarray) -> np.ndarray:
    """``H×W``, ``H×W×C`` or ``C×H×W`` (C ≤ 4, from a tensor) → ``H×W×C``."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"image must be H×W or H×W×C, got shape {array.shape}")
    return array


def intensity_bounds(image, contract: Preprocessing) -> np.ndarray | None:
    """Per-channel ``(low, high)`` float32 ``C×2`` that ``contract`` maps to [0, 1] for this image,
    or ``None`` where the mapping needs no statistics (uint8, bool, ``intensity="full"``).

    Computed once on a whole image, the bounds let ``to_model_input(region, contract, bounds)``
    convert any region (a tile) exactly as the whole image would be converted.
    """
    array = _channels_last(np.asarray(image))
    if array.dtype in (np.uint8, np.bool_) or contract.intensity == "full":
        return None
    bounds = np.empty((array.shape[2], 2), dtype=np.float32)
    for c in range(array.shape[2]):          # one channel at a time: a float32 copy of one plane
        channel = array[:, :, c].astype(np.float32)
        if not np.isfinite(channel).all():
            channel = np.nan_to_num(channel, nan=0.0, posinf=0.0, neginf=0.0)
        # float32 bounds: NumPy 2 would promote float32 − float64 scalars to float64.
        low, high = (np.float32(v) for v in np.percentile(channel, PERCENTILES))
        bounds[c] = (low, high if high > low else low + np.float32(1))
    return bounds


def _scale_intensity(array: np.ndarray, policy: str, bounds: np.ndarray | None = None) -> np.ndarray:
    """``H×W×C`` any dtype → float32 in [0, 1] by ``policy`` (see the module docstring);
    ``bounds`` (from ``intensity_bounds`` of the whole image) replace this array's percentiles."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1 / 255)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    values = array.astype(np.float32)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if policy == "full":
        if np.issubdtype(array.dtype, np.integer):
            values *= np.float32(1 / np.iinfo(array.dtype).max)
        return np.clip(values, 0.0, 1.0, out=values)
    if bounds is None:
        bounds = intensity_bounds(array, Preprocessing(policy, "rgb"))
    if len(bounds) != values.shape[2]:
        raise ValueError(f"intensity bounds for {len(bounds)} channels given for an image with {values.shape[2]}")
    out = np.empty_like(values)
    for c, (low, high) in enumerate(bounds):
        out[:, :, c] = np.clip((values[:, :, c] - low) / (high - low), 0.0, 1.0)
    return out


def _three_channels(values: np.ndarray, mode: str) -> np.ndarray:
    """``H×W×C`` float → ``H×W×3`` by the contract's channel mode."""
    c = values.shape[2]
    if c > 4:
        raise ValueError(f"image has {c} channels; the model takes gray, RGB, RGBA or 2-channel images "
                         "(choose the channels to use and save them as such)")
    if c == 4:
        values, c = values[:, :, :3], 3
    if mode == "gray":
        gray = values[:, :, :1] if c == 1 else values.mean(axis=2, keepdims=True, dtype=np.float32)
        return np.repeat(gray, 3, axis=2)
    if c == 1:
        return np.repeat(values, 3, axis=2)
    if c == 2:
        return np.concatenate([values, np.zeros_like(values[:, :, :1])], axis=2)
    return values


def to_model_input(image, contract: Preprocessing, bounds: np.ndarray | None = None) -> torch.Tensor:
    """An image as stored (numpy ``H×W`` / ``H×W×C`` of any dtype, or a ``C×H×W`` tensor) →
    float32 ``3×H×W`` tensor in [0, 1], by ``contract``. The one place model input is made.

    ``bounds``: ``intensity_bounds`` of the whole image when ``image`` is a region of it (tiled
    prediction), so every tile gets the whole image's intensity mapping."""
    if isinstance(image, torch.Tensor):
        array = image.numpy() if image.ndim == 2 else image.permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
    values = _three_channels(_scale_intensity(_channels_last(array), contract.intensity, bounds), contract.channels)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32))


__all__ = ["Preprocessing", "INTENSITY_POLICIES", "CHANNEL_MODES", "image_channels", "intensity_bounds", "to_model_input"]
