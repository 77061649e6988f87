"""Images for prediction: expand files, folders and globs; read any microscope/camera image.

Reading keeps the pixel data as stored (any dtype, gray/RGB/RGBA/2-channel); the model input is
made from it by the checkpoint's preprocessing contract (``transforms.preprocess``), the same
conversion training used.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file and why."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(arguments: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted, not recursive) and glob patterns → image paths.

    Returns ``(paths, problems)``: paths in argument order without duplicates, and one message
    per argument that named nothing readable (missing file, empty folder, glob with no match).
    A file given by name is kept whatever its extension, so a wrong file is reported by the reader.
    """
    paths: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def add(found: list[Path], argument: str, what: str) -> None:
        if not found:
            problems.append(f"{argument}: {what}")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)

    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            add(sorted(p for p in path.iterdir() if p.is_file() and _is_image(p)), argument,
                f"folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            add([path], argument, "")
        elif glob.has_magic(argument):
            add(sorted(Path(p) for p in glob.glob(argument, recursive=True)
                       if os.path.isfile(p) and _is_image(Path(p))), argument, "no image matches this pattern")
        else:
            problems.append(f"{argument}: no such file or folder")
    return paths, problems


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file → ``H×W`` (gray) or ``H×W×C`` (RGB/RGBA; TIFFs also 2 channels,
    e.g. nucleus + cytoplasm), dtype as stored; multi-page TIFFs give their first plane.

    The one decoder of the project (OpenCV, Pillow as fallback); the dataset readers add their
    checks on top. Raises ``ImageReadError`` naming the file.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _decode_tiff(path)
    return _decode_other(path)


def _decode_tiff(path: Path) -> np.ndarray:
    """tifffile first (float, 16-bit, multi-channel, multi-page, OME, BigTIFF), OpenCV/Pillow for
    what it cannot decode without optional codecs (LZW, JPEG)."""
    from utils.tiff import read_tiff

    try:
        image = read_tiff(path)
    except ImageReadError as tiff_error:
        try:
            return _decode_other(path)
        except ImageReadError:
            raise tiff_error from None
    if image.ndim == 3 and image.shape[2] > 4:
        raise ImageReadError(f"{path}: {image.shape[2]} channels; the model takes gray, RGB, RGBA or 2-channel "
                             "images: save the channels to use as their own file")
    return image


def _decode_other(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)     # works for any path encoding
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        image = _read_with_pillow(path)
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 2:                            # gray + alpha
            image = image[:, :, 0]
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        else:
            raise ImageReadError(f"{path}: {channels} channels; expected gray, RGB or RGBA")
    elif image.ndim != 2:
        raise ImageReadError(f"{path}: unexpected image shape {image.shape}")
    return image


def _read_with_pillow(path: Path) -> np.ndarray | None:
    """Fallback for files OpenCV cannot decode (some TIFF flavours). RGB order already."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.seek(0)
            array = np.array(im)
    except Exception:
        return None
    if array.ndim == 3 and array.shape[2] in (3, 4):   # undo the BGR swap read_image applies
        array = array[:, :, ::-1] if array.shape[2] == 3 else array[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(array)
