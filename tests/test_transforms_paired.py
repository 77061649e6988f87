"""Paired transforms keep image, masks, boxes and labels consistent (property tests)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms import PRESETS, build_transforms
from transforms.core import (
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomRot90,
    RandomScaleCrop,
    RandomVerticalFlip,
    ToFloatImage,
)
from utils.box_masks import masks_to_boxes


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight xyxy boxes of a target's masks, by the project's one rule (``utils.box_masks``)."""
    return torch.from_numpy(masks_to_boxes(masks.numpy()))


def make_sample(seed: int, h: int, w: int, n: int):
    """Image whose pixel value encodes the instance id (non-overlapping rectangles), and its target."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        label[y:y + rng.integers(1, max(2, h // 2)), x:x + rng.integers(1, max(2, w // 2))] = k
    ids = [k for k in range(1, n + 1) if (label == k).any()]
    masks = np.stack([label == k for k in ids]).astype(np.uint8) if ids else np.zeros((0, h, w), np.uint8)
    target = {"boxes": torch.from_numpy(masks_to_boxes(masks)), "labels": torch.tensor(ids, dtype=torch.int64),
              "masks": torch.from_numpy(masks), "image_id": 7,
              "area": torch.from_numpy(masks.sum((1, 2)).astype(np.float32)),
              "iscrowd": torch.zeros(len(ids), dtype=torch.int64)}
    return label, target


def check_consistent(image, target, labels_in):
    n = len(target["labels"])
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n,) + tuple(image.shape[1:])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and target["area"].shape == (n,) and target["iscrowd"].shape == (n,)
    assert torch.equal(target["boxes"], tight_boxes(target["masks"]))          # tight and consistent
    assert (target["area"] == target["masks"].flatten(1).sum(1).float()).all() and (target["area"] > 0).all()
    assert set(target["labels"].tolist()) <= set(labels_in) and len(set(target["labels"].tolist())) == n
    assert target["image_id"] == 7


GEOMETRIC = {
    "hflip": lambda: RandomHorizontalFlip(1.0), "vflip": lambda: RandomVerticalFlip(1.0), "rot90": RandomRot90,
    "crop": lambda: RandomScaleCrop((9, 13), scale_range=(1.0, 1.0)),
}
ALL = dict(GEOMETRIC,
           scale_crop=lambda: RandomScaleCrop((12, 10), scale_range=(0.5, 2.0)),
           lsj=lambda: RandomScaleCrop(16, scale_range=(0.3, 1.5), relative_to="output", pad=True),
           jitter=lambda: ColorJitter(0.2, 0.3, 0.3, p=1.0))


@settings(max_examples=80, deadline=None, database=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 30), st.integers(0, 6),
       st.lists(st.sampled_from(sorted(GEOMETRIC)), max_size=5))
def test_geometric_keep_pixels_aligned(seed, h, w, n, names):
    """Without resampling, every mask pixel must still sit on its instance's pixel value."""
    label, target = make_sample(seed, h, w, n)
    torch.manual_seed(seed)
    image, out = Compose([ToFloatImage()] + [GEOMETRIC[k]() for k in names])(label, target)
    check_consistent(image, out, target["labels"].tolist())
    values = torch.round(image[0] * 255).to(torch.int64)
    covered = torch.zeros_like(values, dtype=torch.bool)
    for mask, k in zip(out["masks"].bool(), out["labels"]):
        assert (values[mask] == k).all()
        covered |= mask
    # Pixels outside all kept masks are background, or belong to an instance cut away by a crop.
    kept = set(out["labels"].tolist())
    assert all(v not in kept for v in values[~covered].unique().tolist())


@settings(max_examples=80, deadline=None, database=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 40), st.integers(0, 8),
       st.lists(st.sampled_from(sorted(ALL)), max_size=5))
def test_random_compositions_stay_consistent(seed, h, w, n, names):
    label, target = make_sample(seed, h, w, n)
    torch.manual_seed(seed)
    chain = Compose([ToFloatImage()] + [ALL[k]() for k in names])
    image, out = chain(label, target)
    check_consistent(image, out, target["labels"].tolist())
    torch.manual_seed(seed)
    again, out2 = Compose([ToFloatImage()] + [ALL[k]() for k in names])(label, target)
    assert torch.equal(image, again) and torch.equal(out["masks"], out2["masks"])   # seeded → reproducible


def test_rot90_matches_torch_rot90():
    label, target = make_sample(3, 7, 11, 3)
    image = ToFloatImage()(label, target)[0]
    drawn = set()
    for seed in range(12):
        torch.manual_seed(seed)
        k = int(torch.randint(0, 4, (1,)))       # the draw RandomRot90 makes first
        drawn.add(k)
        torch.manual_seed(seed)
        rotated, out = RandomRot90()(image, target)
        assert torch.equal(rotated, torch.rot90(image, k, dims=(1, 2)))
        assert torch.equal(out["masks"], torch.rot90(target["masks"], k, dims=(1, 2)))
        assert torch.equal(out["boxes"], tight_boxes(out["masks"]))
    assert drawn == {0, 1, 2, 3}


def test_crop_keeps_partly_visible_instances():
    masks = torch.zeros((2, 20, 20), dtype=torch.uint8)
    masks[0, 2:8, 2:18] = 1        # a wide instance that most crops cut
    masks[1, 15:19, 15:19] = 1     # bottom-right corner only
    target = {"boxes": tight_boxes(masks), "labels": torch.tensor([1, 2]), "masks": masks, "image_id": 0,
              "area": masks.flatten(1).sum(1).float(), "iscrowd": torch.zeros(2, dtype=torch.int64)}
    image = torch.rand(3, 20, 20)
    clipped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out = RandomScaleCrop(10, scale_range=(1.0, 1.0))(image, target)
        assert out_image.shape == (3, 10, 10)
        y0, x0 = next((y, x) for y in range(11) for x in range(11)
                      if torch.equal(image[:, y:y + 10, x:x + 10], out_image))
        window = masks[:, y0:y0 + 10, x0:x0 + 10]
        visible = window.flatten(1).any(1)
        assert out["labels"].tolist() == target["labels"][visible].tolist()   # kept iff any pixel visible
        assert torch.equal(out["masks"], window[visible])
        clipped += bool(visible[0]) and int(out["area"][0]) < 96
    assert clipped > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_on_dense_sample(preset):
    label, target = make_sample(11, 120, 150, 60)
    torch.manual_seed(0)
    image, out = build_transforms(preset, train=True, crop_size=64, lsj_size=96)(label, target)
    check_consistent(image, out, target["labels"].tolist())
    eval_image, eval_target = build_transforms(preset, train=False)(label, target)
    assert eval_image.shape == (3, 120, 150) and eval_target is target


def test_unknown_preset():
    with pytest.raises(ValueError, match="choose one of: none, hflip, cells, lsj"):
        build_transforms("mosaic", True)


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(0, 10_000), st.integers(2, 30), st.integers(2, 30), st.integers(1, 8))
def test_scale_crop_matches_dense_resampling(seed, h, w, n):
    """The per-instance-box path equals resizing the whole mask stack (nearest-exact) at once."""
    label, target = make_sample(seed, h, w, n)
    image = torch.from_numpy(label).float()[None].expand(3, -1, -1) / 255
    torch.manual_seed(seed)
    transform = RandomScaleCrop((7, 9), scale_range=(0.5, 2.5))
    out_image, out = transform(image, target)
    # Recover the window the transform chose by replaying its random draws.
    torch.manual_seed(seed)
    r = 0.5 + 2.0 * torch.rand(1).item()
    sh, sw = max(1, round(h * r)), max(1, round(w * r))
    ch, cw = min(7, sh), min(9, sw)
    top, left = int(torch.randint(0, sh - ch + 1, (1,))), int(torch.randint(0, sw - cw + 1, (1,)))
    y0, x0 = min(int(top / r), h - 1), min(int(left / r), w - 1)
    y1, x1 = min(h, max(y0 + 1, round((top + ch) / r))), min(w, max(x0 + 1, round((left + cw) / r)))
    dense = torch.nn.functional.interpolate(target["masks"][:, None, y0:y1, x0:x1], size=(ch, cw),
                                            mode="nearest-exact")[:, 0]
    visible = dense.flatten(1).any(1)
    assert torch.equal(out["masks"], dense[visible])
    assert out["labels"].tolist() == target["labels"][visible].tolist()
