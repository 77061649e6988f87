"""Weights from torchvision names (downloaded once into the TORCH_HOME cache) or local files.

Offline machines get an error that says where the file would be cached and how to pass a local
copy instead of a bare ``URLError``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torchvision
from torch.hub import get_dir

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights flag that cannot be satisfied; the message says what to do."""


def _torchvision_enum(spec: str, default_enum: str | None, flag: str):
    """'DEFAULT', 'COCO_V1' (member of ``default_enum``) or 'Enum.MEMBER' → a WeightsEnum value."""
    try:
        if "." in spec:
            return torchvision.models.get_weight(spec)
        if default_enum is None:
            raise WeightsError(f"{flag} {spec!r}: this model has no torchvision weights; pass a local file")
        enum = getattr(torchvision.models.detection, default_enum, None) or getattr(torchvision.models, default_enum)
        return enum[spec] if spec != "DEFAULT" else enum.DEFAULT
    except (KeyError, AttributeError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{flag} {spec!r} is neither an existing file nor a torchvision weights name "
                           f"(e.g. DEFAULT, or {default_enum or 'ResNet50_Weights'}.<member>)") from exc


def _download_state_dict(weights, flag: str) -> dict:
    cached = Path(get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not fetchable here"
        raise WeightsError(
            f"{flag}: could not download {weights} from {weights.url} ({type(exc).__name__}: {exc}).\n"
            f"This machine looks offline. Either copy the file to {cached} (TORCH_HOME sets the cache root) "
            f"or pass a local file: {flag} /path/to/weights.pth") from exc


def read_state_dict(spec: str, default_enum: str | None, flag: str) -> dict:
    """State dict for ``spec``: a local file (a plain state dict or one of our checkpoints) or a name."""
    path = Path(spec).expanduser()
    if path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{flag} {path}: not a readable PyTorch weights file ({exc})") from exc
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]  # one of our checkpoints
        if not isinstance(obj, dict):
            raise WeightsError(f"{flag} {path}: expected a state dict, found {type(obj).__name__}")
        return obj
    if any(sep in spec for sep in ("/", "\\")) or spec.endswith((".pth", ".pt")):
        raise WeightsError(f"{flag} {spec}: file not found")
    return _download_state_dict(_torchvision_enum(spec, default_enum, flag), flag)


def load_matching(module: torch.nn.Module, state: dict, what: str) -> list[str]:
    """Load the tensors of ``state`` whose names and shapes match ``module``; return those skipped.

    Shape mismatches are the classifier heads of a model trained with another number of
    classes: they keep their fresh initialisation, and the caller is told so.
    """
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reinit = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if not usable:
        raise WeightsError(f"{what}: no tensor matches this model's names; is it for another architecture?")
    module.load_state_dict(usable, strict=False)
    if reinit:
        log.warning("%s: %d tensors have another shape (different number of classes?) and were "
                    "re-initialised: %s", what, len(reinit), ", ".join(reinit))
    if missing:
        log.warning("%s: %d tensors of the model were not in the weights and keep their initialisation "
                    "(first: %s)", what, len(missing), ", ".join(missing[:5]))
    return reinit
