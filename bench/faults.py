"""Fault injection on real train.py / predict.py processes (issue 10): every fault several times,
at random moments, on tiny synthetic runs (96-px images, the R18 model, 2 iterations an epoch,
data-loader workers ``-j 2``). Prints a markdown table.

    nice -n 10 python bench/faults.py [--trials 3] [--kill9-trials 20] [--seed 0] [--work DIR]

Columns, per fault, counted over its trials:

- *clean stop*: the process ends as promised: exit 143 after SIGTERM with no traceback and no
  "worker killed" error; exit 4 with a message naming ``last.pth`` and the reason for a refused
  write; exit 0 for bad samples and for predict.py's resumed run. ``–`` where there is no such
  promise (``kill -9`` cannot be handled).
- *checkpoint valid*: what ``--resume auto`` reads is a complete checkpoint at the promised
  place: the current iteration after SIGTERM; the newest complete ``last.pth`` (or, when it was
  damaged afterwards, ``last.prev.pth`` with a warning naming both) after ``kill -9``; the
  previous epoch's after a refused write; no temporary files left behind. For bad samples: the
  checkpoint's bad-sample count names the bad file, once per epoch. For predict.py: every image
  has its record.
- *resume exact*: ``--resume auto -j 2`` ends on weights equal to an uninterrupted
  ``--deterministic`` run's (every parameter ``torch.equal``); for predict.py, the resumed
  run's files equal an uninterrupted run's byte for byte and no done image was predicted again.
- *data lost*: trials that lost anything already complete before the fault: iterations logged
  but not in the stop's checkpoint (SIGTERM), a complete checkpoint gone or unreadable, temporary
  files left after the resumed run, bad-sample counts missing from the main log/metrics, or a
  done image's outputs changed.

The kill -9 trials run tests/faulty_train.py with checkpoint writes slowed to about 1 s, so a
good share of the random moments fall inside a write; the count of those is printed below the
table.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.checkpoint import CheckpointError, load_checkpoint, load_for_resume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# 4 images, batches of 2: 2 iterations an epoch, 3 epochs.
EXACT = ("--deterministic", "--eval-every", "0", "--synthetic-train-images", "4", "--epochs", "3", "-j", "2")
# The tiny run of tests/helpers.py (TINY + SGD; bench/ may not import tests/).
TINY_RUN = ["--model", "maskrcnn_resnet18_fpn", "--min-size", "96", "--max-size", "96", "-b", "2", "-j", "0",
            "--print-freq", "1", "--warmup-iters", "2", "--min-epoch-iters", "1", "--detections-per-img", "50",
            "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "200", "--rpn-pre-nms-top-n-train", "200",
            "--rpn-post-nms-top-n-train", "200", "--opt", "sgd", "--lr", "0.01", "--wd", "1e-4"]
TINY_DATA = ["--dataset", "synthetic", "--synthetic-size", "96", "--synthetic-train-images", "4",
             "--synthetic-val-images", "2"]


def tiny_args(out: Path, *extra: str, synthetic: bool = True) -> list[str]:
    return [*(TINY_DATA if synthetic else []), *TINY_RUN, "--output-dir", str(out / "runs"), *extra]


def synthetic_images(folder: Path, count: int, size: int = 64, masks: bool = False) -> list[Path]:
    """``count`` synthetic cell images (``folder/images`` + label images in ``folder/masks`` with
    ``masks``, else straight in ``folder``)."""
    import cv2

    from datasets.synthetic import SyntheticSpec, render_image

    spec = SyntheticSpec(height=size, width=size, split="val", dense_every=0)
    image_dir = folder / "images" if masks else folder
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        image, labels, _ = render_image(spec, k + random.randrange(1000))
        paths.append(image_dir / f"img_{k:02d}.png")
        cv2.imwrite(str(paths[-1]), image)
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            cv2.imwrite(str(folder / "masks" / f"img_{k:02d}.png"), labels.astype("uint16"))
    return paths


def start(argv: list[str], faults: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "tests/faulty_train.py", *faults, "--", *argv] if faults else \
        [sys.executable, "train.py", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    return proc.communicate(timeout=600)[0]


def train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"type": "train"') if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """``True`` once ``condition()`` holds; ``False`` when the process ended first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".*.tmp"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resume(out: Path, run_dir: Path, reference: Path) -> tuple[bool, bool, str]:
    """``(resumed to the end, weights equal the reference, log)``."""
    proc = start(tiny_args(out, *EXACT, "--resume", "auto"))
    log = finish(proc)
    if proc.returncode != 0:
        return False, False, log
    return True, same_weights(run_dir / "last.pth", reference), log


class Tally:
    def __init__(self, fault: str, clean: bool = True, exact: bool = True):
        self.fault, self.has_clean, self.has_exact = fault, clean, exact
        self.trials = self.clean = self.valid = self.exact = self.lost = 0
        self.notes: list[str] = []

    def add(self, clean: bool, valid: bool, exact: bool, lost: bool, note: str = "") -> None:
        self.trials += 1
        self.clean += clean
        self.valid += valid
        self.exact += exact
        self.lost += lost
        if note:
            self.notes.append(note)
        print(f"  {self.fault} #{self.trials}: clean={clean} valid={valid} exact={exact} lost={lost} {note}",
              file=sys.stderr, flush=True)

    def row(self) -> str:
        n = self.trials
        clean = f"{self.clean}/{n}" if self.has_clean else "–"
        exact = f"{self.exact}/{n}" if self.has_exact else "–"
        return f"| {self.fault} | {n} | {clean} | {self.valid}/{n} | {exact} | {self.lost}/{n} |"


def sigterm_trial(work: Path, reference: Path, tally: Tally) -> None:
    out = work / "run"
    run_dir = out / "runs" / "run"
    proc = start(tiny_args(out, *EXACT, "--name", "run"))
    if not wait_for(lambda: train_steps(run_dir) >= 1, proc):
        tally.add(False, False, False, True, "ended before the signal")
        return
    time.sleep(random.uniform(0, 1.0))     # loading, forward, backward, step, checkpoint write
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish(proc)
    clean = proc.returncode == 128 + signal.SIGTERM and "Traceback" not in log and "killed by signal" not in log
    if proc.returncode == 0:
        tally.add(True, True, True, False, "finished before the signal")
        return
    steps = train_steps(run_dir)
    try:
        state = load_checkpoint(run_dir / "last.pth")
        valid = state["global_step"] == steps and not temp_files(run_dir)
        lost = state["global_step"] < steps
    except CheckpointError:
        valid, lost = False, True
    resumed, exact, _ = resume(out, run_dir, reference)
    tally.add(clean, valid, exact, lost or not resumed or bool(temp_files(run_dir)))


def kill9_trial(work: Path, reference: Path, tally: Tally) -> bool:
    """One kill -9 at a random moment after the first checkpoint; ``True`` if it hit a write."""
    out = work / "run"
    run_dir = out / "runs" / "run"
    last = run_dir / "last.pth"
    proc = start(tiny_args(out, *EXACT, "--name", "run"), faults=("--slow-save", "1.0"))
    if not wait_for(last.exists, proc):
        tally.add(False, False, False, True, "ended before the first checkpoint")
        return False
    time.sleep(random.uniform(0, 3.5))
    mid_write = bool(temp_files(run_dir))
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    if proc.returncode == 0:
        tally.add(False, True, True, False, "finished before the kill")
        return False
    try:
        _, used = load_for_resume(last)
        valid = used == last                 # the newest complete checkpoint is readable
    except CheckpointError:
        valid = False
    resumed, exact, _ = resume(out, run_dir, reference)
    tally.add(False, valid, exact, not valid or not resumed or bool(temp_files(run_dir)),
              "mid-write" if mid_write else "")
    return mid_write


def truncated_trial(work: Path, reference: Path, tally: Tally) -> None:
    """A finished epoch's last.pth damaged afterwards (cut at a random length): resume falls back."""
    out = work / "run"
    run_dir = out / "runs" / "run"
    last = run_dir / "last.pth"
    proc = start(tiny_args(out, *EXACT, "--name", "run"))
    if not wait_for(lambda: load_steps(last) >= 4, proc):
        tally.add(False, False, False, True, "ended before the second checkpoint")
        return
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    data = last.read_bytes()
    last.write_bytes(data[:random.randrange(1, len(data))])
    resumed, exact, log = resume(out, run_dir, reference)
    warned = any("resuming from the previous checkpoint" in line and str(last) in line
                 and str(run_dir / "last.prev.pth") in line for line in log.splitlines())
    tally.add(False, warned and resumed, exact, not resumed or "Traceback" in log or bool(temp_files(run_dir)))


def load_steps(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["global_step"]) if path.exists() else -1
    except (CheckpointError, KeyError):
        return -1


def refused_trial(work: Path, reference: Path, tally: Tally, code: str, reason: str) -> None:
    out = work / "run"
    run_dir = out / "runs" / "run"
    nth = random.choice((2, 3))           # the end of epoch 2 or 3
    proc = start(tiny_args(out, *EXACT, "--name", "run"), faults=("--refuse-save", str(nth), "--refuse", code))
    log = finish(proc)
    clean = proc.returncode == 4 and "Traceback" not in log and \
        f"cannot write {run_dir / 'last.pth'}: {reason}" in log
    steps = load_steps(run_dir / "last.pth")
    valid = steps == 2 * (nth - 1) and not temp_files(run_dir)
    resumed, exact, _ = resume(out, run_dir, reference)
    tally.add(clean, valid, exact, not valid or not resumed)


def bad_samples_trial(work: Path, tally: Tally) -> None:
    # Not the first image: the channel count is read from it before training (a clear error
    # even with --skip-bad, outside the workers).
    bad = random.choice(synthetic_images(work / "train", 4, masks=True)[1:])
    synthetic_images(work / "val", 2, masks=True)
    bad.write_bytes(bad.read_bytes()[:random.randrange(60, 400)])
    out = work / "run"
    run_dir = out / "runs" / "run"
    argv = tiny_args(out, "--dataset", "folder", "--data-path", str(work / "train"), "--val-path",
                     str(work / "val"), "--skip-bad", "-j", "2", "--epochs", "2", "--eval-every", "0",
                     "--name", "run", synthetic=False)
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
    clean = proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr
    try:
        counts = load_checkpoint(run_dir / "last.pth")["bad_samples"]
        valid = len(counts) == 1 and str(bad) in next(iter(counts)) and next(iter(counts.values())) == 2
    except (CheckpointError, KeyError, StopIteration):
        valid = False
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    metrics = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    counted = str(bad) in log and "1 bad sample(s)/annotation(s) skipped" in log and '"bad_samples": 1' in metrics
    tally.add(clean, valid, False, not counted, "" if clean else (proc.stdout + proc.stderr)[-600:])


def predict_trial(work: Path, checkpoint: Path, images: Path, reference: Path, tally: Tally) -> None:
    out = work / "pred"
    command = [sys.executable, "predict.py", str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out),
               "--formats", "overlay", "labels", "json", "csv", "table", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = out / ".records"
    if not wait_for(lambda: records.exists() and any(records.iterdir()), proc):
        tally.add(False, False, False, True, "ended before the kill")
        return
    time.sleep(random.uniform(0, 1.0))
    os.killpg(proc.pid, random.choice((signal.SIGKILL, signal.SIGTERM)))
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    result = subprocess.run([*command, "--skip-existing"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    expected = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file() and not p.name.startswith(".")}
    untouched = all(after.get(k) == v for k, v in before.items())
    changed = any(files.get(k) != v for k, v in kept.items() if k not in ("predictions.json", "submission.csv"))
    tally.add(result.returncode == 0, len(after) == len(list(images.iterdir())),
              files == expected and untouched, changed or bool(list(out.glob(".*.tmp"))),
              f"{len(before)} done before")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials of each fault but kill -9")
    parser.add_argument("--kill9-trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--only", nargs="+", help="fault keys to run (sigterm kill9 truncated enospc erofs bad predict)")
    args = parser.parse_args()
    random.seed(args.seed)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="faults-"))
    keys = set(args.only or ("sigterm", "kill9", "truncated", "enospc", "erofs", "bad", "predict"))
    started = time.time()
    try:
        ref_out = root / "reference"
        subprocess.run([sys.executable, "train.py", *tiny_args(ref_out, *EXACT, "--name", "run")], cwd=ROOT, env=ENV,
                       check=True, capture_output=True)
        reference = ref_out / "runs" / "run" / "last.pth"
        tallies = []

        def trials(key: str, tally: Tally, n: int, trial) -> None:
            if key not in keys:
                return
            tallies.append(tally)
            for k in range(n):
                work = root / key / str(k)
                trial(work)
                shutil.rmtree(work, ignore_errors=True)

        trials("sigterm", Tally("SIGTERM to the process group (-j 2)"), args.trials,
               lambda w: sigterm_trial(w, reference, tallies[-1]))
        hits = []
        trials("kill9", Tally("kill -9 (process group, slowed checkpoint writes)", clean=False), args.kill9_trials,
               lambda w: hits.append(kill9_trial(w, reference, tallies[-1])))
        trials("truncated", Tally("last.pth truncated after kill -9", clean=False), args.trials,
               lambda w: truncated_trial(w, reference, tallies[-1]))
        trials("enospc", Tally("disk full (ENOSPC) while saving"), args.trials,
               lambda w: refused_trial(w, reference, tallies[-1], "ENOSPC", "no space left on device"))
        trials("erofs", Tally("read-only output folder while saving"), args.trials,
               lambda w: refused_trial(w, reference, tallies[-1], "EROFS", "read-only file system"))
        trials("bad", Tally("bad sample in a worker (--skip-bad)", exact=False), args.trials,
               lambda w: bad_samples_trial(w, tallies[-1]))
        if "predict" in keys:
            images = root / "images"
            synthetic_images(images, 12)
            pred_ref = root / "pred-reference"
            subprocess.run([sys.executable, "predict.py", str(images), "--checkpoint", str(reference), "--output-dir",
                            str(pred_ref), "--formats", "overlay", "labels", "json", "csv", "table", "--quiet",
                            "--device", "cpu"], cwd=ROOT, env=ENV, check=True, capture_output=True)
            trials("predict", Tally("predict.py killed (-9 or SIGTERM), rerun --skip-existing"), args.trials,
                   lambda w: predict_trial(w, reference, images, pred_ref, tallies[-1]))
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    print("| fault | trials | clean stop | checkpoint valid | resume exact | data lost |")
    print("|---|---|---|---|---|---|")
    for tally in tallies:
        print(tally.row())
    if hits:
        print(f"\n{sum(hits)} of {len(hits)} kill -9 trials landed while a checkpoint was being written.")
    print(f"{time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
