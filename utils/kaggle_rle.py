"""Kaggle "start length" RLE (Sartorius, DSB-2018): pairs of (1-indexed start, run length) over
the image flattened row-major (C order). The Sartorius page's prose says column-major; the data
is row-major (consecutive starts in one cell differ by the image width).

The Kaggle RLE of box-cropped masks (what predict.py writes) is ``utils.box_masks.box_masks_to_kaggle_rles``.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def parse_kaggle_rle(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``"s1 l1 s2 l2 ..."`` → (starts 0-indexed, lengths), both int64 ``K``, validated.

    Raises ``ValueError`` saying what is wrong: non-integer tokens, an odd number of tokens,
    no runs, starts < 1, lengths < 1, runs not sorted or overlapping, runs past ``height*width``.
    """
    tokens = rle.split()
    if not tokens:
        raise ValueError("empty RLE")
    if len(tokens) % 2:
        raise ValueError(f"odd number of RLE tokens ({len(tokens)}); expected start/length pairs")
    try:
        values = np.array(tokens, dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise ValueError(f"non-integer RLE token {bad[:20]!r}") from None
    starts, lengths = values[0::2] - 1, values[1::2]
    if starts.min() < 0:
        raise ValueError("RLE start < 1 (starts are 1-indexed)")
    if lengths.min() < 1:
        raise ValueError("RLE run length < 1")
    ends = starts + lengths
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        k = int(np.flatnonzero(starts[1:] < ends[:-1])[0])
        raise ValueError(f"RLE runs unsorted or overlapping at pair {k + 2} (start {starts[k + 1] + 1} "
                         f"< end of previous run {ends[k]})")
    if ends[-1] > height * width:
        raise ValueError(f"RLE run ends at pixel {int(ends[-1])} > {height}×{width} = {height * width}")
    return starts, lengths


def fill_kaggle_runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, value: int = 1) -> None:
    """Set the runs of one mask in a row-major flattened ``H*W`` array (in place)."""
    for s, n in zip(starts.tolist(), lengths.tolist()):
        flat[s:s + n] = value


def decode_kaggle_rle(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle RLE string → binary mask ``H×W`` uint8 (validated, see ``parse_kaggle_rle``).

    ``""`` (what ``utils.box_masks.box_masks_to_kaggle_rles`` writes for an empty mask) decodes to
    an empty mask; dataset readers that must reject empty annotations call ``parse_kaggle_rle``
    directly.
    """
    flat = np.zeros(height * width, dtype=np.uint8)
    if rle.strip():
        starts, lengths = parse_kaggle_rle(rle, height, width)
        fill_kaggle_runs(flat, starts, lengths)
    return flat.reshape(height, width)


def kaggle_runs_box(starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[int, int, int, int]:
    """Tight xyxy box (exclusive max edge) of a mask given as row-major runs, without decoding.

    A run may wrap past the end of a row; such a run covers the full width of the rows between.
    """
    last = starts + lengths - 1
    y0, y1 = int(starts[0] // width), int(last[-1] // width)
    start_cols, last_cols = starts % width, last % width
    wraps = (last // width) != (starts // width)
    if wraps.any():
        x0, x1 = 0, width
    else:
        x0, x1 = int(start_cols.min()), int(last_cols.max()) + 1
    return x0, y0, x1, y1 + 1


def kaggle_rle_to_coco_rle(starts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> dict:
    """Row-major runs → compressed COCO RLE (column-major) with str counts, decoding only the box.

    The mask is rasterised inside its bounding box, transposed, and the column-major run
    lengths are computed over the band of full-height columns the box spans, so the cost is
    proportional to ``box width × H`` rather than ``H × W``.
    """
    x0, y0, x1, y1 = kaggle_runs_box(starts, lengths, width)
    crop = np.zeros((y1 - y0, width), dtype=np.uint8)
    fill_kaggle_runs(crop.reshape(-1), starts - y0 * width, lengths)
    band = np.zeros((x1 - x0, height), dtype=np.uint8)   # columns x0..x1-1, each full height
    band[:, y0:y1] = crop[:, x0:x1].T
    flat = np.concatenate([[0], band.reshape(-1), [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + x0 * height  # positions in the column-major image
    bounds = np.concatenate([[0], edges, [height * width]])
    counts = np.diff(bounds).tolist()                    # zeros, ones, zeros, ...
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
