"""Bad-input reporting shared by the dataset formats.

Every error names the file (or CSV row) and what is wrong. With ``skip_bad`` the index
builders skip the offending image/annotation and record it in a ``BadInputLog`` instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class DatasetError(ValueError):
    """Bad input data; the message starts with the file or CSV row it concerns.

    Constructible from one string, so a DataLoader worker re-raises it with its own type.
    """


@dataclass
class BadInputLog:
    """What an index builder skipped (``skip_bad=True``) or dropped by design (counters)."""
    skipped: list[str] = field(default_factory=list)     # "where: what" per skipped item
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"duplicate annotations": 115}

    def skip(self, where: str, what: str, skip_bad: bool) -> None:
        """Record a bad item, or raise ``DatasetError`` when skipping is off."""
        if not skip_bad:
            raise DatasetError(f"{where}: {what} (pass skip_bad / --skip-bad to skip such items)")
        self.skipped.append(f"{where}: {what}")

    def skip_error(self, error: DatasetError, skip_bad: bool) -> None:
        """Record an already-formatted ``DatasetError``, or re-raise it when skipping is off."""
        if not skip_bad:
            raise error
        self.skipped.append(str(error))

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n

    def summary(self) -> str:
        parts = [f"{n} {what}" for what, n in sorted(self.counts.items())]
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad items skipped")
        return ", ".join(parts) if parts else "no problems"


def as_bool(value, default: bool) -> bool:
    """Option value → bool; accepts bools, 0/1 and the strings true/false/yes/no."""
    if value is None:
        return default
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise DatasetError(f"option value {value!r} is not a boolean")
    return bool(value)


def load_sample(dataset, index: int):
    """``dataset.load(index)`` then ``dataset.transforms``; any failure becomes a ``DatasetError``
    naming ``dataset.image_path(index)``, so a DataLoader worker never reports a bare traceback."""
    try:
        image, target = dataset.load(index)
        if dataset.transforms is not None:
            image, target = dataset.transforms(image, target)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{dataset.image_path(index)}: {type(e).__name__}: {e}") from e
    return image, target
