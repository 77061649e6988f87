"""End-to-end behaviour of train.py on tiny synthetic runs (in-process, CPU)."""
from __future__ import annotations

import json
import math
import signal

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.trainer import TrainingDiverged, TrainingInterrupted
from tests.helpers import tiny_args


def run(argv):
    return train.main(train.get_args_parser().parse_args(argv))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_decreases_loss_and_writes_run_dir(tmp_path):
    # The synthetic dataset's own optimizer settings (AdamW), as the no-argument run uses them.
    report = run(tiny_args(tmp_path, "--synthetic-train-images", "8", "--epochs", "3", "--name", "quick",
                           "--eval-every", "1", dataset_optimizer=True))
    run_dir = tmp_path / "runs" / "quick"
    for name in ("config.json", "last.pth", "best.pth", "metrics.jsonl", "report.json", "eval_report.json",
                 "train.log", "metrics.png"):
        assert (run_dir / name).is_file(), name
    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert len([r for r in records if r["type"] == "eval"]) == 3
    # The report follows the metrics contract and the checkpoint loads with weights_only.
    assert len(report["coco"]["segm"]["stats"]) == 12 and "score" in report["sartorius"]
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 3 and state["iteration"] == 0 and state["class_names"] == ["round", "elongated"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "maskrcnn_resnet18_fpn" and config["opt"] == "adamw"
    assert report["max_dets"] == 50  # the evaluator's maxDets follows --detections-per-img


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_resume_is_exact_after_epoch_and_mid_epoch_interrupt(tmp_path):
    # multistep: the LR curve must not depend on --epochs, or an E1-epoch run differs by design.
    common = ("--deterministic", "--eval-every", "0", "--synthetic-train-images", "4",
              "--lr-scheduler", "multistep", "--lr-steps", "2")
    run(tiny_args(tmp_path, *common, "--epochs", "2", "--name", "straight"))
    straight = _weights(tmp_path / "runs" / "straight" / "last.pth")

    # Stop at the end of epoch 1, then resume to 2.
    run(tiny_args(tmp_path, *common, "--epochs", "1", "--name", "two_part"))
    run(tiny_args(tmp_path, *common, "--epochs", "2", "--resume", str(tmp_path / "runs" / "two_part" / "last.pth")))
    _assert_same_weights(straight, _weights(tmp_path / "runs" / "two_part" / "last.pth"))

    # Interrupt in the middle of epoch 2 (as SIGTERM would), then resume.
    def stop_in_epoch_2(trainer, epoch, batches_done):
        if epoch == 1 and batches_done == 2:
            trainer.request_stop(signal.SIGTERM)

    args = train.get_args_parser().parse_args(tiny_args(tmp_path, *common, "--epochs", "2", "--name", "interrupted"))
    with pytest.raises(TrainingInterrupted):
        train.main(args, after_step=[stop_in_epoch_2])
    state = load_checkpoint(tmp_path / "runs" / "interrupted" / "last.pth")
    assert (state["epoch"], state["iteration"]) == (1, 2)
    run(tiny_args(tmp_path, *common, "--epochs", "2", "--resume", str(tmp_path / "runs" / "interrupted" / "last.pth")))
    _assert_same_weights(straight, _weights(tmp_path / "runs" / "interrupted" / "last.pth"))


def test_amp_on_cpu_trains(tmp_path):
    run(tiny_args(tmp_path, "--amp", "--epochs", "1", "--name", "amp"))
    records = read_jsonl(tmp_path / "runs" / "amp" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")
    assert load_checkpoint(tmp_path / "runs" / "amp" / "last.pth")["epoch"] == 1


def test_nonfinite_losses_are_skipped_then_stop_training(tmp_path, monkeypatch):
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    forward = GeneralizedRCNN.forward
    calls = {"n": 0}

    def poisoned(self, images, targets=None):
        out = forward(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2:  # epoch 1 (2 steps) is healthy, everything after is NaN
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="learning rate"):
        run(tiny_args(tmp_path, "--epochs", "3", "--eval-every", "0", "--max-nonfinite", "2", "--name", "nan"))
    state = load_checkpoint(tmp_path / "runs" / "nan" / "last.pth")
    assert state["epoch"] == 1  # the last good checkpoint survives
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert calls["n"] == 4


def test_bad_flags_give_clear_errors(tmp_path, capsys):
    cases = [(["--lr", "-1"], "--lr must be > 0"), (["--model", "nope"], "maskrcnn_resnet18_fpn"),
             (["--dataset", "nope"], "synthetic"), (["--anchor-sizes", "8,16"], "--anchor-sizes"),
             (["--lr-scheduler", "step"], "--lr-scheduler"),
             (["--resume", str(tmp_path / "missing.pth")], "missing.pth"),
             (["--test-only", "--epochs", "1"], "--test-only needs")]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            train.run_cli(tiny_args(tmp_path, *argv))
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)


def test_sigterm_saves_position_and_exits(tmp_path):
    """A real SIGTERM (a preempted cluster job): checkpoint at the current iteration, exit 143."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = tiny_args(tmp_path, "--epochs", "50", "--eval-every", "0", "--synthetic-train-images", "8",
                     "--name", "term")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = tmp_path / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    state = load_checkpoint(tmp_path / "runs" / "term" / "last.pth")
    steps_logged = len(read_jsonl(metrics))
    done = state["epoch"] * 4 + state["iteration"]  # 4 batches per epoch
    assert state["global_step"] == done and done >= steps_logged >= 2
    assert "--resume" in out


def test_degenerate_boxes_from_data_never_reach_the_model(tmp_path, monkeypatch):
    from datasets.synthetic import SyntheticCells
    getitem = SyntheticCells.__getitem__

    def with_bad_boxes(self, index):
        image, target = getitem(self, index)
        boxes = target["boxes"].clone()
        boxes[0, 2] = boxes[0, 0]              # zero width
        boxes[1, 3] = boxes[1, 1] - 1          # negative height
        return image, {**target, "boxes": boxes}

    monkeypatch.setattr(SyntheticCells, "__getitem__", with_bad_boxes)
    run(tiny_args(tmp_path, "--epochs", "1", "--eval-every", "0", "--name", "degenerate"))
    assert load_checkpoint(tmp_path / "runs" / "degenerate" / "last.pth")["epoch"] == 1
    assert "dropped 2 instance(s)" in (tmp_path / "runs" / "degenerate" / "train.log").read_text()
