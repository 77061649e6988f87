"""The fast COCO evaluation against pycocotools' COCOeval, on adversarial random cases."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from metrics import evaluate_predictions
from metrics.coco import evaluate_coco, match_group
from metrics.reference import load_coco, pycocotools_eval
from tests.fixtures.workload import make_random_case, make_workload
from utils.coco_rle import fortran_indices_to_rle, rle_area, rle_counts, rle_to_fortran_indices

# pycocotools' decode trips a numpy-2 DeprecationWarning; overlapping raw predictions warn by design.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*overlapping predicted masks:UserWarning")]


def assert_same_as_pycocotools(gt, results, iou_type, max_dets):
    ours = evaluate_coco(gt, results, iou_type, max_dets)
    ref = pycocotools_eval(load_coco(gt), results, iou_type, max_dets, summarize=max_dets == 100)
    np.testing.assert_array_equal(ours.precision, ref.eval["precision"])
    np.testing.assert_array_equal(ours.recall, ref.eval["recall"])
    np.testing.assert_array_equal(ours.scores, ref.eval["scores"])
    if max_dets == 100:
        np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-9)
    return ours, ref


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_random_cases_equal_pycocotools(seed, iou_type):
    rng = np.random.default_rng(seed)
    gt, results = make_random_case(rng, num_images=4, string_ids=seed % 3 == 0, with_bbox=seed % 4 != 3,
                                   num_cats=1 + seed % 3)
    assert results, "the generator must produce detections"
    for max_dets in (100, 4, 1000):
        assert_same_as_pycocotools(gt, results, iou_type, max_dets)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), max_gt=st.integers(1, 40))
def test_hypothesis_cases_equal_pycocotools(seed, max_gt):
    rng = np.random.default_rng(seed)
    gt, results = make_random_case(rng, num_images=2, max_gt=max_gt)
    assume(results)             # pycocotools' loadRes cannot take an empty list
    assert_same_as_pycocotools(gt, results, "segm", 100)
    assert_same_as_pycocotools(gt, results, "bbox", 7)


def test_dense_images_equal_pycocotools_at_1000():
    gt, results = make_workload(num_images=2, height=200, width=260, min_cells=150, max_cells=300, seed=5)
    for iou_type in ("segm", "bbox"):
        ours, ref = assert_same_as_pycocotools(gt, results, iou_type, 1000)
        # pycocotools' summarize() would print AP = -1 here (maxDets 100 hard-coded); ours reads
        # the AP rows at the largest maxDets: the mean of the same precision array.
        p = ref.eval["precision"][:, :, :, 0, -1]
        assert ours.stats[0] == pytest.approx(float(p[p > -1].mean()), abs=1e-12)
        assert 0.05 < ours.stats[0] < 0.95


def test_more_than_maxdets_per_image_changes_the_numbers():
    gt, results = make_workload(num_images=1, height=200, width=260, min_cells=250, max_cells=250, seed=2)
    at_100 = evaluate_coco(gt, results, "segm", 100)
    at_1000 = evaluate_coco(gt, results, "segm", 1000)
    assert at_1000.stats[8] > at_100.stats[8] + 0.1  # AR@max grows when detections are not cut


def test_hard_components_are_replayed_exactly():
    # Two identical GT masks and a detection equal to both: IoU ties → pycocotools picks the later GT.
    ious = np.array([[1.0, 1.0], [1.0, 1.0], [0.6, 0.0]])
    gt_ig = np.zeros((1, 2), dtype=bool)
    m = match_group(ious, np.zeros(2, dtype=bool), gt_ig)
    assert m[0, 0].tolist() == [1, 0, -1]
    # The not-ignored GT is preferred over an ignored one with higher IoU.
    ious = np.array([[0.9, 0.6]])
    m = match_group(ious, np.zeros(2, dtype=bool), np.array([[True, False]]))
    assert m[0, 0].tolist() == [1]
    assert m[0, 5].tolist() == [0]  # at t=0.75 only the ignored GT is a candidate: it takes it


def test_no_results_gives_zero_ap():
    rng = np.random.default_rng(1)
    gt, _ = make_random_case(rng, num_images=3)
    report = evaluate_predictions(gt, [], 100)
    for iou_type in ("segm", "bbox"):
        assert report["coco"][iou_type]["AP"] in (0.0, -1.0)
    assert report["sartorius"]["score"] <= 1.0


def test_report_shape():
    gt, results = make_workload(num_images=2, height=100, width=120, min_cells=20, max_cells=40, seed=0)
    report = evaluate_predictions(gt, results, 1000)
    assert report["max_dets"] == 1000
    for iou_type in ("segm", "bbox"):
        r = report["coco"][iou_type]
        assert len(r["stats"]) == 12 and r["AP"] == r["stats"][0] and r["AP50"] == r["stats"][1]
        assert set(r["per_class"]) == {"shsy5y", "astro", "cort"}
    s = report["sartorius"]
    assert set(s) >= {"score", "per_class", "per_threshold", "per_image"}
    assert list(s["per_threshold"]) == [f"{t:.2f}" for t in np.arange(0.5, 0.96, 0.05)]
    renamed = evaluate_predictions(gt, results, 1000, class_names=["a", "b", "c"])
    assert set(renamed["coco"]["segm"]["per_class"]) == set(renamed["sartorius"]["per_class"]) == {"a", "b", "c"}
    assert list(renamed["coco"]["bbox"]["per_class"].values()) == list(r["per_class"].values())


def test_synthetic_dataset_ground_truth_is_accepted():
    from datasets import build_dataset
    gt = build_dataset("synthetic", "val", {"synthetic_val_images": 2, "synthetic_size": 96}, None).coco_gt()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9, "segmentation": a["segmentation"]} for a in gt["annotations"]]
    report = evaluate_predictions(gt, results, 1000)
    assert report["coco"]["segm"]["AP"] == pytest.approx(1.0)
    assert report["sartorius"]["score"] == pytest.approx(1.0)


# --- RLE helpers in utils/coco_rle.py ---------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), h=st.integers(1, 30), w=st.integers(1, 30), p=st.floats(0, 1))
def test_rle_helpers_agree_with_pycocotools(seed, h, w, p):
    m = (np.random.default_rng(seed).random((h, w)) < p).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(m))
    idx = rle_to_fortran_indices(rle)
    np.testing.assert_array_equal(idx, np.flatnonzero(m.ravel(order="F")))
    assert rle_area(rle) == int(m.sum())
    assert rle_counts(rle).sum() == h * w
    assert fortran_indices_to_rle(idx, h, w)["counts"].encode() == rle["counts"]


def test_single_instance_equal_pycocotools():
    gt, results = make_workload(num_images=1, height=60, width=80, min_cells=1, max_cells=1, pred_ratio=1.0, seed=4)
    assert len(gt["annotations"]) == 1 and len(results) == 1
    for iou_type in ("segm", "bbox"):
        assert_same_as_pycocotools(gt, results, iou_type, 100)


@pytest.mark.slow
def test_800_instances_per_image_equal_pycocotools():
    gt, results = make_workload(num_images=2, min_cells=800, max_cells=800, seed=8)
    for iou_type in ("segm", "bbox"):
        assert_same_as_pycocotools(gt, results, iou_type, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12, 212))
def test_many_random_cases_equal_pycocotools(seed):
    rng = np.random.default_rng(seed)
    gt, results = make_random_case(rng, num_images=4, string_ids=seed % 3 == 0, with_bbox=seed % 4 != 3,
                                   num_cats=1 + seed % 3)
    if not results:  # pycocotools' loadRes cannot take an empty list; covered by test_no_results_gives_zero_ap
        return
    for iou_type in ("segm", "bbox"):
        for max_dets in (100, 3, 1000):
            assert_same_as_pycocotools(gt, results, iou_type, max_dets)
