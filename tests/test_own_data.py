"""A scientist's own data: sizes from the data, run-relative schedules, a time budget, one input
scale, and clear errors before training on data that cannot work."""
from __future__ import annotations

import json
import math
import time

import cv2
import numpy as np
import pytest
import torch

import train
from datasets.errors import DatasetError
from datasets.statistics import DataStatistics, check_objects, recommend_sizes, statistics_from_coco
from engine.budget import budget_total_iters, parse_duration
from engine.config import TrainConfig
from engine.data import TrainBatchSampler
from engine.optim import Schedule, plan_schedule
from models.scale import ScaleTransform, resize_instance_masks
from tests.fixtures.data_writers import write_label_folder
from tests.helpers import tiny_args
from transforms import build_transforms
from transforms.core import RandomScaleCrop
from transforms.presets import crop_size_for


def run(argv):
    return train.main(train.get_args_parser().parse_args(argv))


# ------------------------------------------------------------------------- schedules


def test_schedule_is_relative_to_the_run():
    config = TrainConfig(opt="sgd", lr=0.02)
    short = plan_schedule(config, iters_per_epoch=2, total_iters=120)
    assert short.milestones == (74, 102)                        # 16/26 and 22/26 of 120
    assert short.warmup_iters == 6 <= 0.05 * 120                 # never the COCO recipe's 1000
    assert short.factor(119) == pytest.approx(0.01)
    long = plan_schedule(config, iters_per_epoch=1000, total_iters=90_000)
    assert long.warmup_iters == 1000
    assert plan_schedule(config, 10, 12).warmup_iters == 3       # a dozen steps still warm up a little
    given = plan_schedule(TrainConfig(lr_steps=(3, 5), warmup_iters=7), iters_per_epoch=10, total_iters=60)
    assert given.milestones == (30, 50) and given.warmup_iters == 7
    cosine = plan_schedule(TrainConfig(lr_scheduler="cosine"), 5, 100)
    assert cosine.factor(100) == 0 and 0.45 < cosine.factor(50) < 0.55
    text = short.describe(0.02)
    assert "120 iterations" in text and "from step 74" in text and "after 6 warmup steps" in text
    assert Schedule.from_dict(json.loads(json.dumps(short.to_dict()))) == short


def test_optimizer_gets_its_own_defaults():
    adamw = train.config_from_args(train.get_args_parser().parse_args(["--dataset", "coco", "--data-path", "x",
                                                                         "--opt", "adamw"]))
    assert adamw.lr == 0.001 and adamw.weight_decay == 0.05
    sgd = train.config_from_args(train.get_args_parser().parse_args(["--dataset", "folder", "--data-path", "x",
                                                                       "--opt", "sgd"]))
    assert sgd.lr == 0.02 and sgd.weight_decay == 1e-4           # not the folder's AdamW lr
    assert sgd.model == "maskrcnn_resnet18_fpn" or torch.cuda.is_available()   # R18 on a CPU


def test_tiny_dataset_repeats_within_an_epoch():
    sampler = TrainBatchSampler([0, 0, 0], batch_size=2, seed=1, min_batches=16)
    assert len(sampler) == 17 and sampler.passes == 11          # 11 passes of 3 images: ≥ 16 batches of 2
    sampler.set_epoch(3)
    batches = [b for b in sampler]
    assert len(batches) == 17 and sorted({i for b in batches for i, _ in b}) == [0, 1, 2]
    sampler.set_epoch(3, start_batch=5)
    assert [b for b in sampler] == batches[5:]                   # resumable mid-epoch
    assert len(TrainBatchSampler(list(range(100)), 4, 1, min_batches=16)) == 25   # large sets: one pass


def test_durations():
    assert parse_duration("8m") == 480 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("600") == 600 and parse_duration("2.5min") == 150
    for bad in ("8x", "m8", "", "1h-5m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert budget_total_iters(10, 2.0, deadline=1000.0, reserve=100.0, now=0.0) == 10 + int((1000 - 100 - 5) * 0.96 / 2)
    assert budget_total_iters(10, 2.0, deadline=50.0, reserve=100.0, now=0.0) == 11


# ------------------------------------------------------------------------- a time budget


def test_a_flag_for_the_run_length_replaces_the_datasets_epochs_and_budget():
    """A dataset's run length (the synthetic data's 12 epochs within 4½ minutes) is replaced by
    --epochs or --max-time given by hand: a budget is not cut short by the dataset's epochs, nor
    are epochs by its budget."""
    from datasets.synthetic import SYNTHETIC_DEFAULTS
    from engine.config import resolve_config

    default = resolve_config({}, SYNTHETIC_DEFAULTS)       # 12 epochs, fewer if 4½ minutes are not enough
    assert (default.epochs, default.max_time) == (12, 270.0)
    by_time = resolve_config({"max_time": 600.0}, SYNTHETIC_DEFAULTS)
    assert (by_time.epochs, by_time.max_time) == (None, 600.0)
    by_epochs = resolve_config({"epochs": 30}, SYNTHETIC_DEFAULTS)
    assert (by_epochs.epochs, by_epochs.max_time) == (30, None)
    both = resolve_config({"epochs": 3, "max_time": 60.0}, SYNTHETIC_DEFAULTS)
    assert (both.epochs, both.max_time) == (3, 60.0)


def test_bf16_steps_are_the_default_only_on_a_cpu_with_bf16_units(monkeypatch):
    """bf16 autocast is on by default where the CPU multiplies bf16 in hardware (AMX tiles or
    AVX-512 BF16) and oneDNN may use it; an ISA cap below AVX512_CORE_BF16, another CPU, CUDA or
    ``--no-amp`` keep fp32."""
    from engine import config as config_module
    from engine.config import resolve_config

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for amx, avx512_bf16 in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert config_module.cpu_has_fast_bf16(), (amx, avx512_bf16)
    assert resolve_config({"device": "cpu"}, {}).amp is True
    assert resolve_config({"device": "cpu", "amp": False}, {}).amp is False
    assert resolve_config({"device": "cuda"}, {}).amp is False
    assert resolve_config({"device": "cuda", "amp": True}, {}).amp is True
    for cap, fast in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
                      ("avx512_core_bf16", True), ("AVX512_CORE_AMX", True), ("AVX10_1_512", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert config_module.cpu_has_fast_bf16() is fast, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_config({"device": "cpu"}, {}).amp is False
    args = train.get_args_parser().parse_args(["--no-amp"])
    assert train.config_from_args(args).amp is False


def test_max_time_fixes_the_run_length_and_resume_keeps_it(tmp_path):
    budget = 25
    started = time.time()
    report = run(tiny_args(tmp_path, "--max-time", f"{budget}s", "--name", "budget", "--synthetic-train-images", "4",
                           "--min-epoch-iters", "4"))
    elapsed = time.time() - started
    run_dir = tmp_path / "runs" / "budget"
    state = torch.load(run_dir / "last.pth", weights_only=True)
    schedule = state["schedule"]
    assert schedule["fixed"] and state["global_step"] == schedule["total_iters"] > 7   # more than the measured steps
    assert schedule["total_iters"] < 26 * 4                       # not the unbudgeted 26 epochs of 4 steps
    assert "coco" in report                                       # the final evaluation ran
    assert elapsed < 2 * budget + 10, elapsed                     # estimates on a busy 2-core machine vary
    log = (run_dir / "train.log").read_text()
    assert "time budget" in log and "training ends in about" in log
    # Resuming a finished budgeted run keeps its fixed length: nothing more to train.
    run(tiny_args(tmp_path, "--max-time", f"{budget}s", "--resume", str(run_dir / "last.pth")))
    assert torch.load(run_dir / "last.pth", weights_only=True)["global_step"] == schedule["total_iters"]
    assert "nothing to train" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------- sizes from the data


def stats_of(diameters, counts=(10,), image=(500, 500)) -> DataStatistics:
    d = np.asarray(diameters, dtype=np.float64)
    return DataStatistics(len(counts), np.array([image] * len(counts)), np.asarray(counts), d, d * 0.9,
                          np.stack([d * 0.9, d * 0.9], axis=1))


def test_recommendation_follows_object_size_and_density():
    native, reasons = recommend_sizes(stats_of(np.linspace(10, 30, 200), counts=(1862,)))
    assert native["input_scale"] == 1.0 and native["anchor_sizes"][0] == 11 and len(native["anchor_sizes"]) == 5
    assert native["detections_per_img"] == 2800 and native["rpn_post_nms_top_n_test"] >= 2 * 2800
    assert native["rpn_test_pixels"] == 500 * 500         # the caps are for a median image at the input scale
    assert any("native resolution" in r for r in reasons)
    small, _ = recommend_sizes(stats_of(np.full(50, 6.0)))
    assert small["input_scale"] == 4.0 and small["detections_per_img"] == 100 and small["rpn_test_pixels"] == 2000 ** 2
    large, _ = recommend_sizes(stats_of(np.full(50, 200.0)))
    assert large["input_scale"] == 0.25 and large["anchor_sizes"][0] <= 32


def test_statistics_from_coco_reads_areas_and_boxes():
    gt = {"images": [{"id": 1, "height": 50, "width": 60}, {"id": 2, "height": 50, "width": 60}],
          "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10], "area": 78.5, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "bbox": [5, 5, 4, 9], "area": 30.0, "iscrowd": 0},
                          {"id": 3, "image_id": 2, "bbox": [0, 0, 60, 50], "area": 3000.0, "iscrowd": 1}]}
    stats = statistics_from_coco(gt)
    assert stats.objects_per_image.tolist() == [2, 0] and stats.num_objects == 2
    assert stats.diameters[0] == pytest.approx(10.0, abs=0.01) and stats.box_sizes[1] == pytest.approx(6.0)


def test_unlearnable_objects_stop_with_a_message():
    with pytest.raises(DatasetError, match="smaller than 4 px"):
        check_objects(stats_of(np.full(20, 1.2)), "data")
    whole = DataStatistics(1, np.array([[40, 50]]), np.array([1]), np.array([50.0]), np.array([44.7]),
                           np.array([[40.0, 50.0]]))
    with pytest.raises(DatasetError, match="spans its whole image"):
        check_objects(whole, "data")
    with pytest.raises(DatasetError, match="no annotated objects"):
        check_objects(stats_of([], counts=(0,)), "data")


# ------------------------------------------------------------------------- bad folders, before training


def _train_cli(capsys, root, *extra):
    code = None
    try:
        code = train.run_cli(["--dataset", "folder", "--data-path", str(root), "--val-fraction", "0.5",
                              "--output-dir", str(root.parent / "runs"), "-j", "0", *extra])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_folders_stop_before_training_naming_the_file(tmp_path, capsys):
    no_masks = tmp_path / "no_masks"
    write_label_folder(str(no_masks), 2)
    for f in (no_masks / "masks").iterdir():
        f.unlink()
    (no_masks / "masks").rmdir()
    code, err = _train_cli(capsys, no_masks)
    assert code == 2 and "no masks/ folder" in err and str(no_masks) in err

    wrong_size = tmp_path / "wrong_size"
    write_label_folder(str(wrong_size), 4)
    cv2.imwrite(str(wrong_size / "masks" / "img_00.png"), np.ones((10, 10), np.uint16))
    code, err = _train_cli(capsys, wrong_size)
    assert code == 2 and "img_00.png" in err and "10×10" in err

    colour = tmp_path / "colour"
    write_label_folder(str(colour), 4)
    rgb = np.zeros((64, 80, 3), np.uint8)
    rgb[5:20, 5:20] = (255, 0, 0)
    rgb[30:50, 30:50] = (0, 255, 0)
    (colour / "masks" / "img_01.tif").unlink()
    cv2.imwrite(str(colour / "masks" / "img_01.png"), rgb)
    code, err = _train_cli(capsys, colour)
    assert code == 2 and "img_01.png" in err and "colour" in err

    tiny = tmp_path / "tiny"
    write_label_folder(str(tiny), 4)
    for f in (tiny / "masks").iterdir():
        label = np.zeros((64, 80), np.uint16)
        label[10, 10], label[30, 40] = 1, 2                     # one-pixel "objects"
        f.unlink()
        cv2.imwrite(str(f.with_suffix(".png")), label)
    code, err = _train_cli(capsys, tiny)
    assert code == 2 and "smaller than 4 px" in err


# ------------------------------------------------------------------------- one input scale


def test_box_local_mask_resize_equals_dense_nearest():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 40, 50), np.uint8)
    boxes = np.array([[2, 3, 20, 17], [25, 10, 49, 39], [0, 0, 8, 8]], np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[k, y0:y1, x0:x1] = rng.integers(0, 2, (y1 - y0, x1 - x0))
    for out_h, out_w in ((60, 75), (21, 26)):
        ys = np.minimum(((np.arange(out_h) + 0.5) * 40 / out_h).astype(int), 39)
        xs = np.minimum(((np.arange(out_w) + 0.5) * 50 / out_w).astype(int), 49)
        assert np.array_equal(resize_instance_masks(masks, boxes, out_h, out_w), masks[:, ys][:, :, xs])


def test_scale_transform_resizes_by_one_factor_and_maps_back():
    t = ScaleTransform(0.5, [0.0] * 3, [1.0] * 3)
    t.eval()
    for size in ((512, 512), (1000, 800)):
        images, _ = t([torch.rand(3, *size)])
        assert images.image_sizes[0] == (size[0] // 2, size[1] // 2)   # crops and whole images alike
    t.train()
    masks = torch.zeros(1, 100, 80, dtype=torch.uint8)
    masks[0, 20:60, 10:50] = 1
    target = {"boxes": torch.tensor([[10., 20., 50., 60.]]), "labels": torch.tensor([1]), "masks": masks}
    images, targets = t([torch.rand(3, 100, 80)], [target])
    assert targets[0]["masks"].shape == (1, 50, 40) and int(targets[0]["masks"].sum()) == 400
    assert torch.equal(targets[0]["boxes"], torch.tensor([[5., 10., 25., 30.]]))
    same = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3)
    image = torch.rand(3, 33, 47)
    assert torch.equal(same.resize(image, None)[0], image)        # native: nothing resampled


def test_a_test_scale_resizes_in_eval_mode_only():
    t = ScaleTransform(0.5, [0.0] * 3, [1.0] * 3, test_scale=0.75)
    t.train()
    assert t.resize(torch.rand(3, 100, 80), None)[0].shape[-2:] == (50, 40)
    t.eval()
    assert t.resize(torch.rand(3, 100, 80), None)[0].shape[-2:] == (75, 60)
    with pytest.raises(train.ConfigError, match="--input-scale-test is a fixed resize factor"):
        train.config_from_args(train.get_args_parser().parse_args(["--min-size", "96", "--input-scale-test", "1.5"]))


def test_folder_run_chooses_its_test_scale_and_every_reader_of_the_checkpoint_uses_it(tmp_path):
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.predictor import Predictor, input_scale

    write_label_folder(str(tmp_path / "data"), 4, 64, 80, count=6, seed=2)
    common = ["--dataset", "folder", "--data-path", str(tmp_path / "data"), "--val-fraction", "0.25", "--epochs", "1",
              "--min-epoch-iters", "2", "-b", "2", "-j", "2", "--output-dir", str(tmp_path / "runs")]
    report = run([*common, "--name", "searched"])
    run_dir = tmp_path / "runs" / "searched"
    config = json.loads((run_dir / "config.json").read_text())
    chosen = config["input_scale_test"]
    assert chosen in [config["input_scale"] * f for f in (1.0, 1.25, 1.5)]
    log = (run_dir / "train.log").read_text()
    assert f"test scale {chosen:g} " in log and "chosen by segm_AP on 1 validation image(s)" in log
    eval_report = json.loads((run_dir / "eval_report.json").read_text())
    assert eval_report["input_scale_test"] == chosen and eval_report["coco"] == report["coco"]
    for name in ("best.pth", "last.pth"):
        state = load_checkpoint(run_dir / name)
        assert state["config"]["input_scale_test"] == chosen
        model, _ = build_model_from_checkpoint(state)
        assert model.transform.test_scale == chosen and model.transform.scale == config["input_scale"]
    predictor = Predictor.from_checkpoint(run_dir / "best.pth", device="cpu")
    assert input_scale(predictor.model, 64, 80) == chosen
    # A test scale given by the flag is kept, and nothing is searched.
    run([*common, "--name", "given", "--input-scale-test", "0.9"])
    assert json.loads((tmp_path / "runs" / "given" / "config.json").read_text())["input_scale_test"] == 0.9
    assert "test scale" not in (tmp_path / "runs" / "given" / "train.log").read_text()


def test_folder_run_takes_sizes_from_the_data(tmp_path):
    write_label_folder(str(tmp_path / "data"), 4, 64, 80, count=6, seed=2)
    common = ["--dataset", "folder", "--data-path", str(tmp_path / "data"), "--val-fraction", "0.25",
              "--min-epoch-iters", "2", "-b", "2", "-j", "2", "--output-dir", str(tmp_path / "runs"), "--name", "own"]
    run([*common, "--epochs", "1"])
    config = json.loads((tmp_path / "runs" / "own" / "config.json").read_text())
    state = torch.load(tmp_path / "runs" / "own" / "last.pth", weights_only=True)
    assert config["input_scale"] is not None and config["channels"] == "gray" and config["intensity"] == "percentile"
    assert config["detections_per_img"] == 100 and len(config["anchor_sizes"]) == 5
    assert config["rpn_test_pixels"] == round(64 * 80 * config["input_scale"] ** 2)   # caps per area, from the data
    assert config["opt"] == "adamw" and config["lr"] == 0.002 and config["data_augmentation"] == "cells"
    assert state["schedule"]["total_iters"] == state["global_step"] == 3      # 3 images, 2 passes, batches of 2
    log = (tmp_path / "runs" / "own" / "train.log").read_text()
    assert "sizes from the data: input scale" in log and "cosine schedule over 3 iterations" in log
    assert f"training crops of up to {crop_size_for(config['input_scale'])} px (512 model-input px)" in log
    assert math.isfinite(state["metrics"].get("segm_AP", float("nan")))
    # A resumed run keeps what the data chose (nothing differs from the checkpoint).
    run([*common, "--epochs", "2", "--resume", str(tmp_path / "runs" / "own" / "last.pth")])
    resumed = json.loads((tmp_path / "runs" / "own" / "config.json").read_text())
    assert all(resumed[k] == config[k] for k in ("input_scale", "anchor_sizes", "detections_per_img", "rpn_test_pixels"))
    assert "differ from the checkpoint" not in (tmp_path / "runs" / "own" / "train.log").read_text()


def test_training_crops_are_one_size_for_the_model_at_any_scale():
    """The cells crop is 512 px as the model sees it: a step costs the same at any input scale."""
    assert [crop_size_for(s) for s in (1.0, 1.5, 2.0, 0.5, None)] == [512, 341, 256, 1024, 512]
    crop = build_transforms("cells", True, crop_size=crop_size_for(1.5)).transforms[1]
    assert isinstance(crop, RandomScaleCrop) and crop.output_size == (341, 341)


def test_a_scale_given_by_flags_still_gets_anchors_from_the_data():
    stats = stats_of(np.linspace(10, 30, 200), image=(500, 1000))
    native, _ = recommend_sizes(stats)
    doubled, reasons = recommend_sizes(stats, scale=2.0)
    assert doubled["input_scale"] == 2.0 and doubled["anchor_sizes"][0] == 2 * native["anchor_sizes"][0]
    assert "given" in reasons[0]
    from datasets.statistics import resize_factor
    assert resize_factor(stats, 800, 1333) == pytest.approx(1.333, abs=1e-3)   # 500×1000 → long side 1333
