"""Flip TTA and weighted segments fusion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.tta import cluster_boxes, flip_image, predict_tta, unflip_detections, weighted_segments_fusion
from utils.box_masks import paste_masks_in_boxes
from utils.instances import Instances


def det(boxes, scores, labels, probs, size=(60, 80)) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "mask_probs": torch.as_tensor(probs, dtype=torch.float32).reshape(-1, 28, 28), "image_size": size}


def blob(radius: float = 0.7) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    return torch.sigmoid((radius - torch.sqrt(xx ** 2 + (yy * 1.3) ** 2)) * 10)


@pytest.mark.parametrize("flip", ["none", "h", "v", "hv"])
def test_unflip_maps_flipped_detections_back(flip):
    g = torch.Generator().manual_seed(1)
    probs = torch.stack([blob(0.5 + 0.1 * k) for k in range(5)]) + 0.05 * torch.rand(5, 28, 28, generator=g)
    boxes = [[3, 4, 30, 20], [40, 10, 79, 59], [0, 0, 10, 10], [10.5, 20.25, 33.5, 41], [60, 30, 75, 50]]
    flipped = det(boxes, [0.9] * 5, [1] * 5, probs)
    back = unflip_detections(flipped, flip)
    # Pasting the mapped-back detections = flipping the masks pasted in the flipped image (the
    # paste is pixel-aligned, so mirroring commutes with it; a pixel may differ by float rounding).
    pasted = paste_masks_in_boxes(flipped["mask_probs"], flipped["boxes"], 60, 80).to_dense()
    dims = [d for axis, d in (("v", 1), ("h", 2)) if axis in flip]
    expected = np.flip(pasted, dims) if dims else pasted
    got = paste_masks_in_boxes(back["mask_probs"], back["boxes"], 60, 80).to_dense()
    inter = (got & expected).reshape(5, -1).sum(1)
    union = (got | expected).reshape(5, -1).sum(1)
    iou = inter / np.maximum(union, 1)
    assert iou.min() >= 0.99, iou
    if flip == "none":
        assert np.array_equal(got, expected)
    # Flipping twice is the identity.
    twice = unflip_detections(back, flip)
    assert torch.equal(twice["boxes"], flipped["boxes"]) and torch.equal(twice["mask_probs"], flipped["mask_probs"])
    image = torch.rand(3, 6, 8)
    assert torch.equal(flip_image(flip_image(image, flip), flip), image)


def test_single_augmentation_equals_plain_prediction():
    g = torch.Generator().manual_seed(2)
    boxes = [[5, 5, 25, 25], [30, 5, 55, 30], [10, 35, 40, 58], [12, 7, 27, 26]]    # last overlaps the first
    d = det(boxes, [0.9, 0.8, 0.7, 0.6], [1, 1, 2, 2], torch.rand(4, 28, 28, generator=g))
    fused = weighted_segments_fusion([d])
    plain = Instances.from_detections(d)
    assert np.array_equal(fused.boxes, plain.boxes) and np.array_equal(fused.scores, plain.scores)
    assert np.array_equal(fused.labels, plain.labels)
    assert np.array_equal(fused.masks.to_dense(), plain.masks.to_dense())


def test_fusion_clusters_by_iou_and_class_and_rescales_scores():
    b = blob()
    per_aug = [
        det([[10, 10, 30, 30], [50, 20, 70, 45]], [0.9, 0.8], [1, 1], torch.stack([b, b])),
        det([[11, 10, 31, 31], [50, 20, 70, 45]], [0.7, 0.6], [1, 2], torch.stack([b, b])),   # 2nd: other class
        det([[10, 11, 30, 30]], [0.8], [1], b[None]),
        det([], [], [], torch.zeros(0, 28, 28)),
    ]
    fused = weighted_segments_fusion(per_aug)
    assert len(fused) == 3
    assert np.all(np.diff(fused.scores) <= 0)
    # Object A: found by 3 of 4 flips → mean(0.9, 0.7, 0.8) × 3/4; box = score-weighted mean.
    assert fused.scores[0] == pytest.approx(0.8 * 3 / 4, rel=1e-5) and fused.labels[0] == 1
    weights = np.array([0.9, 0.7, 0.8])
    expected_box = (weights[:, None] * np.array([[10, 10, 30, 30], [11, 10, 31, 31], [10, 11, 30, 30]])).sum(0) / weights.sum()
    np.testing.assert_allclose(fused.boxes[0], expected_box, rtol=1e-5)
    # Object B: class 1 once (0.8/4) and class 2 once (0.6/4): not merged across classes.
    got = sorted(zip(fused.labels[1:].tolist(), fused.scores[1:].tolist()))
    assert [g[0] for g in got] == [1, 2] and np.allclose([g[1] for g in got], [0.2, 0.15])
    assert fused.masks.to_dense()[0].sum() > 100


def test_fused_mask_is_the_score_weighted_mean_of_soft_masks():
    high = torch.full((28, 28), 0.9)
    low = torch.full((28, 28), 0.2)
    box = [[10, 10, 40, 40]]
    # (0.8·0.9 + 0.2·0.2) / 1.0 = 0.76 > 0.5 → foreground; with swapped weights 0.34 → empty.
    fg = weighted_segments_fusion([det(box, [0.8], [1], high[None]), det(box, [0.2], [1], low[None])])
    bg = weighted_segments_fusion([det(box, [0.2], [1], high[None]), det(box, [0.8], [1], low[None])])
    assert len(fg) == len(bg) == 1
    single = paste_masks_in_boxes(high[None], torch.tensor(box, dtype=torch.float32), 60, 80).to_dense()[0]
    assert np.array_equal(fg.masks.to_dense()[0], single)
    assert bg.masks.to_dense().sum() == 0


def test_cluster_boxes_orders_by_score():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], dtype=np.float64)
    clusters = cluster_boxes(boxes, np.array([0.5, 0.9, 0.7]), np.array([1, 1, 1]), 0.55)
    assert clusters == [[1, 0], [2]]


def test_predict_tta_on_a_model(tmp_path):
    from test_predict import make_checkpoint, synthetic_image

    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from transforms.preprocess import Preprocessing, to_model_input

    model, _ = build_model_from_checkpoint(load_checkpoint(make_checkpoint(tmp_path / "c.pth")))
    model.eval()
    images = [to_model_input(synthetic_image(1), Preprocessing())]
    fused = predict_tta(model, images)
    assert len(fused) == 1 and fused[0].image_size == (96, 120)
    assert 0 < len(fused[0]) <= model.roi_heads.detections_per_img
    assert np.all(np.diff(fused[0].scores) <= 0)
    plain = predict_tta(model, images, flips=("none",))[0]
    from engine.inference import detect

    reference = Instances.from_detections(detect(model, images)[0])
    assert np.array_equal(plain.masks.to_dense(), reference.masks.to_dense())


def test_predict_cli_with_tta(tmp_path, capsys):
    from PIL import Image
    from test_predict import make_checkpoint, synthetic_image

    import predict
    from datasets.imageio import read_label_image

    checkpoint = make_checkpoint(tmp_path / "c.pth")
    Image.fromarray(synthetic_image(6)).save(tmp_path / "a.png")
    rc = predict.main(predict.get_args_parser().parse_args(
        [str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "o"), "--tta",
         "--score-thresh", "0.1", "--formats", "labels", "csv"]))
    assert rc == 0, capsys.readouterr().err
    labels = read_label_image(tmp_path / "o" / "a_labels.png")
    rows = (tmp_path / "o" / "submission.csv").read_text().splitlines()[1:]
    assert labels.shape == (96, 120) and labels.max() == len(rows) > 0
