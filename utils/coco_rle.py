"""COCO run-length encoding: the codec (via pycocotools), its run lengths read without decoding
to a canvas, and COCO RLEs ↔ pixel indices and binary mask stacks.

Pixels are numbered column-major (Fortran order): ``index = x·H + y``; runs alternate
background/foreground, first run background. numpy and pycocotools only (no torch), so the
metrics and ``evaluate.py --gt --pred`` import nothing heavier.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from utils.arrays import lazy_zeros


def encode_coco_rle(masks: np.ndarray) -> list[dict]:
    """Binary masks ``N×H×W`` (any integer/bool dtype) → compressed COCO RLEs with str counts."""
    if masks.ndim != 3:
        raise ValueError(f"expected N×H×W masks, got shape {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_coco_rle(rles: list[dict], height: int, width: int) -> np.ndarray:
    """Compressed or uncompressed COCO RLEs → binary masks ``N×H×W`` uint8."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    fixed = [mask_utils.frPyObjects(r, r["size"][0], r["size"][1]) if isinstance(r["counts"], list) else r
             for r in rles]
    return np.ascontiguousarray(mask_utils.decode(fixed).transpose(2, 0, 1))


# A compressed RLE string stores run lengths (alternating background/foreground, column-major
# pixel order, first run background) as 5-bit groups offset by 48 ('0'); bit 0x20 says "another
# group follows", bit 0x10 of the last group is the sign, and from the 4th count on each value is
# stored as the difference to the count two places before it.

def rle_counts(rle: dict) -> np.ndarray:
    """Run lengths (int64 ``K``) of a COCO RLE, compressed (str/bytes) or uncompressed (list).

    ``counts[0]`` is background, ``counts[1]`` foreground, …, in column-major (Fortran) order.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    if not raw:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0                        # the last 5-bit group of each value
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.cumsum(np.concatenate(([0], last[:-1].astype(np.int64))))
    k = np.arange(len(c)) - starts[group]          # position of the group within its value
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * (k[ends][negative] + 1))
    out = x.copy()
    out[2::2] = np.cumsum(x[2::2])                # value i > 2 adds value i - 2 (C: if m > 2)
    if len(x) > 3:
        out[3::2] = x[1] + np.cumsum(x[3::2])
    return out


def rle_area(rle: dict) -> int:
    """Foreground pixel count of one COCO RLE (no decode to a canvas)."""
    return int(rle_counts(rle)[1::2].sum())


def rle_to_fortran_indices(rle: dict) -> np.ndarray:
    """Foreground pixel indices (int64, ascending) in column-major order: ``index = x·H + y``."""
    counts = rle_counts(rle)
    bounds = np.cumsum(counts)
    run_start = bounds[0::2][: len(counts[1::2])]
    run_len = counts[1::2]
    total = int(run_len.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(run_start - np.concatenate(([0], np.cumsum(run_len)[:-1])), run_len)
    return np.arange(total, dtype=np.int64) + offsets


def fortran_indices_to_rle(indices: np.ndarray, height: int, width: int) -> dict:
    """Ascending unique column-major pixel indices → compressed COCO RLE (``counts`` as str).

    The inverse of ``rle_to_fortran_indices``; builds the run lengths directly, so a small mask
    on a large image costs O(pixels of the mask), not O(H·W).
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = height * width
    if len(indices) == 0:
        counts = [n]
    else:
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        run_start = indices[np.concatenate(([0], breaks))]
        run_end = indices[np.concatenate((breaks - 1, [len(indices) - 1]))] + 1
        gaps = run_start - np.concatenate(([0], run_end[:-1]))
        counts = np.empty(2 * len(run_start) + 1, dtype=np.int64)
        counts[0:-1:2] = gaps
        counts[1::2] = run_end - run_start
        counts[-1] = n - run_end[-1]
        counts = counts.tolist() if counts[-1] else counts[:-1].tolist()  # as pycocotools' encode
    rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_rles_to_masks(rles: list[dict], height: int, width: int) -> np.ndarray:
    """COCO RLEs (compressed or uncompressed) → binary masks ``N×H×W`` uint8, touching only
    each mask's own pixels of a lazily mapped array (dense images stay cheap; see ``lazy_zeros``)."""
    masks = lazy_zeros(len(rles), height, width)
    flat = masks.reshape(len(rles), height * width)
    for k, rle in enumerate(rles):
        idx = rle_to_fortran_indices(rle)        # x·H + y, column-major
        flat[k, (idx % height) * width + idx // height] = 1
    return masks


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """One ``segmentation`` (polygons, uncompressed or compressed RLE) → one compressed RLE (bytes
    counts, as pycocotools uses), as pycocotools' ``annToRLE``; the one such conversion (datasets,
    dataset checks, metrics). Raises ``ValueError`` when malformed."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise ValueError("no polygon with ≥ 3 points")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = list(segmentation["size"])
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not {height}×{width}")
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            return {"size": size, "counts": counts.encode("ascii")}
        if isinstance(counts, bytes):
            return {"size": size, "counts": counts}
    raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")
