"""The preprocessing contract (transforms/preprocess.py): one conversion for every input kind."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from transforms import build_transforms
from transforms.core import ToFloatImage
from transforms.preprocess import Preprocessing, image_channels, to_model_input


def twelve_bit(h=40, w=50, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 4096, (h, w)).astype(np.uint16)


def test_uint16_with_12_bit_content_fills_the_range_in_float32():
    image = twelve_bit()
    out = to_model_input(image, Preprocessing("percentile", "gray"))
    # float32 throughout: NumPy 2 promotes float32 − float64 scalars, which crashed training once.
    assert out.dtype == torch.float32 and out.shape == (3, 40, 50)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out.mean()) > 0.3                         # not near-black
    full = to_model_input(image, Preprocessing("full", "gray"))
    assert float(full.max()) <= 4096 / 65535 + 1e-6       # the full range leaves it dark, as documented


def test_uint16_training_sample_through_cells_preset_is_float32():
    image = twelve_bit(64, 64)
    masks = np.zeros((1, 64, 64), np.uint8)
    masks[0, 10:20, 10:20] = 1
    target = {"boxes": torch.tensor([[10., 10., 20., 20.]]), "labels": torch.tensor([1]),
              "masks": torch.from_numpy(masks), "area": torch.tensor([100.]), "iscrowd": torch.tensor([0]),
              "image_id": 1}
    torch.manual_seed(0)
    out, _ = build_transforms("cells", True, Preprocessing("percentile", "gray"), crop_size=48)(image, target)
    assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1


def test_uint8_is_divided_by_255_whatever_the_policy():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for policy in ("percentile", "full"):
        out = to_model_input(image, Preprocessing(policy, "gray"))
        assert torch.allclose(out[0], torch.from_numpy(image.astype(np.float32) / 255))


def test_float_images_any_range_and_non_finite_pixels():
    values = np.linspace(-3.0, 700.0, 30 * 20, dtype=np.float32).reshape(30, 20)
    values[0, 0] = np.nan
    values[0, 1] = np.inf
    out = to_model_input(values, Preprocessing("percentile", "gray"))
    assert torch.isfinite(out).all() and float(out.max()) == 1.0 and float(out.min()) == 0.0
    in_unit = np.clip(values, 0, 1)
    in_unit[0, :2] = 0
    clipped = to_model_input(values, Preprocessing("full", "gray"))
    assert torch.allclose(clipped[0], torch.from_numpy(in_unit))


def test_bool_and_other_integer_dtypes():
    mask = np.zeros((8, 8), bool)
    mask[2:4] = True
    assert torch.equal(to_model_input(mask, Preprocessing())[0], torch.from_numpy(mask.astype(np.float32)))
    int32 = (np.arange(64, dtype=np.int32) * 1000).reshape(8, 8)
    out = to_model_input(int32, Preprocessing("percentile", "gray"))
    assert out.dtype == torch.float32 and float(out.max()) == 1.0


def test_channels():
    gray = np.full((4, 5), 100, np.uint8)
    rgb = np.stack([gray, gray // 2, gray // 4], axis=2)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=2)
    two = np.stack([twelve_bit(4, 5, 1), twelve_bit(4, 5, 2)], axis=2)
    rgb_model, gray_model = Preprocessing(channels="rgb"), Preprocessing(channels="gray")
    assert torch.equal(to_model_input(gray, rgb_model), to_model_input(gray, gray_model))
    assert torch.equal(to_model_input(rgba, rgb_model), to_model_input(rgb, rgb_model))   # alpha dropped
    as_gray = to_model_input(rgb, gray_model)
    assert torch.equal(as_gray[0], as_gray[2])
    assert torch.allclose(as_gray[0], torch.full((4, 5), (100 + 50 + 25) / 3 / 255))
    out = to_model_input(two, rgb_model)
    assert out.shape == (3, 4, 5) and float(out[2].abs().max()) == 0.0 and float(out[1].max()) == 1.0
    with pytest.raises(ValueError, match="5 channels"):
        to_model_input(np.zeros((4, 5, 5), np.uint16), rgb_model)


def test_image_channels_detects_gray_stored_as_rgb():
    gray = np.random.default_rng(0).integers(0, 255, (6, 6), dtype=np.uint8)
    assert image_channels(gray) == "gray"
    assert image_channels(np.stack([gray] * 3, axis=2)) == "gray"
    assert image_channels(np.stack([gray, gray, gray // 2], axis=2)) == "rgb"


def test_contract_from_config_and_legacy_checkpoints(caplog):
    assert Preprocessing.from_config({"intensity": "full", "channels": "gray"}) == Preprocessing("full", "gray")
    with caplog.at_level(logging.WARNING):
        legacy = Preprocessing.from_config({"data_augmentation": "cells"})
    assert legacy == Preprocessing("percentile", "rgb") and "predates" in caplog.text
    assert Preprocessing.from_config({"data_augmentation": "hflip"}).intensity == "full"
    with pytest.raises(ValueError, match="intensity"):
        Preprocessing("minmax", "rgb")


def test_to_float_image_is_the_contract():
    image = twelve_bit()
    contract = Preprocessing("percentile", "rgb")
    assert torch.equal(ToFloatImage(contract)(image, None)[0], to_model_input(image, contract))
    assert torch.equal(build_transforms("hflip", False, contract)(image, None)[0], to_model_input(image, contract))
