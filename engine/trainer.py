"""The training loop.

Order inside an epoch boundary matters and is deliberate: the checkpoint is written before
evaluation, so a failing evaluation still leaves ``last.pth`` to debug or resume from.

Stopping (SIGTERM/SIGINT, to this process or its whole group, at any moment): the iteration
in progress finishes — or the evaluation, at an epoch boundary — then every rank agrees to
stop, ``last.pth`` is written at that position and ``TrainingInterrupted`` carries the signal
out (train.py exits 128 + signal). A repeat more than ``REPEAT_GRACE_S`` later exits at once:
every file is written atomically, so only the write in progress is lost. Data-loader workers
ignore both signals (engine/data.py).
"""
from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from engine import distributed
from engine.budget import REPLAN_TOLERANCE, StepTimer, budget_total_iters, format_duration
from engine.checkpoint import CheckpointError, save_checkpoint
from engine.config import TrainConfig
from engine.data import STOP_SIGNALS
from engine.evaluation import autocast_context, headline
from engine.logging import MetricLogger, MetricsWriter, plot_metrics
from engine.optim import Schedule, match_state_layout, plan_schedule
from utils.io import OutputError, remove_pending_temp_files, write_json_atomic

log = logging.getLogger("trainer")

# A repeated stop signal within this many seconds is the same request delivered twice (SLURM
# signals every process of a step, and a launcher such as torchrun forwards it as well).
REPEAT_GRACE_S = 2.0


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint at the current iteration was written."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def drop_degenerate_instances(target: dict) -> tuple[dict, int]:
    """Remove instances whose box has no width or height (torchvision's model raises on them).

    Datasets already drop these; this is the last line of defence against a transform or a
    custom dataset producing one. Returns the cleaned target and how many were dropped.
    """
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(boxes).all(dim=1)
    dropped = int((~keep).sum())
    if dropped == 0:
        return target, 0
    n = len(boxes)
    return {k: v[keep] if torch.is_tensor(v) and v.ndim >= 1 and len(v) == n else v
            for k, v in target.items()}, dropped


class Trainer:
    """One model, one optimizer, one data source; evaluation is the caller's ``evaluate_fn``.

    The run is ``schedule.total_iters`` iterations long (the last epoch may be partial); with a
    ``deadline`` (``--max-time``) that number is fixed after the first measured steps.

    ``epoch`` is a 0-based epoch index everywhere in the code, records included (``metrics.jsonl``,
    ``eval_report.json``, the checkpoint); only log text counts from 1 ("epoch N/M", N = epoch + 1).
    The training position is ``(epoch, iteration)``: the epoch in progress and the batches of it
    already done, which is what a checkpoint stores; the end of epoch ``e`` is ``(e + 1, 0)``.

    Arguments are keyword-only, by job:

    - what is trained and checkpointed: ``model`` (DDP-wrapped under torchrun), its
      ``model_without_ddp``, ``optimizer``, ``lr_scheduler``, AMP ``scaler``, the LR ``schedule``
      (``engine.optim``), and ``class_names`` (the checkpoint records them for inference);
    - the data: ``train_loader`` over ``batch_sampler`` (``engine.data``, resumable by epoch);
    - evaluation (Detectron2's EvalHook shape): ``evaluate_fn(epoch) -> report`` evaluates the
      model after (the last iteration of) epoch ``epoch``, returning the report of
      ``metrics.evaluate_predictions``, the same on every rank; ``eval_seconds()`` estimates one
      call's seconds on this rank, for ``--max-time`` (``engine.evaluation.Validation`` is both);
    - where: ``device``, ``dist_info`` (``engine.distributed``), ``run_dir`` (checkpoints,
      ``metrics.jsonl``, ``eval_report.json``), and ``deadline`` (``time.time()`` by which the
      run must end, or None);
    - ``after_step``: hooks called as ``hook(trainer, epoch, batches_done)`` after every step
      (all ranks), before the stop check, so a hook may ``request_stop()`` at a chosen position.
    """

    def __init__(self, config: TrainConfig, *,
                 model: torch.nn.Module, model_without_ddp: torch.nn.Module, optimizer, lr_scheduler, scaler,
                 schedule: Schedule, class_names: list[str],
                 train_loader, batch_sampler,
                 evaluate_fn: Callable[[int], dict], eval_seconds: Callable[[], float],
                 device: torch.device, dist_info: distributed.DistInfo, run_dir: Path, deadline: float | None = None,
                 after_step: Iterable[Callable[[Trainer, int, int], None]] = ()):
        self.config = config
        self.schedule = schedule
        self.deadline = deadline
        self.timer = StepTimer(len(batch_sampler))
        self._eval_reserve: float | None = None
        self._recheck_at: int | None = None
        self._recheck_from: tuple = ()
        self.model = model
        self.model_without_ddp = model_without_ddp
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaler = scaler
        self.train_loader = train_loader
        self.batch_sampler = batch_sampler
        self.evaluate_fn = evaluate_fn
        self.eval_seconds = eval_seconds
        self.class_names = class_names
        self.device = device
        self.dist = dist_info
        self.run_dir = run_dir
        self.after_step = list(after_step)
        self.writer = MetricsWriter(run_dir, enabled=dist_info.is_main)
        self.start_epoch = 0
        self.start_iteration = 0
        self.global_step = 0
        self.best_value: float | None = None
        self.last_metrics: dict = {}
        self.nonfinite_total = 0
        self.degenerate_total = 0
        self._consecutive_nonfinite = 0
        self._stop_signal: int | None = None
        self._stop_time = 0.0
        self._eval_estimate: float | None = None
        self.bad_samples: dict[str, int] = {}   # message naming a skipped sample/annotation → times skipped
        self._pending_bad: list[str] = []
        # The run's one iterator over ``train_loader`` (endless: engine.data.RunBatches) and the
        # position its next batch belongs to; dropped when the run ends, which stops the workers.
        self._batches = None
        self._batches_at: tuple[int, int] | None = None

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, epoch: int, iteration: int) -> dict:
        """The checkpoint at position ``(epoch, iteration)`` (0-based epoch in progress, batches of it
        done): model, optimizer, LR scheduler, AMP scaler, every rank's RNG state (a collective:
        every rank calls it), the run's config and LR plan, the latest metrics and best value, the
        bad-sample counts and the class names. Tensors and plain Python only, so
        ``torch.load(weights_only=True)`` reads it."""
        return {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "global_step": self.global_step,
            "rng": distributed.all_gather_objects(capture_rng()),  # one entry per rank
            "config": self.config.to_dict(),
            "metrics": self.last_metrics,
            "best_value": self.best_value,
            "nonfinite_total": self.nonfinite_total,
            "bad_samples": self.bad_samples,
            "class_names": self.class_names,
            "model_name": self.config.model,
            "schedule": self.schedule.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint of ``state_dict``: weights and optimizer state, the position
        (``start_epoch``, ``start_iteration``) and step count, metrics, best value and bad-sample
        counts, the stored LR plan (unless ``--epochs`` changed the run's length) and this rank's
        RNG state (re-seeded, with a warning, when the number of processes changed). Checkpoints
        of older versions (without ``global_step``, ``schedule`` or the counters) load too."""
        self.model_without_ddp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        match_state_layout(self.optimizer)   # moments saved before the models were channels-last
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_iteration = int(state["epoch"]), int(state["iteration"])
        self.global_step = int(state.get("global_step", 0))
        self.best_value = state.get("best_value")
        self.last_metrics = state.get("metrics", {})
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.bad_samples = dict(state.get("bad_samples", {}))
        self._restore_schedule(state.get("schedule"))
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            log.warning("checkpoint holds RNG states of %d processes, this run has %d: random streams are "
                        "re-seeded, so the continuation is not bit-identical", len(rng), self.dist.world_size)
            torch.manual_seed(self.config.seed + 7919 * self.dist.rank + self.start_epoch)

    def save(self, name: str, epoch: int, iteration: int) -> Path:
        """Write checkpoint ``name`` (rank 0). A refused write (full disk, read-only folder)
        raises ``OutputError`` on every rank, saying what survives and how to go on."""
        state = self.state_dict(epoch, iteration)  # every rank joins the RNG gather
        path = self.run_dir / name
        failure = None
        if self.dist.is_main:
            try:
                save_checkpoint(path, state)
            except (OutputError, CheckpointError) as exc:
                after = (f"resume from {path} (--resume auto) once it can be written" if path.is_file() else
                         "no checkpoint of this run exists yet")
                failure = (getattr(exc, "errno", None) or errno.EIO,
                           f"{exc}. Training stopped at epoch {epoch + 1}, iteration {iteration}; {after}")
        failure = distributed.broadcast_object(failure)   # also keeps the ranks in step
        if failure is not None:
            raise OutputError(failure[0], failure[1], path)
        return path

    # -- signals ----------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current iteration, writing a checkpoint (what SIGTERM/SIGINT do)."""
        self._stop_signal = signum
        self._stop_time = time.monotonic()

    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is None:
                log.warning("signal %d received: finishing this iteration, then saving a checkpoint "
                            "(send it again to exit at once)", signum)
                self.request_stop(signum)
            elif time.monotonic() - self._stop_time > REPEAT_GRACE_S:
                log.warning("signal %d received again: exiting now, without a checkpoint at this iteration; "
                            "%s keeps the last one written", signum, self.run_dir / "last.pth")
                remove_pending_temp_files()
                os._exit(128 + signum)

        for sig in STOP_SIGNALS:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (a collective: every rank calls it at the same point)."""
        return distributed.any_rank(self._stop_signal is not None, self.device)

    def _restore_schedule(self, saved: dict | None) -> None:
        """A resumed run keeps its stored plan: always when a budget fixed it, and otherwise
        unless the run was lengthened or shortened (``--epochs``), which re-plans the curve."""
        if not saved:
            log.warning("checkpoint has no stored LR schedule (older format): planning it from the flags")
            return
        stored = Schedule.from_dict(saved)
        if not stored.fixed and self.config.max_time is not None and self.deadline is None:
            # Stopped before the budget fixed the length: the resumed run measures and fixes it,
            # with the full budget from now.
            self.deadline = time.time() + self.config.max_time
            log.warning("the checkpoint's time-budgeted run stopped before its length was fixed: this run "
                        "gets %s from now", format_duration(self.config.max_time))
            return
        budgeted = self.deadline is not None or (stored.fixed and self.config.max_time is not None)
        if budgeted and stored.fixed:
            self._set_schedule(stored)
        elif stored.total_iters == self.schedule.total_iters:
            self._set_schedule(stored)
        else:
            log.warning("the checkpoint's run was %d iterations, this one is %d: the LR schedule is re-planned "
                        "(%s)", stored.total_iters, self.schedule.total_iters, self.schedule.describe(self.config.lr))

    def _set_schedule(self, schedule: Schedule) -> None:
        # The LambdaLR reads self.schedule's fields at every step: update in place.
        for key, value in vars(schedule).items():
            setattr(self.schedule, key, value)

    @property
    def iters_per_epoch(self) -> int:
        return len(self.batch_sampler)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.schedule.total_iters / self.iters_per_epoch)

    def _eval_every(self) -> int:
        """Epochs between evaluations: the flag, else about four per run (only the final one when
        a time budget is set: evaluation time is better spent training)."""
        if self.config.eval_every is not None:
            return self.config.eval_every
        if self.config.max_time is not None:
            return 0
        return max(1, math.ceil(self.num_epochs / 4))

    # -- loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to ``schedule.total_iters``; return the final evaluation report (may be empty)."""
        previous = self._install_signal_handlers()
        report: dict = {}
        log.info("%s", self.schedule.describe(self.config.lr) if self.schedule.fixed else
                 f"time budget {format_duration(self.config.max_time)}: the run length is fixed after "
                 f"measuring the first steps")
        try:
            epoch, start_iter = self.start_epoch, self.start_iteration
            if self.global_step >= self.schedule.total_iters:
                log.info("nothing to train: the checkpoint is already at iteration %d of %d", self.global_step,
                         self.schedule.total_iters)
            while self.global_step < self.schedule.total_iters:
                batches_done = self.train_one_epoch(epoch, start_iter)
                start_iter = 0
                finished = self.global_step >= self.schedule.total_iters
                epoch_done = batches_done >= self.iters_per_epoch
                if finished:
                    self._close_batches()   # the workers' memory is free for the final evaluation
                if finished and not epoch_done:
                    log.info("training ends at iteration %d (batch %d of epoch %d), as planned", self.global_step,
                             batches_done, epoch + 1)
                position = (epoch + 1, 0) if epoch_done else (epoch, batches_done)
                path = self.save("last.pth", *position)
                every = self._eval_every()
                if finished or (every and epoch_done and (epoch + 1) % every == 0):
                    report = self.evaluate(epoch)
                    self._maybe_save_best(*position)
                    self.save("last.pth", *position)  # again, now holding the metrics and best value
                if not finished and self._stop_requested():   # it came during the save or the evaluation
                    log.warning("stopping at the start of epoch %d; continue with --resume %s", position[0] + 1,
                                path)
                    raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, path)
                epoch = position[0]
            self._summarise_bad_samples()
        finally:
            self._close_batches()
            for sig, h in previous.items():
                signal.signal(sig, h)
            self.writer.close()
            if self.dist.is_main:
                try:
                    plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "metrics.png")
                except OSError as exc:   # a full disk must not hide why training stopped
                    log.warning("metrics plot not written: %s", exc)
                    plot = None
                if plot:
                    log.info("plot of losses and metrics: %s", plot)
        return report

    def train_one_epoch(self, epoch: int, start_iter: int) -> int:
        """Train from batch ``start_iter`` of ``epoch`` to its end or to the run's last iteration;
        return the number of batches of this epoch done."""
        c = self.config
        self.model.train()
        total = self.iters_per_epoch
        logger = MetricLogger(self.device, c.print_freq, header=f"epoch {epoch + 1}/{self.num_epochs}")
        batches_done = start_iter
        batches = itertools.islice(self._run_batches(epoch, start_iter), total - start_iter)
        for images, targets, skipped in logger.log_every(batches, total, start=start_iter):
            self._pending_bad.extend(skipped)
            images = [img.to(self.device, non_blocking=True) for img in images]
            targets = [self._clean_target(t) for t in targets]
            with autocast_context(self.device, c.amp):
                loss_dict = self.model(images, targets)
            losses = sum(loss_dict.values())
            reduced = distributed.reduce_mean_dict({k: v.detach() for k, v in loss_dict.items()})
            loss_value = float(sum(reduced.values()))

            self.optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss_value):
                self._consecutive_nonfinite = 0
                self.scaler.scale(losses).backward()
                if c.clip_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self._skip_nonfinite(loss_value, reduced, epoch, batches_done)
            self.lr_scheduler.step()
            batches_done += 1
            self.global_step += 1

            lr = self.optimizer.param_groups[0]["lr"]
            logger.update(loss=loss_value, lr=lr, **{k: float(v) for k, v in reduced.items()})
            last_step = self.global_step >= self.schedule.total_iters
            if self.global_step % c.print_freq == 0 or batches_done == total or last_step:
                self._report_bad_samples()
                bad = {"bad_samples": len(self.bad_samples)} if self.bad_samples else {}
                self.writer.write({"type": "train", "epoch": epoch, "iteration": batches_done,
                                   "step": self.global_step, "lr": lr, "loss": loss_value,
                                   **{k: float(v) for k, v in reduced.items()}, **bad, "time": time.time()},
                                  self.global_step)
            for hook in self.after_step:
                hook(self, epoch, batches_done)
            if self._stop_requested():
                path = self.save("last.pth", epoch, batches_done)
                log.warning("saved %s at epoch %d, iteration %d/%d; continue with --resume %s", path,
                            epoch + 1, batches_done, total, path)
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, path)
            self._track_time()
            if self.global_step >= self.schedule.total_iters and batches_done < total:
                break   # the run ends inside this epoch (a time budget chose its length)
        self._batches_at = (epoch + 1, 0) if batches_done >= total else (epoch, batches_done)
        return batches_done

    def _run_batches(self, epoch: int, start_iter: int):
        """The run's batch iterator, positioned at batch ``start_iter`` of ``epoch``: the one
        already running when it stands there (the workers keep going across epochs), else a new one."""
        if self._batches is None or self._batches_at != (epoch, start_iter):
            self._close_batches()
            self.batch_sampler.set_epoch(epoch, start_iter)
            self._batches = iter(self.train_loader)
        return self._batches

    def _close_batches(self) -> None:
        """Stop the run's workers now. Dropping the iterator is not enough: when a stop signal ends
        the run, the exception's frames keep it alive until the interpreter exits, whose exit
        handler then waits forever on workers that ignore SIGTERM (engine.data)."""
        batches, self._batches, self._batches_at = self._batches, None, None
        shutdown = getattr(batches, "_shutdown_workers", None)   # torch's multi-process loader iterator
        if shutdown is not None:
            shutdown()

    # -- run length -------------------------------------------------------------------------
    def _track_time(self) -> None:
        """After the first measured steps: fix the run length (with a budget) and print the ETA;
        later, with a budget, stop early if the machine slowed down."""
        self.timer.step_done()
        if self.timer.just_measured:
            seconds = self.timer.seconds_per_step()
            if self.deadline is not None and not self.schedule.fixed:
                self._fix_budget(seconds)
            remaining = (self.schedule.total_iters - self.global_step) * seconds
            log.info("%.2f s/step: %d iterations left (%d epochs of %d), training ends in about %s; the whole "
                     "run (with evaluations) in about %s", seconds, self.schedule.total_iters - self.global_step,
                     self.num_epochs, self.iters_per_epoch, format_duration(remaining),
                     format_duration(remaining + self._estimate_eval_seconds() * (1 + self._evaluations_left())))
        elif self.deadline is not None and self._recheck_at is not None and self.global_step >= self._recheck_at:
            self._recheck_budget()
        elif self.deadline is not None and self.schedule.fixed and self._eval_reserve is not None:
            late = time.time() > self.deadline - self._eval_reserve
            if distributed.any_rank(late, self.device) and self.global_step < self.schedule.total_iters:
                log.warning("the time budget is nearly spent (this machine got slower than measured): training "
                            "stops at iteration %d of %d to leave time for the final evaluation",
                            self.global_step, self.schedule.total_iters)
                self.schedule.total_iters = self.global_step

    def _evaluations_left(self) -> int:
        every = self._eval_every()
        if not every:
            return 0
        done_epochs = self.global_step // self.iters_per_epoch
        return max(0, (self.num_epochs - 1) // every - done_epochs // every)

    def _fix_budget(self, seconds_per_step: float) -> None:
        reserve = self._estimate_eval_seconds()
        self._eval_reserve = reserve
        left = self.deadline - time.time()
        if reserve >= left:
            log.warning("time budget %s: the final evaluation alone takes about %s, more than the %s left; the "
                        "run trains one more step and ends about %s late. Give a longer --max-time, or validate on "
                        "fewer images (--val-path, --val-fraction)", format_duration(self.config.max_time),
                        format_duration(reserve), format_duration(max(left, 0.0)),
                        format_duration(reserve - left + seconds_per_step))
        self._plan_for_budget(seconds_per_step)
        log.info("time budget: %.2f s/step measured, final evaluation estimated at %s → %s", seconds_per_step,
                 format_duration(reserve), self.schedule.describe(self.config.lr))
        # One re-check after a quarter of the rest: a few steps measured on a machine that was
        # briefly busy (or idle) must not decide the whole run.
        self._recheck_at = self.global_step + max(10, (self.schedule.total_iters - self.global_step) // 4)
        self._recheck_from = (self.global_step, time.time(), seconds_per_step)

    def _plan_for_budget(self, seconds_per_step: float) -> None:
        total = budget_total_iters(self.global_step, seconds_per_step, self.deadline, self._eval_reserve)
        if self.config.epochs is not None:
            total = min(total, self.config.epochs * self.iters_per_epoch)
        total = distributed.broadcast_object(total)   # every rank stops at the same iteration
        self._set_schedule(plan_schedule(self.config, self.iters_per_epoch, total, fixed=True))

    def _recheck_budget(self) -> None:
        self._recheck_at = None
        step0, time0, measured = self._recheck_from
        seconds = distributed.broadcast_object((time.time() - time0) / max(self.global_step - step0, 1))
        if abs(seconds / measured - 1) > REPLAN_TOLERANCE:
            before = self.schedule.total_iters
            self._plan_for_budget(seconds)
            if self.schedule.total_iters != before:   # not when --epochs caps the length either way
                log.warning("time budget: the steps take %.2f s, not the %.2f s first measured: the run is "
                            "re-planned from %d to %d iterations (%s)", seconds, measured, before,
                            self.schedule.total_iters, self.schedule.describe(self.config.lr))

    def _estimate_eval_seconds(self) -> float:
        """Seconds one evaluation will take (rank 0's estimate, so every rank plans alike), measured
        once, outside the training RNG streams."""
        if self._eval_estimate is None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                seconds = self.eval_seconds()
            self.model.train()
            self._eval_estimate = distributed.broadcast_object(seconds)
        return self._eval_estimate

    def _report_bad_samples(self) -> None:
        """Count and name (rank 0's log) what the data loaders skipped since the last call, on
        every rank: workers' own counts never reach the main process. A collective."""
        pending, self._pending_bad = self._pending_bad, []
        for messages in distributed.all_gather_objects(pending):
            for message in messages:
                if message not in self.bad_samples and self.dist.is_main:
                    log.warning("skipped (--skip-bad): %s [%d different so far]", message, len(self.bad_samples) + 1)
                self.bad_samples[message] = self.bad_samples.get(message, 0) + 1

    def _summarise_bad_samples(self) -> None:
        if self.bad_samples:
            shown = list(self.bad_samples)[:10]
            more = len(self.bad_samples) - len(shown)
            log.warning("%d bad sample(s)/annotation(s) skipped during training (--skip-bad), %d times in all: %s%s",
                        len(self.bad_samples), sum(self.bad_samples.values()), "; ".join(shown),
                        f"; … ({more} more in train.log)" if more else "")

    def _clean_target(self, target: dict) -> dict:
        target, dropped = drop_degenerate_instances(target)
        if dropped:
            self.degenerate_total += dropped
            log.warning("dropped %d instance(s) with empty or non-finite boxes from image %s (%d so far)",
                        dropped, target.get("image_id"), self.degenerate_total)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in target.items()}

    def _skip_nonfinite(self, loss_value: float, reduced: dict, epoch: int, batches_done: int) -> None:
        self._consecutive_nonfinite += 1
        self.nonfinite_total += 1
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in reduced.items())
        log.warning("non-finite loss %s at epoch %d iteration %d (%s): step skipped (%d in a row, %d in total)",
                    loss_value, epoch + 1, batches_done + 1, parts, self._consecutive_nonfinite, self.nonfinite_total)
        if self._consecutive_nonfinite >= self.config.max_nonfinite:
            raise TrainingDiverged(
                f"{self._consecutive_nonfinite} consecutive non-finite losses: training stopped. Likely causes: "
                f"a learning rate too high for this batch size (--lr {self.config.lr}; try lowering it or "
                f"longer --warmup-iters), AMP overflow (try without --amp), or bad boxes/masks in the data "
                f"(check it with tools/check_dataset.py). The last good checkpoint is {self.run_dir / 'last.pth'}.")

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict:
        """``evaluate_fn(epoch)``, recorded: headline numbers logged and in ``metrics.jsonl``, the
        report in ``eval_report.json``, both with ``epoch``: the 0-based index of the epoch trained
        last (-1: none; see ``engine.checkpoint.last_trained_epoch``)."""
        # Evaluation must not consume the training RNG streams, or a resumed run would diverge.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            report = self.evaluate_fn(epoch)
        self.last_metrics = headline(report)
        log.info("validation after epoch %d/%d: %s", epoch + 1, self.num_epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items()))
        self.writer.write({"type": "eval", "epoch": epoch, "step": self.global_step, **self.last_metrics,
                           "time": time.time()}, self.global_step)
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "eval_report.json", {"epoch": epoch, **report})
        return report

    def _maybe_save_best(self, epoch: int, iteration: int) -> None:
        """Keep the checkpoint at position ``(epoch, iteration)`` as ``best.pth`` if its metric is the best yet."""
        value = self.last_metrics.get(self.config.best_metric)
        if value is None:
            return
        if self.best_value is None or value > self.best_value:
            self.best_value = value
            self.save("best.pth", epoch, iteration)
            log.info("new best %s %.4f → %s", self.config.best_metric, value, self.run_dir / "best.pth")
