"""tools/cross_validate.py end to end on a tiny generated Sartorius layout, the OOF scoring on
predictions that score, and tools/runs_table.py."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from datasets import build_dataset
from datasets.sartorius import read_index
from metrics.crossval import merge_folds
from metrics.validation import InvalidInputError
from tests.fixtures.data_writers import write_sartorius
from tests.test_distributed import free_port
from utils.coco_rle import encode_coco_rle

ROOT = Path(__file__).resolve().parents[1]
NUM_FOLDS = 3
TYPES = ["shsy5y"] * 3 + ["astro"] * 3 + ["cort"] * 3
# Tiny images, the small model, one short epoch per fold; workers on, as in real runs.
TINY_CV = ["--model", "maskrcnn_resnet18_fpn", "--min-size", "64", "--max-size", "80", "-b", "2", "-j", "2",
           "--epochs", "1", "--min-epoch-iters", "1", "--warmup-iters", "1", "--print-freq", "1",
           "--opt", "sgd", "--lr", "0.01", "--detections-per-img", "50", "--box-score-thresh", "0.01",
           "--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "200",
           "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "200"]
METADATA_FIELDS = ("date", "git_commit", "command", "config", "dataset", "folds", "thresholds", "min_sizes",
                   "cv_raw", "cv_pp", "comment")


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cross_validate = tool("cross_validate")
runs_table = tool("runs_table")


def cv_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "sartorius", "--data-path", str(tmp_path / "data"), "--num-folds", str(NUM_FOLDS),
            "--output-dir", str(tmp_path / "runs"), "--name", "exp", *TINY_CV, *extra]


def cv(tmp_path: Path, *extra: str) -> int:
    return cross_validate.run_cli(cv_args(tmp_path, *extra))


def cv_torchrun(tmp_path: Path, *extra: str) -> int:
    """The command under torchrun, 2 CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "tools/cross_validate.py", *cv_args(tmp_path, "--device", "cpu", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Folds 0 and 2 in a first run, then the whole command under torchrun (fold 1 trained on 2
    processes, 0 and 2 skipped), then fold 1 marked unfinished again and the command rerun (it
    resumes fold 1's last.pth)."""
    tmp = tmp_path_factory.mktemp("cv")
    # Frames of one sample come in pairs: 9 images, 6 samples, 3 folds.
    write_sartorius(str(tmp / "data"), [3, 4, 2, 2, 3, 2, 3, 4, 3], TYPES, frames_per_sample=2, height=64,
                    width=80, seed=3)
    exp = tmp / "runs" / "exp"
    assert cv(tmp, "--folds", "0,2", "--comment", "tiny") == 0
    partial = json.loads((exp / "metadata.json").read_text())
    mtimes = {k: (exp / f"fold{k}" / "last.pth").stat().st_mtime_ns for k in (0, 2)}
    assert cv_torchrun(tmp) == 0
    complete = json.loads((exp / "metadata.json").read_text())
    skipped = {k: (exp / f"fold{k}" / "last.pth").stat().st_mtime_ns == mtimes[k] for k in (0, 2)}
    (exp / "fold1" / "fold.json").unlink()
    assert cv(tmp) == 0
    return {"tmp": tmp, "exp": exp, "partial": partial, "complete": complete, "skipped": skipped}


def test_a_subset_of_folds_leaves_the_oof_report_for_later(experiment):
    partial = experiment["partial"]
    assert sorted(partial["folds"]) == ["0", "2"] and partial["cv_raw"] is None and partial["cv_pp"] is None
    assert partial["status"] == "2 of 3 folds done" and partial["comment"] == "tiny"


def test_second_run_skips_finished_folds_and_resumes_an_unfinished_one(experiment):
    exp = experiment["exp"]
    assert experiment["skipped"] == {0: True, 2: True}, "finished folds were trained again"
    assert experiment["complete"]["status"] == "done" and experiment["complete"]["world_size"] == 2
    assert "2 process(es)" in (exp / "fold1" / "train.log").read_text()      # fold 1 trained under torchrun
    log = (exp / "cross_validate.log").read_text()
    assert log.count("fold 0: done already") == 2 and log.count("fold 2: done already") == 2
    # The third run found fold 1 unfinished and went through train.py's --resume auto in its directory.
    assert f"resumed from {exp / 'fold1' / 'last.pth'}" in (exp / "fold1" / "train.log").read_text()
    assert (exp / "fold1" / "fold.json").is_file()
    assert not list(exp.glob("fold1/*/last.pth")), "the fold's run directory is the fold directory itself"


def test_oof_covers_every_image_exactly_once_and_folds_never_share_a_sample(experiment):
    exp, tmp = experiment["exp"], experiment["tmp"]
    index = read_index(str(tmp / "data" / "train.csv"), str(tmp / "data" / "train"))
    gt = json.loads((exp / "oof_gt.json").read_text())
    results = json.loads((exp / "oof_predictions.json").read_text())
    ids = [img["id"] for img in gt["images"]]
    assert sorted(ids) == list(range(1, len(index.names) + 1))      # every training image, once
    assert {r["image_id"] for r in results} <= set(ids) and results, "the tiny models predict something"
    meta = json.loads((exp / "metadata.json").read_text())
    split = meta["dataset"]["folds"]
    assert sorted(i for f in split.values() for i in f["val_image_ids"]) == sorted(ids)
    sample_of = {p + 1: index.sample_ids[p] for p in range(len(index.names))}
    samples = {k: {sample_of[i] for i in f["val_image_ids"]} for k, f in split.items()}
    for a in samples:
        for b in samples:
            assert a == b or not samples[a] & samples[b], f"folds {a} and {b} share a sample_id"
    # Each fold's predictions come from its own validation split, which its model did not train on.
    for k in range(NUM_FOLDS):
        fold_results = json.loads((exp / f"fold{k}" / "oof_predictions.json").read_text())
        assert {r["image_id"] for r in fold_results} <= set(split[str(k)]["val_image_ids"])
        options = {"data_path": str(tmp / "data"), "num_folds": NUM_FOLDS, "fold": k}
        train_ids = set(build_dataset("sartorius", "train", options).image_ids)
        assert not train_ids & set(split[str(k)]["val_image_ids"])
        assert not {sample_of[i] for i in train_ids} & samples[str(k)]


def test_metadata_has_every_field(experiment):
    meta = json.loads((experiment["exp"] / "metadata.json").read_text())
    for key in METADATA_FIELDS:
        assert meta.get(key) is not None, key
    assert meta["comment"] == "tiny"                    # kept from the first run, which gave it
    assert meta["config"]["dataset"] == "sartorius" and meta["config"]["model"] == "maskrcnn_resnet18_fpn"
    assert meta["dataset"]["num_folds"] == NUM_FOLDS and meta["status"] == "done"
    assert set(meta["thresholds"]) == set(meta["min_sizes"]) == {"shsy5y", "astro", "cort"}
    for k in range(NUM_FOLDS):
        fold = meta["folds"][str(k)]
        assert fold["best_epoch"] == 1 and fold["best_metric"] == "segm_AP" and "segm_AP" in fold["best_metrics"]
    assert "--num-folds 3" in meta["command"] and len(meta["git_commit"]) == 40


def test_cv_pp_equals_evaluate_py_by_hand(experiment, tmp_path, capsys):
    exp = experiment["exp"]
    meta = json.loads((exp / "metadata.json").read_text())
    files = ["--gt", str(exp / "oof_gt.json"), "--pred", str(exp / "oof_predictions.json"), "--max-dets", "50"]
    assert evaluate.main([*files, "--postprocess", str(exp / "postprocess.json"), "--out", str(tmp_path / "pp.json")]) == 0
    assert evaluate.main([*files, "--out", str(tmp_path / "raw.json")]) == 0
    assert json.loads((tmp_path / "pp.json").read_text())["sartorius"]["score"] == pytest.approx(meta["cv_pp"], abs=1e-12)
    assert json.loads((tmp_path / "raw.json").read_text())["sartorius"]["score"] == pytest.approx(meta["cv_raw"], abs=1e-12)
    report = json.loads((exp / "cv_report.json").read_text())
    assert set(report["folds"]) == {"0", "1", "2"} and "mean" in report["fold_mean_std"]["pp"]["score"]
    assert set(report["cv_pp"]["per_class"]) == {"shsy5y", "astro", "cort"}
    assert len(report["cv_pp"]["per_threshold"]) == 10
    assert "per IoU threshold" in (exp / "cv_report.txt").read_text()


def test_flags_that_cross_validation_sets_or_other_folds_are_clear_errors(experiment, capsys):
    tmp = experiment["tmp"]
    for extra, expected in ((["--fold", "1"], "--fold: cross_validate.py sets it"),
                            (["--resume", "auto"], "--resume: cross_validate.py sets it"),
                            (["--folds", "3"], "--folds 3: folds are 0..2")):
        with pytest.raises(SystemExit) as exc:
            cv(tmp, *extra)
        assert exc.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:       # same experiment name, another split of the data
        cross_validate.run_cli(["--dataset", "sartorius", "--data-path", str(tmp / "data"), "--num-folds", "2",
                                "--output-dir", str(tmp / "runs"), "--name", "exp", *TINY_CV])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "other data or folds" in err and "num_folds: 3 there, 2 now" in err


def test_runs_table_lists_experiments_and_runs(experiment, tmp_path, capsys):
    runs = experiment["tmp"] / "runs"
    plain = runs / "plain-run"          # a train.py run beside the experiment
    plain.mkdir(exist_ok=True)
    (plain / "config.json").write_text(json.dumps({"dataset": "synthetic", "model": "maskrcnn_resnet18_fpn",
                                                   "epochs": 3, "opt": "adamw", "lr": 0.002, "amp": True}))
    (plain / "report.json").write_text(json.dumps({"sartorius": {"score": 0.25}, "coco": {"segm": {"AP": 0.5}}}))
    assert runs_table.main([str(runs), "--csv", str(tmp_path / "t.csv")]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["kind"] for r in rows].count("cv") == 1 and len(rows) == 2, "fold runs are part of their experiment"
    cv_row = next(r for r in rows if r["kind"] == "cv")
    meta = json.loads((experiment["exp"] / "metadata.json").read_text())
    assert float(cv_row["cv_pp"]) == pytest.approx(meta["cv_pp"]) and cv_row["comment"] == "tiny"
    assert cv_row["folds"] == "3/3" and cv_row["dataset"] == "sartorius" and "epochs=1" in cv_row["key_flags"]
    run_row = next(r for r in rows if r["kind"] == "run")
    assert float(run_row["cv_raw"]) == 0.25 and run_row["cv_pp"] == "" and "amp" in run_row["key_flags"].split()
    assert "plain-run" in printed and "tiny" in printed


# ----------------------------------------------------------------------------- OOF scoring


def noisy_fold_predictions(gt: dict, rng: np.random.Generator) -> list[dict]:
    """Results that score: each GT mask (most of them) at a high score, plus shifted copies
    (false positives) at scores just above 0.5, so a higher threshold must win."""
    from metrics.coco import gt_rle
    from utils.coco_rle import decode_coco_rle

    size = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    out = []
    for a in gt["annotations"]:
        h, w = size[a["image_id"]]
        mask = decode_coco_rle([gt_rle(a, h, w)], h, w)[0]
        for shifted, score in ((mask, rng.uniform(0.75, 1.0)), (np.roll(mask, 9, axis=1), rng.uniform(0.5, 0.65))):
            if rng.random() < 0.15 or not shifted.any():
                continue
            ys, xs = np.nonzero(shifted)
            rle = encode_coco_rle(shifted[None])[0]
            out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(score),
                        "segmentation": rle, "bbox": [float(xs.min()), float(ys.min()),
                                                      float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]})
    return out


def test_oof_scoring_matches_the_search_and_evaluate_py(tmp_path):
    """An experiment directory of predictions that score: CV post-processed is the search's own
    score, evaluate.py --postprocess gives it by hand, and it beats the raw CV."""
    exp = tmp_path / "exp"
    rng = np.random.default_rng(0)
    options = {"synthetic_train_images": 6, "synthetic_size": 64, "num_folds": 3}
    for k in range(3):
        gt = build_dataset("synthetic", "val", {**options, "fold": k}).coco_gt()
        (exp / f"fold{k}").mkdir(parents=True)
        (exp / f"fold{k}" / "val_gt.json").write_text(json.dumps(gt))
        (exp / f"fold{k}" / "oof_predictions.json").write_text(json.dumps(noisy_fold_predictions(gt, rng)))
    for k in range(3):
        (exp / f"fold{k}" / "config.json").write_text(json.dumps({"detections_per_img": 500,
                                                                  "sartorius_score_thresh": 0.5}))
    report, params, _ = cross_validate.score_out_of_fold(exp, 3, None)
    assert report["cv_pp"]["score"] == pytest.approx(report["search"]["score"], abs=1e-9)
    assert report["cv_pp"]["score"] > report["cv_raw"]["score"] + 0.05
    assert min(p["score_thresh"] for p in params["classes"].values()) > 0.6
    files = ["--gt", str(exp / "oof_gt.json"), "--pred", str(exp / "oof_predictions.json")]
    assert evaluate.main([*files, "--postprocess", str(exp / "postprocess.json"), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["sartorius"]["score"] == pytest.approx(report["cv_pp"]["score"])
    # The OOF score is the image-weighted mean of the fold scores.
    folds = report["folds"].values()
    weighted = sum(f["num_images"] * f["pp"]["score"] for f in folds) / sum(f["num_images"] for f in folds)
    assert weighted == pytest.approx(report["cv_pp"]["score"])


def test_merge_folds_rejects_overlapping_folds_and_foreign_predictions():
    cats = [{"id": 1, "name": "cell"}]
    gts = {0: {"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": cats},
           1: {"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": cats}}
    with pytest.raises(InvalidInputError, match="folds 0 and 1: the folds overlap"):
        merge_folds(gts, {0: [], 1: []})
    gts[1]["images"][0]["id"] = 2
    with pytest.raises(InvalidInputError, match="fold 0's predictions name image 2"):
        merge_folds(gts, {0: [{"image_id": 2}], 1: []})
    gt, results, fold_of = merge_folds(gts, {0: [], 1: [{"image_id": 2}]})
    assert fold_of == {1: 0, 2: 1} and [i["id"] for i in gt["images"]] == [1, 2]


def test_evaluate_postprocess_flag_errors(tmp_path, capsys):
    gt = {"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [], "categories": [{"id": 1, "name": "c"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text("[]")
    (tmp_path / "pp.json").write_text(json.dumps({"classes": {"1": {"score_thresh": 2, "min_size": 0}}}))
    files = ["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]
    assert evaluate.main([*files, "--postprocess", str(tmp_path / "pp.json")]) == 2
    err = capsys.readouterr().err
    assert "pp.json" in err and "score_thresh in [0, 1]" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        evaluate.main([*files, "--postprocess", str(tmp_path / "pp.json"), "--search"])
    assert "one after the other" in capsys.readouterr().err
