"""The Python API (engine.predictor): README example, inputs, result object, tiled prediction."""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict import make_checkpoint, synthetic_image

import predict
from engine.predictor import PredictError, Predictor
from engine.tiling import Tile, merge_tiles, tile_grid
from transforms.preprocess import Preprocessing, intensity_bounds, to_model_input
from utils.box_masks import BoxMasks
from utils.coco_rle import decode_coco_rle
from utils.image_files import ImageReadError
from utils.instances import Instances
from utils.kaggle_rle import decode_kaggle_rle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pth")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu", score_thresh=0.1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(>>> from engine.predictor import Predictor.*?)```", readme, re.S).group(1)
    make_checkpoint(tmp_path / "runs" / "demo" / "best.pth")
    Image.fromarray(synthetic_image(0)).save(tmp_path / "cells.png")
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 8, capsys.readouterr().out


def test_result_forms_agree(tmp_path, predictor):
    image = synthetic_image(2)
    result = predictor.predict(image)
    assert result.name == "image" and len(result) > 0, "the random checkpoint finds instances at 0.1"
    labels = result.label_image
    h, w = image.shape
    assert labels.shape == (h, w) and labels.dtype == np.uint16 and int(labels.max()) == len(result)
    # Every mask form describes the same pixels: label k == RLE k == Kaggle row k.
    rles = decode_coco_rle(result.rles, h, w)
    rows = result.to_kaggle_rows("x")
    assert len(rows) == len(result) and all(r.startswith("x,") for r in rows)
    for k in range(len(result)):
        assert np.array_equal(rles[k].astype(bool), labels == k + 1)
        assert np.array_equal(decode_kaggle_rle(rows[k][2:], h, w).astype(bool), labels == k + 1)
    coco = result.to_coco(image_id=7)
    assert [c["score"] for c in coco] == pytest.approx(result.scores.tolist())
    assert {c["image_id"] for c in coco} == {7}
    assert len(result.to_coco(every_detection=True)) >= len(result)
    assert (np.diff(result.scores) <= 0).all() and (result.scores >= 0.1).all()
    assert set(result.label_names) <= {"round", "elongated"}
    assert result.overlay().shape == (h, w, 3) and result.overlay(text=True).shape == (h, w, 3)
    assert result.view.shape == (h, w, 3) and result.view.dtype == np.uint8


def test_inputs_path_array_folder_list_agree(tmp_path, predictor):
    folder = tmp_path / "imgs"
    folder.mkdir()
    arrays = {"a": synthetic_image(3), "b": synthetic_image(4, 80, 64)}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    from_folder = predictor.predict(folder)
    assert [r.name for r in from_folder] == ["a", "b"]
    one = predictor.predict(folder / "a.png")
    assert one.name == "a" and one.path == folder / "a.png"
    mixed = predictor.predict([folder / "b.png", arrays["a"]])
    assert [r.name for r in mixed] == ["b", "image1"]
    assert np.array_equal(mixed[1].label_image, one.label_image)
    assert np.array_equal(mixed[0].label_image, from_folder[1].label_image)
    # Batched like unbatched (one image per pass keeps the padding identical: same sizes here).
    batched = Predictor(predictor.model, predictor.contract, predictor.class_names, score_thresh=0.1, batch_size=2)
    same = batched.predict([arrays["a"], arrays["a"]])
    assert all(np.array_equal(r.label_image, one.label_image) for r in same)


def test_bad_inputs_are_named(tmp_path, predictor):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        predictor.predict(tmp_path / "broken.png")
    with pytest.raises(PredictError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(PredictError, match="numpy array"):
        predictor.predict(42)
    with pytest.raises(PredictError, match="tile-overlap"):
        Predictor(predictor.model, predictor.contract, [], tile=128, tile_overlap=64)
    reported = []
    good = tmp_path / "good.png"
    Image.fromarray(synthetic_image(1)).save(good)
    out = list(predictor.predict_paths([tmp_path / "broken.png", good], on_error=reported.append))
    assert [r.name for r in out] == ["good"] and len(reported) == 1 and "broken.png" in reported[0]


# ----------------------------------------------------------------------------- preprocessing by region


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_region_with_whole_image_bounds_converts_like_the_whole_image(dtype):
    rng = np.random.default_rng(0)
    image = (rng.gamma(2.0, 300.0, (50, 70, 2))).astype(dtype)
    contract = Preprocessing("percentile", "rgb")
    whole = to_model_input(image, contract)
    bounds = intensity_bounds(image, contract)
    region = to_model_input(image[10:40, 25:60], contract, bounds)
    assert torch.equal(region, whole[:, 10:40, 25:60])
    assert not torch.equal(to_model_input(image[10:40, 25:60], contract), region)   # its own percentiles differ
    assert intensity_bounds(image.astype(np.uint8), contract) is None


# ----------------------------------------------------------------------------- tiling


def test_tile_grid_covers_with_overlap():
    assert len(tile_grid(1000, 1000, 512, 24)) == 4             # 2×2 tiles overlap by exactly 24
    grid = tile_grid(1000, 1000, 512, 64)                         # 64 needs 3×3
    assert len(grid) == 9
    cover = np.zeros((1000, 1000), np.int32)
    for t in grid:
        assert t.y1 - t.y0 == 512 and t.x1 - t.x0 == 512
        cover[t.y0:t.y1, t.x0:t.x1] += 1
    assert cover.min() >= 1
    grid = tile_grid(300, 2100, 512, 100)
    xs = sorted({t.x0 for t in grid})
    assert xs[0] == 0 and xs[-1] + 512 == 2100 and all(b - a <= 412 for a, b in zip(xs, xs[1:]))
    assert {(t.y0, t.y1) for t in grid} == {(0, 300)}


@pytest.mark.parametrize("length,tile,overlap,align", [(1000, 512, 128, 32), (2100, 512, 100, 64), (777, 300, 50, 48)])
def test_tiles_start_on_the_stride_grid_and_still_cover_with_overlap(length, tile, overlap, align):
    grid = tile_grid(length, length, tile, overlap, align)
    starts = sorted({t.x0 for t in grid})
    ends = sorted({t.x1 for t in grid})
    assert all(s % align == 0 for s in starts) and starts[0] == 0 and ends[-1] == length
    assert all(a_end - b_start >= overlap for a_end, b_start in zip(ends, starts[1:]))
    assert max(t.x1 - t.x0 for t in grid) < tile + align
    cover = np.zeros(length, np.int32)
    for start, end in zip(starts, ends):
        cover[start:end] += 1
    assert cover.min() >= 1


def test_stride_aligned_step_is_whole_model_strides():
    from engine.tiling import stride_aligned_step

    for scale, step in ((1.0, 32), (1.5, 64), (1.25, 128), (0.5, 64), (2.0, 16)):
        assert stride_aligned_step(scale) == step
        assert (step * scale) % 32 == 0


def disk(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def tile_instances(tile: Tile, cells: list[tuple[np.ndarray, float, int]], height: int, width: int) -> Instances:
    """What a perfect model sees in ``tile``: each cell (full-image mask, score, label) cropped to it."""
    dense = [m[tile.y0:tile.y1, tile.x0:tile.x1] for m, _, _ in cells]
    keep = [i for i, m in enumerate(dense) if m.any()]
    masks = BoxMasks.from_dense(np.array([dense[i] for i in keep], np.uint8).reshape(-1, tile.y1 - tile.y0, tile.x1 - tile.x0))
    return Instances(masks.tight_boxes(), np.array([cells[i][1] for i in keep], np.float32),
                     np.array([cells[i][2] for i in keep], np.int64), masks)


def test_merge_joins_cells_across_seams_and_keeps_neighbours_apart():
    h, w = 200, 200
    cells = [(disk(h, w, 100, 104, 12), 0.9, 1),      # on the vertical seam: cut in one tile or the other
             (disk(h, w, 100, 78, 12), 0.8, 1),       # its touching neighbour, in the overlap
             (disk(h, w, 100, 100, 60), 0.7, 2),      # larger than the overlap: cut in every tile
             (disk(h, w, 30, 30, 8), 0.6, 1),         # inside one tile only
             (disk(h, w, 118, 118, 10), 0.5, 1)]      # the corner of four tiles
    cells[2] = (cells[2][0] & ~(cells[0][0] | cells[1][0] | cells[4][0]), 0.7, 2)
    grid = tile_grid(h, w, 128, 56)
    assert len(grid) == 4
    parts = [(t, tile_instances(t, cells, h, w)) for t in grid]
    assert sum(len(p) for _, p in parts) > 12          # without the merge: duplicates and halves
    # A tile edge can split a cut cell into two detections: the second piece is dropped too.
    tile, inst = parts[1]
    piece = np.zeros((1, tile.y1 - tile.y0, tile.x1 - tile.x0), np.uint8)
    piece[0, 95:105, 0:4] = cells[1][0][tile.y0 + 95:tile.y0 + 105, tile.x0:tile.x0 + 4]   # cell 1, cut by x0
    assert piece.any()
    extra = Instances(np.zeros((1, 4), np.float32), np.array([0.55], np.float32), np.array([1]),
                      BoxMasks.from_dense(piece))
    joined = BoxMasks(inst.masks.height, inst.masks.width, np.concatenate([inst.masks.offsets, extra.masks.offsets]),
                      inst.masks.crops + extra.masks.crops)
    parts[1] = (tile, Instances(np.concatenate([inst.boxes, extra.boxes]), np.concatenate([inst.scores, extra.scores]),
                                np.concatenate([inst.labels, extra.labels]), joined))
    merged = merge_tiles(parts, h, w)
    assert len(merged) == len(cells)
    dense = merged.masks.to_dense().astype(bool)
    for mask, score, label in cells:
        k = int(np.argmax([(d & mask).sum() / (d | mask).sum() for d in dense]))
        assert np.array_equal(dense[k], mask)
        assert merged.labels[k] == label and merged.scores[k] == pytest.approx(score)


def test_merge_keeps_two_detections_of_one_tile_apart():
    """Two overlapping detections a tile makes (a confident cell and a faint smaller one inside
    it, as whole-image prediction keeps both) stay two instances, even when a cut part in a third
    tile pairs with the confident one in one neighbour and with the faint one in the other: a
    chain through it made one group of both, and the faint one, farther from the tile sides, was
    kept in place of the cell."""
    h, w = 40, 224
    xx = np.arange(w)[None, :]
    cell, faint = disk(h, w, 20, 130, 10), disk(h, w, 20, 125, 6)
    left, middle, right = Tile(0, 0, h, 128), Tile(0, 64, h, 192), Tile(0, 96, h, w)
    parts = [(left, tile_instances(left, [(cell, 0.7, 1)], h, w)),                  # cut by x = 128
             (middle, tile_instances(middle, [(cell, 0.9, 1), (faint, 0.1, 1)], h, w)),
             # this tile's outline of the cell misses its left part (where the cut part lies)
             (right, tile_instances(right, [(cell & (xx >= 128), 0.9, 1), (faint, 0.1, 1)], h, w))]
    merged = merge_tiles(parts, h, w)
    dense = merged.masks.to_dense().astype(bool)
    assert len(merged) == 2
    assert np.array_equal(dense[0], cell) and merged.scores[0] == pytest.approx(0.9)
    assert np.array_equal(dense[1], faint) and merged.scores[1] == pytest.approx(0.1)


def test_tiled_prediction_with_one_tile_equals_whole_image(predictor):
    image = synthetic_image(5, 96, 120).astype(np.uint16) * 40 + 1000    # percentile contract path
    whole = predictor.predict(image)
    item = predictor._items(image)[0][0]
    tiled = predictor._predict_tiled(item, image, 256, progress=False)
    assert tiled.tiles == 1 and len(whole) > 0
    assert np.array_equal(tiled.label_image, whole.label_image)
    assert np.array_equal(tiled.view, whole.view)


def test_tiled_prediction_end_to_end(tmp_path, checkpoint, capsys):
    image = np.concatenate([np.concatenate([synthetic_image(i), synthetic_image(i + 1)], axis=1)
                            for i in (6, 8)], axis=0)                      # 192×240
    Image.fromarray(image).save(tmp_path / "big.png")
    out = tmp_path / "out"
    rc = predict.main(predict.get_args_parser().parse_args(
        [str(tmp_path / "big.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out), "--score-thresh", "0.1",
         "--tile", "96", "--tile-overlap", "32", "--batch-size", "2"]))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "12/12 tiles of big" in err                                  # per-tile progress (3×4 tiles)
    from datasets.imageio import read_label_image

    labels = read_label_image(out / "big_labels.png")
    assert labels.shape == (192, 240) and labels.max() > 0
    rc = predict.main(predict.get_args_parser().parse_args(
        [str(tmp_path / "big.png"), "--checkpoint", str(checkpoint), "--tile", "96", "--tile-overlap", "60"]))
    assert rc == 2 and "--tile-overlap" in capsys.readouterr().err


def test_mask_head_in_chunks_gives_torchvision_results(predictor, monkeypatch):
    """detect() runs the mask head a few detections at a time (memory); every chunk size, in a
    batch of two images of different sizes, gives torchvision's own forward."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    import engine.inference
    from engine.inference import detect

    images = [to_model_input(synthetic_image(4), predictor.contract),
              to_model_input(synthetic_image(5, 80, 64), predictor.contract)]
    with torch.inference_mode():
        reference = predictor.model(images)
    assert min(len(r["boxes"]) for r in reference) > 7
    monkeypatch.setattr(engine.inference, "MASK_CHUNK", 7)
    for ref, out in zip(reference, detect(predictor.model, images)):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(ref[key], out[key]), key
        # torchvision's own paste of the chunked mask probabilities gives its canvas.
        assert torch.equal(paste_masks_in_image(out["mask_probs"][:, None], out["boxes"], out["image_size"]),
                           ref["masks"])
