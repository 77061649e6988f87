"""predict.py --skip-existing: a run interrupted at any moment, started again, predicts only the
missing images and ends with the same files as an uninterrupted run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import predict
import utils.writers
from tests.test_predict import make_checkpoint, synthetic_image
from utils.writers import RECORDS_DIR

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ["--formats", "overlay", "labels", "json", "csv", "table"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for k in range(8):
        Image.fromarray(synthetic_image(k, 64, 64)).save(folder / f"img{k}.png")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, checkpoint, images) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert run([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out), *FORMATS]) == 0
    return out


def run(args: list[str]) -> int:
    return predict.main(predict.get_args_parser().parse_args([*args, "--quiet"]))


def outputs(folder: Path) -> dict[str, bytes]:
    """Every visible output file → its bytes (records and temporaries are not outputs)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def done_records(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / RECORDS_DIR).glob("*.json")}


def test_failure_mid_image_then_skip_existing(tmp_path, checkpoint, images, uninterrupted, monkeypatch, capsys):
    """A crash between two outputs of the 4th image: images 1-3 are done, the 4th is not (its label
    image exists, its overlay not); the rerun predicts images 4-8 only."""
    out = tmp_path / "out"
    real_write_png, calls = utils.writers.write_png, []

    def crash_on_fourth_overlay(path, image):
        if str(path).endswith("_overlay.png"):
            calls.append(path)
            if len(calls) == 4:
                raise KeyboardInterrupt("injected")
        real_write_png(path, image)

    monkeypatch.setattr(utils.writers, "write_png", crash_on_fourth_overlay)
    with pytest.raises(KeyboardInterrupt):
        run([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out), *FORMATS])
    monkeypatch.setattr(utils.writers, "write_png", real_write_png)
    assert (out / "img3_labels.png").exists() and not (out / "img3_overlay.png").exists()
    assert not (out / "predictions.json").exists()
    before = done_records(out)
    assert sorted(before) == ["img0.json", "img1.json", "img2.json"]
    capsys.readouterr()

    assert run([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out), *FORMATS,
                "--skip-existing"]) == 0
    assert "3 of 8 image(s) already done" in capsys.readouterr().err
    after = done_records(out)
    assert {k: after[k] for k in before} == before           # the done images were not predicted again
    assert len(after) == 8
    assert outputs(out) == outputs(uninterrupted)

    assert run([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out), *FORMATS,
                "--skip-existing"]) == 0                     # nothing left to do
    assert "8 of 8 image(s) already done" in capsys.readouterr().err
    assert done_records(out) == after and outputs(out) == outputs(uninterrupted)


def test_other_formats_or_source_are_not_done(tmp_path, checkpoint, images, capsys):
    """A record made with fewer formats, or for another image of the same name, does not count."""
    out = tmp_path / "out"
    assert run([str(images / "img0.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                "--formats", "labels"]) == 0
    assert run([str(images / "img0.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                "--formats", "labels", "csv", "--skip-existing"]) == 0
    assert "already done" not in capsys.readouterr().err
    assert (out / "submission.csv").read_text().startswith("id,predicted\nimg0,")
    other = tmp_path / "other"
    other.mkdir()
    (other / "img0.png").write_bytes((images / "img1.png").read_bytes())
    assert run([str(other / "img0.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                "--formats", "labels", "csv", "--skip-existing"]) == 0
    assert "already done" not in capsys.readouterr().err
    (out / "img0_labels.png").unlink()                       # a done image whose output was deleted
    assert run([str(other / "img0.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                "--formats", "labels", "--skip-existing"]) == 0
    assert "already done" not in capsys.readouterr().err
    assert (out / "img0_labels.png").exists()


def test_kill_9_mid_run_then_skip_existing(tmp_path, checkpoint, images, uninterrupted):
    """predict.py killed (SIGKILL) after a few images, run again with --skip-existing."""
    out = tmp_path / "out"
    command = [sys.executable, "predict.py", str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out),
               *FORMATS, "--quiet", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(done_records(out)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "predict.py ended before it was killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = done_records(out)
    assert 2 <= len(before) < 8, "the kill came too late to test anything"
    assert not (out / "predictions.json").exists()

    result = subprocess.run([*command, "--skip-existing"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} of 8 image(s) already done" in result.stderr
    after = done_records(out)
    assert {k: after[k] for k in before} == before
    assert len(after) == 8
    assert not list(out.glob(".*.tmp"))
    assert outputs(out) == outputs(uninterrupted)
