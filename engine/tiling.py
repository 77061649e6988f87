"""Tiled prediction: a grid of overlapping tiles over a large image, and the merge of the tiles'
instances into one set for the whole image, so that a cell crossing a seam is one instance.

Grid: along each axis, tiles of ``tile`` pixels whose starts are spread evenly from 0 to
``length - tile`` so that neighbours overlap by at least ``overlap`` pixels (an axis no longer
than ``tile`` gets one tile), rounded down to the model's stride grid (``align``,
``stride_aligned_step``): a tile cut off that grid shifts every anchor and feature against the
whole image's by a fraction of a cell, which changes detections far from its sides too.
Instances stay box crops in image coordinates throughout (``utils.box_masks.BoxMasks``): memory
grows with the tile and the instances, not with the image.

Merge (``merge_tiles``), for every pair of overlapping tiles with shared region ``S``:

1. the instances of either tile whose mask reaches into ``S`` are candidate pairs by their IoU
   inside ``S`` (``|A ∩ B| / |(A ∪ B) ∩ S|``) when it is ≥ ``match_iou``: a whole cell and the
   part of it a neighbour tile cut off cover the same pixels of ``S``;
2. the candidates of all tile pairs are joined in descending IoU (union-find), and a join is
   refused when the two groups hold instances of one tile: a group is one detection followed
   across tiles (a cell at a corner of four tiles becomes one group), and two detections one
   tile made stay two, as whole-image prediction keeps them. Without that rule, cut parts
   chained a cell's confident detection to a faint overlapping one and the faint one was
   kept (MoNuSeg: 2.2 % of the whole-image instances lost in tiles);
3. a cut part left unpaired whose pixels inside ``S`` are mostly (≥ ``match_iou``) covered by
   one instance of the other tile is a second piece of that cell (a tile edge can split a cell
   into two detections) and is dropped.

A group becomes one instance. A part is *cut* when its mask touches (within ``EDGE_PX``) a
tile side that is not an image side. If some part is whole, the whole part seen with the most
context (the largest distance between its mask and its tile's inner sides) is the instance:
its mask, box, score and class, as whole-image prediction would give them. If every part is
cut (a cell larger than the overlap), the instance is their union: the mask is the union of
the parts, the box its tight box, the score the parts' mean score weighted by their areas,
and the class the one with the largest score-weighted area.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.box_masks import BoxMasks
from utils.instances import Instances

EDGE_PX = 2          # a mask this close to an inner tile side counts as cut by it


@dataclass(frozen=True)
class Tile:
    """Image rows ``y0:y1`` and columns ``x0:x1``."""
    y0: int
    x0: int
    y1: int
    x1: int


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``0..length`` with overlaps ≥ ``overlap``, each
    a multiple of ``align`` (the last tile then runs to the end: up to ``tile + align - 1`` pixels)."""
    if length <= tile:
        return [0]
    stride = tile - overlap - (align - 1)     # room for rounding each start down to the grid
    if stride < 1:
        raise ValueError(f"tile {tile} too small for overlap {overlap} on a grid of {align} pixels")
    count = int(np.ceil((length - tile) / stride)) + 1
    return sorted({round(i * (length - tile) / (count - 1)) // align * align for i in range(count)})


def tile_grid(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Tile]:
    """Row-major tiles over a ``height×width`` image (edge tiles as large as the image allows),
    starting on multiples of ``align`` pixels (``tile_starts``)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in 0..tile-1, got tile {tile}, overlap {overlap}")

    def spans(length: int) -> list[tuple[int, int]]:
        starts = tile_starts(length, tile, overlap, align)
        return [(s, length if k == len(starts) - 1 else min(s + tile, length)) for k, s in enumerate(starts)]

    return [Tile(y0, x0, y1, x1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def stride_aligned_step(scale: float, stride: int = 32, limit: int = 512) -> int:
    """The smallest step in image pixels that is a whole number of ``stride`` model pixels at
    ``scale`` (32: the backbone's total stride, the grid of every FPN level up to P5; only the
    extra max-pool level, whose anchors are the largest, has a coarser one): tiles starting on it
    cut the image on the model's feature grid, so their anchors and features line up with the
    whole image's. When no step up to ``limit`` is exact (an odd scale), the nearest whole step
    to one stride."""
    for step in range(1, limit + 1):
        cells = step * scale / stride
        if cells >= 1 and abs(cells - round(cells)) < 1e-6:
            return step
    return max(1, round(stride / scale))


def to_image_frame(instances: Instances, tile: Tile, height: int, width: int) -> Instances:
    """Instances of a tile (its own frame) → the same instances in the ``height×width`` image."""
    boxes = instances.boxes + np.array([tile.x0, tile.y0, tile.x0, tile.y0], dtype=np.float32)
    offsets = instances.masks.offsets + np.array([tile.y0, tile.x0], dtype=np.int64)
    return Instances(boxes.astype(np.float32), instances.scores, instances.labels,
                     BoxMasks(height, width, offsets.reshape(-1, 2), list(instances.masks.crops)))


def _inner_margins(extent: np.ndarray, tile: Tile, height: int, width: int) -> np.ndarray:
    """Distance of each mask extent (``N×4`` xyxy, exclusive) to the tile's sides that are not
    image sides (``inf`` where the tile has none)."""
    inf = np.full(len(extent), np.inf)
    margins = [extent[:, 1] - tile.y0 if tile.y0 > 0 else inf,
               tile.y1 - extent[:, 3] if tile.y1 < height else inf,
               extent[:, 0] - tile.x0 if tile.x0 > 0 else inf,
               tile.x1 - extent[:, 2] if tile.x1 < width else inf]
    return np.min(np.stack(margins), axis=0) if len(extent) else np.zeros(0)


def _pixels_in(crop: np.ndarray, offset: tuple[int, int], rect: tuple[int, int, int, int]) -> np.ndarray:
    """The part of a crop inside ``rect`` (y0, x0, y1, x1), as a view (may be empty)."""
    y0, x0 = offset
    ry0, rx0, ry1, rx1 = rect
    return crop[max(ry0 - y0, 0):max(ry1 - y0, 0), max(rx0 - x0, 0):max(rx1 - x0, 0)]


def _match_pair(a: list[int], b: list[int], extent: np.ndarray, crops: list[np.ndarray], offsets: np.ndarray,
                shared: tuple[int, int, int, int], match_iou: float,
                covered: np.ndarray) -> list[tuple[float, int, int]]:
    """Candidate pairs ``(IoU, i, j)``, ``i`` from ``a`` and ``j`` from ``b``, whose IoU inside
    ``shared`` is ≥ ``match_iou``. ``covered[i]`` is raised to the largest share of ``i``'s
    pixels inside ``shared`` that one instance of the other tile covers."""
    sy0, sx0, sy1, sx1 = shared
    area_in = {i: int(np.count_nonzero(_pixels_in(crops[i], offsets[i], shared))) for i in a + b}
    ea, eb = extent[a], extent[b]
    # Rectangles of the masks' extents clipped to the shared region, then pairwise overlap.
    ix0 = np.maximum(np.maximum(ea[:, None, 0], eb[None, :, 0]), sx0)
    iy0 = np.maximum(np.maximum(ea[:, None, 1], eb[None, :, 1]), sy0)
    ix1 = np.minimum(np.minimum(ea[:, None, 2], eb[None, :, 2]), sx1)
    iy1 = np.minimum(np.minimum(ea[:, None, 3], eb[None, :, 3]), sy1)
    candidates = []
    for p, q in zip(*np.nonzero((ix1 > ix0) & (iy1 > iy0))):
        i, j = a[p], b[q]
        rect = (int(iy0[p, q]), int(ix0[p, q]), int(iy1[p, q]), int(ix1[p, q]))
        inter = int(np.count_nonzero(_pixels_in(crops[i], offsets[i], rect) & _pixels_in(crops[j], offsets[j], rect)))
        union = area_in[i] + area_in[j] - inter
        covered[i] = max(covered[i], inter / max(area_in[i], 1))
        covered[j] = max(covered[j], inter / max(area_in[j], 1))
        if inter and inter >= match_iou * union:
            candidates.append((inter / union, i, j))
    return candidates


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def merge_tiles(parts: list[tuple[Tile, Instances]], height: int, width: int,
                match_iou: float = 0.5) -> Instances:
    """Per-tile instances (each in the tile's own frame) → one set for the ``height×width`` image,
    score-descending, overlaps between different cells kept (see the module docstring)."""
    tiles = [tile for tile, _ in parts]
    framed = [to_image_frame(inst, tile, height, width) for tile, inst in parts]
    owner = np.concatenate([np.full(len(inst), t, dtype=np.int64) for t, inst in enumerate(framed)] or
                           [np.zeros(0, np.int64)])
    boxes = np.concatenate([inst.boxes for inst in framed] or [np.zeros((0, 4), np.float32)]).reshape(-1, 4)
    scores = np.concatenate([inst.scores for inst in framed] or [np.zeros(0, np.float32)])
    labels = np.concatenate([inst.labels for inst in framed] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([inst.masks.offsets for inst in framed] or [np.zeros((0, 2), np.int64)]).reshape(-1, 2)
    crops = [crop for inst in framed for crop in inst.masks.crops]
    masks = BoxMasks(height, width, offsets, crops)
    extent = masks.tight_boxes().astype(np.int64)          # xyxy of each mask's pixels (0s if empty)
    present = np.array([bool(c.size) and bool(c.any()) for c in crops], dtype=bool)
    margin = np.zeros(len(crops))
    for t, tile in enumerate(tiles):
        mine = np.flatnonzero(owner == t)
        margin[mine] = _inner_margins(extent[mine], tile, height, width)
    cut = margin < EDGE_PX

    covered = np.zeros(len(crops))
    candidates: list[tuple[float, int, int]] = []
    members_of = [np.flatnonzero((owner == t) & present) for t in range(len(tiles))]
    for ta in range(len(tiles)):
        for tb in range(ta + 1, len(tiles)):
            a, b = tiles[ta], tiles[tb]
            shared = (max(a.y0, b.y0), max(a.x0, b.x0), min(a.y1, b.y1), min(a.x1, b.x1))
            if shared[2] <= shared[0] or shared[3] <= shared[1]:
                continue
            sy0, sx0, sy1, sx1 = shared

            def reaching(ids: np.ndarray) -> list[int]:
                e = extent[ids]
                return ids[(e[:, 0] < sx1) & (e[:, 2] > sx0) & (e[:, 1] < sy1) & (e[:, 3] > sy0)].tolist()

            in_a, in_b = reaching(members_of[ta]), reaching(members_of[tb])
            if in_a and in_b:
                candidates += _match_pair(in_a, in_b, extent, crops, offsets, shared, match_iou, covered)

    parent = list(range(len(crops)))
    tiles_of = {i: {int(owner[i])} for i in range(len(crops))}    # per group root: the tiles it holds
    for _, i, j in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        ri, rj = _find(parent, i), _find(parent, j)
        if ri != rj and not tiles_of[ri] & tiles_of[rj]:
            parent[ri] = rj
            tiles_of[rj] |= tiles_of.pop(ri)

    groups: dict[int, list[int]] = {}
    for i in range(len(crops)):
        groups.setdefault(_find(parent, i), []).append(i)
    out_boxes, out_scores, out_labels, out_offsets, out_crops = [], [], [], [], []
    for members in groups.values():
        if len(members) == 1 and cut[members[0]] and covered[members[0]] >= match_iou:
            continue        # a piece of a cell that a neighbour tile holds (as a whole or a larger part)
        whole = [m for m in members if not cut[m]]
        if len(members) == 1 or whole:
            best = max(whole or members, key=lambda m: (margin[m], scores[m]))
            out_boxes.append(boxes[best])
            out_scores.append(scores[best])
            out_labels.append(labels[best])
            out_offsets.append(offsets[best])
            out_crops.append(crops[best])
            continue
        y0, x0 = (int(v) for v in extent[members][:, [1, 0]].min(axis=0))
        y1, x1 = (int(v) for v in extent[members][:, [3, 2]].max(axis=0))
        union = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for m in members:
            my, mx = int(offsets[m, 0]) - y0, int(offsets[m, 1]) - x0
            h, w = crops[m].shape
            # A crop may extend past the union's extent with zeros only: clip it.
            cy0, cx0 = max(-my, 0), max(-mx, 0)
            cy1, cx1 = min(h, union.shape[0] - my), min(w, union.shape[1] - mx)
            union[my + cy0:my + cy1, mx + cx0:mx + cx1] |= crops[m][cy0:cy1, cx0:cx1]
        areas = np.array([np.count_nonzero(crops[m]) for m in members], dtype=np.float64)
        weight = areas * scores[members]
        by_label: dict[int, float] = {}
        for m, w in zip(members, weight):
            by_label[int(labels[m])] = by_label.get(int(labels[m]), 0.0) + float(w)
        out_boxes.append(np.array([x0, y0, x1, y1], dtype=np.float32))
        out_scores.append(np.float32(weight.sum() / areas.sum()))
        out_labels.append(max(by_label, key=by_label.get))
        out_offsets.append(np.array([y0, x0], dtype=np.int64))
        out_crops.append(union)
    merged = Instances(np.array(out_boxes, dtype=np.float32).reshape(-1, 4), np.array(out_scores, dtype=np.float32),
                       np.array(out_labels, dtype=np.int64),
                       BoxMasks(height, width, np.array(out_offsets, dtype=np.int64).reshape(-1, 2), out_crops))
    return merged.select(np.argsort(-merged.scores, kind="stable"))
