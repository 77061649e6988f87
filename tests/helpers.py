"""Tiny-run flags shared by the trainer tests: 96-px synthetic images, the small model."""
from __future__ import annotations

# The tiny synthetic data, and the small, fast run on whatever data (folder tests use only the latter).
TINY_DATA = ["--dataset", "synthetic", "--synthetic-size", "96", "--synthetic-train-images", "4",
             "--synthetic-val-images", "2"]
TINY_RUN = ["--model", "maskrcnn_resnet18_fpn", "--min-size", "96", "--max-size", "96",
            "-b", "2", "-j", "0", "--print-freq", "1", "--warmup-iters", "2", "--min-epoch-iters", "1",
            "--detections-per-img", "50", "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "200",
            "--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "200"]
TINY = [*TINY_DATA, *TINY_RUN]


# The tiny runs were tuned with SGD; the synthetic dataset's own default is AdamW (quick start).
SGD = ["--opt", "sgd", "--lr", "0.01", "--wd", "1e-4"]


def tiny_args(tmp_path, *extra: str, dataset_optimizer: bool = False, synthetic: bool = True) -> list[str]:
    """TINY flags writing under ``tmp_path``; SGD unless the dataset's default optimizer is asked for;
    ``synthetic=False`` leaves out the synthetic data's flags (``extra`` names the data)."""
    flags = TINY if synthetic else TINY_RUN
    return [*flags, *([] if dataset_optimizer else SGD), "--output-dir", str(tmp_path / "runs"), *extra]
