"""Read microscopy TIFFs (16-bit, float, multi-channel, multi-page, ImageJ, OME, BigTIFF) with tifffile.

OpenCV and Pillow read only some TIFF flavours (no float32 multi-channel, no ImageJ/OME
hyperstacks, no channel-first stacks). ``read_tiff`` returns ONE image plane set, as stored:

* ``H×W`` for one channel, ``H×W×C`` (channel-last) for several; dtype exactly as stored
  (uint8, uint16, int16, int32, uint32, float32, float64, bool, ...), native byte order.
  No rescaling and no photometric interpretation (palette indices and MinIsWhite values come
  back raw; RGB stays in R, G, B order).
* The axes of the first series (``tifffile``'s axes string, e.g. ``'CYX'``, ``'YXS'``,
  ``'ZCYX'``, ``'TZCYX'``, ``'QYX'``) decide what is kept: Y, X and the channel-like axes
  C (channel) and S (samples, e.g. RGB) are kept whole; index 0 is taken of every other axis
  (T time, Z depth, I page sequence, Q unknown, ...). So a z-stack or time series gives its
  first plane, and channels stored as separate pages (ImageJ/OME) come back as ``H×W×C``.
* Unlabelled channel-first data: when there is no C/S axis with more than one entry and the
  axis just before Y is an unknown ``Q`` axis of 2–4 entries (a plain ``C×H×W`` array, e.g.
  written by ``tifffile.imwrite`` without metadata), that axis is taken as the channels.
  (A 2–4 plane z-stack without metadata is indistinguishable and is read as channels too.)
* Several channel axes left (C and S both > 1) are flattened C-major into one channel axis.
  More than 4 channels are all returned; the caller decides what to do with them.
* Singleton channels are dropped (→ ``H×W``).

Only the pages of the returned plane set are decoded, so memory stays about one plane even
for large multi-page files.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from utils.image_files import ImageReadError

_CHANNEL_AXES = "CS"
_MAX_UNLABELLED_CHANNELS = 4


def read_tiff(path: str | os.PathLike) -> np.ndarray:
    """Read the first image plane set of a TIFF → ``H×W`` or ``H×W×C`` array, dtype as stored.

    See the module docstring for the exact rules. Raises ``ImageReadError`` naming the file
    for missing/unreadable files, files tifffile cannot decode (corrupt, truncated, not a
    TIFF, compression that needs the optional ``imagecodecs`` package) and zero-size images.
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
        raise ImageReadError(f"{path}: not a readable TIFF ({exc})") from exc
    except Exception as exc:                          # TiffFileError, struct.error, ...
        raise ImageReadError(f"{path}: not a readable TIFF ({_describe(exc)})") from exc
    try:
        with tif:
            image = _read_first_planes(tif, path)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot decode TIFF image data ({_describe(exc)})") from exc
    if image.size == 0:
        raise ImageReadError(f"{path}: image has zero size {image.shape}")
    return image


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "imagecodecs" in text:
        text += "; install it with 'pip install imagecodecs'"
    return text


def _read_first_planes(tif, path: Path) -> np.ndarray:
    if not tif.series:
        raise ImageReadError(f"{path}: TIFF holds no image")
    series = tif.series[0]
    axes = series.get_axes(False)
    shape = tuple(int(n) for n in series.get_shape(False))
    if math.prod(shape) == 0:
        raise ImageReadError(f"{path}: image has zero size {shape}")
    if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
        return _plane_from_shape(np.asarray(tif.pages[0].asarray()))

    keep = [axis in "YX" or axis in _CHANNEL_AXES for axis in axes]
    has_channels = any(axis in _CHANNEL_AXES and n > 1 for axis, n in zip(axes, shape))
    if not has_channels:
        before_y = [i for i in range(axes.index("Y")) if shape[i] > 1]
        if before_y and axes[before_y[-1]] == "Q" and 2 <= shape[before_y[-1]] <= _MAX_UNLABELLED_CHANNELS:
            keep[before_y[-1]] = True              # plain C×H×W without axes metadata

    data = _read_selected(series, shape, keep, axes.index("Y"))
    # data has the full (unsqueezed) axes; dropped axes have length 1 or are indexed here.
    index = tuple(slice(None) if k else 0 for k in keep)
    data = data[index]
    kept_axes = "".join(a if a != "Q" else "C" for a, k in zip(axes, keep) if k)
    y, x = kept_axes.index("Y"), kept_axes.index("X")
    channel_dims = [i for i in range(len(kept_axes)) if i not in (y, x)]
    data = np.transpose(data, (y, x, *channel_dims))
    height, width = data.shape[:2]
    channels = math.prod(data.shape[2:])
    data = data.reshape(height, width, channels) if channels > 1 else data.reshape(height, width)
    return _native(data)


def _read_selected(series, shape: tuple[int, ...], keep: list[bool], y_axis: int) -> np.ndarray:
    """Decode only the pages holding index 0 of the dropped axes; return them in ``shape`` layout
    with every dropped outer axis of length 1 (page-internal axes are whole)."""
    npages = len(series)
    page_size = math.prod(series.keyframe.shape)
    split = _page_split(shape, npages, page_size, y_axis)
    if split is None or getattr(series, "is_truncated", False):
        # Contiguous data described by a single page (e.g. ImageJ hyperstack > 4 GB):
        # memory-map it (tifffile uses a temporary file if it cannot map directly).
        return series.asarray(out="memmap", squeeze=False).reshape(shape)
    outer = shape[:split]
    selection = [range(n) if k else range(1) for n, k in zip(outer, keep[:split])]
    grids = np.meshgrid(*[np.asarray(s) for s in selection], indexing="ij") if outer else []
    pages = (np.ravel_multi_index([g.ravel() for g in grids], outer).tolist() if outer else [0])
    data = series.asarray(key=pages, squeeze=False)
    return data.reshape(*[len(s) for s in selection], *shape[split:])


def _page_split(shape: tuple[int, ...], npages: int, page_size: int, limit: int) -> int | None:
    """Number of leading axes (at most ``limit``, the Y axis) that enumerate the ``npages``
    pages of ``page_size`` elements each, or None if no split matches (truncated series)."""
    best = None
    product = 1
    for i in range(limit + 1):
        if product == npages:
            best = i
        if i < limit:
            product *= shape[i]
        if product > npages:
            break
    if best is None or math.prod(shape[best:]) != page_size:
        return None
    return best


def _plane_from_shape(image: np.ndarray) -> np.ndarray:
    """Fallback without axes: ``H×W``, ``H×W×C`` or channel-first ``C×H×W`` (C ≤ 4)."""
    image = np.squeeze(image) if image.ndim > 2 else image
    if image.ndim == 3 and image.shape[0] <= _MAX_UNLABELLED_CHANNELS < image.shape[2]:
        image = np.transpose(image, (1, 2, 0))
    while image.ndim > 3:
        image = image[0]
    return _native(image)


def _native(image: np.ndarray) -> np.ndarray:
    """Own, C-contiguous, native-byte-order copy (never a view into a memory map)."""
    dtype = image.dtype.newbyteorder("=")
    if isinstance(image, np.memmap) or not image.flags.c_contiguous or image.dtype != dtype:
        return np.array(image, dtype=dtype, order="C", copy=True)
    return image
