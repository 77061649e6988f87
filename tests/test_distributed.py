"""Two-process DDP on CPU (gloo) through the real launchers, as a user would run it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pycocotools.mask as mask_utils
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
    # Batches are composed (padded) differently with 2 processes, so scores may differ in the last
    # float bits and a mask pixel whose probability is that close to 0.5 may flip; boxes, classes
    # and the number of predictions must be identical and nothing duplicated.
    key = lambda r: (r["image_id"], r["bbox"], r["category_id"])  # noqa: E731
    a, b = sorted(predictions[0], key=key), sorted(predictions[1], key=key)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {**x, "score": 0, "segmentation": 0} == {**y, "score": 0, "segmentation": 0}
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert mask_utils.iou([x["segmentation"]], [y["segmentation"]], [0])[0, 0] > 0.95
    assert one["coco"]["segm"]["stats"] == pytest.approx(two["coco"]["segm"]["stats"], abs=1e-9)
    assert one["coco"]["bbox"]["stats"] == pytest.approx(two["coco"]["bbox"]["stats"], abs=1e-9)
    assert one["sartorius"]["per_image"] == two["sartorius"]["per_image"]
    assert len(one["sartorius"]["per_image"]) == 3


def test_distributed_launch_with_use_env_trains(tmp_path):
    args = tiny_args(tmp_path, "--device", "cpu", "--epochs", "1", "--name", "launch")
    proc = launch(["torch.distributed.launch", "--use_env"], args, nproc=2)
    assert (tmp_path / "runs" / "launch" / "last.pth").is_file(), proc.stdout[-2000:]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def test_sigterm_to_every_process_of_a_torchrun_job_stops_all_ranks_at_one_iteration(tmp_path):
    """As SLURM's scancel stops a job step: SIGTERM to torchrun, both ranks and their data-loader
    workers at once (each rank also gets torchrun's forwarded copy). Every rank stops at the
    same iteration, one checkpoint holds both ranks' state, and resuming on 2 processes ends on
    the weights of an uninterrupted 2-process run."""
    import random
    import signal
    import time

    import torch

    from engine.checkpoint import load_checkpoint
    # 8 images over 2 ranks, batches of 2: 2 iterations per epoch.
    exact = ("--device", "cpu", "--deterministic", "--eval-every", "0", "--synthetic-train-images", "8",
             "--epochs", "3", "-j", "1", "--name", "run")
    launch(["torch.distributed.run"], tiny_args(tmp_path / "straight", *exact), nproc=2)

    out = tmp_path / "stopped"
    run_dir = out / "runs" / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train.py", *tiny_args(out, *exact)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))
    for pid in _process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    log, _ = proc.communicate(timeout=300)
    stops = [line.split("saved ", 1)[1].split(";")[0] for line in log.splitlines() if " at epoch " in line
             and "saved " in line and "iteration" in line]
    assert len(stops) == 2 and stops[0] == stops[1], log[-4000:]   # one line per rank, the same position
    # torchrun itself ends with a traceback of its SignalException; the ranks end cleanly.
    assert "DataLoader worker" not in log and log.count("interrupted: checkpoint") == 2, log[-4000:]
    state = load_checkpoint(run_dir / "last.pth")
    done = sum(1 for line in metrics.read_text().splitlines() if '"train"' in line)
    assert len(state["rng"]) == 2 and state["global_step"] == state["epoch"] * 2 + state["iteration"] == done < 6

    launch(["torch.distributed.run"], tiny_args(out, *exact[:-2], "--resume", "auto"), nproc=2)
    a = load_checkpoint(tmp_path / "straight" / "runs" / "run" / "last.pth")["model"]
    b = load_checkpoint(run_dir / "last.pth")["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
