"""Name → dataset builder. Each format module registers itself with ``@register_dataset``."""
from __future__ import annotations

from typing import Any, Callable

_BUILDERS: dict[str, Callable[..., Any]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_dataset(name: str, defaults: dict[str, Any] | None = None):
    """Register ``builder(split, options, transforms) -> dataset`` under ``name``.

    ``defaults`` are model/training options that suit this kind of data (image size, anchor
    sizes, detections per image); flags the user gave explicitly always win.
    """
    def wrap(builder):
        _BUILDERS[name] = builder
        _DEFAULTS[name] = dict(defaults or {})
        return builder
    return wrap


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def dataset_defaults(name: str) -> dict[str, Any]:
    _check(name)
    return dict(_DEFAULTS[name])


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
