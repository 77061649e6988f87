"""Sartorius CSV dataset: decoding, folds, duplicates, hole filling, bad input."""
import csv
import os

import cv2
import numpy as np
import pytest
import torch

from datasets import build_dataset, dataset_defaults
from datasets.errors import DatasetError
from datasets.sartorius import SARTORIUS_DEFAULTS
from tests.fixtures.data_writers import SARTORIUS_COLUMNS, write_sartorius
from transforms import build_transforms
from utils.coco_rle import decode_coco_rle
from utils.kaggle_rle import decode_kaggle_rle

TYPES = ["shsy5y", "astro", "cort"]


@pytest.fixture(scope="module")
def sartorius_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sartorius"))
    types = [TYPES[i % 3] for i in range(18)]
    write_sartorius(root, counts=[3 + (i * 7) % 20 for i in range(18)], cell_types=types, frames_per_sample=2)
    return root


def write_csv(root, rows, size=(20, 30), images=("a",)):
    """Tiny CSV from (id, annotation, cell_type[, sample_id]) rows and blank images of ``size``."""
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    for name in images:
        cv2.imwrite(os.path.join(root, "train", f"{name}.png"), np.full(size, 100, np.uint8))
    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SARTORIUS_COLUMNS)
        for row in rows:
            if isinstance(row, str):
                f.write(row + "\n")
                continue
            name, ann, cell_type, *sample = row
            w.writerow([name, ann, size[1], size[0], cell_type, "t", "d", sample[0] if sample else f"s_{name}", "0"])


def test_samples_match_csv_rles(sartorius_root):
    ds = build_dataset("sartorius", "val", {"data_path": sartorius_root, "num_folds": 3, "fold": 1})
    rows = list(csv.DictReader(open(os.path.join(sartorius_root, "train.csv"))))
    assert ds.class_names == TYPES
    image, target = ds[0]
    assert isinstance(image, np.ndarray) and image.shape == (520, 704) and image.dtype == np.uint8
    mine = [r for r in rows if r["id"] == ds.names[0]]
    expected = np.stack([decode_kaggle_rle(r["annotation"], 520, 704) for r in mine])
    assert target["masks"].dtype == torch.uint8 and torch.equal(target["masks"], torch.from_numpy(expected))
    assert target["labels"].tolist() == [TYPES.index(r["cell_type"]) + 1 for r in mine]
    assert target["image_id"] == ds.image_ids[0]
    assert target["area"].tolist() == expected.reshape(len(expected), -1).sum(1).tolist()
    ys, xs = np.nonzero(expected[0])
    assert target["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert ds.get_image_size(0) == (520, 704)


def test_coco_gt_equals_decoded_targets(sartorius_root):
    ds = build_dataset("sartorius", "val", {"data_path": sartorius_root, "num_folds": 3})
    gt = ds.coco_gt()
    assert [c["name"] for c in gt["categories"]] == TYPES and [im["id"] for im in gt["images"]] == ds.image_ids
    for i in range(len(ds)):
        target = ds.load(i)[1]
        anns = [a for a in gt["annotations"] if a["image_id"] == ds.image_ids[i]]
        masks = decode_coco_rle([a["segmentation"] for a in anns], 520, 704)
        assert np.array_equal(masks, target["masks"].numpy())
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        assert torch.equal(xywh[:, :2], target["boxes"][:, :2]) and torch.equal(xywh[:, :2] + xywh[:, 2:], target["boxes"][:, 2:])
        assert [a["area"] for a in anns] == target["area"].tolist()


def test_folds_grouped_stratified_deterministic(sartorius_root):
    options = {"data_path": sartorius_root, "num_folds": 3}
    seen = []
    for fold in range(3):
        train = build_dataset("sartorius", "train", dict(options, fold=fold))
        val = build_dataset("sartorius", "val", dict(options, fold=fold))
        index = val.index
        val_samples = {index.sample_ids[p] for p in val.positions}
        train_samples = {index.sample_ids[p] for p in train.positions}
        assert not val_samples & train_samples                      # grouped by sample_id
        assert {index.cell_types[p] for p in val.positions} == set(TYPES)  # stratified
        assert sorted(train.positions + val.positions) == list(range(18))
        seen += val.positions
        again = build_dataset("sartorius", "val", dict(options, fold=fold))
        assert again.positions == val.positions                     # deterministic
    assert sorted(seen) == list(range(18))                          # folds partition the images
    other = [build_dataset("sartorius", "val", dict(options, fold=f, fold_seed=7)).positions for f in range(3)]
    assert sorted(sum(other, [])) == list(range(18))


def test_defaults_are_config_fields():
    from engine.config import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(dataset_defaults("sartorius")) <= fields and dataset_defaults("sartorius") == SARTORIUS_DEFAULTS
    assert dataset_defaults("sartorius")["detections_per_img"] >= 790


def test_duplicates_dropped_and_counted(tmp_path):
    write_csv(tmp_path, [("a", "1 3", "cort"), ("a", "1 3", "cort"), ("a", "40 2", "cort")])
    ds = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0})
    assert len(ds.load(0)[1]["labels"]) == 2 and ds.index.log.counts == {"duplicate annotations dropped": 1}
    keep = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0, "drop_duplicates": False})
    assert len(keep.load(0)[1]["labels"]) == 3


def test_fill_holes_train_only(tmp_path):
    ring = np.zeros((20, 30), np.uint8)
    ring[2:9, 2:9] = 1
    ring[4:7, 4:7] = 0
    from tests.fixtures.data_writers import encode_kaggle_rle
    write_csv(tmp_path, [("a", encode_kaggle_rle(ring), "astro", "s1"), ("b", "1 3", "astro", "s2")], images=("a", "b"))
    options = {"data_path": str(tmp_path), "num_folds": 2}
    train = build_dataset("sartorius", "train", options)
    val = build_dataset("sartorius", "val", options)
    hollow = train if train.names == ["a"] else val
    filled = hollow.load(0)[1]
    if hollow is train:
        assert filled["masks"][0].sum() == 49 and filled["area"][0] == 49
    else:
        assert filled["masks"][0].sum() == 40 and hollow.coco_gt()["annotations"][0]["area"] == 40
    off = build_dataset("sartorius", hollow is train and "train" or "val", dict(options, fill_holes=False))
    assert off.load(0)[1]["masks"][0].sum() == 40


@pytest.mark.parametrize("row, message", [
    ("a,1 3,30,20,cort,t,d", "line 3: expected 9 fields, got 7"),
    (("a", "1 3", "neuron"), "line 3: unknown cell_type 'neuron'"),
    ("a,1 3,30,wide,cort,t,d,s,0", "line 3: width/height not integers"),
    (("a", "", "cort"), "line 3: empty annotation"),
])
def test_bad_rows_name_the_line(tmp_path, row, message):
    write_csv(tmp_path, [("a", "5 2", "cort"), row])
    with pytest.raises(DatasetError, match=message):
        build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0})
    ds = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0, "skip_bad": True})
    assert len(ds.index.log.skipped) == 1 and len(ds.load(0)[1]["labels"]) == 1


def test_bad_rle_names_the_line_at_load(tmp_path):
    write_csv(tmp_path, [("a", "5 2", "cort"), ("a", "700 2", "cort"), ("a", "9 2 3 1", "cort")])
    ds = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0})
    with pytest.raises(DatasetError, match=r"train.csv line 3 \(image a\): bad RLE: RLE run ends at pixel 701"):
        ds[0]
    lenient = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0, "skip_bad": True})
    assert len(lenient.load(0)[1]["labels"]) == 1 and len(lenient.index.log.skipped) == 2
    assert len(lenient.coco_gt()["annotations"]) == 1


def test_missing_and_wrong_size_images(tmp_path):
    write_csv(tmp_path, [("a", "5 2", "cort"), ("b", "5 2", "cort"), ("c", "5 2", "cort")], images=("a", "b"))
    cv2.imwrite(str(tmp_path / "train" / "b.png"), np.zeros((21, 30), np.uint8))
    with pytest.raises(DatasetError, match=r"train/b.png: image is 21×30, train.csv says 20×30"):
        build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0})
    (tmp_path / "train" / "b.png").unlink()
    cv2.imwrite(str(tmp_path / "train" / "c.png"), np.zeros((20, 30), np.uint8))
    with pytest.raises(DatasetError, match=r"train/b.png: file not found"):
        build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0})
    ds = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0, "skip_bad": True})
    assert ds.names == ["a", "c"] and len(ds.index.log.skipped) == 1
    (tmp_path / "train" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")   # corrupt after index
    with pytest.raises(DatasetError, match="c.png"):
        ds[1]


def test_options_errors(tmp_path):
    write_csv(tmp_path, [("a", "5 2", "cort")])
    with pytest.raises(DatasetError, match="data_path"):
        build_dataset("sartorius", "train", {})
    with pytest.raises(DatasetError, match="fold must be in 0..4"):
        build_dataset("sartorius", "train", {"data_path": str(tmp_path), "fold": 5})
    with pytest.raises(DatasetError, match="val split needs num_folds"):
        build_dataset("sartorius", "val", {"data_path": str(tmp_path), "num_folds": 1})
    with pytest.raises(DatasetError, match="missing columns"):
        (tmp_path / "train.csv").write_text("id,annotation\na,1 2\n")
        build_dataset("sartorius", "train", {"data_path": str(tmp_path)})


def test_worker_sample_equals_in_process(sartorius_root):
    # Masks live in mmap-backed arrays; they must survive the trip through a worker's queue.
    ds = build_dataset("sartorius", "val", {"data_path": sartorius_root, "num_folds": 3})
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=lambda b: b)
    (image, target), _ = next(iter(loader))
    expected = ds[0][1]
    assert torch.equal(target["masks"], expected["masks"]) and torch.equal(target["boxes"], expected["boxes"])


def test_worker_error_carries_file_name(tmp_path):
    write_csv(tmp_path, [("a", "5 2 1 1", "cort")])
    ds = build_dataset("sartorius", "train", {"data_path": str(tmp_path), "num_folds": 0},
                       build_transforms("cells", True))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(DatasetError, match=r"train.csv line 2 \(image a\): bad RLE"):
        next(iter(loader))
