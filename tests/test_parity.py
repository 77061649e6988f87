"""One checkpoint, three ways in: the trainer's validation, ``evaluate.py --checkpoint`` and
``predict.py`` see the same model input (the stored preprocessing contract) and so give the
same predictions, image kind by image kind (12-bit uint16, float32 TIFF, 8-bit gray, RGB, RGBA)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from engine.config import cpu_has_fast_bf16
from tests.fixtures.data_writers import write_label_folder

ROOT = Path(__file__).resolve().parents[1]
# Score threshold 0: an untrained model's detections all count (up to 40 per image).
SMALL = ["--model", "maskrcnn_resnet18_fpn", "--detections-per-img", "40", "--box-score-thresh", "0", "--rpn-pre-nms-top-n-test", "150",
         "--rpn-post-nms-top-n-test", "150", "--rpn-pre-nms-top-n-train", "150", "--rpn-post-nms-top-n-train", "150"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def write_validation_kinds(root: Path) -> list[str]:
    """The same scene stored five ways, each with its label image."""
    rng = np.random.default_rng(3)
    label = write_label_folder(str(root / "scratch"), 1, 96, 112, count=8, seed=5)[0]
    signal = (rng.normal(0, 0.08, label.shape) + 0.15 + 0.6 * (label > 0)).clip(0, 1)
    kinds = {
        "a_uint16_12bit.png": (signal * 4095).astype(np.uint16),           # a 12-bit camera
        "b_float32.tif": (signal * 37.5 - 4.0).astype(np.float32),          # any float range
        "c_gray8.png": (signal * 255).astype(np.uint8),
        "d_rgb8.png": np.stack([signal * 255, signal * 200, signal * 90], axis=2).astype(np.uint8),
        "e_rgba8.png": np.concatenate([np.stack([signal * 255] * 3, axis=2),
                                       np.full(label.shape + (1,), 255.0)], axis=2).astype(np.uint8),
    }
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, array in kinds.items():
        path = root / "images" / name
        if name.endswith(".tif"):
            Image.fromarray(array).save(path)
        elif array.ndim == 3:
            cv2.imwrite(str(path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA))
        else:
            cv2.imwrite(str(path), array)
        cv2.imwrite(str(root / "masks" / (Path(name).stem + ".png")), label)
    return [Path(n).stem for n in kinds]


def by_name(results: list[dict], names: dict) -> dict[str, list[tuple]]:
    """Results grouped by image name, each detection as a comparable tuple."""
    grouped: dict[str, list[tuple]] = {}
    for r in results:
        grouped.setdefault(names.get(r["image_id"], r["image_id"]), []).append(
            (r["category_id"], tuple(round(v, 4) for v in r["bbox"]), round(r["score"], 5), r["segmentation"]["counts"]))
    return {k: sorted(v) for k, v in grouped.items()}


def test_trainer_evaluate_and_predict_give_identical_predictions(tmp_path):
    write_label_folder(str(tmp_path / "train"), 4, 96, 112, count=8, seed=1)
    kinds = write_validation_kinds(tmp_path / "val")
    common = ["--dataset", "folder", "--data-path", str(tmp_path / "train"), "--val-path", str(tmp_path / "val")]
    cli("train.py", *common, *SMALL, "--epochs", "1", "--min-epoch-iters", "2", "-b", "2", "-j", "2",
        "--eval-every", "0", "--output-dir", str(tmp_path / "runs"), "--name", "r", cwd=tmp_path)
    run = tmp_path / "runs" / "r"
    config = json.loads((run / "config.json").read_text())
    assert config["channels"] == "gray" and config["intensity"] == "percentile" and config["input_scale"] == 1.0
    # trained in bf16 where that is the default (a CPU with bf16 units); every evaluation below runs in fp32
    assert config["amp"] is cpu_has_fast_bf16()

    # 1. the trainer's validation (batch of one: batching pads images, which shifts the numbers)
    cli("train.py", *common, *SMALL, "--test-only", "--resume", str(run / "last.pth"), "-b", "1", "-j", "2",
        cwd=tmp_path)
    trainer = json.loads((run / "predictions.json").read_text())
    # 2. evaluate.py --checkpoint
    cli("evaluate.py", "--checkpoint", str(run / "last.pth"), "--dataset", "folder", "--data-path",
        str(tmp_path / "train"), "--dataset-option", f"val_path={tmp_path / 'val'}", "--batch-size", "1",
        "--device", "cpu", "--save-predictions", str(tmp_path / "eval.json"), cwd=tmp_path)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # 3. predict.py on the image files
    cli("predict.py", str(tmp_path / "val" / "images"), "--checkpoint", str(run / "last.pth"), "--formats", "json",
        "--score-thresh", "0", "--output-dir", str(tmp_path / "pred"), "--quiet", cwd=tmp_path)
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())

    gt = {img["id"]: Path(img["file_name"]).stem for img in _val_images(tmp_path)}
    a, b, c = by_name(trainer, gt), by_name(evaluated, gt), by_name(predicted, {})
    assert set(a) == set(kinds), (sorted(a), kinds)   # every kind got detections
    assert a == b
    assert a == c


def _val_images(tmp_path: Path) -> list[dict]:
    from datasets import build_dataset
    return build_dataset("folder", "val", {"data_path": str(tmp_path / "train"),
                                           "val_path": str(tmp_path / "val")}).coco_gt()["images"]
