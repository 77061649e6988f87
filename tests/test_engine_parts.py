"""The training loop's parts on their own: the LR curve, the samplers, the loader with workers,
dataset option keys, config-change warnings, the metrics writer. Tiny inputs, seconds in all."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import pytest
import torch

import train
from datasets import build_dataset
from datasets.errors import DatasetError
from datasets.registry import check_options, option_keys, parse_option
from engine.config import TrainConfig
from engine.data import EvalSampler, TrainBatchSampler, train_loader
from engine.logging import MetricsWriter
from engine.optim import Schedule, build_lr_scheduler, plan_schedule
from tests.helpers import tiny_args
from transforms import build_transforms

# --- LR curve -----------------------------------------------------------------------------------

def lrs_of(schedule: Schedule, base_lr: float) -> list[float]:
    """The LR an optimizer sees at each iteration when build_lr_scheduler is stepped once per step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, schedule)
    out = []
    for _ in range(schedule.total_iters):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_multistep_curve_warms_up_then_decays_at_16_and_22_of_26():
    config = dataclasses.replace(TrainConfig(), lr_scheduler="multistep", warmup_iters=10, warmup_factor=0.001,
                                 lr_gamma=0.1)
    schedule = plan_schedule(config, iters_per_epoch=10, total_iters=260)
    assert schedule.milestones == (160, 220)
    lrs = lrs_of(schedule, 0.02)
    assert lrs[0] == pytest.approx(0.02 * 0.001)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))              # linear warmup, rising
    assert lrs[10] == pytest.approx(0.02) and lrs[159] == pytest.approx(0.02)
    assert lrs[160] == pytest.approx(0.002) and lrs[219] == pytest.approx(0.002)
    assert lrs[220] == pytest.approx(0.0002) and lrs[-1] == pytest.approx(0.0002)


def test_cosine_curve_halves_mid_run_and_ends_near_zero():
    config = dataclasses.replace(TrainConfig(), lr_scheduler="cosine", warmup_iters=5, warmup_factor=0.1)
    schedule = plan_schedule(config, iters_per_epoch=10, total_iters=100)
    lrs = lrs_of(schedule, 1.0)
    expected = [(0.1 * (1 - i / 5) + i / 5 if i < 5 else 1.0) * 0.5 * (1 + math.cos(math.pi * i / 100))
                for i in range(100)]
    assert lrs == pytest.approx(expected)
    assert lrs[50] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))                # monotone after warmup
    assert lrs[-1] < 1e-3
    assert "cosine to 0 at step 100" in schedule.describe(1.0)


def test_lr_steps_in_epochs_and_a_replanned_length_take_effect_at_once():
    config = dataclasses.replace(TrainConfig(), lr_scheduler="multistep", lr_steps=(2,), warmup_iters=0)
    schedule = plan_schedule(config, iters_per_epoch=7, total_iters=30)
    assert schedule.milestones == (14,)
    cosine = plan_schedule(dataclasses.replace(config, lr_scheduler="cosine"), 7, 30, fixed=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cosine)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    cosine.total_iters = 20                                               # a budget fixes the length
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))


# --- samplers -------------------------------------------------------------------------------------

def test_train_batch_sampler_shuffles_each_epoch_reproducibly_and_keeps_groups():
    groups = [0, 1] * 12                                                # 12 per group: no mixed leftover
    sampler = TrainBatchSampler(groups, batch_size=4, seed=3)
    sampler.set_epoch(0)
    first = sampler.batches()
    assert sorted(i for b in first for i in b) == list(range(24))       # every image once
    assert all(len({groups[i] for i in b}) == 1 for b in first)        # one aspect-ratio group per batch
    assert len(first) == len(sampler) == 6
    again = TrainBatchSampler(groups, batch_size=4, seed=3)
    again.set_epoch(0)
    assert again.batches() == first                                     # deterministic in (seed, epoch)
    sampler.set_epoch(1)
    assert sampler.batches() != first                                   # reshuffled per epoch
    sampler.set_epoch(1, start_batch=3)                                 # resume inside the epoch
    assert [[i for i, _ in b] for b in sampler] == sampler.batches()[3:]
    assert all(e == 1 for b in sampler for _, e in b)


def test_train_batch_sampler_shards_ranks_and_repeats_tiny_datasets():
    groups = [0] * 7
    shards = []
    for rank in range(2):
        sampler = TrainBatchSampler(groups, batch_size=2, seed=0, rank=rank, world_size=2)
        sampler.set_epoch(0)
        shards.append([i for b in sampler.batches() for i in b])
    assert len(shards[0]) == len(shards[1]) == 4                        # padded to equal length
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    tiny = TrainBatchSampler([0, 0, 0], batch_size=2, seed=0, min_batches=4)
    tiny.set_epoch(0)
    assert tiny.passes == 3 and len(tiny) == len(tiny.batches()) == 5          # ≥ min_batches, 3 fresh passes


def test_eval_sampler_is_in_order_and_padded_per_rank():
    assert list(EvalSampler(5)) == [0, 1, 2, 3, 4]
    assert [list(EvalSampler(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3, 0]]


def test_loader_with_workers_gives_the_same_augmented_batches():
    dataset = build_dataset("synthetic", "train", {"synthetic_size": 64, "synthetic_train_images": 4},
                            build_transforms("cells", True))

    def batches(workers, epochs):
        """The batches of ``epochs``, each epoch from a new loader iterator."""
        sampler = TrainBatchSampler([0] * len(dataset), batch_size=2, seed=5)
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out += itertools.islice(train_loader(dataset, sampler, seed=5, workers=workers), len(sampler))
        return out

    def run(workers):
        """Epochs 1 and 2 from one iterator (the trainer's way: the workers start once)."""
        sampler = TrainBatchSampler([0] * len(dataset), batch_size=2, seed=5)
        sampler.set_epoch(1)
        return list(itertools.islice(train_loader(dataset, sampler, seed=5, workers=workers), 2 * len(sampler)))

    alone, with_workers, one_run = batches(0, [1, 2]), batches(2, [1, 2]), run(2)
    assert len(alone) == len(with_workers) == len(one_run) == 4
    assert not all(torch.equal(ta["boxes"], tb["boxes"]) for ta, tb in zip(alone[0][1], alone[2][1]))  # new draws
    for (images_a, targets_a, skipped_a), (images_b, targets_b, skipped_b) in [*zip(alone, with_workers),
                                                                               *zip(alone, one_run)]:
        assert skipped_a == skipped_b == ()
        for a, b, ta, tb in zip(images_a, images_b, targets_a, targets_b):
            # Same augmentation draws; pixel values agree to float rounding only, because a worker runs
            # one thread and reductions (ColorJitter's mean) sum in another order with several.
            assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, rtol=0, atol=1e-5)
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["boxes"], tb["boxes"])


# --- dataset options --------------------------------------------------------------------------------

def test_unknown_dataset_option_is_rejected_with_the_valid_keys():
    with pytest.raises(DatasetError, match=r"no option fodl .*synthetic_size, synthetic_train_images"):
        build_dataset("synthetic", "train", {"fodl": "1"})
    assert set(option_keys("sartorius")) >= {"data_path", "num_folds", "fold", "fill_holes"}
    assert check_options("sartorius", {"fold": "2", "fill_holes": "no", "data_path": None}) == {"fold": 2,
                                                                                              "fill_holes": False}
    with pytest.raises(DatasetError, match="option fold: expected int, got 'x'"):
        check_options("sartorius", {"fold": "x"})
    assert parse_option("val-path=/a=b") == ("val_path", "/a=b")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_option("fold")


def test_train_cli_names_an_unknown_dataset_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(tiny_args(tmp_path, "--dataset-option", "fodl=1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fodl" in err and "synthetic_size" in err


def test_fields_from_the_dataset_defaults_are_the_ones_no_flag_set():
    args = train.get_args_parser().parse_args(["--dataset", "synthetic", "--opt", "sgd", "--epochs", "3"])
    applied = train.applied_dataset_defaults(args)
    assert applied["batch_size"] == 4 and applied["lr_scheduler"] == "cosine"
    assert "epochs" not in applied and "opt" not in applied
    assert "lr" not in applied and "weight_decay" not in applied        # AdamW's values, and SGD was asked for
    config = train.config_from_args(args)
    assert config.epochs == 3 and config.batch_size == 4 and config.opt == "sgd"


# --- model options ------------------------------------------------------------------------------

def test_model_options_are_declared_and_checked_once():
    from engine.config import ConfigError, resolve_config
    from models import ModelOptions, build_model
    # TrainConfig inherits ModelOptions' fields: declaring one again would be a second owner.
    own = {f.name for f in dataclasses.fields(ModelOptions)}
    assert own <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert not own & set(TrainConfig.__dict__.get("__annotations__", {}))
    assert TrainConfig(min_size=64, box_nms_thresh=0.3).model_options() == ModelOptions(min_size=64, box_nms_thresh=0.3)
    # One check, as a flag error from train.py's config and as a ValueError from build_model.
    for bad, flag in (({"box_nms_thresh": 0.0}, "--box-nms-thresh"), ({"anchor_sizes": (8, 16)}, "--anchor-sizes"),
                      ({"trainable_backbone_layers": 6}, "--trainable-backbone-layers")):
        with pytest.raises(ConfigError, match=flag):
            resolve_config(bad, {})
        with pytest.raises(ValueError, match=flag):
            build_model("maskrcnn_resnet18_fpn", 2, ModelOptions(**bad))


# --- resume warning, metrics writer ---------------------------------------------------------------

def test_warn_config_changes_names_changed_options_only(caplog):
    config = TrainConfig()
    saved = config.to_dict()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.warn_config_changes(saved, dataclasses.replace(config, epochs=99, print_freq=3))
    assert not caplog.records                                            # epochs, print_freq may change
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.warn_config_changes(saved, dataclasses.replace(config, lr=0.5, batch_size=7))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"lr: {config.lr!r} → 0.5" in message and f"batch_size: {config.batch_size!r} → 7" in message
    # A checkpoint older than a field (anchor_ratios came with ModelOptions' fields) changed nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.warn_config_changes({k: v for k, v in saved.items() if k != "anchor_ratios"}, config)
    assert not caplog.records


class _ScoredValidation:
    """A stand-in for ``engine.evaluation.Validation`` whose score depends on the test scale."""

    def __init__(self, transform, scores: dict[float, float], images: int, calls: list):
        self.transform, self.scores, self.calls = transform, scores, calls
        self.loader = type("Loader", (), {"dataset": list(range(images))})()
        self.last_seconds = 10.0   # as if the validation at the training scale took 10 s

    def subset(self, max_images: int):
        return self if len(self.loader.dataset) <= max_images else _ScoredValidation(
            self.transform, self.scores, max_images, self.calls)

    def __call__(self, epoch: int) -> dict:
        self.calls.append((len(self.loader.dataset), self.transform.test_scale))
        score = self.scores[self.transform.test_scale]
        return {"coco": {"segm": {"AP": score, "AP50": score, "AP75": score}}}


@pytest.mark.parametrize("images", [4, 100])
def test_test_scale_search_keeps_the_best_factor_and_scores_it_on_the_whole_split(images):
    from engine.evaluation import TestScaleSearch
    from models.scale import ScaleTransform

    transform = ScaleTransform(2.0, [0.0] * 3, [1.0] * 3)
    calls: list = []
    validation = _ScoredValidation(transform, {2.0: 0.1, 2.5: 0.3, 3.0: 0.302}, images, calls)   # +0.7 %
    search = TestScaleSearch(validation, transform, "segm_AP", max_images=32)
    at_training_scale = validation(0)
    calls.clear()
    scale, _, report, numbers, _ = search(0, at_training_scale)
    assert scale == 2.5 and transform.test_scale == 2.5 and transform.scale == 2.0   # not 3.0: no gain over 2.5
    assert report["coco"]["segm"]["AP"] == 0.3 and numbers[1.0]["segm_AP"] == 0.1
    if images <= 32:     # the training-scale report is reused; the searched images are the split
        assert calls == [(images, 2.5), (images, 3.0)] and search.cost() == pytest.approx(1.25 ** 2 + 1.5 ** 2)
    else:                # 32 images searched at every scale, then the whole split at the chosen one
        assert calls == [(32, 2.0), (32, 2.5), (32, 3.0), (100, 2.5)]
        assert search.cost() == pytest.approx(32 / 100 * (1 + 1.25 ** 2 + 1.5 ** 2) + 1.5 ** 2)
    # A clear gain (+17 %) does choose the larger factor.
    validation.scores[3.0] = 0.35
    transform.test_scale = 2.0
    assert TestScaleSearch(validation, transform, "segm_AP", max_images=32)(0, at_training_scale)[0] == 3.0


def test_test_scale_search_tries_only_the_factors_that_fit_in_the_time_budget(caplog):
    """With a time budget's deadline the search stops before a factor whose evaluation would end
    after it (cost: the last validation's seconds × factor²); with none left it keeps the training
    scale and its report."""
    import time

    from engine.evaluation import TestScaleSearch
    from models.scale import ScaleTransform

    transform = ScaleTransform(1.0, [0.0] * 3, [1.0] * 3)
    calls: list = []
    validation = _ScoredValidation(transform, {1.0: 0.1, 1.25: 0.3, 1.5: 0.35}, 4, calls)
    at_training_scale = validation(0)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="engine.evaluation"):
        scale, _, report, numbers, _ = TestScaleSearch(validation, transform, "segm_AP")(0, at_training_scale,
                                                                                       time.time() + 12)
    assert calls == [] and scale == 1.0 and transform.test_scale == 1.0 and report is at_training_scale
    assert list(numbers) == [1.0] and "×1.25 and larger not tried" in caplog.text
    scale, _, _, numbers, _ = TestScaleSearch(validation, transform, "segm_AP")(0, at_training_scale, time.time() + 60)
    assert scale == 1.5 and sorted(numbers) == [1.0, 1.25, 1.5]


def test_metrics_writer_keeps_json_lines(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write({"type": "train", "loss": 1.5, "epoch": 0}, step=3)
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"type": "train", "loss": 1.5, "epoch": 0}
    off = MetricsWriter(tmp_path / "off", enabled=False)
    off.write({"loss": 1.0}, step=0)
    assert not (tmp_path / "off").exists()


def test_metrics_writer_mirrors_scalars_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard output is tested where tensorboard is installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write({"type": "val", "segm_AP": 0.25, "epoch": 1}, step=7)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["val/segm_AP"]
    (scalar,) = events.Scalars("val/segm_AP")
    assert scalar.step == 7 and scalar.value == pytest.approx(0.25)


def test_evaluation_estimate_prices_each_image_by_its_pixels_and_objects(monkeypatch):
    """``Validation.estimate_seconds`` (a time budget's reserve for the final evaluation) times
    the validation image with the most objects with the score threshold at 0 (a trained model's
    detection count, not an early one's) and with one detection; from the two it prices one
    detection and the image's pixels, and costs every image by its own size and objects (up to
    the cap); thresholds are restored. Without detections to go by, every image costs as the
    densest."""
    import types

    import engine.evaluation as evaluation

    heads = types.SimpleNamespace(score_thresh=0.05, detections_per_img=5)
    model = types.SimpleNamespace(roi_heads=heads)
    timed, kept = [], {"full": 21}

    def fake_time(model, dataset, coco_gt, device, max_dets, amp=False, index=0):
        timed.append((index, model.roi_heads.score_thresh, model.roi_heads.detections_per_img))
        return (1.0, 1) if model.roi_heads.detections_per_img == 1 else (3.0, kept["full"])

    monkeypatch.setattr(evaluation, "time_one_evaluation", fake_time)
    dataset = type("D", (), {"image_ids": [11, 12, 13], "__len__": lambda self: 3})()
    coco_gt = {"images": [{"id": 11, "width": 100, "height": 100}, {"id": 12, "width": 100, "height": 100},
                          {"id": 13, "width": 200, "height": 100}],
               "annotations": [{"image_id": i} for i in (11, 12, 12, 12, 13, 13)]}
    validation = evaluation.Validation(model, types.SimpleNamespace(dataset=dataset), coco_gt, None, 100)
    per_detection = (3.0 - 1.0) / (21 - 1)
    objects = {11: 1, 12: 3, 13: 2}
    cost = {i: (2.0 if i == 13 else 1.0) + per_detection * min(5, evaluation.DETECTIONS_PER_OBJECT * k)
            for i, k in objects.items()}
    margin, fixed = evaluation.EVAL_MARGIN, evaluation.EVAL_FIXED_SECONDS
    assert validation.estimate_seconds() == pytest.approx(sum(cost.values()) * margin + fixed)
    assert validation.estimate_seconds(3.5) == pytest.approx(sum(cost.values()) * 3.5 * margin + fixed)
    assert timed[:3] == [(1, 0.0, 5), (1, 0.0, 5), (1, 0.0, 1)]
    assert (heads.score_thresh, heads.detections_per_img) == (0.05, 5)

    timed.clear()
    kept["full"] = 0       # an untrained model that keeps nothing even at score 0
    assert validation.estimate_seconds() == pytest.approx(3 * 3.0 * margin + fixed)
    assert timed == [(1, 0.0, 5), (1, 0.0, 5)] and (heads.score_thresh, heads.detections_per_img) == (0.05, 5)


def test_resumed_optimizer_moments_take_the_channels_last_layout_of_the_weights():
    """Checkpoints from before the models were channels-last hold contiguous Adam moments; the
    fused kernel pairs elements by memory position, so ``match_state_layout`` (called by the
    trainer's ``load_state_dict``) gives them the weights' layout and the resumed step is exact."""
    import copy

    from engine.optim import match_state_layout

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(conv)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (conv, reference)]
    x = torch.randn(2, 4, 10, 10)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    for model, optimizer in zip((conv, reference), optimizers):
        step(model, optimizer)
    saved = optimizers[0].state_dict()
    for state in saved["state"].values():    # as an older checkpoint holds them
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == 4:
                state[key] = value.contiguous()
    optimizers[0].load_state_dict(saved)
    assert not optimizers[0].state[conv.weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert match_state_layout(optimizers[0]) == 2          # the weight's two moments
    assert optimizers[0].state[conv.weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for model, optimizer in zip((conv, reference), optimizers):
        step(model, optimizer)
    torch.testing.assert_close(conv.weight, reference.weight, rtol=0, atol=1e-6)
