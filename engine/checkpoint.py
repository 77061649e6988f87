"""Checkpoints: plain dicts written atomically, read with ``torch.load(weights_only=True)``.

Layout of a run directory: ``last.pth`` (end of every epoch, and on interruption mid-epoch),
``last.prev.pth`` (the ``last.pth`` before it, kept for resuming when ``last.pth`` is damaged),
``best.pth`` (best validation metric so far), ``config.json``, ``metrics.jsonl``.

A checkpoint is written to a temporary file, fsynced, verified (every record's CRC), and only
then renamed over the old one, so ``last.pth`` is complete at every moment, even under
``kill -9``. Damage that happens later (a bad disk, a copy cut short) is found on loading by
the same check, and resuming falls back to ``last.prev.pth``.
"""
from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_path

log = logging.getLogger("trainer")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message says which and why."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before ``path`` is kept: ``last.pth`` → ``last.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete, undamaged ``torch.save`` file.

    ``torch.save`` writes a zip archive with a CRC per record: a truncated file has no central
    directory, a damaged one fails a CRC (``torch.load`` itself does not check them).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be read: it is incomplete or damaged (truncated by a "
                              f"crash or a full disk? {type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} could not be read: it is damaged, its record {bad!r} fails the "
                              f"CRC check")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Write ``state`` to ``path``: temp file, fsync, verify, rename. A crash at any moment
    leaves the old file; a refused write (full disk, read-only) raises ``utils.io.OutputError``.

    With ``keep_previous`` the old ``path``, when complete, stays as ``previous_path(path)``
    (a hard link: no extra space until the new file replaces it).
    """
    path = Path(path)
    with atomic_path(path, needed_bytes=state_nbytes(state)) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        verify_checkpoint_file(tmp)
        if keep_previous and path.is_file():
            _keep_as_previous(path)
    _fsync_folder(path.parent)


def _keep_as_previous(path: Path) -> None:
    try:
        verify_checkpoint_file(path)
    except CheckpointError:
        return  # a damaged file must not replace a good previous one
    with atomic_path(previous_path(path)) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, tmp)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (power loss), where the OS allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); "
                              f"is it a complete file written by this trainer?") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'model' entry)")
    return state


def set_config_values(path: str | os.PathLike, **values: Any) -> None:
    """Rewrite checkpoint ``path`` (atomically) with ``values`` in its stored config: what the end
    of a run decides for the checkpoints it already wrote (the test scale)."""
    state = load_checkpoint(path)
    state["config"] = {**state["config"], **values}
    save_checkpoint(path, state, keep_previous=False)


def load_for_resume(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """``(state, path read)``: ``path``, or when it is damaged or missing the previous checkpoint
    kept next to it, with a warning naming both files."""
    path = Path(path)
    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError as exc:
        previous = previous_path(path)
        if not previous.is_file():
            raise CheckpointError(f"{exc}; there is no previous checkpoint {previous} to fall back on") from None
        try:
            state = load_checkpoint(previous, map_location)
        except CheckpointError as exc_previous:
            raise CheckpointError(f"{exc}; the previous checkpoint is unusable too: {exc_previous}") from None
        log.warning("%s: resuming from the previous checkpoint %s instead (epoch %d, iteration %d)", exc, previous,
                    int(state.get("epoch", 0)) + 1, int(state.get("iteration", 0)))
        return state, previous


def last_trained_epoch(epoch: int, iteration: int) -> int:
    """0-based index of the last epoch a checkpoint at position ``(epoch, iteration)`` trained in
    (-1: none): the epoch in progress when some of its batches are done, else the one before.
    A checkpoint's ``epoch`` is the epoch in progress (0-based) and ``iteration`` the batches of
    it done, so the end of epoch ``e`` is stored as ``(e + 1, 0)``."""
    return epoch if iteration > 0 else epoch - 1


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
