"""Label images: ``H×W``, 0 for background and one value per instance; to and from masks."""
from __future__ import annotations

import numpy as np

from utils.arrays import lazy_zeros
from utils.box_masks import BoxMasks


def label_image_to_instances(label_image: np.ndarray, return_boxes: bool = False):
    """Label image ``H×W`` (0 background, any other value one instance; any int dtype) →
    (masks ``N×H×W`` uint8, values ``N`` of the label image), ordered by label value; with
    ``return_boxes`` also their tight xyxy boxes (float32 ``N×4``) and pixel counts (``N``).

    Each mask is filled inside its bounding box only (``scipy.ndimage.find_objects``), and
    boxes and areas come from the label image: scanning the ``N×H×W`` stack for them would read
    1.8 GB for a 1000² image of 1,800 nuclei.
    """
    from scipy.ndimage import find_objects
    if label_image.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {label_image.shape}")
    values = np.unique(label_image)
    values = values[values != 0]
    masks = lazy_zeros(len(values), *label_image.shape)
    boxes = np.zeros((len(values), 4), dtype=np.float32)
    areas = np.zeros(len(values), dtype=np.int64)
    if len(values):
        # Relabel to 1..N so find_objects' output is as long as N, not max(label).
        dense = np.searchsorted(values, label_image).astype(np.int32) + 1
        dense[label_image == 0] = 0
        areas = np.bincount(dense.ravel(), minlength=len(values) + 1)[1:]
        for k, slices in enumerate(find_objects(dense)):
            if slices is not None:
                masks[k][slices] = dense[slices] == k + 1
                boxes[k] = (slices[1].start, slices[0].start, slices[1].stop, slices[0].stop)
    return (masks, values, boxes, areas) if return_boxes else (masks, values)


def label_image_to_box_masks(labels: np.ndarray) -> BoxMasks:
    """Label image ``H×W`` (0 background, 1..K) → ``K`` masks in label order; absent labels give
    empty ``0×0`` crops."""
    height, width = labels.shape
    count = int(labels.max()) if labels.size else 0
    offsets = np.zeros((count, 2), dtype=np.int64)
    crops = [np.zeros((0, 0), dtype=bool) for _ in range(count)]
    if count == 0:
        return BoxMasks(height, width, offsets, crops)
    from scipy import ndimage

    for k, region in enumerate(ndimage.find_objects(labels.astype(np.int64)), start=1):
        if region is None:
            continue
        ys, xs = region
        offsets[k - 1] = (ys.start, xs.start)
        crops[k - 1] = labels[region] == k
    return BoxMasks(height, width, offsets, crops)


def box_masks_to_label_image(masks: BoxMasks) -> np.ndarray:
    """Label image ``H×W``: 0 background, ``k`` for ``masks[k-1]``; the first mask wins a pixel.

    Pass masks in priority order (``remove_overlaps`` gives descending score). dtype is uint16
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
