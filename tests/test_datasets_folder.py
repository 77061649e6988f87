"""Label-image folders (cellpose/stardist) and one-file-per-instance folders (DSB-2018)."""
import os

import cv2
import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.errors import DatasetError
from tests.fixtures.data_writers import write_instance_folder, write_label_folder
from utils.coco_rle import decode_coco_rle


def test_label_images_8_and_16_bit(tmp_path):
    labels = write_label_folder(str(tmp_path), 4, count=6)
    ds = build_dataset("folder", "train", {"data_path": str(tmp_path), "val_fraction": 0})
    assert len(ds) == 4 and ds.class_names == ["cell"] and ds.get_image_size(0) == (64, 80)
    for i, label in enumerate(labels):
        image, target = ds[i]
        values = [v for v in np.unique(label) if v]
        assert target["masks"].dtype == torch.uint8 and len(target["masks"]) == len(values)
        for mask, v in zip(target["masks"].numpy(), values):
            assert np.array_equal(mask, (label == v).astype(np.uint8))
        assert target["labels"].tolist() == [1] * len(values)
    # odd images were written as .tif, even as .png: both are 16-bit
    assert cv2.imread(str(tmp_path / "masks" / "img_01.tif"), cv2.IMREAD_UNCHANGED).dtype == np.uint16


def test_cellpose_mask_suffix_and_second_path(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    write_label_folder(str(train), 3)
    write_label_folder(str(val), 2, seed=1)
    for f in os.listdir(val / "masks"):
        stem, ext = os.path.splitext(f)
        os.rename(val / "masks" / f, val / "masks" / f"{stem}_masks{ext}")
    options = {"data_path": str(train), "val_path": str(val)}
    assert len(build_dataset("folder", "train", options)) == 3
    ds = build_dataset("folder", "val", options)
    assert len(ds) == 2 and len(ds[1][1]["masks"]) > 0


def test_instance_files_layout_and_gt(tmp_path):
    stacks = write_instance_folder(str(tmp_path), 5)
    cv2.imwrite(str(tmp_path / "sample00" / "masks" / "zzz_empty.png"), np.zeros((64, 80), np.uint8))
    train = build_dataset("folder", "train", {"data_path": str(tmp_path), "val_fraction": 0.4})
    val = build_dataset("folder", "val", {"data_path": str(tmp_path), "val_fraction": 0.4})
    assert len(train) == 3 and len(val) == 2 and not set(train.names) & set(val.names)
    everything = build_dataset("folder", "train", {"data_path": str(tmp_path), "val_fraction": 0})
    image, target = everything[0]
    assert image.shape == (64, 80, 3)
    assert np.array_equal(target["masks"].numpy(), stacks[0])      # the empty mask file is dropped
    gt = everything.coco_gt()
    assert gt["images"][0]["file_name"] == "sample00/images/sample00.png"
    anns = [a for a in gt["annotations"] if a["image_id"] == everything.image_ids[0]]
    assert np.array_equal(decode_coco_rle([a["segmentation"] for a in anns], 64, 80), stacks[0])


def test_val_split_deterministic_and_seeded(tmp_path):
    write_label_folder(str(tmp_path), 10, height=16, width=16, count=2)

    def names(seed):
        return build_dataset("folder", "val", {"data_path": str(tmp_path), "split_seed": seed}).names
    assert names(0) == names(0) and len(names(0)) == 2
    assert any(names(0) != names(s) for s in range(1, 6))


def test_bad_folders(tmp_path):
    write_label_folder(str(tmp_path), 3)
    os.remove(tmp_path / "masks" / "img_01.tif")
    with pytest.raises(DatasetError, match=r"img_01.png: no label image masks/img_01"):
        build_dataset("folder", "train", {"data_path": str(tmp_path)})
    ds = build_dataset("folder", "train", {"data_path": str(tmp_path), "skip_bad": True, "val_fraction": 0})
    assert len(ds) == 2 and len(ds.log.skipped) == 1
    cv2.imwrite(str(tmp_path / "masks" / "img_02.png"), np.zeros((10, 10), np.uint16))
    with pytest.raises(DatasetError, match=r"img_02.png: mask is 10×10, image .*img_02.png is 64×80"):
        ds[1]
    with pytest.raises(DatasetError, match="found neither"):
        build_dataset("folder", "train", {"data_path": str(tmp_path / "masks")})
    with pytest.raises(DatasetError, match="no val images"):
        build_dataset("folder", "val", {"data_path": str(tmp_path), "val_fraction": 0, "skip_bad": True})


def test_unexpected_failures_name_the_file(tmp_path):
    write_label_folder(str(tmp_path), 2)

    def broken(image, target):
        raise RuntimeError("boom")

    ds = build_dataset("folder", "train", {"data_path": str(tmp_path), "val_fraction": 0}, broken)
    with pytest.raises(DatasetError, match=r"images/img_00.png: RuntimeError: boom"):
        ds[0]
