"""Atomic file writes: a crash mid-write never leaves a half-written file behind.

A write goes to a temporary file next to the target (``.<name>.<random>.tmp``) and is renamed
onto it when complete. A failure removes the temporary file; a write the disk or the
permissions refuse (full, quota, read-only, no permission) becomes an ``OutputError`` that
names the file, the reason and, for a full disk, the space needed and free.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# What the disk or the permissions refuse, as a user would say it.
WRITE_REFUSALS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# Temporary files being written right now: an immediate exit (a second SIGTERM) removes them.
_pending: set[Path] = set()


class OutputError(OSError):
    """An output file the disk or the permissions refused; ``str()`` is the whole message."""

    def __init__(self, code: int, message: str, path: Path):
        super().__init__(code, message, str(path))
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space (bytes) on the filesystem holding ``folder`` or its nearest existing parent."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def output_error(path: str | os.PathLike, code: int, needed: int | None = None) -> OutputError:
    """The ``OutputError`` for writing ``path`` refused with ``code`` (an errno)."""
    path = Path(path)
    reason = WRITE_REFUSALS.get(code, os.strerror(code))
    if code in _SPACE_ERRNOS:
        parts = [f"it needs about {format_bytes(needed)}"] if needed else []
        free = free_bytes(path.parent)
        if free is not None:
            parts.append(f"{format_bytes(free)} free in {path.parent}")
        advice = (f" ({'; '.join(parts)})" if parts else "") + ". Free some space or write elsewhere"
    else:
        advice = f". Make {path.parent} writable or write elsewhere"
    return OutputError(code, f"cannot write {path}: {reason}{advice}; any previous {path.name} is intact", path)


def load_json(path: str | os.PathLike, what: str = "", error: type[Exception] = ValueError) -> Any:
    """Read a JSON file. A missing or unreadable file, bad UTF-8 or a syntax error raises ``error``
    (the caller's input-error type) with a message naming the file; ``what`` says what it should hold."""
    label = f"{what} file {path}" if what else str(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{label}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror or e})") from None


@contextmanager
def atomic_path(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it onto ``path`` on success.

    The rename is atomic on POSIX, so readers see either the old file or the new one.
    On an exception the temporary file is removed and ``path`` is untouched. With
    ``needed_bytes`` (the size about to be written), a disk without that much free space is
    refused before anything is written. Refusals raise ``OutputError``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if needed_bytes is not None:
            free = free_bytes(path.parent)
            if free is not None and free < needed_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in WRITE_REFUSALS:
            raise output_error(path, exc.errno, needed_bytes) from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    _pending.add(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in WRITE_REFUSALS and not isinstance(exc, OutputError):
            raise output_error(path, exc.errno, needed_bytes) from exc
        raise
    finally:
        _pending.discard(tmp_path)
        tmp_path.unlink(missing_ok=True)


def remove_pending_temp_files() -> None:
    """Remove the temporary files of writes in progress (before an immediate ``os._exit``)."""
    for tmp in list(_pending):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove ``atomic_path`` temporaries left in ``folder`` by a process killed mid-write
    (``kill -9``, power loss). Only call it when no other process writes there."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and p not in _pending]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
