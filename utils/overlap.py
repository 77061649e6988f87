"""The overlap rule: masks in descending score order, each pixel to the first mask that claims it.

One implementation for every form: the post-processing on COCO results (``metrics.postprocess``)
and the box crops of predictions (``utils.box_masks.resolve_overlaps``) both hand it the masks as
pixel indices. numpy only.
"""
from __future__ import annotations

import numpy as np

# A mask whose visible part is less than this share of its own pixels is dropped: more than
# half of it lies under masks of higher score, so it is a second detection of what they cover
# (or a fragment of it), and the sliver it would leave is a false positive to every instance
# metric. MoNuSeg, the 20-minute checkpoint's 5 validation images: DSB 0.289 → 0.301 (AJI
# 0.542 → 0.545), and the same 0.301–0.302 whatever the box NMS threshold (0.35–0.65), where
# keeping the slivers gave 0.269–0.299 (docs/predict.md).
MIN_VISIBLE_SHARE = 0.5


def remove_overlap(pixels: list[np.ndarray], min_sizes: np.ndarray, num_pixels: int,
                   remove: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """Overlap removal with minimum size over masks in descending score order.

    ``pixels[j]`` are mask j's pixel indices into a flattened image of ``num_pixels`` pixels (any
    flattening order, unique), ``min_sizes[j]`` its minimum size. ``visible_j = pixels_j \\ (union of
    kept masks before j)``; j is kept (with ``visible_j``) iff ``|visible_j| ≥ max(min_sizes[j], 1)``
    and ``|visible_j| ≥ MIN_VISIBLE_SHARE · |pixels_j|``, so a dropped mask claims no pixels.
    Returns (kept positions, their visible pixel indices). ``remove=False`` only applies the
    minimum size to the masks as they are.
    """
    taken = np.zeros(num_pixels, dtype=bool)
    kept, visible = [], []
    for j, idx in enumerate(pixels):
        vis = idx[~taken[idx]] if remove else idx
        if len(vis) >= max(int(min_sizes[j]), 1, MIN_VISIBLE_SHARE * len(idx)):
            if remove:
                taken[vis] = True
            kept.append(j)
            visible.append(vis)
    return kept, visible
