"""Label images: ``H×W``, 0 for background and one value per instance; to and from masks."""
from __future__ import annotations

import numpy as np

from utils.box_masks import BoxMasks


def label_image_to_box_masks(label_image: np.ndarray) -> tuple[BoxMasks, np.ndarray]:
    """Label image ``H×W`` (0 background, any other value one instance; any int dtype) →
    (one box-cropped mask per value present, the values ``N``), ordered by label value.

    The one reading of a label image: each mask is cut from its bounding box only
    (``scipy.ndimage.find_objects``), so a 1000² image of 1,800 nuclei never becomes an
    ``N×H×W`` stack here.
    """
    from scipy.ndimage import find_objects
    if label_image.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {label_image.shape}")
    height, width = label_image.shape
    values = np.unique(label_image)
    values = values[values != 0]
    offsets = np.zeros((len(values), 2), dtype=np.int64)
    crops = [np.zeros((0, 0), dtype=bool) for _ in values]
    if len(values):
        # Relabel to 1..N so find_objects' output is as long as N, not max(label).
        dense = np.searchsorted(values, label_image).astype(np.int32) + 1
        dense[label_image == 0] = 0
        for k, slices in enumerate(find_objects(dense)):
            if slices is not None:
                offsets[k] = (slices[0].start, slices[1].start)
                crops[k] = dense[slices] == k + 1
    return BoxMasks(height, width, offsets, crops), values


def label_image_to_instances(label_image: np.ndarray, return_boxes: bool = False):
    """Label image ``H×W`` → (masks ``N×H×W`` uint8, values ``N``) as ``label_image_to_box_masks``
    orders them; with ``return_boxes`` also their tight xyxy boxes (float32 ``N×4``) and pixel
    counts (int64 ``N``), taken from the box crops rather than by scanning the stack.

    The stack is lazily mapped (``utils.arrays.lazy_zeros``): only the boxes' pages take memory.
    """
    masks, values = label_image_to_box_masks(label_image)
    dense = masks.to_dense()
    return (dense, values, masks.tight_boxes(), masks.areas()) if return_boxes else (dense, values)


def box_masks_to_label_image(masks: BoxMasks) -> np.ndarray:
    """Label image ``H×W``: 0 background, ``k`` for ``masks[k-1]``; the first mask wins a pixel.

    Pass masks in priority order (``resolve_overlaps`` gives descending score). dtype is uint16
    up to 65535 masks, else int32.
    """
    dtype = np.uint16 if len(masks) <= np.iinfo(np.uint16).max else np.int32
    labels = np.zeros((masks.height, masks.width), dtype=dtype)
    for k, (crop, (y0, x0)) in enumerate(zip(masks.crops, masks.offsets.tolist()), start=1):
        if not crop.size:
            continue
        h, w = crop.shape
        region = labels[y0:y0 + h, x0:x0 + w]
        region[crop & (region == 0)] = k
    return labels
