"""Kaggle RLE (row-major, 1-indexed) and the dataset mask and ground-truth helpers (utils.kaggle_rle,
datasets.targets)."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from datasets.targets import coco_annotation, coco_ground_truth, fill_holes
from tests.fixtures.data_writers import encode_kaggle_rle
from utils.box_masks import masks_to_boxes
from utils.coco_rle import decode_coco_rle
from utils.kaggle_rle import decode_kaggle_rle, kaggle_rle_to_coco_rle, kaggle_runs_box, parse_kaggle_rle
from utils.label_images import label_image_to_instances


def test_row_major_one_indexed():
    # "1 3" is the first three pixels of row 0; "705 2" starts row 1 of a 704-wide image.
    mask = decode_kaggle_rle("1 3 705 2", 520, 704)
    assert mask.dtype == np.uint8 and mask.shape == (520, 704)
    assert mask[0, :3].all() and mask[1, :2].all() and mask.sum() == 5
    assert mask[:3, 0].sum() == 2   # column-major would have filled column 0 with three pixels


def test_run_wrapping_a_row_end():
    mask = decode_kaggle_rle("4 4", 3, 5)    # 0-indexed pixels 3..6: row 0 cols 3-4, row 1 cols 0-1
    assert mask[0].tolist() == [0, 0, 0, 1, 1] and mask[1].tolist() == [1, 1, 0, 0, 0]
    starts, lengths = parse_kaggle_rle("4 4", 3, 5)
    assert kaggle_runs_box(starts, lengths, 5) == (0, 0, 5, 2)
    assert masks_to_boxes(mask[None])[0].tolist() == [0, 0, 5, 2]


@pytest.mark.parametrize("rle, reason", [
    ("", "empty"), ("1 2 3", "odd"), ("1 x", "non-integer"), ("0 3", "start < 1"), ("5 0", "length < 1"),
    ("10 2 5 2", "unsorted"), ("1 5 3 2", "unsorted or overlapping"), ("15 2", "> 3×5"),
])
def test_malformed_rle_says_why(rle, reason):
    with pytest.raises(ValueError, match=reason.replace("×", ".").replace("<", "<")):
        parse_kaggle_rle(rle, 3, 5)


@settings(max_examples=60, deadline=None, database=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1)))
def test_kaggle_round_trip_box_and_coco_conversion(mask):
    rle = encode_kaggle_rle(mask)
    assert (rle == "") == (not mask.any())
    assume(mask.any())          # the rest needs a mask: hypothesis draws another instead
    h, w = mask.shape
    assert np.array_equal(decode_kaggle_rle(rle, h, w), mask)
    starts, lengths = parse_kaggle_rle(rle, h, w)
    assert list(kaggle_runs_box(starts, lengths, w)) == masks_to_boxes(mask[None])[0].tolist()
    coco = kaggle_rle_to_coco_rle(starts, lengths, h, w)
    assert isinstance(coco["counts"], str) and coco["size"] == [h, w]
    assert np.array_equal(decode_coco_rle([coco], h, w)[0], mask)


def test_fill_holes_fills_only_enclosed_background():
    masks = np.zeros((2, 12, 12), np.uint8)
    masks[0, 2:9, 2:9] = 1
    masks[0, 4:7, 4:7] = 0          # enclosed hole
    masks[1, 0:5, 0:5] = 1
    masks[1, 0:2, 2] = 0            # notch open to the border: not a hole
    before = masks[1].copy()
    fill_holes(masks)
    assert masks[0, 2:9, 2:9].all() and masks[0].sum() == 49
    assert np.array_equal(masks[1], before)


def test_label_image_to_instances_sparse_values_and_dtypes():
    label = np.zeros((6, 7), np.uint16)
    label[0:2, 0:2] = 60000           # 16-bit value far above the count
    label[3:6, 4:7] = 7
    masks, values = label_image_to_instances(label)
    assert values.tolist() == [7, 60000] and masks.dtype == np.uint8 and masks.shape == (2, 6, 7)
    assert masks[0].sum() == 9 and masks[1].sum() == 4 and masks[1, 0, 0] == 1
    empty, v = label_image_to_instances(np.zeros((4, 4), np.uint8))
    assert empty.shape == (0, 4, 4) and len(v) == 0


@settings(max_examples=60, deadline=None, database=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 16), st.integers(1, 16)), elements=st.integers(0, 1)))
def test_fill_holes_matches_scipy(masks):
    from scipy.ndimage import binary_fill_holes
    expected = np.stack([binary_fill_holes(m) for m in masks]).astype(np.uint8)
    assert np.array_equal(fill_holes(masks.copy()), expected)


@settings(max_examples=40, deadline=None, database=None)
@given(arrays(np.uint8, st.tuples(st.integers(0, 4), st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 1)))
def test_coco_rles_to_masks_matches_pycocotools(masks):
    from utils.coco_rle import coco_rles_to_masks, encode_coco_rle
    h, w = masks.shape[1:]
    rles = encode_coco_rle(masks)
    assert np.array_equal(coco_rles_to_masks(rles, h, w), masks)
    assert np.array_equal(coco_rles_to_masks([{"size": r["size"], "counts": r["counts"].encode()} for r in rles], h, w), masks)


def test_coco_ground_truth_numbers_annotations_and_converts_boxes():
    rle = {"size": [4, 5], "counts": "0"}
    images = [({"id": 7, "file_name": "a.png", "height": 4, "width": 5},
               [coco_annotation(2, rle, [1, 0, 4, 3], 6.0), coco_annotation(1, rle, [0, 0, 1, 1], 1.0)]),
              ({"id": 9, "file_name": "b.png", "height": 4, "width": 5}, []),
              ({"id": 3, "file_name": "c.png", "height": 4, "width": 5}, [coco_annotation(1, rle, [2, 2, 5, 4], 4.0)])]
    gt = coco_ground_truth(images, ["big", "small"])
    assert [i["id"] for i in gt["images"]] == [7, 9, 3]
    assert [(a["id"], a["image_id"], a["category_id"]) for a in gt["annotations"]] == [(1, 7, 2), (2, 7, 1), (3, 3, 1)]
    assert gt["annotations"][0] == {"id": 1, "image_id": 7, "category_id": 2, "segmentation": rle, "area": 6.0,
                                    "bbox": [1, 0, 3, 3], "iscrowd": 0}
    assert gt["categories"] == [{"id": 1, "name": "big"}, {"id": 2, "name": "small"}]
    # A dataset's own stable ids (Sartorius: CSV line numbers) are kept.
    own = coco_ground_truth([(images[0][0], [{"id": 41, **coco_annotation(1, rle, [0, 0, 2, 2], 4.0)}])], ["x"])
    assert own["annotations"][0]["id"] == 41 and list(own["annotations"][0])[:2] == ["id", "image_id"]
