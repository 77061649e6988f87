"""Box-region mask pasting and the mask forms derived from it, checked against a full-canvas
reference paste (``grid_sample``), torchvision's paste and pycocotools on random detections and
random masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import clip_boxes_to_image

from tests.fixtures.data_writers import encode_kaggle_rle
from utils.box_masks import (
    BoxMasks,
    box_masks_to_coco_rle,
    box_masks_to_kaggle_rles,
    coco_rle_to_box_masks,
    paste_masks_in_boxes,
    resolve_overlaps,
)
from utils.coco_rle import decode_coco_rle, encode_coco_rle
from utils.instances import detections_to_coco_results
from utils.kaggle_rle import decode_kaggle_rle
from utils.label_images import box_masks_to_label_image, label_image_to_box_masks


def random_detections(n: int, height: int, width: int, seed: int, max_size: float = 60.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 10
    wh = torch.rand(n, 2, generator=g) * max_size
    wh[: n // 10] = 0.0                                         # some degenerate boxes
    boxes = clip_boxes_to_image(torch.cat([xy, xy + wh], 1), (height, width))
    probs = torch.rand(n, 1, 28, 28, generator=g)
    return boxes, probs


def canvas_reference(probs, boxes, height, width) -> torch.Tensor:
    """``N×H×W`` probabilities: every image pixel centre sampled from its box's ``M×M`` mask,
    cell centres spread evenly over the box (the pixel-aligned frame), zeros beyond the cells —
    ``grid_sample`` over the whole canvas, an implementation independent of utils.box_masks."""
    probs = probs.reshape(len(probs), 1, *probs.shape[-2:]).float()
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    out = torch.zeros(len(probs), height, width)
    for i, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        if x1 <= x0 or y1 <= y0:
            continue
        gx = (xs - x0) / (x1 - x0) * 2 - 1            # -1 and 1 are the box edges (align_corners=False)
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).float()[None]
        out[i] = torch.nn.functional.grid_sample(probs[i:i + 1], grid, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)[0, 0]
    return out


@pytest.mark.parametrize("seed,size", [(0, (120, 150)), (1, (64, 64)), (2, (33, 257))])
def test_box_paste_equals_the_full_canvas_reference(seed, size):
    height, width = size
    boxes, probs = random_detections(200, height, width, seed)
    ref = canvas_reference(probs, boxes, height, width).numpy()
    soft = paste_masks_in_boxes(probs, boxes, height, width, threshold=None)
    masks = paste_masks_in_boxes(probs, boxes, height, width)
    for i, (crop, (y0, x0)) in enumerate(zip(soft.crops, soft.offsets.tolist())):
        h, w = crop.shape
        assert crop.dtype == np.float32 and masks.crops[i].dtype == bool
        assert 0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width     # crops inside the image
        np.testing.assert_allclose(crop, ref[i, y0:y0 + h, x0:x0 + w], atol=1e-5)
        outside = ref[i].copy()
        outside[y0:y0 + h, x0:x0 + w] = 0
        assert np.abs(outside).max() < 1e-6                                   # nothing lost outside the crop
    dense = masks.to_dense().astype(bool)
    undecided = np.abs(ref - 0.5) < 1e-5                                     # float rounding at the threshold
    assert np.array_equal(dense[~undecided], (ref > 0.5)[~undecided])


def test_box_paste_does_not_grow_masks_as_torchvision_does():
    """A square mask comes out as exactly the pixels whose centres lie inside the square's place
    in the box; torchvision's paste (box max edge read as inclusive, box grown then truncated)
    gives about half a pixel more on every side."""
    boxes = torch.tensor([[10.0, 20.0, 30.0, 32.0], [40.3, 5.6, 52.9, 18.2], [3.0, 40.0, 11.0, 48.0]])
    probs = torch.zeros(3, 28, 28)
    probs[:, 2:26, 2:26] = 1.0                                 # a square of 24/28 of the box, centred
    masks = paste_masks_in_boxes(probs, boxes, 60, 70).to_dense().astype(bool)
    tv = (paste_masks_in_image(probs[:, None], boxes, (60, 70))[:, 0] > 0.5).numpy()
    for mask, tv_mask, (x0, y0, x1, y1) in zip(masks, tv, boxes.tolist()):
        # The 0.5 crossing lies on the square's edges (between cells 1 and 2, 25 and 26), so the
        # pasted mask is exactly the pixels whose centres are inside the square.
        cx, cy = (x1 - x0) * 2 / 28, (y1 - y0) * 2 / 28
        centres_x, centres_y = np.arange(70) + 0.5, np.arange(60) + 0.5
        inside = (((centres_y > y0 + cy) & (centres_y < y1 - cy))[:, None]
                  & ((centres_x > x0 + cx) & (centres_x < x1 - cx))[None, :])
        assert np.array_equal(mask, inside)
        assert tv_mask.sum() > mask.sum()
    # A mask symmetric under a half turn, in a box centred in the image, comes out symmetric
    # (flips, as in TTA, map pasted masks onto each other) and no larger than its box's share.
    g = torch.Generator().manual_seed(0)
    blob = torch.rand(28, 28, generator=g)
    blob = ((blob + blob.flip(0, 1)) / 2)[None]
    box = torch.tensor([[12.5, 21.5, 27.5, 30.5]])           # centre (20, 26) of a 40×52 image
    ours = paste_masks_in_boxes(blob, box, 52, 40).to_dense()[0]
    assert ours.any() and np.array_equal(ours, ours[::-1, ::-1])
    theirs = (paste_masks_in_image(blob[:, None], box, (52, 40))[0, 0] > 0.5).numpy()
    assert theirs.sum() > 1.3 * ours.sum()


def test_fast_rle_equals_pycocotools_on_the_same_masks():
    boxes, probs = random_detections(300, 100, 130, seed=4)
    masks = paste_masks_in_boxes(probs, boxes, 100, 130)
    ref = encode_coco_rle(masks.to_dense())
    fast = box_masks_to_coco_rle(masks)
    assert [r["counts"] for r in fast] == [r["counts"] for r in ref]
    assert all(r["size"] == [100, 130] for r in fast)


@st.composite
def masks_in_image(draw):
    height = draw(st.integers(1, 12))
    width = draw(st.integers(1, 12))
    n = draw(st.integers(0, 5))
    return draw(arrays(np.uint8, (n, height, width), elements=st.integers(0, 1)))


@settings(max_examples=150, deadline=None)
@given(masks_in_image())
def test_box_masks_forms_round_trip(dense):
    # Small images make runs that wrap from one column (row) into the next: the merge path.
    boxed = BoxMasks.from_dense(dense)
    assert np.array_equal(boxed.to_dense(), dense)
    n, height, width = dense.shape
    fast = box_masks_to_coco_rle(boxed)
    assert [r["counts"] for r in fast] == [r["counts"] for r in encode_coco_rle(dense)]
    assert np.array_equal(decode_coco_rle(fast, height, width), dense)
    assert np.array_equal(coco_rle_to_box_masks(fast, height, width).to_dense(), dense)
    kaggle = box_masks_to_kaggle_rles(boxed)
    assert kaggle == [encode_kaggle_rle(m) for m in dense]
    for rle, mask in zip(kaggle, dense):
        assert np.array_equal(decode_kaggle_rle(rle, height, width), mask)
        values = [int(v) for v in rle.split()]
        starts, lengths = values[0::2], values[1::2]
        assert starts == sorted(starts) and all(v > 0 for v in values)
        # Runs are maximal: a run never ends where the next begins.
        assert all(s + n < t for s, n, t in zip(starts, lengths, starts[1:]))


def test_kaggle_rle_is_row_major_and_one_indexed():
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[0, 1:3] = 1          # flat 1, 2
    mask[1, 3] = 1            # flat 7, continues into flat 8 (row 2, col 0)
    mask[2, 0] = 1
    assert encode_kaggle_rle(mask) == "2 2 8 2"
    assert np.array_equal(decode_kaggle_rle("2 2 8 2", 3, 4), mask)
    assert encode_kaggle_rle(np.zeros((3, 4))) == ""


@pytest.mark.parametrize("bad", ["1", "0 3", "5 0", "11 5", "a b"])
def test_decode_kaggle_rle_rejects_malformed(bad):
    with pytest.raises(ValueError):
        decode_kaggle_rle(bad, 3, 4)


def test_resolve_overlaps_gives_pixels_to_higher_score():
    dense = np.zeros((3, 6, 6), dtype=np.uint8)
    dense[0, 0:4, 0:4] = 1        # low score
    dense[1, 2:6, 2:6] = 1        # high score
    dense[2, 3:5, 3:5] = 1        # fully inside mask 1, lower score: vanishes
    scores = np.array([0.3, 0.9, 0.5])
    kept, resolved = resolve_overlaps(BoxMasks.from_dense(dense), scores)
    assert kept.tolist() == [1, 0]
    out = resolved.to_dense()
    assert np.array_equal(out[0], dense[1])
    assert np.array_equal(out[1], dense[0] & ~dense[1])
    assert out.sum(0).max() == 1
    labels = box_masks_to_label_image(resolved)
    assert labels.dtype == np.uint16
    assert labels[2, 2] == 1 and labels[0, 0] == 2 and labels[5, 0] == 0
    assert np.array_equal(label_image_to_box_masks(labels)[0].to_dense(), out)


def test_resolve_overlaps_drops_masks_mostly_under_higher_scores():
    dense = np.zeros((3, 6, 8), dtype=np.uint8)
    dense[0, 0:4, 0:4] = 1        # highest score
    dense[1, 0:4, 1:5] = 1        # 12 of its 16 pixels under mask 0: a duplicate, dropped
    dense[2, 0:4, 2:8] = 1        # 8 of 24 under mask 0: keeps the other 16
    kept, resolved = resolve_overlaps(BoxMasks.from_dense(dense), np.array([0.9, 0.8, 0.7]))
    assert kept.tolist() == [0, 2]
    assert np.array_equal(resolved.to_dense()[1], dense[2] & ~dense[0])


def test_label_image_first_mask_wins_without_resolving():
    dense = np.zeros((2, 4, 4), dtype=np.uint8)
    dense[0, :2] = 1
    dense[1, 1:] = 1
    labels = box_masks_to_label_image(BoxMasks.from_dense(dense))
    assert labels[1].tolist() == [1, 1, 1, 1] and labels[2].tolist() == [2, 2, 2, 2]


def test_detections_to_coco_results_fast_and_canvas_forms_agree():
    boxes, probs = random_detections(40, 70, 90, seed=5)
    scores = torch.linspace(1, 0.1, 40)
    labels = torch.randint(1, 3, (40,))
    canvas = {"boxes": boxes, "scores": scores, "labels": labels,
              "masks": canvas_reference(probs, boxes, 70, 90)[:, None]}
    fast = {"boxes": boxes, "scores": scores, "labels": labels, "mask_probs": probs, "image_size": (70, 90)}
    a = detections_to_coco_results(canvas, "img")
    b = detections_to_coco_results(fast, "img")
    assert a == b
    assert a[0]["image_id"] == "img" and len(a[0]["bbox"]) == 4 and isinstance(a[0]["segmentation"]["counts"], str)
