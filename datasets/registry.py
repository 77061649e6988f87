"""Name → dataset builder. Each format module registers itself with ``@register_dataset``."""
from __future__ import annotations

from typing import Any, Callable

_BUILDERS: dict[str, Callable[..., Any]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_dataset(name: str, defaults: dict[str, Any] | Callable[[dict], dict] | None = None):
    """Register ``builder(split, options, transforms) -> dataset`` under ``name``.

    ``defaults`` are model/training options that suit this kind of data (image size, anchor
    sizes, detections per image), or a function of the dataset options returning them (COCO
    2017 keeps torchvision's recipe, other COCO-format data gets sizes from its annotations);
    flags the user gave explicitly always win. Size options left out of them are chosen
    from the data (datasets/statistics.py).
    """
    def wrap(builder):
        _BUILDERS[name] = builder
        _DEFAULTS[name] = defaults if callable(defaults) else dict(defaults or {})
        return builder
    return wrap


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def dataset_defaults(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    _check(name)
    defaults = _DEFAULTS[name]
    return dict(defaults(dict(options or {})) if callable(defaults) else defaults)


def build_dataset(name: str, split: str, options: dict[str, Any], transforms=None):
    """Build split ``"train"`` or ``"val"`` of dataset ``name``.

    ``options`` is a plain dict of the dataset flags (``data_path``, ``seed``, …); each
    builder reads only the keys it knows.
    """
    _check(name)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return _BUILDERS[name](split, options, transforms)


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
