"""bench/monuseg.py without training: the split folders of links and the scoring of predict.py-style outputs."""
import json
import os

import cv2
import numpy as np
import pytest

from bench.monuseg import BenchError, prepare_work_dir, score_predictions, split_names
from datasets.folder import FolderDataset, scan_folder
from datasets.imageio import read_label_image
from tests.fixtures.data_writers import write_label_folder


def write_predictions(gt_dir, pred_dir, perturb: bool = False) -> None:
    """predict.py's outputs made from the ground truth: NAME_labels.png and predictions.json
    (image_id = file stem); ``perturb`` drops the first instance of every image."""
    os.makedirs(pred_dir, exist_ok=True)
    dataset = FolderDataset(scan_folder(str(gt_dir)))
    name_of = dict(zip(dataset.image_ids, dataset.names))
    dropped = set()
    for item in dataset.items:
        labels = read_label_image(item.mask_paths[0]).astype(np.uint16)
        if perturb:
            labels[labels == np.unique(labels)[1]] = 0
        cv2.imwrite(os.path.join(pred_dir, f"{item.name}_labels.png"), labels)
    results = []
    for ann in dataset.coco_gt()["annotations"]:
        if perturb and ann["image_id"] not in dropped:
            dropped.add(ann["image_id"])     # annotations follow label order: this is the first instance
            continue
        results.append({"image_id": name_of[ann["image_id"]], "category_id": 1, "bbox": ann["bbox"],
                        "score": 0.9, "segmentation": ann["segmentation"]})
    with open(os.path.join(pred_dir, "predictions.json"), "w") as f:
        json.dump(results, f)


def test_ground_truth_against_itself_scores_one(tmp_path):
    write_label_folder(str(tmp_path / "gt"), 3, count=6, seed=3)
    write_predictions(tmp_path / "gt", tmp_path / "pred")
    scores = score_predictions(tmp_path / "gt", tmp_path / "pred", max_dets=3000)
    m = scores["metrics"]
    assert (m["segm_AP"], m["segm_AP50"], m["sartorius"], m["aji"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert m["num_gt"] == m["num_pred"] > 0
    assert sorted(scores["per_image"]) == ["img_00", "img_01", "img_02"]
    assert all(v["num_detections"] == v["num_gt"] for v in scores["per_image"].values())


def test_a_missed_instance_lowers_every_score(tmp_path):
    write_label_folder(str(tmp_path / "gt"), 2, count=6, seed=4)
    write_predictions(tmp_path / "gt", tmp_path / "pred", perturb=True)
    scores = score_predictions(tmp_path / "gt", tmp_path / "pred", names=["img_01"])
    m, one = scores["metrics"], scores["per_image"]["img_01"]
    assert list(scores["per_image"]) == ["img_01"]
    assert one["num_pred"] == one["num_gt"] - 1
    assert 0 < m["aji"] < 1 and 0 < m["sartorius"] < 1 and 0 < m["segm_AP"] < 1
    # one miss, no false positive: TP/(TP+FN) at every threshold
    assert m["sartorius"] == pytest.approx(one["num_pred"] / one["num_gt"])


def test_missing_outputs_are_named(tmp_path):
    write_label_folder(str(tmp_path / "gt"), 1, seed=5)
    write_predictions(tmp_path / "gt", tmp_path / "pred")
    os.remove(tmp_path / "pred" / "img_00_labels.png")
    with pytest.raises(BenchError, match="img_00_labels.png"):
        score_predictions(tmp_path / "gt", tmp_path / "pred")
    with pytest.raises(BenchError, match="predictions.json"):
        score_predictions(tmp_path / "gt", tmp_path / "elsewhere")
    with pytest.raises(BenchError, match="img_07"):
        score_predictions(tmp_path / "gt", tmp_path / "pred", names=["img_07"])


def test_split_folders_are_links_and_never_overwrite_files(tmp_path):
    write_label_folder(str(tmp_path / "data" / "train"), 4, seed=6)
    train, val = split_names(tmp_path / "data", val_names=("img_01", "img_03"))
    assert (train, val) == (["img_00", "img_02"], ["img_01", "img_03"])
    work = tmp_path / "work"
    for _ in range(2):                   # a second run in the same work dir replaces the links
        prepare_work_dir(tmp_path / "data", work, train, val)
    assert sorted(os.listdir(work / "val" / "images")) == ["img_01.png", "img_03.png"]
    assert all((work / split / kind / f).is_symlink() for split in ("train", "val") for kind in ("images", "masks")
               for f in os.listdir(work / split / kind))
    assert [it.name for it in scan_folder(str(work / "val"))] == ["img_01", "img_03"]
    (work / "val" / "images" / "mine.png").write_bytes(b"")
    with pytest.raises(BenchError, match="not links"):
        prepare_work_dir(tmp_path / "data", work, train, val)
    with pytest.raises(BenchError, match="img_09"):
        split_names(tmp_path / "data", val_names=("img_09",))
