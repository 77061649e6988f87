"""The Trainer itself, built directly around a one-parameter model: positions, epochs, evaluation
records, the best checkpoint and checkpoints written by older versions (seconds, no detector)."""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest
import torch

from engine.budget import FIXED_RESERVE, MARGIN
from engine.checkpoint import last_trained_epoch, load_checkpoint
from engine.config import TrainConfig
from engine.data import TrainBatchSampler, train_loader
from engine.distributed import DistInfo
from engine.optim import build_lr_scheduler, plan_schedule
from engine.trainer import Trainer, capture_rng

IMAGES, BATCH = 6, 2   # 3 iterations an epoch


class Toy(torch.nn.Module):
    """A loss from one weight and the images' means; remembers the image ids of every step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[list[int]] = []

    def forward(self, images, targets):
        self.seen.append([t["image_id"] for t in targets])
        means = torch.stack([image.mean() for image in images])
        return {"loss_toy": ((self.w * means).sum() - 1) ** 2}


class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return IMAGES

    def __getitem__(self, i):
        return torch.full((3, 4, 4), (i + 1) / 10), {"boxes": torch.zeros(0, 4), "image_id": i}


def report(ap: float) -> dict:
    return {"coco": {"segm": {"AP": ap, "AP50": ap, "AP75": ap}}, "sartorius": {"score": ap}}


def make_trainer(run_dir, total_iters=6, evaluate_fn=lambda epoch: report(0.5), after_step=(), workers=0,
                 max_time=None, eval_seconds=lambda: 0.0):
    config = TrainConfig(epochs=2, eval_every=1, batch_size=BATCH, print_freq=1, lr=0.1, weight_decay=0.0,
                         warmup_iters=0, model="maskrcnn_resnet18_fpn", workers=workers, max_time=max_time)
    sampler = TrainBatchSampler([0] * IMAGES, BATCH, config.seed)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    schedule = plan_schedule(config, len(sampler), total_iters, fixed=max_time is None)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config, model=model, model_without_ddp=model, optimizer=optimizer,
                   lr_scheduler=build_lr_scheduler(optimizer, schedule),
                   scaler=torch.amp.GradScaler("cuda", enabled=False), schedule=schedule, class_names=["cell"],
                   train_loader=train_loader(ToyData(), sampler, config.seed, workers), batch_sampler=sampler,
                   evaluate_fn=evaluate_fn, eval_seconds=eval_seconds, device=torch.device("cpu"),
                   dist_info=DistInfo(), run_dir=run_dir, after_step=after_step,
                   deadline=None if max_time is None else time.time() + max_time)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_last_trained_epoch_of_a_position():
    assert last_trained_epoch(0, 0) == -1      # nothing trained
    assert last_trained_epoch(1, 0) == 0       # the end of the first epoch
    assert last_trained_epoch(1, 2) == 1       # two batches into the second


@pytest.mark.parametrize("total_iters, aps, best_position", [
    (6, {0: 0.5, 1: 0.3}, (1, 0)),    # two whole epochs; the first scores best
    (4, {0: 0.3, 1: 0.5}, (1, 1)),    # the run ends one batch into the second epoch, which scores best
])
def test_epoch_is_a_0_based_index_in_evaluations_and_records(tmp_path, total_iters, aps, best_position):
    calls = []

    def evaluate_fn(epoch):
        calls.append(epoch)
        return report(aps[epoch])

    trainer = make_trainer(tmp_path, total_iters, evaluate_fn)
    trainer.train()
    assert calls == [0, 1]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    evals = [i for i, r in enumerate(records) if r["type"] == "eval"]
    assert [records[i]["epoch"] for i in evals] == [0, 1]
    # An evaluation row carries the epoch of the training rows it follows.
    assert all(records[i - 1]["type"] == "train" and records[i - 1]["epoch"] == records[i]["epoch"] for i in evals)
    assert json.loads((tmp_path / "eval_report.json").read_text())["epoch"] == 1
    last = load_checkpoint(tmp_path / "last.pth")
    assert (last["epoch"], last["iteration"]) == ((2, 0) if total_iters == 6 else (1, 1))
    best = load_checkpoint(tmp_path / "best.pth")
    assert (best["epoch"], best["iteration"]) == best_position and best["best_value"] == max(aps.values())
    assert last_trained_epoch(best["epoch"], best["iteration"]) == max(aps, key=aps.get)


@pytest.mark.parametrize("position", [(1, 0), (1, 2)])
def test_checkpoint_written_by_the_old_code_resumes_at_the_same_place(tmp_path, position):
    """A checkpoint dict shaped as the code before the epoch clean-up wrote it (the end of the
    first epoch, or two batches into the second: a SIGTERM) continues exactly as the
    uninterrupted run, with -j 2."""
    saved = {}

    def snapshot(trainer, epoch, batches_done):
        at = (epoch + 1, 0) if batches_done == trainer.iters_per_epoch else (epoch, batches_done)
        if at == position:
            saved.update(model=copy.deepcopy(trainer.model.state_dict()), global_step=trainer.global_step,
                         optimizer=copy.deepcopy(trainer.optimizer.state_dict()), rng=capture_rng(),
                         lr_scheduler=trainer.lr_scheduler.state_dict(), seen=len(trainer.model.seen),
                         schedule=trainer.schedule.to_dict())

    straight = make_trainer(tmp_path / "straight", after_step=[snapshot], workers=2)
    straight.train()
    old = {"model": saved["model"], "optimizer": saved["optimizer"], "lr_scheduler": saved["lr_scheduler"],
           "scaler": straight.scaler.state_dict(), "epoch": position[0], "iteration": position[1],
           "global_step": saved["global_step"], "rng": [saved["rng"]], "config": straight.config.to_dict(),
           "metrics": {}, "best_value": None, "nonfinite_total": 0, "bad_samples": {}, "class_names": ["cell"],
           "model_name": "maskrcnn_resnet18_fpn", "schedule": saved["schedule"]}
    assert old["global_step"] == position[0] * 3 + position[1]

    positions = []
    resumed = make_trainer(tmp_path / "resumed", after_step=[lambda t, e, b: positions.append((e, b))], workers=2)
    resumed.load_state_dict(old)
    resumed.train()
    assert resumed.model.seen == straight.model.seen[saved["seen"]:]
    assert positions[0] == (position[0], position[1] + 1) and positions[-1] == (1, 3)
    assert torch.equal(resumed.model.w, straight.model.w)
    assert (load_checkpoint(tmp_path / "resumed" / "last.pth")["epoch"], resumed.global_step) == (2, 6)


def test_after_step_hooks_see_every_step_and_can_stop_the_run(tmp_path):
    from engine.trainer import TrainingInterrupted
    calls = []

    def stop_at_second_batch(trainer, epoch, batches_done):
        calls.append((epoch, batches_done, trainer.global_step))
        if (epoch, batches_done) == (1, 2):
            trainer.request_stop()

    trainer = make_trainer(tmp_path, after_step=[stop_at_second_batch])
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert calls == [(0, 1, 1), (0, 2, 2), (0, 3, 3), (1, 1, 4), (1, 2, 5)]
    state = load_checkpoint(stopped.value.checkpoint)
    assert (state["epoch"], state["iteration"], state["global_step"]) == (1, 2, 5)


def test_a_final_evaluation_longer_than_the_budget_is_announced(tmp_path, caplog):
    """--max-time shorter than one evaluation (a large validation set on a CPU): the run says so
    when it fixes its length, with how late it will end and what to change, and still finishes."""
    trainer = make_trainer(tmp_path, total_iters=30, max_time=30.0, eval_seconds=lambda: 300.0)
    with caplog.at_level("WARNING", logger="trainer"):
        trainer.train()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "the final evaluation alone takes about 5m00s" in message and "--max-time" in message
    assert (tmp_path / "last.pth").exists()


@pytest.mark.parametrize("speed_ratio, replanned", [(1.0, False), (1.03, False), (0.92, True), (1.08, True)])
def test_the_budget_recheck_replans_when_the_speed_is_off_by_more_than_the_tolerance(tmp_path, speed_ratio,
                                                                                      replanned):
    """The first steps of a run are slower than the rest (start-up, a busy machine): a quarter into
    the run the speed is measured again and a difference above REPLAN_TOLERANCE (5 %) re-plans
    the length, so the budget is neither wasted nor overrun; a small one keeps the plan."""
    trainer = make_trainer(tmp_path, total_iters=100, max_time=1000.0)
    trainer.config = dataclasses.replace(trainer.config, epochs=None)   # the budget alone sets the length
    trainer._eval_reserve = 0.0
    trainer.global_step = 40
    trainer._plan_for_budget(1.0)                        # 1.0 s/step measured at step 40
    planned = trainer.schedule.total_iters
    # 20 steps later, taking speed_ratio × the measured time each.
    trainer._recheck_from = (40, time.time() - 20 * speed_ratio, 1.0)
    trainer.global_step = 60
    trainer._recheck_budget()
    expected = 60 + int((trainer.deadline - time.time() - FIXED_RESERVE) * (1 - MARGIN) / speed_ratio)
    if replanned:
        assert trainer.schedule.total_iters == pytest.approx(expected, abs=1) and trainer.schedule.fixed
        assert abs(trainer.schedule.total_iters - planned) > 0.03 * planned
    else:
        assert trainer.schedule.total_iters == planned
