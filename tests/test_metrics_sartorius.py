"""The Sartorius score against a straightforward dense reference implementation."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from pycocotools import mask as mask_utils

from metrics.sartorius import THRESHOLDS, sartorius_score
from tests.fixtures.workload import ellipse_indices, make_random_case, make_workload
from utils.coco_rle import fortran_indices_to_rle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def reference_image_score(pred_masks: list[np.ndarray], gt_masks: list[np.ndarray]) -> float:
    """The competition kernel, written out: dense masks, IoU by counting, loops over thresholds."""
    if not pred_masks and not gt_masks:
        return 1.0
    iou = np.zeros((len(pred_masks), len(gt_masks)))
    if pred_masks and gt_masks:
        P = sp.csr_matrix(np.array([m.ravel() for m in pred_masks], dtype=np.float64))
        G = sp.csr_matrix(np.array([m.ravel() for m in gt_masks], dtype=np.float64))
        inter = (P @ G.T).toarray()
        union = np.asarray(P.sum(axis=1)) + np.asarray(G.sum(axis=1)).T - inter
        iou = np.divide(inter, union, out=iou, where=union > 0)
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        matches = iou > t
        tp = np.sum(matches.sum(axis=0) == 1)
        fn = np.sum(matches.sum(axis=0) == 0)
        fp = np.sum(matches.sum(axis=1) == 0)
        scores.append(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def dense(rle_or_segm, h, w):
    if isinstance(rle_or_segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(rle_or_segm, h, w))
    elif isinstance(rle_or_segm["counts"], list):
        rle = mask_utils.frPyObjects(rle_or_segm, h, w)
    else:
        rle = rle_or_segm
    return mask_utils.decode(rle).astype(bool)


def reference_score(gt, results, thresh=0.5):
    per_image = {}
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        g = [dense(a["segmentation"], h, w) for a in gt["annotations"]
             if a["image_id"] == img["id"] and not a.get("iscrowd", 0)]
        p = [dense(r["segmentation"], h, w) for r in results if r["image_id"] == img["id"] and r["score"] >= thresh]
        per_image[img["id"]] = reference_image_score(p, g)
    return float(np.mean(list(per_image.values()))), per_image


def _case(pred_idx, gt_idx, h=40, w=50):
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": 1, "name": "cell"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(len(i)),
                           "segmentation": fortran_indices_to_rle(np.array(i), h, w)} for k, i in enumerate(gt_idx)]}
    results = [{"image_id": 1, "category_id": 1, "score": 0.9,
                "segmentation": fortran_indices_to_rle(np.array(i), h, w)} for i in pred_idx]
    return gt, results


def test_empty_cases():
    one = list(range(100, 130))
    assert sartorius_score(*_case([], []))["score"] == 1.0          # nothing to find, nothing found
    assert sartorius_score(*_case([], [one]))["score"] == 0.0       # GT, no predictions
    assert sartorius_score(*_case([one], []))["score"] == 0.0       # predictions, no GT


def test_single_instance_exact_and_shifted():
    cell = ellipse_indices(20, 25, 6, 8, 0.3, 40, 50)
    assert sartorius_score(*_case([cell], [cell]))["score"] == 1.0
    shifted = ellipse_indices(21, 25, 6, 8, 0.3, 40, 50)
    gt, results = _case([shifted], [cell])
    expected = reference_score(gt, results)[0]
    assert 0.0 < expected < 1.0
    assert sartorius_score(gt, results)["score"] == pytest.approx(expected, abs=1e-12)
    # A hit is IoU > t, strictly: IoU exactly 0.5 is a miss at every threshold.
    half = np.arange(0, 100)
    gt, results = _case([half[:50]], [half])
    assert sartorius_score(gt, results)["score"] == 0.0


def test_two_predictions_on_one_gt_is_neither_tp_nor_fn():
    cell = ellipse_indices(20, 25, 6, 8, 0.0, 40, 50)
    gt, results = _case([cell, cell], [cell])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = sartorius_score(gt, results)
    assert s["score"] == pytest.approx(reference_score(gt, results)[0]) == 0.0
    assert s["overlapping_images"] == 1 and any("overlapping" in str(w.message) for w in caught)


def test_800_instances_match_reference():
    gt, results = make_workload(num_images=1, height=180, width=240, min_cells=800, max_cells=800, seed=11,
                                min_px=3)
    assert len(gt["annotations"]) > 500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sartorius_score(gt, results, score_thresh=0.4)
    ref, _ = reference_score(gt, results, 0.4)
    assert 0.05 < ref < 0.95
    assert ours["score"] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_match_reference(seed):
    gt, results = make_random_case(np.random.default_rng(100 + seed), num_images=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sartorius_score(gt, results, score_thresh=0.3)
    ref, per_image = reference_score(gt, results, 0.3)
    assert ours["score"] == pytest.approx(ref, abs=1e-12)
    for image_id, value in per_image.items():
        assert ours["per_image"][image_id] == pytest.approx(value, abs=1e-12)
    mean_t = np.mean(list(ours["per_threshold"].values()))
    assert mean_t == pytest.approx(ref, abs=1e-12)  # mean over t of means over images


def test_no_overlap_no_warning_and_score_thresh_filters():
    a = ellipse_indices(10, 10, 5, 5, 0, 40, 50)
    b = ellipse_indices(28, 35, 5, 5, 0, 40, 50)
    gt, results = _case([a, b], [a, b])
    results[1]["score"] = 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sartorius_score(gt, results, score_thresh=0.5)
    assert s["score"] == pytest.approx(0.5)   # 1 TP, 1 FN at every threshold
    assert s["overlapping_images"] == 0
    assert sartorius_score(gt, results, score_thresh=0.1)["score"] == 1.0


def test_per_class_uses_cell_type_or_restricts_mixed_images():
    h, w = 40, 50
    a = ellipse_indices(10, 10, 5, 5, 0, h, w)
    b = ellipse_indices(28, 35, 5, 5, 0, h, w)
    rle = lambda i: fortran_indices_to_rle(i, h, w)  # noqa: E731
    gt = {"categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
          "images": [{"id": 1, "height": h, "width": w, "cell_type": "x"}, {"id": 2, "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle(a), "area": 1.0},
                          {"id": 2, "image_id": 2, "category_id": 1, "segmentation": rle(a), "area": 1.0},
                          {"id": 3, "image_id": 2, "category_id": 2, "segmentation": rle(b), "area": 1.0}]}
    results = [{"image_id": 1, "category_id": 2, "score": 1.0, "segmentation": rle(a)},   # wrong class, right mask
               {"image_id": 2, "category_id": 1, "score": 1.0, "segmentation": rle(a)},
               {"image_id": 2, "category_id": 1, "score": 1.0, "segmentation": rle(b)}]  # wrong class
    s = sartorius_score(gt, results)
    assert s["per_image"] == {1: 1.0, 2: 1.0}          # the score itself is class-agnostic
    # image 1 is known to be "x": counts fully; image 2 is mixed: per class on its own instances.
    assert s["per_class"]["x"] == pytest.approx((1.0 + 0.5) / 2)  # image 2, class x: 1 TP, 1 FP
    assert s["per_class"]["y"] == 0.0                              # image 2, class y: 0 TP, 1 FN
    assert set(THRESHOLDS.tolist()) == {round(0.5 + 0.05 * k, 2) for k in range(10)}
