"""Export a checkpoint as a self-contained model: TorchScript (LibTorch, QuPath, ``torch.jit.load``)
or ONNX (ONNX Runtime), with its preprocessing recorded.

The exported computation is ``engine.inference.BoxFrameDetector`` for one image: input a float32
``3×H×W`` tensor in [0, 1] (the checkpoint's preprocessing contract applied, see the record),
outputs ``boxes`` float32 ``N×4`` xyxy in input pixels, ``scores`` float32 ``N``, ``labels``
int64 ``N`` (class ids 1..C) and ``mask_probs`` float32 ``N×28×28``: each instance's mask
probabilities in its box frame. The model's own normalisation and resize are inside; pasting a
mask into its box (pixel-aligned: ``utils.box_masks.paste_masks_in_boxes``, or the numpy version in
docs/predict.md) and thresholding at 0.5 gives the instance mask — never an ``N×H×W``
tensor.

The record (``preprocessing``, ``class_names``, outputs) is written as JSON beside the file
(``FILE.json``) and inside it: TorchScript ``_extra_files["preprocessing.json"]``, ONNX
``metadata_props["preprocessing"]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.inference import OBJECT_SCALE_RANGE, BoxFrameDetector
from models.zoo import fix_rpn_test_caps
from transforms.preprocess import PERCENTILES, Preprocessing
from utils.io import atomic_path, write_json_atomic

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17
OUTPUT_NAMES = ["boxes", "scores", "labels", "mask_probs"]


class ExportError(Exception):
    """An export that cannot be done; the message says why and what to do."""


class SingleImageDetector(torch.nn.Module):
    """``BoxFrameDetector`` for one image: ``3×H×W`` → ``(boxes, scores, labels, mask_probs)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.detector = BoxFrameDetector(model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["scores"], out["labels"], out["mask_probs"]


def export_record(state: dict[str, Any], model: torch.nn.Module, fmt: str, example_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """What a user of the exported file needs besides the file: how to make its input, the class
    names, what the outputs are and what is fixed."""
    config = state["config"]
    contract = Preprocessing.from_config(config)
    # The factor the exported (eval-mode) model resizes by: the test scale when one was chosen.
    geometry = ({"input_scale": config.get("input_scale_test") or config["input_scale"]}
                if config.get("input_scale") is not None else {"min_size": config["min_size"], "max_size": config["max_size"]})
    record = {
        "format": fmt,
        "input": "float32 tensor 3×H×W in [0, 1] (one image), made from the stored image by 'preprocessing'",
        "preprocessing": {
            "intensity": contract.intensity, "channels": contract.channels, "percentiles": list(PERCENTILES),
            "rules": {"uint8": "divide by 255", "bool": "0 / 1",
                      "other": "per channel: 'percentile' maps the image's 0.5th..99.5th percentile to 0..1 and "
                               "clips; 'full' divides unsigned integers by their dtype maximum, clips floats",
                      "channels": "'gray': one channel (a colour image averaged) repeated 3×; 'rgb': gray repeated, "
                                  "alpha dropped, 2 channels → (c0, c1, 0)"},
            "inside_the_model": {"normalize_mean": list(model.transform.image_mean),
                                 "normalize_std": list(model.transform.image_std), **geometry},
        },
        "class_names": list(state.get("class_names") or []),
        "outputs": {"boxes": "float32 N×4 xyxy, input pixels", "scores": "float32 N",
                    "labels": "int64 N, class id 1..C (class_names[id-1])",
                    "mask_probs": "float32 N×28×28 mask probabilities in each box's frame; paste into the box "
                                  "(cell centres spread evenly over the box, each pixel centre read bilinearly, zero beyond the "
                                  "outer cells) and threshold at 0.5"},
        "box_score_thresh": config.get("box_score_thresh"),
        "detections_per_img": config.get("detections_per_img"),
        # Fixed in the file: the trainer's caps follow the input's area (rpn_test_pixels), these are
        # their values for a median training image at the test scale.
        "rpn_test_top_n": {"pre_nms_per_level": int(model.rpn._pre_nms_top_n["testing"]),
                           "post_nms": int(model.rpn._post_nms_top_n["testing"])},
        "model": config.get("model"),
    }
    if config.get("object_diameter_test"):
        # The per-image scale is two passes in Python (engine.inference.detect), not the graph's.
        record["per_image_scale"] = (
            f"not in the file, which resizes every image by input_scale; predict.py rescales each image so its "
            f"objects' median diameter (from the detections scoring ≥ 0.5 at input_scale) becomes "
            f"{config['object_diameter_test']:.1f} model pixels, within {OBJECT_SCALE_RANGE[0]:g}-"
            f"{OBJECT_SCALE_RANGE[1]:g}× the training scale {config['input_scale']:g}")
    if example_size is not None:
        record["traced_at_size"] = list(example_size)
    return record


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _load(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint

    state = load_checkpoint(checkpoint)
    model, _ = build_model_from_checkpoint(state)
    fix_rpn_test_caps(model)        # one set of caps for every input size (see the record)
    return model.eval(), state


def export_torchscript(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Script the detector and save it (with the record inside and beside it) → the record."""
    from models.zoo import with_torchvision_classes

    model, state = _load(checkpoint)
    with_torchvision_classes(model)         # same inference; the trainer's subclasses do not script
    record = export_record(state, model, "torchscript")
    try:
        scripted = torch.jit.script(SingleImageDetector(model).eval())
    except Exception as exc:        # TorchScript reports any unsupported construct this way
        raise ExportError(f"{checkpoint}: TorchScript cannot compile this model ({_first_line(exc)})") from exc
    text = json.dumps(record, indent=1)
    with atomic_path(out) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"preprocessing.json": text})
    write_json_atomic(Path(str(out) + ".json"), record)
    return record


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike,
                example_size: tuple[int, int] = (512, 512)) -> dict[str, Any]:
    """Trace the detector into ONNX (opset ``ONNX_OPSET``) with dynamic height and width → the record.

    Tracing needs an example image; its content does not matter, only that the model finds
    detections in it is not required either (the traced graph holds every branch it took).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("--format onnx needs the onnx package: pip install onnx onnxruntime") from exc
    import warnings

    model, state = _load(checkpoint)
    scale = state["config"].get("input_scale_test") or state["config"].get("input_scale")
    if scale is not None and scale < 1:
        raise ExportError(f"{checkpoint}: input scale {scale} < 1 shrinks images with an antialiased resize, which "
                          "the ONNX exporter has no operator for; export --format torchscript instead, or "
                          "fine-tune at --input-scale 1 and resize images yourself before the model")
    record = export_record(state, model, "onnx", example_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(3, *example_size, generator=generator)
    wrapper = SingleImageDetector(model).eval()
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # tracer warnings about Python values in the graph
                torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["image"], output_names=OUTPUT_NAMES,
                                  dynamic_axes={"image": {1: "height", 2: "width"},
                                                **{name: {0: "detections"} for name in OUTPUT_NAMES}})
        except Exception as exc:
            raise ExportError(f"{checkpoint}: ONNX export failed ({_first_line(exc)})") from exc
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "preprocessing", json.dumps(record)
        onnx.save(proto, str(tmp))
    write_json_atomic(Path(str(out) + ".json"), record)
    return record
