"""Masks stored inside their boxes (``BoxMasks``), the box-local paste of the mask head's output,
and the conversions from box crops to COCO and Kaggle RLE.

A dense image has hundreds of instances of a few hundred pixels each; storing each one only
inside its box keeps memory at the sum of box areas instead of N×H×W, and every later form
(COCO RLE, Kaggle RLE, label image) is computed from the box region directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils

from utils.arrays import lazy_zeros
from utils.coco_rle import decode_coco_rle
from utils.overlap import remove_overlap


def tight_box(mask: np.ndarray, top: int = 0, left: int = 0) -> np.ndarray:
    """Tight xyxy box (float32 ``4``, exclusive max edge) of a binary ``h×w`` mask whose top-left
    pixel sits at image row ``top``, column ``left``; all zeros when the mask is empty.

    The one tight-box rule: dense stacks, box crops and the crop transform all use it.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return np.zeros(4, dtype=np.float32)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1], dtype=np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (float32 ``N×4``) of binary masks ``N×H×W`` (``tight_box`` of each).

    Empty masks give an all-zero box (degenerate; callers drop them).
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        boxes[i] = tight_box(mask)
    return boxes


@dataclass
class BoxMasks:
    """``N`` instance masks of one ``height×width`` image, each kept only inside its box.

    ``crops[i]`` is a bool array ``h_i×w_i`` (float32 for soft masks) whose top-left pixel sits
    at image row ``offsets[i, 0]`` and column ``offsets[i, 1]``; every crop lies inside the image.
    """
    height: int
    width: int
    offsets: np.ndarray                      # N×2 int64 (y0, x0)
    crops: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def empty(cls, height: int, width: int) -> "BoxMasks":
        return cls(height, width, np.zeros((0, 2), dtype=np.int64), [])

    def select(self, indices: np.ndarray | list[int]) -> "BoxMasks":
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return BoxMasks(self.height, self.width, self.offsets[indices].reshape(-1, 2),
                        [self.crops[i] for i in indices])

    def areas(self) -> np.ndarray:
        """Foreground pixels per mask, int64 ``N``."""
        return np.array([int(np.count_nonzero(c)) for c in self.crops], dtype=np.int64)

    def tight_boxes(self) -> np.ndarray:
        """Tight xyxy boxes (float32 ``N×4``, exclusive max edge); empty masks give zeros."""
        boxes = np.zeros((len(self), 4), dtype=np.float32)
        for i, (crop, (y0, x0)) in enumerate(zip(self.crops, self.offsets.tolist())):
            if crop.size:
                boxes[i] = tight_box(crop, y0, x0)
        return boxes

    def to_dense(self) -> np.ndarray:
        """``N×H×W`` uint8 (this is what the class avoids; a lazily mapped array, so only the
        pages the boxes touch take memory — see ``utils.arrays.lazy_zeros``)."""
        dense = lazy_zeros(len(self), self.height, self.width)
        for i, (crop, (y0, x0)) in enumerate(zip(self.crops, self.offsets)):
            h, w = crop.shape
            dense[i, y0:y0 + h, x0:x0 + w] = crop
        return dense

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> "BoxMasks":
        """Binary masks ``N×H×W`` → each cropped to its tight box (empty masks to ``0×0``)."""
        n, height, width = masks.shape
        offsets = np.zeros((n, 2), dtype=np.int64)
        crops = []
        for i, box in enumerate(masks_to_boxes(masks).astype(np.int64)):
            x0, y0, x1, y1 = box.tolist()
            offsets[i] = (y0, x0)
            crops.append(masks[i, y0:y1, x0:x1].astype(bool))
        return cls(height, width, offsets, crops)


def box_axis_weights(lo: np.ndarray, hi: np.ndarray, start: np.ndarray, stop: np.ndarray, m: int) -> list[np.ndarray]:
    """Per box ``i``: the ``(stop_i − start_i)×m`` bilinear weights that sample ``m`` mask cells
    spread evenly over ``[lo_i, hi_i)`` at the centres of pixels ``start_i .. stop_i − 1`` (pixel
    ``p`` covers ``[p, p+1)``); one image axis.

    Cell ``j`` covers ``[lo + j·c, lo + (j+1)·c)`` with ``c = (hi − lo)/m`` and holds its value at
    its centre — the frame ``roi_align(aligned=True)`` samples the training targets in — so a
    pixel centre ``x`` reads cell coordinate ``(x − lo)/c − 0.5``, interpolated between the two
    nearest cells; beyond the first and last cell centres it fades into zero (the 1-cell zero
    border of torchvision's paste). A box of no extent gets all-zero weights.
    """
    counts = np.maximum(stop - start, 0)
    owner = np.repeat(np.arange(len(counts)), counts)               # the box of each pixel row
    first = np.cumsum(counts) - counts
    pixel = start[owner] + (np.arange(int(counts.sum())) - first[owner])
    cell = (hi - lo) / m
    valid = cell[owner] > 0
    u = np.where(valid, (pixel + 0.5 - lo[owner]) / np.where(valid, cell[owner], 1.0) - 0.5, -2.0)
    below = np.floor(u)
    frac = u - below
    weights = np.zeros((len(u), m + 2), dtype=np.float32)            # columns: cells -1 .. m (zeros)
    rows = np.arange(len(u))
    weights[rows, np.clip(below + 1, 0, m + 1).astype(np.int64)] += 1 - frac
    weights[rows, np.clip(below + 2, 0, m + 1).astype(np.int64)] += frac
    return np.split(weights[:, 1:m + 1], np.cumsum(counts)[:-1])


def paste_masks_in_boxes(mask_probs: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray,
                         height: int, width: int, threshold: float | None = 0.5) -> BoxMasks:
    """Paste ``M×M`` box-frame mask probabilities into a ``height×width`` image, box by box.

    ``mask_probs``: ``N×M×M`` or ``N×1×M×M`` floats (the mask head's output for the predicted
    class); ``boxes``: ``N×4`` xyxy in image pixels, the max edge exclusive (a box ``[0, 10)``
    covers pixels 0..9). Each pixel near the box reads the mask bilinearly at its centre
    (``box_axis_weights``: ``rows @ mask @ columns.T``), the inverse of the pixel-aligned
    sampling of the training targets, so a perfect mask head gives its object back exactly.

    Not torchvision's ``paste_masks_in_image``: that one grows the box by ``(M+2)/M``, truncates
    it to integers and resizes the padded mask onto ``x1 − x0 + 1`` pixels, treating the max edge
    as inclusive — every mask comes out about half a pixel larger on each side (MoNuSeg's
    kidney nuclei, ground truth sampled and pasted back: +8 % area, mean IoU 0.90 instead of
    1.00; docs/predict.md). Each mask is computed only inside its box, never on ``H×W``.

    ``threshold=None`` keeps the soft float32 probabilities (for TTA fusion).
    """
    probs = torch.as_tensor(mask_probs).detach().to("cpu", torch.float32)
    if probs.ndim == 4:
        probs = probs[:, 0]
    probs_np = probs.numpy()
    boxes_np = torch.as_tensor(boxes).detach().to("cpu", torch.float32).reshape(-1, 4).numpy().astype(np.float64)
    n = len(probs_np)
    if n == 0:
        return BoxMasks.empty(height, width)
    m = probs_np.shape[-1]
    # Pixels whose centres lie within half a cell of the box can read a non-zero value.
    half_w = (boxes_np[:, 2] - boxes_np[:, 0]) / (2 * m)
    half_h = (boxes_np[:, 3] - boxes_np[:, 1]) / (2 * m)
    x_start = np.clip(np.floor(boxes_np[:, 0] - half_w), 0, width).astype(np.int64)
    x_stop = np.clip(np.ceil(boxes_np[:, 2] + half_w), 0, width).astype(np.int64)
    y_start = np.clip(np.floor(boxes_np[:, 1] - half_h), 0, height).astype(np.int64)
    y_stop = np.clip(np.ceil(boxes_np[:, 3] + half_h), 0, height).astype(np.int64)

    offsets = np.stack([y_start, x_start], axis=1)
    row_weights = box_axis_weights(boxes_np[:, 1], boxes_np[:, 3], y_start, y_stop, m)
    col_weights = box_axis_weights(boxes_np[:, 0], boxes_np[:, 2], x_start, x_stop, m)
    crops: list[np.ndarray] = []
    for mask, rows, cols in zip(probs_np, row_weights, col_weights):
        crop = rows @ mask @ cols.T
        crops.append(crop > threshold if threshold is not None else crop)
    return BoxMasks(height, width, offsets, crops)


def _crop_runs(crop: np.ndarray, y0: int, x0: int, height: int, width: int,
               order: str) -> tuple[np.ndarray, np.ndarray]:
    """Runs of foreground of one crop as global flat ``(starts, ends)`` (0-indexed, end exclusive).

    ``order="F"`` flattens the image column-major (COCO), ``"C"`` row-major (Kaggle). Runs that
    continue from one column (row) into the next are merged, so the result is canonical.
    """
    if order == "F":
        lines, first_line, first_pos, stride = crop.T, x0, y0, height
    else:
        lines, first_line, first_pos, stride = crop, y0, x0, width
    n_lines, length = lines.shape
    padded = np.zeros((n_lines, length + 2), dtype=np.int8)
    padded[:, 1:-1] = lines
    step = np.diff(padded, axis=1)                 # +1 at a run start, -1 one past its end
    line_s, pos_s = np.nonzero(step == 1)
    line_e, pos_e = np.nonzero(step == -1)
    starts = (first_line + line_s) * stride + first_pos + pos_s
    ends = (first_line + line_e) * stride + first_pos + pos_e
    if len(starts) > 1:
        split = starts[1:] != ends[:-1]            # False where a run wraps onto the next line
        starts = starts[np.concatenate(([True], split))]
        ends = ends[np.concatenate((split, [True]))]
    return starts.astype(np.int64), ends.astype(np.int64)


def box_masks_to_coco_rle(masks: BoxMasks) -> list[dict]:
    """Compressed COCO RLEs (``counts`` str, ``size`` [H, W]) computed from the box crops.

    Equal to ``encode_coco_rle(masks.to_dense())`` without building the dense stack.
    """
    h, w = masks.height, masks.width
    uncompressed = []
    for crop, (y0, x0) in zip(masks.crops, masks.offsets.tolist()):
        starts, ends = _crop_runs(crop, y0, x0, h, w, "F") if crop.size else (np.zeros(0, np.int64),) * 2
        if len(starts) == 0:
            counts = np.array([h * w], dtype=np.int64)
        else:
            counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
            counts[0] = starts[0]
            counts[1::2] = ends - starts
            counts[2:-1:2] = starts[1:] - ends[:-1]
            counts[-1] = h * w - ends[-1]
            if counts[-1] == 0:
                counts = counts[:-1]
        uncompressed.append({"counts": counts, "size": [h, w]})
    if not uncompressed:
        return []
    rles = mask_utils.frPyObjects(uncompressed, h, w)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_rle_to_box_masks(rles: list[dict], height: int, width: int) -> BoxMasks:
    """COCO RLEs (compressed or not) → ``BoxMasks``; decodes one full mask at a time."""
    offsets = np.zeros((len(rles), 2), dtype=np.int64)
    crops = []
    for i, rle in enumerate(rles):
        mask = decode_coco_rle([rle], height, width)[0]
        box = tight_box(mask).astype(np.int64)
        x0, y0, x1, y1 = box.tolist()
        offsets[i] = (y0, x0)
        crops.append(mask[y0:y1, x0:x1].astype(bool))
    return BoxMasks(height, width, offsets, crops)


def resolve_overlaps(masks: BoxMasks, scores: np.ndarray) -> tuple[np.ndarray, BoxMasks]:
    """Give each pixel to the highest-scoring mask that claims it; drop masks left empty or with
    less than half their pixels visible (``utils.overlap.remove_overlap``, minimum size 1).

    Returns ``(kept, resolved)``: indices into ``masks`` in descending score order (ties keep
    input order) and their non-overlapping crops (same offsets and crop shapes as before).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    width = masks.width
    pixels = []
    for i in order.tolist():
        ys, xs = np.nonzero(masks.crops[i])
        y0, x0 = masks.offsets[i].tolist()
        pixels.append((ys + y0) * width + xs + x0)        # row-major image indices
    kept_pos, visible = remove_overlap(pixels, np.ones(len(order), dtype=np.int64), masks.height * width)
    kept = order[np.asarray(kept_pos, dtype=np.int64)]
    crops = []
    for i, vis in zip(kept.tolist(), visible):
        y0, x0 = masks.offsets[i].tolist()
        crop = np.zeros(masks.crops[i].shape, dtype=bool)
        crop[vis // width - y0, vis % width - x0] = True
        crops.append(crop)
    return kept, BoxMasks(masks.height, masks.width, masks.offsets[kept].reshape(-1, 2), crops)


def box_masks_to_kaggle_rles(masks: BoxMasks) -> list[str]:
    """Kaggle RLE of every mask, from the box crops (row-major, 1-indexed, runs ascending)."""
    out = []
    for crop, (y0, x0) in zip(masks.crops, masks.offsets.tolist()):
        if not crop.size:
            out.append("")
            continue
        starts, ends = _crop_runs(crop, y0, x0, masks.height, masks.width, "C")
        out.append(" ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist())))
    return out
