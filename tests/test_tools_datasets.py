"""tools/sartorius_to_coco.py, tools/masks_to_coco.py, tools/check_dataset.py."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from datasets import build_dataset
from datasets.coco import CocoDataset
from tests.fixtures.data_writers import write_coco, write_instance_folder, write_label_folder, write_sartorius

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, argv):
    module = tool(name)
    return module.main(module.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def sartorius(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sart"))
    types = ["shsy5y", "astro", "cort"] * 4
    write_sartorius(root, counts=[4, 3, 2] * 4, cell_types=types, frames_per_sample=2, height=40, width=48)
    return root


def test_sartorius_to_coco_matches_dataset_folds(sartorius, tmp_path):
    assert run("sartorius_to_coco", ["--data-path", sartorius, "--out", str(tmp_path), "--num-folds", "2"]) == 0
    everything = json.load(open(tmp_path / "all.json"))
    assert len(everything["images"]) == 12 and len(everything["annotations"]) == 36
    assert [c["name"] for c in everything["categories"]] == ["shsy5y", "astro", "cort"]
    ids = set()
    for fold in range(2):
        val = json.load(open(tmp_path / f"fold{fold}_val.json"))
        train = json.load(open(tmp_path / f"fold{fold}_train.json"))
        dataset = build_dataset("sartorius", "val", {"data_path": sartorius, "num_folds": 2, "fold": fold})
        assert val == json.loads(json.dumps(dataset.coco_gt()))
        assert not {im["id"] for im in val["images"]} & {im["id"] for im in train["images"]}
        ids |= {im["id"] for im in val["images"]}
    assert ids == {im["id"] for im in everything["images"]}
    # The COCO files read back through the coco format with the same masks.
    coco = CocoDataset(str(tmp_path / "all.json"), os.path.join(sartorius, "train"))
    sart = build_dataset("sartorius", "train", {"data_path": sartorius, "num_folds": 0, "fill_holes": False})
    assert coco.image_ids == sart.image_ids
    assert np.array_equal(coco.load(3)[1]["masks"].numpy(), sart.load(3)[1]["masks"].numpy())


@pytest.mark.parametrize("layout", ["labels", "instances"])
def test_masks_to_coco_round_trip(tmp_path, layout):
    data = tmp_path / "data"
    (write_label_folder if layout == "labels" else write_instance_folder)(str(data), 3)
    out = tmp_path / "gt.json"
    assert run("masks_to_coco", ["--data-path", str(data), "--out", str(out), "--class-name", "nucleus"]) == 0
    coco = CocoDataset(str(out), str(data))
    folder = build_dataset("folder", "train", {"data_path": str(data), "val_fraction": 0})
    assert coco.class_names == ["nucleus"] and len(coco) == 3
    for i in range(3):
        assert np.array_equal(coco.load(i)[1]["masks"].numpy(), folder.load(i)[1]["masks"].numpy())


def test_check_dataset_reports_each_problem(sartorius, tmp_path, capsys):
    assert run("check_dataset", ["--dataset", "sartorius", "--data-path", sartorius]) == 0
    assert "images: 12" in capsys.readouterr().out
    bad = tmp_path / "bad"
    write_sartorius(str(bad), counts=[2, 2], cell_types=["cort", "astro"], height=20, width=30)
    lines = open(bad / "train.csv").read().splitlines()
    name = lines[1].split(",")[0]
    extra = [f"{name},1 3 1 3,30,20,cort,t,d,s,0",      # line 6: unsorted/overlapping
             f"{name},598 5,30,20,cort,t,d,s,0",        # line 7: past the image
             f"{name},1 2,30,20,neuron,t,d,s,0",        # line 8: unknown class
             lines[1],                                  # line 9: duplicate of line 2
             "ghost,1 2,30,20,cort,t,d,s,0"]            # line 10: image file missing
    (bad / "train.csv").write_text("\n".join(lines + extra) + "\n")
    cv2.imwrite(str(bad / "train" / f"{lines[3].split(',')[0]}.png"), np.zeros((21, 30), np.uint8))
    assert run("check_dataset", ["--dataset", "sartorius", "--data-path", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"line 6 (image {name}): bad RLE: RLE runs unsorted or overlapping" in out
    assert f"line 7 (image {name}): bad RLE: RLE run ends at pixel 602 > 20×30" in out
    assert "line 8: unknown cell_type 'neuron'" in out
    assert f"warning: {bad}/train.csv line 9 (image {name}): duplicate of line 2" in out
    assert "ghost.png: file not found" in out
    assert "image is 21×30, train.csv says 20×30" in out
    assert "errors: 5, warnings: 1" in out


def test_check_dataset_strict_and_cli(tmp_path):
    write_coco(str(tmp_path))
    args = [sys.executable, os.path.join(ROOT, "tools", "check_dataset.py"), "--dataset", "coco",
            "--train-ann", str(tmp_path / "annotations.json"), "--train-images", str(tmp_path / "images")]
    loose = subprocess.run(args, capture_output=True, text=True, cwd=str(tmp_path))
    assert loose.returncode == 0, loose.stderr
    assert "degenerate box" in loose.stdout and "errors: 0, warnings: 3" in loose.stdout
    strict = subprocess.run(args + ["--strict"], capture_output=True, text=True, cwd=str(tmp_path))
    assert strict.returncode == 1
