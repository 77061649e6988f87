"""Reading images and their sizes for the dataset formats; errors name the file."""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from datasets.errors import DatasetError
from utils.image_files import ImageReadError, decode_image

# cv2 would otherwise start its own thread pool inside every DataLoader worker.
cv2.setNumThreads(0)


def read_image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the file header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises several types for unreadable headers
        raise DatasetError(f"{path}: unreadable image header ({e})") from None
    return height, width


def _decode(path: str, what: str) -> np.ndarray:
    """The project's one decoder (utils.image_files), with its errors as ``DatasetError``."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    try:
        return decode_image(path)
    except ImageReadError as e:  # its message already names the file and the problem
        raise DatasetError(f"{e}; it was read as {what}") from None


def read_image(path: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as stored: ``H×W`` or ``H×W×3`` (RGB), uint8 or uint16.

    Colour images are converted from OpenCV's BGR to RGB; an alpha channel is dropped.
    ``expected_size`` ``(h, w)`` is checked when given.
    """
    array = _decode(path, "an image")
    if array.ndim == 3 and array.shape[2] == 4:
        array = np.ascontiguousarray(array[:, :, :3])  # alpha carries no image content
    if array.dtype not in (np.uint8, np.uint16):
        if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
            if array.min() < 0 or array.max() > 65535:
                raise DatasetError(f"{path}: pixel values outside 0..65535 ({array.dtype})")
            array = array.astype(np.uint16)
        else:
            array = array.astype(np.float32)  # any range: the preprocessing contract scales it
    if expected_size is not None and array.shape[:2] != tuple(expected_size):
        raise DatasetError(f"{path}: image is {array.shape[0]}×{array.shape[1]}, "
                           f"annotations say {expected_size[0]}×{expected_size[1]}")
    return array


def read_label_image(path: str) -> np.ndarray:
    """An instance label image ``H×W`` (integer dtype, 0 = background) as stored."""
    array = _decode(path, "a label image")
    if array.ndim == 3:
        # Binary masks are sometimes saved as RGB(A); any colour channel is the same there. A
        # colour-coded label image (an instance per colour) is not a label image.
        colour = array[:, :, :3]
        if not (colour == colour[:, :, :1]).all():
            raise DatasetError(f"{path}: label image is a colour (RGB) image; save it as a single-channel "
                               "integer image (8/16-bit PNG or TIFF) with 0 for background and one value per "
                               "object, e.g. with tools/masks_to_coco.py's input layout or skimage.measure.label")
        array = array[:, :, 0]
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(f"{path}: label image must have integer pixels, got {array.dtype}")
    return array
