"""Evaluation loop: model → COCO results per image → gathered over ranks → ``metrics``.

The distributed sampler pads the last batch by repeating images; results are merged by
unique image id, so those repeats never count twice and 1 or N processes give one answer.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine import distributed
from metrics import evaluate_predictions
from utils.masks import detections_to_coco_results

log = logging.getLogger(__name__)


def autocast_context(device: torch.device, enabled: bool):
    """Mixed precision: fp16 on CUDA, bf16 on CPU (where fp16 kernels are missing)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, amp: bool = False,
                   print_freq: int = 50) -> dict[Any, list[dict]]:
    """Run ``model`` over ``loader`` → ``{image_id: [COCO result, ...]}`` for this rank's images."""
    model.eval()
    per_image: dict[Any, list[dict]] = {}
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        images = [img.to(device, non_blocking=True) for img in images]
        with autocast_context(device, amp):
            outputs = model(images)
        for target, output in zip(targets, outputs):
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            per_image[target["image_id"]] = detections_to_coco_results(output, target["image_id"])
        if print_freq and (step + 1) % print_freq == 0:
            log.info("eval: %d/%d batches, %.2f s/batch", step + 1, len(loader),
                     (time.perf_counter() - start) / (step + 1))
    return per_image


def gather_results(per_image: dict[Any, list[dict]]) -> list[dict]:
    """All ranks' results, one entry per image id (the first rank's copy wins), on every rank."""
    merged: dict[Any, list[dict]] = {}
    for part in distributed.all_gather_objects(per_image):
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    return [r for image_id in sorted(merged, key=str) for r in merged[image_id]]


def evaluate_model(model: torch.nn.Module, loader, coco_gt: dict, device: torch.device, max_dets: int,
                   amp: bool = False, sartorius_score_thresh: float = 0.5,
                   class_names: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Predict, gather and score. Every rank gets the same ``(report, results)``."""
    per_image = predict_loader(model, loader, device, amp)
    results = gather_results(per_image)
    report = None
    if not distributed.is_distributed() or torch.distributed.get_rank() == 0:
        report = evaluate_predictions(coco_gt, results, max_dets, class_names=class_names,
                                      sartorius_score_thresh=sartorius_score_thresh)
    report = distributed.broadcast_object(report)
    return report, results


def headline(report: dict) -> dict[str, float]:
    """The flat numbers a run is judged by: segm/bbox AP, AP50, AP75, and the Sartorius score."""
    flat = {}
    for iou_type, r in report.get("coco", {}).items():
        for key in ("AP", "AP50", "AP75"):
            flat[f"{iou_type}_{key}"] = r[key]
    if "sartorius" in report:
        flat["sartorius"] = report["sartorius"]["score"]
    return flat
