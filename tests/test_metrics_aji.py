"""AJI and the label-image DSB/Sartorius score: hand-computed cases, empty cases, a slow
reference on random label images, and the COCO-RLE Sartorius score on the same instances."""
import numpy as np
import pytest

from metrics.aji import (
    aggregated_jaccard_index,
    label_image_sartorius_score,
    label_image_scores,
    label_overlap,
    score_label_images,
)
from metrics.sartorius import THRESHOLDS, sartorius_score
from tests.fixtures.data_writers import random_label_image
from utils.coco_rle import encode_coco_rle
from utils.label_images import label_image_to_instances


def reference_aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kumar et al.'s AJI written out: one full mask per instance, a loop over GT instances."""
    gt_values = [v for v in np.unique(gt) if v != 0]
    pred_values = [v for v in np.unique(pred) if v != 0]
    if not gt_values and not pred_values:
        return 1.0
    inter_sum, union_sum, used = 0, 0, set()
    for g in gt_values:
        g_mask = gt == g
        best, best_iou = None, 0.0
        for p in pred_values:                     # ascending: ties keep the lowest label
            p_mask = pred == p
            inter = np.logical_and(g_mask, p_mask).sum()
            iou = inter / np.logical_or(g_mask, p_mask).sum()
            if inter and iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            union_sum += g_mask.sum()
            continue
        p_mask = pred == best
        inter_sum += np.logical_and(g_mask, p_mask).sum()
        union_sum += np.logical_or(g_mask, p_mask).sum()
        used.add(best)
    union_sum += sum((pred == p).sum() for p in pred_values if p not in used)
    return inter_sum / union_sum if union_sum else 0.0


def row(*values) -> np.ndarray:
    """A 1×N label image."""
    return np.array([values], dtype=np.int32)


def test_unmatched_prediction_adds_its_area():
    gt = row(1, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0)
    pred = row(5, 5, 5, 0, 0, 0, 7, 7, 7, 0, 9, 9)
    # g1–p5: 3 of 4; g2–p7: 2 of 3; p9 (2 px) chosen by nobody
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(5 / 9)
    # IoUs 0.75 and 0.667: both hits up to t = 0.65 (TP 2, FP 1), only g1 at 0.70 (TP 1, FP 2, FN 1)
    expected = np.array([2 / 3] * 4 + [1 / 4] + [0.0] * 5)
    np.testing.assert_allclose(label_image_scores(gt, pred), expected)
    assert label_image_sartorius_score(gt, pred) == pytest.approx(expected.mean())


def test_shared_best_match_counts_in_each_union():
    gt = row(1, 1, 0, 2, 2, 2, 0, 3)
    pred = row(4, 4, 4, 4, 4, 4, 0, 0)
    # p4 (6 px) is the best match of g1 (2/6) and g2 (3/6); g3 overlaps nothing
    assert aggregated_jaccard_index(gt, pred) == pytest.approx((2 + 3) / (6 + 6 + 1))


def test_equal_iou_goes_to_the_lowest_predicted_label():
    gt = row(1, 1, 1, 1, 1, 1, 0, 0, 0)
    # a: 2 px inside (IoU 2/6), b: 3 px inside, 3 outside (IoU 3/9): a tie
    a_first = row(3, 3, 8, 8, 8, 0, 8, 8, 8)
    b_first = row(8, 8, 3, 3, 3, 0, 3, 3, 3)
    assert aggregated_jaccard_index(gt, a_first) == pytest.approx(2 / (6 + 6))
    assert aggregated_jaccard_index(gt, b_first) == pytest.approx(3 / (9 + 2))


@pytest.mark.parametrize("gt_count, pred_count, expected", [(0, 0, 1.0), (3, 0, 0.0), (0, 3, 0.0)])
def test_empty_cases(gt_count, pred_count, expected):
    rng = np.random.default_rng(0)
    gt = random_label_image(rng, 20, 30, gt_count)
    pred = random_label_image(rng, 20, 30, pred_count)
    assert aggregated_jaccard_index(gt, pred) == expected
    assert label_image_sartorius_score(gt, pred) == expected
    scores = score_label_images(gt, pred)
    assert (scores["aji"], scores["sartorius"]) == (expected, expected)


def test_identical_images_score_one_whatever_the_label_values():
    gt = random_label_image(np.random.default_rng(1), 40, 50, 8)
    relabelled = np.where(gt > 0, gt.astype(np.int64) * 1000 + 70000, 0)   # beyond uint16, gaps
    assert score_label_images(gt, relabelled) == {"aji": 1.0, "sartorius": 1.0,
                                                  "num_gt": len(np.unique(gt)) - 1, "num_pred": len(np.unique(gt)) - 1}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same shape"):
        label_overlap(np.zeros((4, 5), np.uint16), np.zeros((5, 4), np.uint16))
    with pytest.raises(ValueError, match="integer"):
        label_overlap(np.zeros((4, 5), np.float32), np.zeros((4, 5), np.uint16))
    with pytest.raises(ValueError, match="negative"):
        label_overlap(np.zeros((4, 5), np.int32), -np.ones((4, 5), np.int32))


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A GT label image and a prediction made from it: shifted, some instances merged, dropped
    or added, labels renumbered."""
    rng = np.random.default_rng(seed)
    gt = random_label_image(rng, 48, 64, 14)
    pred = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1)).astype(np.int32)
    values = np.unique(pred)[1:]
    if len(values) > 3:
        pred[pred == values[1]] = values[0]                         # a merge
        pred[pred == values[2]] = 0                                 # a miss
    extra = random_label_image(rng, 48, 64, 3).astype(np.int32)
    pred = np.where((pred == 0) & (extra > 0), extra + 100, pred)  # false positives
    perm = rng.permutation(int(pred.max()) + 1) + 1
    perm[0] = 0
    return gt, perm[pred]


@pytest.mark.parametrize("seed", range(6))
def test_aji_equals_the_slow_reference(seed):
    gt, pred = random_pair(seed)
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(reference_aji(gt, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_sartorius_equals_the_coco_rle_score(seed):
    gt, pred = random_pair(seed)
    h, w = gt.shape

    def coco(labels):
        masks, _ = label_image_to_instances(labels)
        return encode_coco_rle(np.asarray(masks))

    gt_anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0}
               for k, rle in enumerate(coco(gt))]
    results = [{"image_id": 1, "category_id": 1, "segmentation": rle, "score": 1.0} for rle in coco(pred)]
    gt_coco = {"images": [{"id": 1, "height": h, "width": w}], "annotations": gt_anns,
               "categories": [{"id": 1, "name": "cell"}]}
    expected = sartorius_score(gt_coco, results)
    assert label_image_sartorius_score(gt, pred) == pytest.approx(expected["score"], abs=1e-12)
    np.testing.assert_allclose(label_image_scores(gt, pred),
                               [expected["per_threshold"][f"{t:.2f}"] for t in THRESHOLDS], atol=1e-12)


def test_large_dense_image_closed_form():
    """1000×1000, 2,000 tiles of 20×25 px, prediction shifted 5 px right (a loop over
    full-image instance masks would take minutes here)."""
    tiles = np.arange(1, 2001, dtype=np.int32).reshape(50, 40)
    gt = np.repeat(np.repeat(tiles, 20, axis=0), 25, axis=1).astype(np.uint16)
    pred = np.zeros_like(gt)
    pred[:, 5:] = gt[:, :-5]
    # Each GT keeps 400 px of its own tile (IoU 400/600; last column 400/500, its tile cut to
    # 20×20) over 100 px of the left neighbour's (IoU 100/900); every prediction is chosen.
    inter, union = 2000 * 400, 1950 * 600 + 50 * 500
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(inter / union)
    # Hits up to t = 0.65 all; at 0.70 and 0.75 only the 50 of IoU 0.8 (1,950 FN, 1,950 FP).
    expected = (4 * 1.0 + 2 * 50 / (50 + 1950 + 1950)) / 10
    assert label_image_sartorius_score(gt, pred) == pytest.approx(expected)
