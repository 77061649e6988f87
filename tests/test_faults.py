"""Faults as they arrive on clusters, on real train.py processes with data-loader workers (-j 2):
a stop signal to the whole process group, a second one, kill -9 in the middle of a checkpoint
write, a damaged last.pth, a full disk, a read-only folder, bad samples found inside workers."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(argv: list[str], faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """train.py (or tests/faulty_train.py with ``faults``) in its own process group, as a job."""
    cmd = [sys.executable, "tests/faulty_train.py", *faults, "--", *argv] if faults else \
        [sys.executable, "train.py", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def run_to_end(argv: list[str]) -> str:
    proc = start(argv)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (status {proc.returncode}) before the fault could be injected:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, "timed out waiting to inject the fault"
        time.sleep(0.05)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def temp_files(run_dir: Path, name: str = "") -> list[str]:
    """Temporary files of atomic writes (of ``name`` only, when given) in ``run_dir``."""
    return sorted(p.name for p in run_dir.glob(f".{name}*.tmp"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# 4 images, batches of 2: 2 iterations per epoch.
EXACT = ("--deterministic", "--eval-every", "0", "--synthetic-train-images", "4", "--epochs", "3")


def test_sigterm_to_the_process_group_with_workers_stops_cleanly_and_resumes_exactly(tmp_path):
    """As `timeout`, SLURM and Kubernetes stop a job: SIGTERM to every process, workers included,
    at a random moment. One checkpoint at the current iteration, exit 143, and `--resume auto`
    with workers ends on the weights of an uninterrupted run without workers."""
    straight = tmp_path / "straight"
    run_to_end(tiny_args(straight, *EXACT, "--name", "run"))

    out = tmp_path / "stopped"
    argv = tiny_args(out, *EXACT, "--name", "run", "-j", "2")
    run_dir = out / "runs" / "run"
    proc = start(argv)
    wait_for(lambda: len(train_records(run_dir)) >= 1, proc)
    time.sleep(random.uniform(0, 0.5))    # anywhere in the next iteration: loading, forward, backward, step
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "killed by signal" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("signal 15 received") == 1
    state = load_checkpoint(run_dir / "last.pth")
    done = len(train_records(run_dir))
    assert state["global_step"] == state["epoch"] * 2 + state["iteration"] == done < 6
    assert temp_files(run_dir) == []

    log = run_to_end(tiny_args(out, *EXACT, "-j", "2", "--resume", "auto"))
    assert f"resumed from {run_dir / 'last.pth'}" in log
    assert_same_weights(load_checkpoint(straight / "runs" / "run" / "last.pth")["model"],
                        load_checkpoint(run_dir / "last.pth")["model"])


def test_second_signal_exits_at_once_leaving_the_last_complete_checkpoint(tmp_path):
    # Checkpoint writes from the second on take 20 s: the stop's own write is under way when the
    # second signal comes.
    run_dir = tmp_path / "runs" / "run"
    argv = tiny_args(tmp_path, "--eval-every", "0", "--synthetic-train-images", "2", "--epochs", "5",
                     "--name", "run", "-j", "2")
    proc = start(argv, faults=("--slow-save", "20", "--slow-from", "2"))
    wait_for(lambda: len(train_records(run_dir)) >= 2, proc)      # epoch 1's checkpoint is written
    os.killpg(proc.pid, signal.SIGTERM)
    wait_for(lambda: temp_files(run_dir, "last.pth"), proc)       # the stop's checkpoint is half written
    time.sleep(2.5)                                                # past the repeat grace
    os.killpg(proc.pid, signal.SIGTERM)
    started = time.time()
    log = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert time.time() - started < 10 and "received again: exiting now" in log, log[-3000:]
    assert temp_files(run_dir) == []
    assert load_checkpoint(run_dir / "last.pth")["global_step"] == 1


def test_kill_9_mid_write_then_a_damaged_last_pth_still_resumes(tmp_path):
    """kill -9 while a checkpoint is half written leaves the previous one complete; a last.pth
    damaged afterwards (a bad disk) is detected on resuming and last.prev.pth is used."""
    run_dir = tmp_path / "runs" / "run"
    argv = tiny_args(tmp_path, "--eval-every", "0", "--synthetic-train-images", "2", "--epochs", "3",
                     "--name", "run", "-j", "2")
    proc = start(argv, faults=("--slow-save", "20", "--slow-from", "3"))
    # Epoch 3 trained (so epoch 2's checkpoint is complete) and its checkpoint half written.
    wait_for(lambda: len(train_records(run_dir)) == 3 and temp_files(run_dir, "last.pth"), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 2
    assert load_checkpoint(run_dir / "last.prev.pth")["epoch"] == 1
    assert temp_files(run_dir)

    last = run_dir / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    log = run_to_end(tiny_args(tmp_path, "--eval-every", "0", "--synthetic-train-images", "2", "--epochs", "3",
                               "-j", "2", "--resume", "auto"))
    warning = next(line for line in log.splitlines() if "resuming from the previous checkpoint" in line)
    assert str(last) in warning and str(run_dir / "last.prev.pth") in warning
    assert "removed " in log and temp_files(run_dir) == []
    state = load_checkpoint(last)
    assert (state["epoch"], state["global_step"]) == (3, 3)


def _fail_second_checkpoint(monkeypatch, how: str) -> None:
    import tempfile
    real_save, real_mkstemp, calls = torch.save, tempfile.mkstemp, {"save": 0}

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if calls["save"] == 2 and how == "disk full":
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    def mkstemp(*args, prefix="", **kwargs):
        if prefix.startswith(".last.pth") and calls["save"] >= 1 and how == "read-only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("how, reason", [("disk full", "no space left on device"),
                                         ("read-only", "read-only file system")])
def test_refused_checkpoint_write_stops_with_a_clear_message(tmp_path, monkeypatch, capsys, how, reason):
    _fail_second_checkpoint(monkeypatch, how)
    with pytest.raises(SystemExit) as exc:
        train.run_cli(tiny_args(tmp_path, "--eval-every", "0", "--synthetic-train-images", "2", "--epochs", "3",
                                "--name", "run"))
    run_dir = tmp_path / "runs" / "run"
    err = capsys.readouterr().err
    assert exc.value.code == 4 and "Traceback" not in err, err
    assert f"cannot write {run_dir / 'last.pth'}: {reason}" in err
    assert "Training stopped at epoch 3, iteration 0" in err and "--resume auto" in err
    if how == "disk full":
        assert "it needs about" in err and " free in " in err
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1
    assert temp_files(run_dir) == []


def test_bad_samples_found_in_workers_are_counted_and_named(tmp_path):
    from tests.fixtures.data_writers import write_label_folder
    write_label_folder(str(tmp_path / "train"), 4)
    write_label_folder(str(tmp_path / "val"), 2, seed=1)
    bad = tmp_path / "train" / "images" / "img_02.png"
    bad.write_bytes(bad.read_bytes()[:200])   # the header (its size) reads, the pixels do not
    argv = tiny_args(tmp_path, "--dataset", "folder", "--data-path", str(tmp_path / "train"), "--val-path",
                     str(tmp_path / "val"), "--skip-bad", "-j", "2", "--epochs", "2", "--eval-every", "0",
                     "--name", "run", synthetic=False)
    train.main(train.get_args_parser().parse_args(argv))
    run_dir = tmp_path / "runs" / "run"
    log = (run_dir / "train.log").read_text()
    named = [line for line in log.splitlines() if "skipped (--skip-bad)" in line]
    assert len(named) == 1 and str(bad) in named[0], log[-3000:]   # once, though it fails every epoch
    assert "1 bad sample(s)/annotation(s) skipped during training (--skip-bad), 2 times in all" in log
    records = train_records(run_dir)
    assert len(records) == 4 and records[-1]["bad_samples"] == 1
    (message, times), = load_checkpoint(run_dir / "last.pth")["bad_samples"].items()
    assert str(bad) in message and times == 2
