"""Datasets: one module per format, all returning ``(image, target)`` per docs/architecture.md."""
# Importing a format module registers it.
from datasets import synthetic  # noqa: F401,E402
from datasets.registry import build_dataset, dataset_defaults, dataset_names, register_dataset

__all__ = ["build_dataset", "dataset_defaults", "dataset_names", "register_dataset"]
from datasets import coco, folder, sartorius  # noqa: F401,E402
