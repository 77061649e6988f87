"""What an upload must be before the model sees it: an image by its bytes, within the limits.

The client's file name is only ever shown (as text by the page) and used, sanitised, as the
output name inside downloads; on disk an upload lives under a random name in the server's own
temporary folder, with the suffix of the type its bytes show (so ``decode_image`` picks the
TIFF reader for TIFFs whatever the name said).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Magic numbers of the accepted types (PNG, JPEG, classic TIFF and BigTIFF in both byte orders).
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"),
)
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif"}
SNIFF_BYTES = 8
MAX_NAME_CHARS = 200


class UploadError(ValueError):
    """An upload the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """``max_bytes``: largest upload; ``max_pixels``: largest ``height × width``."""
    max_bytes: int = 64 * 1024 ** 2
    max_pixels: int = 64_000_000


def sniff_image_type(head: bytes) -> str | None:
    """First bytes of a file → ``"png"``, ``"jpeg"``, ``"tiff"``, or ``None`` for anything else."""
    for signature, kind in SIGNATURES:
        if head.startswith(signature):
            return kind
    return None


def display_name(name: str | None) -> str:
    """The client's file name as shown in the page and in messages: control characters removed,
    at most ``MAX_NAME_CHARS`` characters. Only ever shown as text, never used as a path."""
    name = "".join(ch for ch in (name or "") if ch.isprintable())
    return name[:MAX_NAME_CHARS] or "image"


def output_stem(name: str) -> str:
    """Output name (image id and file-name prefix in downloads) from a client file name: its
    stem, as predict.py names outputs, with every run of characters other than letters, digits,
    ``.``, ``_`` and ``-`` made one ``_`` and leading/trailing ``._-`` removed, so it can never
    be a path: ``cells 1.png`` → ``cells_1``, ``../<b>x</b>.png`` → ``b_x_b``."""
    base = display_name(name)
    head, dot, suffix = base.rpartition(".")
    if dot and head.strip(".") and not any(sep in suffix for sep in "/\\"):
        base = head                                   # drop the extension, as Path.stem does
    stem = re.sub(r"[^\w.-]+", "_", base).strip("._-")
    return stem[:100] or "image"


def unique_stems(stems: list[str]) -> list[str]:
    """Stems made unique within one download by suffixing ``_2``, ``_3``, …"""
    seen: dict[str, int] = {}
    out = []
    for stem in stems:
        candidate, k = stem, 1
        while candidate in seen:
            k += 1
            candidate = f"{stem}_{k}"
        seen[candidate] = 1
        out.append(candidate)
    return out


def image_size(path: Path, kind: str) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding its pixels (so a small file
    that would decode to billions of pixels is refused before it fills the memory)."""
    if kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        except Exception as exc:           # tifffile raises many types for malformed files
            raise UploadError(f"malformed TIFF, its header cannot be read ({type(exc).__name__}: {exc})") from exc
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our limit speaks instead
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        raise UploadError(f"too many pixels for this server ({exc})", status=413) from exc
    except Exception as exc:                # Pillow raises many types for malformed files
        raise UploadError(f"corrupt {kind.upper()} header ({type(exc).__name__}: {exc})") from exc
    return int(height), int(width)


def check_upload(path: Path, limits: Limits) -> tuple[str, tuple[int, int]]:
    """An uploaded file → ``(type, (height, width))``, or ``UploadError`` saying what is wrong
    (not an image by its content; header unreadable; more pixels than allowed)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        raise UploadError("empty file")
    kind = sniff_image_type(head)
    if kind is None:
        raise UploadError("not a PNG, JPEG or TIFF image (judged by its content, not its name)", status=415)
    height, width = image_size(path, kind)
    if height * width > limits.max_pixels:
        raise UploadError(f"{width}×{height} = {height * width:,} pixels is over this server's limit of "
                          f"{limits.max_pixels:,} (serve.py --max-pixels)", status=413)
    if height < 1 or width < 1:
        raise UploadError(f"image of size {width}×{height}")
    return kind, (height, width)
