"""predict.py end to end on a tiny random-weight checkpoint, plus its inputs and writers."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import predict
from datasets.imageio import read_label_image
from datasets.synthetic import SyntheticSpec, render_image
from engine.checkpoint import save_checkpoint
from engine.config import TrainConfig
from transforms.preprocess import Preprocessing, to_model_input
from utils.coco_rle import decode_coco_rle
from utils.image_files import decode_image, expand_inputs
from utils.kaggle_rle import decode_kaggle_rle
from utils.label_images import label_image_to_box_masks
from utils.writers import render_overlay, write_label_image

SMALL = dict(model="maskrcnn_resnet18_fpn", min_size=128, max_size=128, anchor_sizes=(8, 16, 32, 64, 128),
             detections_per_img=40, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight R18 checkpoint in this trainer's format (it still detects things)."""
    import models

    torch.manual_seed(seed)
    config = TrainConfig(**SMALL)
    model = models.build_model(config.model, 2, config.model_options())
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(), "epoch": 1, "iteration": 0,
                           "class_names": ["round", "elongated"], "model_name": config.model})
    return path


def synthetic_image(index: int = 0, height: int = 96, width: int = 120) -> np.ndarray:
    return render_image(SyntheticSpec(height=height, width=width, split="val", dense_every=0), index)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pth")


def run(args: list[str]) -> int:
    return predict.main(predict.get_args_parser().parse_args(args))


# ----------------------------------------------------------------------------- input kinds


def write_inputs(folder: Path) -> dict[str, np.ndarray]:
    """One file per supported kind; returns the arrays as they should read back (RGB order)."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = synthetic_image(0)
    rgb = np.stack([gray, synthetic_image(1), gray // 2], axis=2)
    rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 200, np.uint8)], axis=2)
    gray16 = gray.astype(np.uint16) * 257
    rgb16 = rgb.astype(np.uint16) * 257
    kinds = {"gray8.png": gray, "rgb8.png": rgb, "rgba8.png": rgba, "gray16.png": gray16,
             "gray8.tif": gray, "gray16.tiff": gray16, "rgb8.tif": rgb}
    for name, array in kinds.items():
        Image.fromarray(array).save(folder / name)
    cv2.imwrite(str(folder / "rgb16.png"), rgb16[:, :, ::-1])
    kinds["rgb16.png"] = rgb16
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=95)
    kinds["rgb.jpg"] = rgb
    Image.fromarray(gray).save(folder / "gray.jpeg", quality=95)
    kinds["gray.jpeg"] = gray
    return kinds


def test_every_input_kind_reads_back(tmp_path):
    kinds = write_inputs(tmp_path)
    contract = Preprocessing()
    for name, expected in kinds.items():
        image = decode_image(tmp_path / name)
        assert image.shape == expected.shape, name
        assert image.dtype == expected.dtype, name
        if name.endswith((".jpg", ".jpeg")):
            # Lossy on noisy pixels; channel order must still be RGB (channel 2 is half as bright).
            assert np.abs(image.astype(int) - expected.astype(int)).mean() < 10, name
            means = image.reshape(-1, image.shape[-1] if image.ndim == 3 else 1).mean(0)
            expected_means = expected.reshape(len(means) and -1, len(means)).mean(0)
            assert np.allclose(means, expected_means, atol=3), name
        else:
            assert np.array_equal(image, expected), name
        tensor = to_model_input(image, contract)
        assert tensor.shape == (3,) + expected.shape[:2] and tensor.dtype == torch.float32
        assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    # 8- and 16-bit versions of one image give the same model input with the full-range policy.
    full = Preprocessing(intensity="full")
    assert torch.allclose(to_model_input(decode_image(tmp_path / "gray8.png"), full),
                          to_model_input(decode_image(tmp_path / "gray16.png"), full), atol=1e-6)


def test_expand_inputs_files_folders_globs(tmp_path):
    write_inputs(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    paths, problems = expand_inputs([str(tmp_path / "imgs"), str(tmp_path / "imgs" / "*.png"),
                                     str(tmp_path / "imgs" / "rgb.jpg"), str(tmp_path / "missing.png"),
                                     str(tmp_path / "empty"), str(tmp_path / "nothing*.png")])
    names = [p.name for p in paths]
    assert len(names) == 10 and len(set(names)) == 10          # folder once, glob/file duplicates dropped
    assert "notes.txt" not in names
    assert names == sorted(names)
    assert len(problems) == 3
    assert any("missing.png" in p for p in problems) and any("empty" in p for p in problems)


def test_unique_names_disambiguate_collisions(tmp_path):
    names = predict.unique_names([tmp_path / "a" / "img.png", tmp_path / "b" / "img.png", tmp_path / "img.tif"])
    assert len(set(names)) == 3 and names[0] == "img" and names[1] == "b_img"


# ----------------------------------------------------------------------------- end to end


def test_predict_folder_with_corrupt_image(tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    kinds = write_inputs(images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(images / "blank.png")
    out = tmp_path / "out"
    rc = run([str(images), "--checkpoint", str(checkpoint), "--output-dir", str(out), "--score-thresh", "0.1",
              "--batch-size", "3", "--formats", "overlay", "labels", "json", "csv"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "Traceback" not in err
    assert f"using checkpoint {checkpoint}" in err
    assert "12/12 images" in err                                 # progress bar, corrupt file counted

    stems = sorted(Path(k).stem for k in kinds) + ["blank"]
    assert len(set(stems)) == len(stems) - 3     # gray8, gray16, rgb8 exist as PNG and TIFF: names collide
    results = json.loads((out / "predictions.json").read_text())
    rows = (out / "submission.csv").read_text().splitlines()
    assert rows[0] == "id,predicted"
    by_id: dict[str, list[str]] = {}
    for row in rows[1:]:
        image_id, rle = row.split(",")
        by_id.setdefault(image_id, []).append(rle)
    label_files = sorted(out.glob("*_labels.png"))
    assert len(label_files) == 11 and len(list(out.glob("*_overlay.png"))) == 11
    assert set(by_id) == {f.name[:-len("_labels.png")] for f in label_files}
    total = 0
    for label_file in label_files:
        name = label_file.name[:-len("_labels.png")]
        labels = read_label_image(label_file)
        assert labels.dtype == np.uint16
        h, w = labels.shape
        # Round trip: the CSV rows decode to exactly the instances of the label image.
        from_csv = np.zeros((h, w), dtype=np.int64)
        for k, rle in enumerate(r for r in by_id[name] if r):
            values = [int(v) for v in rle.split()]
            assert values[0::2] == sorted(values[0::2]) and min(values) > 0
            mask = decode_kaggle_rle(rle, h, w).astype(bool)
            assert mask.any() and not (from_csv[mask] > 0).any()    # non-empty, non-overlapping
            from_csv[mask] = k + 1
        assert np.array_equal(from_csv, labels)
        assert labels.max() == len(label_image_to_box_masks(labels)[0]) == len([r for r in by_id[name] if r])
        total += int(labels.max())
        overlay = cv2.imread(str(out / f"{name}_overlay.png"))
        assert overlay.shape == (h, w, 3)
        mine = [r for r in results if r["image_id"] == name]
        if mine:
            assert decode_coco_rle([mine[0]["segmentation"]], h, w).shape == (1, h, w)
    assert total > 0, "the random checkpoint should still produce instances at --score-thresh 0.1"
    assert {r["image_id"] for r in results} <= set(by_id)
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    # predictions.json keeps every detection, overlapping ones included.
    assert len(results) >= total


def test_score_thresh_filters_instances_not_predictions_json(tmp_path, checkpoint, capsys):
    Image.fromarray(synthetic_image(3)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    rc = run([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
              "--score-thresh", "0.99", "--formats", "labels", "json", "csv"])
    assert rc == 0, capsys.readouterr().err
    assert read_label_image(out / "a_labels.png").max() == 0
    assert (out / "submission.csv").read_text().splitlines() == ["id,predicted", "a,"]
    assert len(json.loads((out / "predictions.json").read_text())) > 0


def test_missing_checkpoint_says_train_first(tmp_path, capsys):
    Image.fromarray(synthetic_image()).save(tmp_path / "a.png")
    rc = run([str(tmp_path / "a.png"), "--runs-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train a model first" in err and "--checkpoint" in err and "Traceback" not in err
    rc = run([str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nope.pth")])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    rc = run([str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "bad.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.pth" in err and "could not be read" in err


def test_no_images_is_an_error(tmp_path, checkpoint, capsys):
    rc = run([str(tmp_path / "*.png"), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert rc == 2 and "no image matches" in err and "no images" in err


def test_default_checkpoint_is_newest_best_then_last(tmp_path, checkpoint):
    runs = tmp_path / "runs"
    with pytest.raises(predict.PredictError, match="train a model first"):
        predict.resolve_checkpoint(None, str(runs))
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "last.pth").write_bytes(b"x")
    path, how = predict.resolve_checkpoint(None, str(runs))
    assert path == runs / "old" / "last.pth" and "last.pth" in how
    for i, name in enumerate(["a", "b"]):
        (runs / name).mkdir()
        (runs / name / "best.pth").write_bytes(b"x")
        os.utime(runs / name / "best.pth", (time.time() - 100 + i, time.time() - 100 + i))
    path, how = predict.resolve_checkpoint(None, str(runs))
    assert path == runs / "b" / "best.pth" and str(path) in how
    assert predict.resolve_checkpoint(str(runs / "old"), str(runs))[0] == runs / "old" / "last.pth"


def search_postprocess_file(tmp_path, image_index: int, checkpoint, capsys) -> tuple[Path, list[dict]]:
    """The parameters ``evaluate.py --search`` writes for predict.py's raw predictions of synthetic
    image ``image_index`` (saved as a.png) against its true instances; and those predictions."""
    import evaluate
    from datasets.synthetic import SyntheticSpec, render_image
    from datasets.targets import coco_annotation, coco_ground_truth
    from utils.box_masks import box_masks_to_coco_rle

    image, label_image, labels = render_image(SyntheticSpec(height=96, width=120, split="val", dense_every=0),
                                              image_index)
    Image.fromarray(image).save(tmp_path / "a.png")
    masks, values = label_image_to_box_masks(label_image)
    annotations = [coco_annotation(int(labels[v - 1]), rle, box.tolist(), float(area)) for rle, box, v, area
                   in zip(box_masks_to_coco_rle(masks), masks.tight_boxes(), values, masks.areas().tolist())]
    gt = coco_ground_truth([({"id": "a", "file_name": "a.png", "height": 96, "width": 120}, annotations)],
                           ["round", "elongated"])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert run([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "raw"),
                "--formats", "json"]) == 0
    params = tmp_path / "postprocess.json"
    assert evaluate.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "raw" / "predictions.json"),
                          "--search", "--search-out", str(params)]) == 0
    capsys.readouterr()
    return params, json.loads((tmp_path / "raw" / "predictions.json").read_text())


def test_postprocess_is_applied(tmp_path, checkpoint, monkeypatch, capsys):
    import metrics.postprocess

    params, raw = search_postprocess_file(tmp_path, 2, checkpoint, capsys)
    calls = []
    apply = metrics.postprocess.apply_postprocess

    def recording(results, params, height, width):
        kept = apply(results, params, height, width)
        calls.append((len(results), params, height, width, len(kept)))
        return kept

    monkeypatch.setattr(metrics.postprocess, "apply_postprocess", recording)
    out = tmp_path / "out"
    rc = run([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--output-dir", str(out),
              "--postprocess", str(params), "--formats", "labels", "json", "csv"])
    assert rc == 0, capsys.readouterr().err
    # The file evaluate.py wrote reaches apply_postprocess as written, with the image's size.
    assert len(calls) == 1 and calls[0][1:4] == (json.loads(params.read_text()), 96, 120)
    assert calls[0][0] == len(raw) > calls[0][4] >= 1   # post-processing dropped some, kept some
    labels = read_label_image(out / "a_labels.png")
    rows = (out / "submission.csv").read_text().splitlines()[1:]
    assert labels.max() == len(rows) == calls[0][4]
    # predictions.json keeps every detection; only the instance outputs are post-processed.
    assert len(json.loads((out / "predictions.json").read_text())) == len(raw)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "malformed JSON"),
    (json.dumps({"version": 1, "classes": {"1": {"name": "round", "score_thresh": 0.4}}}), "entry '1'"),
    (json.dumps({"version": 1, "classes": {"2": {"score_thresh": 1.5, "min_size": 0}}}), "entry '2'"),
    (json.dumps({"version": 1, "default": {"score_thresh": 0.5, "min_size": 0}, "nms_iou": 2}), "nms_iou"),
    (json.dumps({"min_area": 5}), "no 'classes' or 'default'"),
])
def test_bad_postprocess_file_names_the_file_and_entry(tmp_path, checkpoint, capsys, content, needle):
    from engine.predictor import PredictError, Predictor

    Image.fromarray(synthetic_image(2)).save(tmp_path / "a.png")
    params = tmp_path / "pp.json"
    params.write_text(content)
    rc = run([str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"),
              "--postprocess", str(params)])
    err = capsys.readouterr().err
    assert rc == 2 and str(params) in err and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    if not content.startswith("{not"):
        with pytest.raises(PredictError, match=needle):      # the Python API checks a dict the same way
            Predictor.from_checkpoint(checkpoint, device="cpu", postprocess=json.loads(content))


def test_label_image_goes_to_tiff_above_65535(tmp_path):
    labels = np.arange(300 * 300, dtype=np.int32).reshape(300, 300)   # 89999 instances
    path = write_label_image(tmp_path / "x_labels", labels)
    assert path.suffix == ".tif"
    back = read_label_image(path)
    assert np.array_equal(back.astype(np.int64), labels)
    small = write_label_image(tmp_path / "y_labels", (labels % 7).astype(np.uint16))
    assert small.suffix == ".png" and np.array_equal(read_label_image(small), labels % 7)


def test_overlay_tints_instances_and_keeps_background():
    image = np.full((20, 20), 100, np.uint8)
    labels = np.zeros((20, 20), np.uint16)
    labels[5:15, 5:15] = 1
    out = render_overlay(image, labels)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and (out[19, 19] == 100).all()
    assert not (out[10, 10] == 100).all()                              # tinted inside
    assert not np.array_equal(out[5, 10], out[10, 10])                 # outline differs from fill


def test_submission_rows_for_an_image_without_instances():
    from utils.box_masks import BoxMasks
    from utils.instances import Instances
    from utils.writers import submission_rows

    empty = Instances(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                      BoxMasks.empty(5, 6))
    assert submission_rows("img", empty) == ["img,"]
    dense = np.zeros((2, 5, 6), np.uint8)
    dense[0, 1, 1:3] = 1
    one = Instances(np.zeros((2, 4), np.float32), np.array([0.9, 0.8], np.float32), np.array([1, 2]),
                    BoxMasks.from_dense(dense))
    assert submission_rows("img", one) == ["img,8 2"]                  # empty mask skipped


def test_detect_matches_torchvision_forward(checkpoint):
    """engine.inference.detect gives the detections and mask probabilities of torchvision's full
    forward; only the paste differs (pixel-aligned, tests/test_masks_fast.py)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.evaluation import predict_loader
    from engine.inference import detect
    from utils.instances import detections_to_coco_results

    model, _ = build_model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    images = [to_model_input(synthetic_image(4), Preprocessing()), to_model_input(synthetic_image(5, 80, 64), Preprocessing())]
    with torch.inference_mode():
        reference = model(images)
    fast = detect(model, images)
    for ref, out, image in zip(reference, fast, images):
        assert out["image_size"] == tuple(image.shape[-2:]) and out["mask_probs"].shape[1:] == (28, 28)
        assert torch.equal(ref["boxes"], out["boxes"]) and len(ref["boxes"]) > 0
        ours, theirs = detections_to_coco_results(out, 7), detections_to_coco_results(ref, 7)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "segmentation"} for r in rows]  # noqa: E731
        assert strip(ours) == strip(theirs)
        # The box-frame probabilities are torchvision's: its own paste of them gives its canvas.
        canvas = paste_masks_in_image(out["mask_probs"][:, None], out["boxes"], out["image_size"])
        assert torch.equal(canvas, ref["masks"])
    # The evaluation loop shares the same conversion (a batch of one: padding depends on the batch).
    alone = detect(model, images[1:])[0]
    loader = [([images[1]], [{"image_id": 3}])]
    assert predict_loader(model, loader, torch.device("cpu")) == {3: detections_to_coco_results(alone, 3)}
