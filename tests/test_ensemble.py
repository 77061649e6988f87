"""Fold-model ensembles: engine.tta.predict_ensemble and predict.py with several checkpoints."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import predict
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from engine.inference import detect
from engine.tta import predict_ensemble
from tests.test_predict import make_checkpoint, synthetic_image
from transforms.preprocess import Preprocessing, to_model_input
from utils.instances import Instances
from utils.kaggle_rle import decode_kaggle_rle


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("folds")
    return [make_checkpoint(folder / f"fold{k}.pth", seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cells.png"
    cv2.imwrite(str(path), synthetic_image(0))
    return path


def run(args: list[str]) -> int:
    return predict.main(predict.get_args_parser().parse_args(args))


def test_a_model_fused_with_itself_gives_its_own_predictions(checkpoints, image_file):
    state = load_checkpoint(checkpoints[0])
    model = build_model_from_checkpoint(state, box_score_thresh=0.01)[0].eval()
    image = to_model_input(cv2.imread(str(image_file), cv2.IMREAD_UNCHANGED), Preprocessing.from_config(state["config"]))
    plain = Instances.from_detections(detect(model, [image])[0])
    fused = predict_ensemble([model, model], [image])[0]
    assert len(plain) > 5, "the random-weight model should detect something at score 0.01"
    assert np.array_equal(fused.labels, plain.labels)
    np.testing.assert_allclose(fused.scores, plain.scores, rtol=1e-6)
    np.testing.assert_allclose(fused.boxes, plain.boxes, atol=1e-4)
    assert np.array_equal(fused.masks.to_dense(), plain.masks.to_dense())
    # Two different models do not give either one's output.
    other = build_model_from_checkpoint(load_checkpoint(checkpoints[1]), box_score_thresh=0.01)[0].eval()
    mixed = predict_ensemble([model, other], [image])[0]
    assert len(mixed) != len(plain) or not np.allclose(mixed.scores, plain.scores)


def test_predict_with_several_checkpoints(checkpoints, image_file, tmp_path, capsys):
    same = tmp_path / "same"
    alone = tmp_path / "alone"
    common = [str(image_file), "--score-thresh", "0.1", "--formats", "json", "csv", "--quiet"]
    assert run([*common, "--checkpoint", str(checkpoints[0]), "--output-dir", str(alone)]) == 0
    assert run([*common, "--checkpoint", str(checkpoints[0]), str(checkpoints[0]), "--output-dir", str(same)]) == 0
    a = json.loads((alone / "predictions.json").read_text())
    s = json.loads((same / "predictions.json").read_text())
    assert len(a) == len(s) > 0
    assert [r["segmentation"] for r in a] == [r["segmentation"] for r in s]
    assert (alone / "submission.csv").read_text() == (same / "submission.csv").read_text()

    fused = tmp_path / "fused"
    assert run([*common, "--checkpoint", *map(str, checkpoints), "--output-dir", str(fused)]) == 0
    err = capsys.readouterr().err
    assert all(f"using checkpoint {c}" in err for c in checkpoints)
    rows = list(csv.DictReader(open(fused / "submission.csv")))
    assert rows and {r["id"] for r in rows} == {"cells"}
    masks = np.stack([decode_kaggle_rle(r["predicted"], 96, 120) for r in rows])
    assert masks.sum(0).max() == 1, "submission masks must not overlap"


def test_checkpoints_of_other_classes_cannot_be_ensembled(checkpoints, image_file, tmp_path, capsys):
    state = load_checkpoint(checkpoints[1])
    state["class_names"] = ["a", "b"]
    save_checkpoint(tmp_path / "other.pth", state)
    rc = run([str(image_file), "--checkpoint", str(checkpoints[0]), str(tmp_path / "other.pth"),
              "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "other.pth" in err and "an ensemble needs models of one task" in err
    assert "Traceback" not in err
