"""Array helpers for stacks of full-size instance masks: lazily mapped zeros, nearest-neighbour
resampling indices. numpy only."""
from __future__ import annotations

import numpy as np


def lazy_zeros(n: int, height: int, width: int) -> np.ndarray:
    """uint8 zeros ``n×height×width`` whose memory the OS provides only where written.

    Backed by an anonymous mmap rather than ``np.zeros``: numpy advises huge pages for large
    arrays, so writing a few rows of each of 790 masks would materialise (and zero) the whole
    290 MB stack in 2 MB pages; with 4 KB pages only the touched rows cost memory.
    """
    import mmap
    size = n * height * width
    if size == 0:
        return np.zeros((n, height, width), dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8).reshape(n, height, width)


def nearest_source_index(out_len: int, in_len: int) -> np.ndarray:
    """Nearest source pixel of each of ``out_len`` output pixels resampling ``in_len`` (pixel-centre
    convention, as bilinear ``align_corners=False``): the one nearest-neighbour rule for masks."""
    return np.minimum(((np.arange(out_len) + 0.5) * in_len / out_len).astype(np.int64), in_len - 1)
