"""Name → dataset builder. Each format module registers itself with ``@register_dataset``."""
from __future__ import annotations

from typing import Any, Callable

from datasets.errors import DatasetError, as_bool

_BUILDERS: dict[str, Callable[..., Any]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_OPTIONS: dict[str, dict[str, type]] = {}

# Option types a format may declare; command-line values arrive as strings and are converted here.
_CONVERT: dict[type, Callable[[Any], Any]] = {str: str, int: int, float: float,
                                             bool: lambda v: as_bool(v, False)}


def register_dataset(name: str, defaults: dict[str, Any] | Callable[[dict], dict] | None = None,
                     options: dict[str, type] | None = None):
    """Register ``builder(split, options, transforms) -> dataset`` under ``name``.

    ``options`` declares the format's option keys and their types (``str``, ``int``, ``float``,
    ``bool``): ``build_dataset`` rejects any other key, naming the valid ones, and converts the
    values (the command line gives strings).

    ``defaults`` are model/training options that suit this kind of data (image size, anchor
    sizes, detections per image), or a function of the dataset options returning them (COCO
    2017 keeps torchvision's recipe, other COCO-format data gets sizes from its annotations);
    flags the user gave explicitly always win. Size options left out of them are chosen
    from the data (datasets/statistics.py).
    """
    def wrap(builder):
        _BUILDERS[name] = builder
        _DEFAULTS[name] = defaults if callable(defaults) else dict(defaults or {})
        _OPTIONS[name] = dict(options or {})
        return builder
    return wrap


def parse_option(text: str) -> tuple[str, str]:
    """A ``KEY=VALUE`` dataset option from the command line → ``(key, value)``; ``-`` in the key
    becomes ``_`` (``--dataset-option val-path=x`` is ``val_path``). The one parser of the CLIs."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def dataset_defaults(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    _check(name)
    defaults = _DEFAULTS[name]
    return dict(defaults(dict(options or {})) if callable(defaults) else defaults)


def option_keys(name: str) -> dict[str, type]:
    """The option keys dataset ``name`` declares, with their types."""
    _check(name)
    return dict(_OPTIONS[name])


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of dataset ``name`` with ``None`` values left out and each value converted to
    its declared type. An undeclared key or an unconvertible value raises ``DatasetError`` that
    names the option and lists the valid keys."""
    spec = option_keys(name)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(spec))
    if unknown:
        flags = ", ".join(f"{k} (--{k.replace('_', '-')} / --dataset-option {k}=...)" for k in unknown)
        raise DatasetError(f"dataset {name!r} has no option {flags}; its options are: {', '.join(sorted(spec))}")
    checked = {}
    for key, value in given.items():
        try:
            checked[key] = _CONVERT[spec[key]](value)
        except (TypeError, ValueError):
            raise DatasetError(f"dataset {name!r} option {key}: expected {spec[key].__name__}, got {value!r}") from None
    return checked


def build_dataset(name: str, split: str, options: dict[str, Any], transforms=None):
    """Build split ``"train"`` or ``"val"`` of dataset ``name``.

    ``options`` is a plain dict of the dataset's option keys (``data_path``, ``fold``, …), checked
    and typed by ``check_options``; ``None`` values count as not given.
    """
    _check(name)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return _BUILDERS[name](split, check_options(name, options), transforms)


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
