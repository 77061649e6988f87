"""COCO-format dataset: segmentation kinds, crowd, empty images, degenerate boxes, ids, quirks."""
import json

import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.coco import CocoDataset
from datasets.errors import DatasetError
from tests.fixtures.data_writers import write_coco


def options(path, root):
    return {"train_ann": path, "val_ann": path, "train_images": str(root / "images"),
            "val_images": str(root / "images")}


@pytest.mark.parametrize("string_ids, as_dict", [(False, False), (True, True)])
def test_targets_and_gt(tmp_path, string_ids, as_dict):
    path = write_coco(str(tmp_path), num_images=3, string_ids=string_ids, annotations_as_dict=as_dict)
    train = build_dataset("coco", "train", options(path, tmp_path))
    val = build_dataset("coco", "val", options(path, tmp_path))
    # Categories 3 "cat" and 7 "dog" become 1 and 2 in id order, names kept.
    assert train.class_names == ["cat", "dog"] and train.category_ids == [3, 7]
    assert len(train) == 2 and len(val) == 3                     # the empty image: val only
    assert train.image_ids == ([1, 2] if string_ids else [100, 101])
    image, target = train[0]
    assert image.shape == (60, 70, 3) and image.dtype == np.uint8
    # polygon (cat), compressed RLE disc (dog), uncompressed RLE square (dog); crowd and degenerate out
    assert target["labels"].tolist() == [1, 2, 2] and target["iscrowd"].tolist() == [0, 0, 0]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, 60, 70)
    assert masks[0, 5:25, 10:30].all() and masks[2].sum() == 100 and masks[2, 40:50, 5:15].all()
    assert target["boxes"][0].tolist() == [10, 5, 30, 25]
    assert train.log.counts["degenerate boxes dropped from targets"] == 2
    gt = val.coco_gt()
    assert [c["id"] for c in gt["categories"]] == [1, 2] and len(gt["images"]) == 3
    assert len(gt["annotations"]) == 10                           # crowd and degenerate kept
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 2
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2}
    if string_ids:
        assert gt["images"][0]["original_id"] == "img-0"
    assert val.get_image_size(2) == (60, 70)


def test_gt_loads_in_pycocotools(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    path = write_coco(str(tmp_path), num_images=2)
    ds = build_dataset("coco", "val", options(path, tmp_path))
    coco = COCO()
    coco.dataset = ds.coco_gt()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[ds.image_ids[0]], iscrowd=False))
    masks = np.stack([coco.annToMask(a) for a in ann])
    assert masks.shape[0] == 4 and masks[0].sum() > 0


def test_keep_empty_for_training(tmp_path):
    path = write_coco(str(tmp_path), num_images=3, empty_images=2)
    ds = build_dataset("coco", "train", dict(options(path, tmp_path), keep_empty=True))
    assert len(ds) == 3
    image, target = ds[2]
    assert target["masks"].shape == (0, 60, 70) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_default_layout_paths(tmp_path):
    with pytest.raises(DatasetError, match="instances_train2017.json: file not found"):
        build_dataset("coco", "train", {"data_path": str(tmp_path)})
    with pytest.raises(DatasetError, match="give data_path"):
        build_dataset("coco", "val", {})


def edit(path, fn):
    data = json.load(open(path))
    fn(data)
    json.dump(data, open(path, "w"))


def test_bad_annotations_named(tmp_path):
    path = write_coco(str(tmp_path), num_images=2)
    edit(path, lambda d: d["annotations"][1].update(category_id=99))
    with pytest.raises(DatasetError, match=r"annotation 2: unknown category_id 99"):
        CocoDataset(path, str(tmp_path / "images"))
    ds = CocoDataset(path, str(tmp_path / "images"), skip_bad=True)
    assert len(ds.log.skipped) == 1 and len(ds.coco_gt()["annotations"]) == 4   # 5 written, 1 skipped
    edit(path, lambda d: d["annotations"][1].update(category_id=7, segmentation={"size": [60, 70], "counts": [1, 2]}))
    ds = CocoDataset(path, str(tmp_path / "images"))
    with pytest.raises(DatasetError, match=r"annotation 2 of .*im0.png: bad segmentation: uncompressed RLE counts"):
        ds[0]
    edit(path, lambda d: d["annotations"][1].update(image_id=555))
    with pytest.raises(DatasetError, match="annotation 2: unknown or skipped image_id 555"):
        CocoDataset(path, str(tmp_path / "images"))


def test_bad_files_named(tmp_path):
    path = write_coco(str(tmp_path), num_images=2)
    (tmp_path / "images" / "im0.png").unlink()
    ds = CocoDataset(path, str(tmp_path / "images"))
    with pytest.raises(DatasetError, match="im0.png: file not found"):
        ds[0]
    (tmp_path / "broken.json").write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"broken.json: malformed JSON at line 1"):
        CocoDataset(str(tmp_path / "broken.json"), str(tmp_path))
    edit(path, lambda d: d["images"][1].update(height=61))
    ds = CocoDataset(path, str(tmp_path / "images"), keep_empty=True)
    with pytest.raises(DatasetError, match=r"im1.jpg: image is 60×70, annotations say 61×70"):
        ds[1]
