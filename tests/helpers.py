"""Tiny-run flags shared by the trainer tests: 96-px synthetic images, the small model."""
from __future__ import annotations

TINY = ["--dataset", "synthetic", "--synthetic-size", "96", "--synthetic-train-images", "4",
        "--synthetic-val-images", "2", "--model", "maskrcnn_resnet18_fpn", "--min-size", "96", "--max-size", "96",
        "-b", "2", "-j", "0", "--print-freq", "1", "--warmup-iters", "2", "--lr", "0.01",
        "--detections-per-img", "50", "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "200",
        "--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "200"]


def tiny_args(tmp_path, *extra: str) -> list[str]:
    return [*TINY, "--output-dir", str(tmp_path / "runs"), *extra]
