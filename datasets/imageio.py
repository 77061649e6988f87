"""Reading images and their sizes for the dataset formats; errors name the file."""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from datasets.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

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


def read_image(path: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as stored: ``H×W`` or ``H×W×3`` (RGB), uint8 or uint16.

    Colour images are converted from OpenCV's BGR to RGB; an alpha channel is dropped.
    ``expected_size`` ``(h, w)`` is checked when given.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:  # cv2 cannot read some TIFF flavours; PIL can
        try:
            with Image.open(path) as im:
                array = np.array(im)
        except Exception as e:
            raise DatasetError(f"{path}: corrupt or unsupported image ({e})") from None
    elif array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise DatasetError(f"{path}: expected a 2-D image, got array of shape {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
            if array.min() < 0 or array.max() > 65535:
                raise DatasetError(f"{path}: pixel values outside 0..65535 ({array.dtype})")
            array = array.astype(np.uint16)
        else:
            array = array.astype(np.float32)  # float TIFFs: assumed already in [0, 1]
    if expected_size is not None and array.shape[:2] != tuple(expected_size):
        raise DatasetError(f"{path}: image is {array.shape[0]}×{array.shape[1]}, "
                           f"annotations say {expected_size[0]}×{expected_size[1]}")
    return array


def read_label_image(path: str) -> np.ndarray:
    """An instance label image ``H×W`` (integer dtype, 0 = background) as stored."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        try:
            with Image.open(path) as im:
                array = np.array(im)
        except Exception as e:
            raise DatasetError(f"{path}: corrupt or unsupported label image ({e})") from None
    if array.ndim == 3:
        # Binary masks are sometimes saved as RGB(A); any colour channel is the same there.
        array = array[:, :, 0]
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(f"{path}: label image must have integer pixels, got {array.dtype}")
    return array
