"""Post-processing: overlap removal, minimum size, NMS, and the search scoring what apply gives."""
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from metrics.postprocess import apply_postprocess, mask_nms, search_postprocess
from metrics.sartorius import masks_overlap, sartorius_score
from tests.fixtures.workload import ellipse_indices, make_workload
from utils.coco_rle import fortran_indices_to_rle, rle_to_fortran_indices

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*overlapping predicted masks:UserWarning")]
H, W = 40, 50


def entry(idx, score, cat=1):
    return {"image_id": 1, "category_id": cat, "score": score, "bbox": [0, 0, 1, 1],
            "segmentation": fortran_indices_to_rle(np.asarray(idx), H, W)}


PARAMS = {"classes": {"1": {"score_thresh": 0.3, "min_size": 10}, "2": {"score_thresh": 0.8, "min_size": 0}},
          "default": {"score_thresh": 0.5, "min_size": 0}, "nms_iou": None}


def test_higher_score_wins_pixels_and_small_leftovers_are_dropped():
    a = ellipse_indices(20, 20, 8, 8, 0, H, W)
    b = ellipse_indices(20, 30, 8, 8, 0, H, W)                  # overlaps a, mostly visible
    c = np.setdiff1d(ellipse_indices(20, 21, 8, 8, 0, H, W), a)[:5]  # after a: a 5-px sliver
    low = ellipse_indices(5, 45, 3, 3, 0, H, W)
    out = apply_postprocess([entry(b, 0.6), entry(a, 0.9), entry(np.union1d(a, c), 0.7), entry(low, 0.2)],
                            PARAMS, H, W)
    assert [e["score"] for e in out] == [0.9, 0.6]               # sliver dropped, low score dropped
    got_b = rle_to_fortran_indices(out[1]["segmentation"])
    np.testing.assert_array_equal(got_b, np.setdiff1d(b, a))     # b lost the pixels a holds
    assert not masks_overlap([o["segmentation"] for o in out])
    x, y, w, h = out[1]["bbox"]
    ys, xs = got_b % H, got_b // H
    assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_a_mask_mostly_under_higher_scores_is_dropped_as_a_duplicate():
    a = ellipse_indices(20, 20, 8, 8, 0, H, W)
    b = ellipse_indices(20, 24, 8, 8, 0, H, W)                  # over half of it under a
    c = ellipse_indices(20, 34, 8, 8, 0, H, W)                  # under a a little
    hidden_b = np.isin(b, a).mean()
    assert 0.5 < hidden_b < 1 and np.isin(c, a).mean() < 0.5
    out = apply_postprocess([entry(a, 0.9), entry(b, 0.8), entry(c, 0.7)], PARAMS, H, W)
    assert [e["score"] for e in out] == [0.9, 0.7]              # b's visible rim would be a false positive
    np.testing.assert_array_equal(rle_to_fortran_indices(out[1]["segmentation"]), np.setdiff1d(c, a))


def test_dropped_mask_claims_no_pixels():
    a = ellipse_indices(20, 20, 1.5, 1.5, 0, H, W)  # small: dropped for min_size 10 ...
    b = ellipse_indices(20, 20, 5, 5, 0, H, W)     # ... so b keeps its whole mask
    out = apply_postprocess([entry(a, 0.9), entry(b, 0.5)], PARAMS, H, W)
    assert len(a) < 10 and len(out) == 1
    np.testing.assert_array_equal(rle_to_fortran_indices(out[0]["segmentation"]), b)


def test_per_class_thresholds_and_default():
    a = ellipse_indices(10, 10, 4, 4, 0, H, W)
    b = ellipse_indices(30, 40, 4, 4, 0, H, W)
    out = apply_postprocess([entry(a, 0.7, cat=2), entry(b, 0.7, cat=3)], PARAMS, H, W)
    assert [e["category_id"] for e in out] == [3]   # class 2 needs 0.8; class 3 uses the default 0.5


def test_mask_nms():
    a = ellipse_indices(20, 20, 8, 8, 0, H, W)
    b = ellipse_indices(20, 21, 8, 8, 0, H, W)      # IoU with a ≈ 0.9
    c = ellipse_indices(20, 35, 8, 8, 0, H, W)
    rles = [fortran_indices_to_rle(i, H, W) for i in (a, b, c)]
    assert mask_nms(rles, 0.5).tolist() == [0, 2]
    assert mask_nms(rles, 0.95).tolist() == [0, 1, 2]
    out = apply_postprocess([entry(a, 0.9), entry(b, 0.8), entry(c, 0.7)], {**PARAMS, "nms_iou": 0.5}, H, W)
    assert [e["score"] for e in out] == [0.9, 0.7]


@pytest.mark.parametrize("nms_iou", [None, 0.5])
def test_search_score_equals_applying_its_parameters(nms_iou):
    gt, results = make_workload(num_images=4, height=120, width=160, min_cells=30, max_cells=120, seed=9)
    found = search_postprocess(gt, results, nms_iou=nms_iou, score_grid=(0.2, 0.4, 0.6, 0.8), min_size_grid=(0, 20, 60))
    assert found["params"]["nms_iou"] == nms_iou
    assert found["score"] >= found["baseline_score"]
    images = {img["id"]: img for img in gt["images"]}
    processed = []
    for image_id, img in images.items():
        mine = [r for r in results if r["image_id"] == image_id]
        processed += apply_postprocess(mine, found["params"], img["height"], img["width"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # post-processed masks never overlap
        s = sartorius_score(gt, processed, score_thresh=0.0)
    assert s["score"] == pytest.approx(found["score"], abs=1e-12)
    baseline = {**found["params"], "classes": {}, "default": {"score_thresh": 0.5, "min_size": 0}}
    processed = []
    for image_id, img in images.items():
        processed += apply_postprocess([r for r in results if r["image_id"] == image_id], baseline,
                                       img["height"], img["width"])
    assert sartorius_score(gt, processed, score_thresh=0.0)["score"] == pytest.approx(found["baseline_score"], abs=1e-12)


def test_uncut_masks_keep_their_rle():
    a = ellipse_indices(10, 10, 4, 4, 0, H, W)
    e = entry(a, 0.9)
    out = apply_postprocess([e], PARAMS, H, W)
    assert out[0]["segmentation"] == e["segmentation"] and out[0] is not e
    assert mask_utils.area(out[0]["segmentation"]) == len(a)
