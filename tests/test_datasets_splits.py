"""Grouped, stratified k-fold and random hold-out splits."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.errors import DatasetError
from datasets.splits import grouped_stratified_folds, random_split


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), min_size=1, max_size=40),
       st.integers(2, 5), st.integers(0, 3))
def test_groups_never_straddle_folds(spec, k, seed):
    groups, strata = [], []
    for g, count in spec:
        groups += [f"g{g}"] * count
        strata += [f"type{g % 3}"] * count       # one type per group, like a Sartorius sample
    folds = grouped_stratified_folds(groups, strata, k, seed)
    assert folds.dtype == np.int64 and folds.min() >= 0 and folds.max() < k
    for g in set(groups):
        assert len({folds[i] for i in range(len(groups)) if groups[i] == g}) == 1
    assert np.array_equal(folds, grouped_stratified_folds(groups, strata, k, seed))


def test_strata_balanced():
    # 3 types × 10 samples × 2 frames, 5 folds: every fold gets 2 samples (4 images) of each type.
    groups = [f"{t}_{s}" for t in "abc" for s in range(10) for _ in range(2)]
    strata = [g[0] for g in groups]
    folds = grouped_stratified_folds(groups, strata, 5, seed=0)
    for t in "abc":
        counts = np.bincount(folds[[s == t for s in strata]], minlength=5)
        assert counts.tolist() == [4] * 5
    assert not np.array_equal(folds, grouped_stratified_folds(groups, strata, 5, seed=1))


def test_random_split():
    a = random_split(10, 0.3, seed=0)
    assert a.sum() == 3 and np.array_equal(a, random_split(10, 0.3, seed=0))
    assert random_split(3, 0.01).sum() == 1 and random_split(5, 0.0).sum() == 0
    with pytest.raises(DatasetError, match="val_fraction"):
        random_split(5, 1.0)
    with pytest.raises(DatasetError, match="num_folds"):
        grouped_stratified_folds(["a"], ["x"], 1)


@pytest.mark.parametrize("name", ["folder", "coco", "synthetic"])
def test_k_fold_option_of_every_format_partitions_the_images(name, tmp_path):
    from datasets import build_dataset
    from tests.fixtures.data_writers import write_coco, write_label_folder

    if name == "folder":
        write_label_folder(str(tmp_path), 7)
        options = {"data_path": str(tmp_path)}
    elif name == "coco":
        ann = write_coco(str(tmp_path), num_images=7, empty_images=2)
        options = {"train_ann": ann, "train_images": str(tmp_path / "images")}
    else:
        options = {"synthetic_train_images": 7, "synthetic_size": 48}
    val_ids = []
    for fold in range(3):
        opts = {**options, "num_folds": 3, "fold": fold}
        train, val = build_dataset(name, "train", opts), build_dataset(name, "val", opts)
        assert val.image_ids and not set(train.image_ids) & set(val.image_ids)
        assert [img["id"] for img in val.coco_gt()["images"]] == val.image_ids
        val_ids += val.image_ids
    # Every image in exactly one validation fold, with one id whatever the fold (out-of-fold merging needs it).
    everything = build_dataset(name, "val", {**options, "num_folds": 7, "fold": 0})
    assert len(val_ids) == len(set(val_ids)) == 7
    assert set(everything.image_ids) <= set(val_ids)
    with pytest.raises(DatasetError, match="cannot make 8 folds"):
        build_dataset(name, "val", {**options, "num_folds": 8, "fold": 0})


def test_coco_fold_group_keeps_images_of_a_group_together(tmp_path):
    import json

    from datasets import build_dataset
    from tests.fixtures.data_writers import write_coco

    ann = write_coco(str(tmp_path), num_images=8, empty_images=0)
    data = json.load(open(ann))
    for k, img in enumerate(data["images"]):
        img["sample_id"] = f"s{k // 2}"            # pairs of frames
    json.dump(data, open(ann, "w"))
    sample = {img["id"]: img["sample_id"] for img in data["images"]}
    options = {"train_ann": ann, "train_images": str(tmp_path / "images"), "num_folds": 2, "fold_group": "sample_id"}
    for fold in range(2):
        train = build_dataset("coco", "train", {**options, "fold": fold})
        val = build_dataset("coco", "val", {**options, "fold": fold})
        assert not {sample[i] for i in train.image_ids} & {sample[i] for i in val.image_ids}
    del data["images"][0]["sample_id"]
    json.dump(data, open(ann, "w"))
    with pytest.raises(DatasetError, match="no 'sample_id' field to group folds by"):
        build_dataset("coco", "val", {**options, "fold": 0})


def test_folder_folds_and_val_path_exclude_each_other(tmp_path):
    from datasets import build_dataset
    from tests.fixtures.data_writers import write_label_folder

    write_label_folder(str(tmp_path), 3)
    with pytest.raises(DatasetError, match="not both"):
        build_dataset("folder", "train", {"data_path": str(tmp_path), "val_path": str(tmp_path), "num_folds": 3})
