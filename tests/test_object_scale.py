"""A test scale per image from the size of its objects (``engine.inference.detect`` with an
``object_diameter``): the estimate, the scale it asks for, every reader following it (predictor,
TTA, tiles, evaluation), the end-of-run choice and where it is stored."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from test_predict import synthetic_image

import engine.inference as inference
import train
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from engine.config import TrainConfig
from engine.evaluation import TestScaleChoice, TestScaleSearch, median_diameters
from engine.inference import detect, median_diameter, object_scale
from models.scale import ScaleTransform
from transforms.preprocess import Preprocessing, to_model_input

SMALL = dict(model="maskrcnn_resnet18_fpn", input_scale=1.0, anchor_sizes=(8, 16, 32, 64, 128),
             detections_per_img=40, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)


def output(sizes: list[int], scores: list[float], fill: float = 1.0) -> dict[str, torch.Tensor]:
    """Square detections of side ``sizes`` whose masks fill ``fill`` of their box."""
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sizes])
    probs = torch.zeros(len(sizes), 28, 28)
    probs[:, :, :int(round(28 * fill))] = 0.9
    return {"boxes": boxes, "scores": torch.tensor(scores), "mask_probs": probs}


def test_median_diameter_reads_the_mask_area_in_the_box_frame():
    sizes = [10, 20, 30, 40, 50, 60, 100]
    # the 100-px box scores below 0.5: not counted; median of 10..60 by area: sides 30 and 40
    found = median_diameter(output(sizes, [0.9] * 6 + [0.3], fill=0.5))
    assert found == pytest.approx(2 * math.sqrt((0.5 * 900 + 0.5 * 1600) / 2 / math.pi), rel=1e-5)
    assert median_diameter(output(sizes[:4], [0.9] * 4)) is None            # fewer than 5: no estimate
    assert median_diameter(output(sizes, [0.4] * 7)) is None


def test_object_scale_aims_at_the_diameter_within_bounds_and_keeps_a_close_first_pass():
    t = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3, object_diameter=20.0)
    assert object_scale(t, 10.0) == 2.0
    assert object_scale(t, 16.0) == 1.25
    assert object_scale(t, 4.0) == 2.0                  # at most 2× the training scale
    assert object_scale(t, 80.0) == 1.0                 # never below the training scale
    assert object_scale(t, 19.0) == 1.0                 # within 10 % of the first pass: keep it
    assert object_scale(t, None) == 1.0
    assert object_scale(t, 10.0, target=25.0) == 2.0 and object_scale(t, 20.0, target=25.0) == 1.25
    t = ScaleTransform(0.5, [0.0] * 3, [1.0] * 3, test_scale=0.75, object_diameter=20.0)
    assert object_scale(t, 10.0) == 1.0                 # 2 × the training scale 0.5
    assert object_scale(t, 28.0) == 0.75 and object_scale(t, 40.0) == 0.5   # 0.71: within 10 % of 0.75


@pytest.fixture(scope="module")
def model():
    import models

    torch.manual_seed(0)
    config = TrainConfig(**SMALL)
    return models.build_model(config.model, 2, config.model_options()).eval()


@pytest.fixture
def counted_by_any_score(monkeypatch):
    """A random-weight model's detections score about 1/3: let every one count for the estimate."""
    monkeypatch.setattr(inference, "DIAMETER_MIN_SCORE", 0.0)
    monkeypatch.setattr(inference.median_diameter, "__defaults__", (0.0, inference.DIAMETER_MIN_OBJECTS))


def images() -> list[torch.Tensor]:
    contract = Preprocessing("percentile", "gray")
    return [to_model_input(synthetic_image(k, 96, 120), contract) for k in range(2)]


def test_detect_predicts_each_image_again_at_the_scale_its_objects_ask_for(model, counted_by_any_score):
    inputs = images()
    transform = model.transform
    plain = detect(model, inputs)
    assert all(out["input_scale"] == 1.0 and out["object_diameter"] for out in plain)
    d0, d1 = (out["object_diameter"] for out in plain)
    # a target that keeps the first image at ×1 (within 10 %) and enlarges the second
    transform.object_diameter = d0 * 1.05
    try:
        expected = [object_scale(transform, d) for d in (d0, d1)]
        assert d0 * 1.05 / d1 > 1.1, "the two images' objects must differ in size for this test"
        found = detect(model, inputs)
    finally:
        transform.object_diameter = None
    assert [out["input_scale"] for out in found] == expected and expected[0] == 1.0 and expected[1] > 1.1
    assert [out["object_diameter"] for out in found] == [d0, d1]        # the first pass's estimates
    again = detect(model, [inputs[1]], [expected[1]])[0]
    for key in ("boxes", "scores", "labels", "mask_probs"):
        assert torch.equal(found[1][key], again[key]) and torch.equal(found[0][key], plain[0][key])
    assert float(found[1]["boxes"][:, 2].max()) <= 120 and found[1]["image_size"] == (96, 120)
    assert transform.test_scale == 1.0


def test_tta_uses_the_first_flips_scale_for_every_flip(model, counted_by_any_score, monkeypatch):
    import engine.tta as tta

    calls = []

    def spy(m, imgs, scales=None):
        calls.append(scales)
        return detect(m, imgs, scales)
    monkeypatch.setattr(tta, "detect", spy)
    model.transform.object_diameter = 30.0
    try:
        tta.predict_tta(model, images())
    finally:
        model.transform.object_diameter = None
    first = detect(model, images())     # not adaptive: the first pass's diameters
    assert calls[0] is None and len(calls) == len(tta.FLIPS)
    expected = [object_scale(ScaleTransform(1.0, [0.0] * 3, [1.0] * 3, object_diameter=30.0), out["object_diameter"])
                for out in first]
    assert all(c == expected for c in calls[1:])


def test_predictor_and_evaluation_follow_the_scale_per_image_and_tiles_share_one(tmp_path, counted_by_any_score,
                                                                                  monkeypatch):
    import engine.predictor as predictor_module
    from engine.evaluation import predict_loader
    from engine.predictor import Predictor
    from utils.instances import Instances

    path = tmp_path / "best.pth"
    torch.manual_seed(0)
    config = TrainConfig(**SMALL, object_diameter_test=30.0)
    import models
    net = models.build_model(config.model, 2, config.model_options())
    save_checkpoint(path, {"model": net.state_dict(), "config": config.to_dict(), "epoch": 1, "iteration": 0,
                           "class_names": ["round", "elongated"], "model_name": config.model})
    model, _ = build_model_from_checkpoint(load_checkpoint(path))
    assert model.transform.object_diameter == 30.0
    predictor = Predictor.from_checkpoint(path, device="cpu", score_thresh=0.0)
    image = synthetic_image(1, 96, 120)
    x = to_model_input(image, predictor.contract)
    expected = detect(predictor.model, [x])[0]
    assert expected["input_scale"] != 1.0                 # the test means something
    got = predictor.predict(image)
    want = Instances.from_detections(expected).non_overlapping()
    assert np.array_equal(got.instances.boxes, want.boxes) and np.array_equal(got.instances.scores, want.scores)
    # the evaluation loop (trainer's validation, evaluate.py) records the first pass's estimate
    diameters: dict = {}
    loader = [([x], [{"image_id": 7}])]
    results = predict_loader(predictor.model, loader, torch.device("cpu"), diameters=diameters, print_freq=0)
    assert diameters == {7: expected["object_diameter"]} and len(results[7]) == len(expected["scores"])

    # Tiles: one scale for the whole image (from its centre tile), no per-tile choice.
    seen = []

    def spy(m, imgs, scales=None):
        t = m.transform
        seen.append((t.test_scale, t.object_diameter, scales))
        return detect(m, imgs, scales)
    monkeypatch.setattr(predictor_module, "detect", spy)
    tiled = Predictor.from_checkpoint(path, device="cpu", score_thresh=0.0, tile=64, tile_overlap=16)
    tiled.predict(image)
    centre = seen[0]
    assert centre[1] == 30.0 and centre[2] == [1.0]
    chosen = {s for s, _, _ in seen[1:]}
    assert len(chosen) == 1 and all(d is None and sc is None for _, d, sc in seen[1:]) and len(seen) > 2
    assert tiled.model.transform.object_diameter == 30.0 and tiled.model.transform.test_scale == 1.0


class _Validation:
    """A stand-in for ``engine.evaluation.Validation``: its score depends on the test scale, or
    on the per-image scales when the transform has an object diameter."""

    def __init__(self, transform, scores: dict, diameters: dict, gt_sizes: dict, calls: list):
        self.transform, self.scores, self.calls = transform, scores, calls
        self.loader = type("Loader", (), {"dataset": list(diameters)})()
        self.coco_gt = {"annotations": [{"image_id": i, "area": math.pi * (d / 2) ** 2, "iscrowd": 0}
                                        for i, d in gt_sizes.items() for _ in range(5)]}
        self.diameters, self.last_diameters = diameters, dict(diameters)
        self.last_seconds = 10.0

    def subset(self, max_images: int):
        return self

    def __call__(self, epoch: int) -> dict:
        per_image = self.transform.object_diameter is not None
        self.calls.append("per image" if per_image else self.transform.test_scale)
        score = self.scores["per image" if per_image else self.transform.test_scale]
        return {"coco": {"segm": {"AP": score, "AP50": score, "AP75": score}}}


def test_median_diameters_of_the_ground_truth():
    gt = {"annotations": [{"image_id": 1, "area": a, "iscrowd": 0} for a in (10, 20, 30, 40, 50)]
          + [{"image_id": 2, "area": 5.0, "iscrowd": 0}] + [{"image_id": 1, "area": 1e6, "iscrowd": 1}]}
    assert median_diameters(gt) == {1: pytest.approx(2 * math.sqrt(30 / math.pi))}


@pytest.mark.parametrize("per_image_score, chosen", [(0.288, True), (0.35, True), (0.28, False)])
def test_search_keeps_per_image_scales_unless_they_score_below_the_best_factor(per_image_score, chosen):
    transform = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3)
    calls: list = []
    scores = {1.0: 0.2, 1.25: 0.3, 1.5: 0.29, "per image": per_image_score}
    validation = _Validation(transform, scores, {1: 12.0, 2: 20.0, 3: 24.0}, {1: 12.0, 2: 20.0, 3: 25.0}, calls)
    search = TestScaleSearch(validation, transform, "segm_AP")
    assert search.tries_per_image
    assert search.cost() == pytest.approx(1.25 ** 2 + 1.5 ** 2 + 1 + 1.5 ** 2)
    choice = search(0, validation(0))
    assert calls == [1.0, 1.25, 1.5, "per image"]
    assert choice.numbers[1.25]["segm_AP"] == 0.3 and choice.per_image["segm_AP"] == per_image_score
    if chosen:    # objects at 1.25 (the best score) × the median of the first pass's diameters (20 px): 25 px
        assert choice.object_diameter == pytest.approx(25.0) and choice.scale == 1.0
        assert transform.object_diameter == pytest.approx(25.0) and transform.test_scale == 1.0
        assert choice.report["coco"]["segm"]["AP"] == per_image_score
    else:
        assert choice.object_diameter is None and choice.scale == 1.25
        assert transform.object_diameter is None and transform.test_scale == 1.25


def test_per_image_objects_are_shown_at_the_best_scoring_factor_even_below_the_gain_asked_of_a_factor():
    transform = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3)
    scores = {1.0: 0.2, 1.25: 0.3, 1.5: 0.302, "per image": 0.31}      # ×1.5: +0.7 %, not chosen alone
    validation = _Validation(transform, scores, {1: 12.0, 2: 20.0, 3: 24.0}, {1: 12.0, 2: 20.0, 3: 25.0}, [])
    choice = TestScaleSearch(validation, transform, "segm_AP")(0, validation(0))
    assert choice.object_diameter == pytest.approx(30.0)


def test_search_skips_per_image_scales_when_the_validation_objects_are_of_one_size():
    transform = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3)
    calls: list = []
    validation = _Validation(transform, {1.0: 0.2, 1.25: 0.3, 1.5: 0.29, "per image": 0.5},
                             {1: 20.0, 2: 21.0}, {1: 20.0, 2: 22.0}, calls)
    search = TestScaleSearch(validation, transform, "segm_AP")
    assert not search.tries_per_image and search.cost() == pytest.approx(1.25 ** 2 + 1.5 ** 2)
    choice = search(0, validation(0))
    assert calls == [1.0, 1.25, 1.5] and choice.per_image is None and choice.scale == 1.25


def test_the_choice_is_stored_in_the_run_and_its_checkpoints(tmp_path, caplog):
    config = TrainConfig(**SMALL, best_metric="segm_AP")
    import models
    net = models.build_model(config.model, 2, config.model_options())
    for name in ("last.pth", "best.pth"):
        save_checkpoint(tmp_path / name, {"model": net.state_dict(), "config": config.to_dict(), "epoch": 1,
                                          "iteration": 0, "class_names": ["a", "b"], "model_name": config.model})
    report = {"coco": {"segm": {"AP": 0.4, "AP50": 0.4, "AP75": 0.4}}}

    class Search:
        subset = type("V", (), {"loader": type("L", (), {"dataset": [0, 1, 2]})()})()

        def __call__(self, epoch, report, deadline):
            return TestScaleChoice(1.0, 26.5, report, {1.0: {"segm_AP": 0.3}}, {"segm_AP": 0.4})
    with caplog.at_level(logging.INFO, logger=train.log.name):
        config, _ = train.choose_test_scale(Search(), config, report, tmp_path, True)
    assert "a scale per image: objects shown at a median diameter of 26.5 px" in caplog.text
    assert "×1 0.3000, per image 0.4000" in caplog.text
    assert config.object_diameter_test == 26.5
    assert json.loads((tmp_path / "config.json").read_text())["object_diameter_test"] == 26.5
    assert json.loads((tmp_path / "eval_report.json").read_text())["object_diameter_test"] == 26.5
    for name in ("last.pth", "best.pth"):
        model, _ = build_model_from_checkpoint(load_checkpoint(tmp_path / name))
        assert model.transform.object_diameter == 26.5 and model.transform.test_scale == 1.0
    # an older checkpoint has no such field: one scale for all
    state = load_checkpoint(tmp_path / "best.pth")
    del state["config"]["object_diameter_test"]
    assert build_model_from_checkpoint(state)[0].transform.object_diameter is None


def test_the_flag_pins_the_object_diameter_and_is_checked():
    args = train.get_args_parser().parse_args(["--object-diameter-test", "24"])
    assert not train.searches_test_scale(train.config_from_args(args), train.pinned_options(args))
    with pytest.raises(ValueError, match="--object-diameter-test must be a diameter"):
        TrainConfig(**SMALL, object_diameter_test=-1.0).model_options().check()
    with pytest.raises(train.ConfigError, match="--object-diameter-test needs a fixed resize factor"):
        train.config_from_args(train.get_args_parser().parse_args(["--min-size", "96", "--object-diameter-test", "20"]))
