"""Tiny-run flags shared by the trainer tests: 96-px synthetic images, the small model."""
from __future__ import annotations

TINY = ["--dataset", "synthetic", "--synthetic-size", "96", "--synthetic-train-images", "4",
        "--synthetic-val-images", "2", "--model", "maskrcnn_resnet18_fpn", "--min-size", "96", "--max-size", "96",
        "-b", "2", "-j", "0", "--print-freq", "1", "--warmup-iters", "2", "--min-epoch-iters", "1",
        "--detections-per-img", "50", "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "200",
        "--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "200"]


# The tiny runs were tuned with SGD; the synthetic dataset's own default is AdamW (quick start).
SGD = ["--opt", "sgd", "--lr", "0.01", "--wd", "1e-4"]


def tiny_args(tmp_path, *extra: str, dataset_optimizer: bool = False) -> list[str]:
    """TINY flags writing under ``tmp_path``; SGD unless the dataset's default optimizer is asked for."""
    return [*TINY, *([] if dataset_optimizer else SGD), "--output-dir", str(tmp_path / "runs"), *extra]
