"""Two-process DDP on CPU (gloo) through the real launchers, as a user would run it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], argv: list[str], nproc: int, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *launcher, f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "train.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_trains_and_eval_matches_across_process_counts(tmp_path):
    # 3 validation images: with 2 processes the sampler pads one, which must not count twice.
    args = tiny_args(tmp_path, "--synthetic-val-images", "3", "--device", "cpu", "--box-score-thresh", "0.0")
    launch(["torch.distributed.run"], [*args, "--epochs", "1", "--name", "ddp"], nproc=2)
    run_dir = tmp_path / "runs" / "ddp"
    ckpt = run_dir / "last.pth"
    assert ckpt.is_file() and (run_dir / "metrics.jsonl").is_file()

    reports, predictions = [], []
    for nproc in (1, 2):
        launch(["torch.distributed.run"], [*args, "--test-only", "--resume", str(ckpt)], nproc=nproc)
        reports.append(json.loads((run_dir / "report.json").read_text()))
        predictions.append(json.loads((run_dir / "predictions.json").read_text()))
    one, two = reports
    # Batches are composed differently with 2 processes, so scores may differ in the last float
    # bits; everything else about every prediction must be identical and nothing duplicated.
    key = lambda r: (r["image_id"], r["bbox"], r["category_id"])  # noqa: E731
    a, b = sorted(predictions[0], key=key), sorted(predictions[1], key=key)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {**x, "score": 0} == {**y, "score": 0}
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
    assert one["coco"]["segm"]["stats"] == pytest.approx(two["coco"]["segm"]["stats"], abs=1e-9)
    assert one["coco"]["bbox"]["stats"] == pytest.approx(two["coco"]["bbox"]["stats"], abs=1e-9)
    assert one["sartorius"]["per_image"] == two["sartorius"]["per_image"]
    assert len(one["sartorius"]["per_image"]) == 3


def test_distributed_launch_with_use_env_trains(tmp_path):
    args = tiny_args(tmp_path, "--device", "cpu", "--epochs", "1", "--name", "launch")
    proc = launch(["torch.distributed.launch", "--use_env"], args, nproc=2)
    assert (tmp_path / "runs" / "launch" / "last.pth").is_file(), proc.stdout[-2000:]
