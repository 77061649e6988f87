"""tools/export.py: the TorchScript and ONNX files give the PyTorch model's detections.

The exported files are run in a separate Python process that imports nothing of this project
(``torch.jit.load``; onnxruntime + numpy), as a deployment would."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import SMALL, synthetic_image

from engine.checkpoint import save_checkpoint
from engine.config import TrainConfig
from engine.inference import detect
from transforms.preprocess import Preprocessing, to_model_input
from utils.box_masks import paste_masks_in_boxes

ROOT = Path(__file__).resolve().parents[1]

RUN_EXPORTED = r"""
import json, sys
import numpy as np
import onnxruntime as ort
import torch
import torchvision  # registers the nms / roi_align operators the TorchScript graph calls

assert not any(name.split(".")[0] in ("engine", "models", "utils", "transforms") for name in sys.modules)
folder = sys.argv[1]
images = np.load(folder + "/images.npz")
scripted = torch.jit.load(folder + "/model.pt")
session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
out = {}
for key in images.files:
    with torch.inference_mode():
        ts = scripted(torch.from_numpy(images[key]))
    ox = session.run(None, {"image": images[key]})
    for name, a, b in zip(("boxes", "scores", "labels", "mask_probs"), ts, ox):
        out[f"ts_{key}_{name}"] = a.numpy()
        out[f"onnx_{key}_{name}"] = b
np.savez(folder + "/outputs.npz", **out)
"""


def load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(path: Path, input_scale: float | None, input_scale_test: float | None = None) -> Path:
    import models

    torch.manual_seed(0)
    config = TrainConfig(**{**SMALL, "input_scale": input_scale, "input_scale_test": input_scale_test,
                            "intensity": "percentile", "channels": "gray"})
    model = models.build_model(config.model, 2, config.model_options())
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(), "epoch": 1, "iteration": 0,
                           "class_names": ["round", "elongated"], "model_name": config.model})
    return path


def export(*args: str) -> int:
    tool = load_tool()
    return tool.main(tool.get_args_parser().parse_args(list(args)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint whose model resizes by 1.25 at test time (trained at 1.0; the resize is part of
    the exported graph), its two exports, test images of two sizes, and the exports' outputs from
    a clean process."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(folder / "best.pth", 1.0, input_scale_test=1.25)
    assert export("--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(folder / "model.pt")) == 0
    assert export("--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(folder / "model.onnx"),
                  "--example-size", "64", "64") == 0
    contract = Preprocessing("percentile", "gray")
    images = {"a": to_model_input(synthetic_image(4), contract),                              # 96×120
              "b": to_model_input(synthetic_image(5, 80, 64).astype(np.uint16) * 50, contract)}  # another size
    np.savez(folder / "images.npz", **{k: v.numpy() for k, v in images.items()})
    done = subprocess.run([sys.executable, "-c", RUN_EXPORTED, str(folder)], cwd=folder, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return checkpoint, images, dict(np.load(folder / "outputs.npz")), folder


@pytest.mark.parametrize("kind", ["ts", "onnx"])
def test_exported_model_gives_the_pytorch_detections(exported, kind):
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint

    checkpoint, images, outputs, _ = exported
    model, _ = build_model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    for key, image in images.items():
        ref = detect(model, [image])[0]
        boxes, scores = outputs[f"{kind}_{key}_boxes"], outputs[f"{kind}_{key}_scores"]
        labels, probs = outputs[f"{kind}_{key}_labels"], outputs[f"{kind}_{key}_mask_probs"]
        assert len(ref["boxes"]) > 0 and len(boxes) == len(ref["boxes"]), key
        assert np.abs(boxes - ref["boxes"].numpy()).max() <= 1e-3
        assert np.abs(scores - ref["scores"].numpy()).max() <= 1e-4
        assert np.array_equal(labels, ref["labels"].numpy())
        h, w = image.shape[-2:]
        mine = paste_masks_in_boxes(ref["mask_probs"], ref["boxes"], h, w).to_dense().astype(bool)
        theirs = paste_masks_in_boxes(torch.from_numpy(probs), torch.from_numpy(boxes), h, w).to_dense().astype(bool)
        inter = (mine & theirs).sum(axis=(1, 2))
        union = (mine | theirs).sum(axis=(1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        assert iou.min() >= 0.99, (key, iou.min())


def test_export_records_the_preprocessing(exported):
    _, _, _, folder = exported
    record = json.loads((folder / "model.onnx.json").read_text())
    assert record["preprocessing"]["intensity"] == "percentile" and record["preprocessing"]["channels"] == "gray"
    assert record["preprocessing"]["inside_the_model"]["input_scale"] == 1.25
    assert record["class_names"] == ["round", "elongated"]
    assert record["rpn_test_top_n"] == {"pre_nms_per_level": 300, "post_nms": 150}     # fixed in the file
    extra = {"preprocessing.json": ""}
    torch.jit.load(str(folder / "model.pt"), _extra_files=extra)
    assert json.loads(extra["preprocessing.json"])["class_names"] == ["round", "elongated"]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(props["preprocessing"])["preprocessing"]["channels"] == "gray"


def test_export_errors_are_clear(tmp_path, capsys):
    shrink = make_checkpoint(tmp_path / "shrink.pth", 0.5)
    assert export("--checkpoint", str(shrink), "--format", "onnx", "--out", str(tmp_path / "m.onnx")) == 2
    err = capsys.readouterr().err
    assert "antialiased" in err and "torchscript" in err and not (tmp_path / "m.onnx").exists()
    assert export("--checkpoint", str(tmp_path / "none.pth"), "--format", "torchscript", "--out", "x.pt") == 2
    assert "none.pth" in capsys.readouterr().err


def test_docs_onnx_example_gives_the_projects_masks(exported, monkeypatch):
    """The onnxruntime + numpy example of docs/predict.md pastes masks exactly as utils.box_masks does."""
    import re

    _, _, _, folder = exported
    docs = (ROOT / "docs" / "predict.md").read_text()
    code = re.search(r"### Running the ONNX file.*?```python\n(.*?)```", docs, re.S).group(1)
    assert "import torch" not in code and "from engine" not in code and len(code.splitlines()) < 45
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(code, "docs/predict.md", "exec"), namespace)
    image = synthetic_image(4)
    boxes, scores, names, masks = namespace["predict"](image)
    assert len(masks) > 0 and set(names) <= {"round", "elongated"}
    contract_input = to_model_input(image, Preprocessing("full", "gray"))      # 8-bit: ÷255 under any policy
    probs = namespace["session"].run(None, {"image": contract_input.numpy()})[3]
    ours = paste_masks_in_boxes(torch.from_numpy(probs), torch.from_numpy(boxes), *image.shape)
    for (top, left, crop), our_crop, (y0, x0) in zip(masks, ours.crops, ours.offsets.tolist()):
        assert (top, left) == (y0, x0) and crop.shape == our_crop.shape
        assert (crop == our_crop).mean() >= 0.999
