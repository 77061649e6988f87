"""Checkpoints: plain dicts written atomically, read with ``torch.load(weights_only=True)``.

Layout of a run directory: ``last.pth`` (end of every epoch, and on interruption mid-epoch),
``best.pth`` (best validation metric so far), ``config.json``, ``metrics.jsonl``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message says which and why."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` via a temp file + rename: a crash mid-save keeps the old file."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); "
                              f"is it a complete file written by this trainer?") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'model' entry)")
    return state


def find_latest(output_dir: str | os.PathLike, name: str = "last.pth") -> Path | None:
    """The most recently written ``name`` under ``output_dir`` (searched one and two levels deep)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = list(root.glob(name)) + list(root.glob(f"*/{name}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def build_model_from_checkpoint(state: dict[str, Any], **option_overrides):
    """Rebuild the trained model (architecture, classes and options from the checkpoint's config).

    ``option_overrides`` change inference-time options such as ``detections_per_img`` or
    ``box_score_thresh``; any field of ``TrainConfig`` that is a model option is accepted.
    """
    from engine.config import TrainConfig
    from models import build_model

    config = TrainConfig.from_dict({**state["config"], **option_overrides})
    model = build_model(config.model, len(state["class_names"]), config.model_options(),
                        pretrained_layout=bool(config.weights or config.weights_backbone))
    model.load_state_dict(state["model"])
    return model, config
