"""Data loaders whose sample order and augmentation are functions of (seed, epoch, index).

That makes them resumable mid-epoch (skip the batches already done) and the same whatever
the number of workers: the batch sampler yields ``(index, epoch)`` keys and ``SeededDataset``
seeds the random generators from them before calling the transforms.

Workers ignore SIGTERM/SIGINT: stopping is the main process's job (engine/trainer.py finishes
the iteration and writes a checkpoint, which needs the workers alive), and a signal to the
whole process group (``timeout``, SLURM, Kubernetes, Ctrl-C) reaches the workers as well.
"""
from __future__ import annotations

import math
import random
import signal
import zlib
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.errors import DatasetError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def collate(batch):
    """A batch is (images, targets) tuples: detection images keep their own sizes."""
    return tuple(zip(*batch))


def _key_seed(seed: int, epoch: int, index: int) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode()) & 0x7FFFFFFF


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, epoch)`` is augmented identically on every run.

    torch's, numpy's and Python's global generators are seeded from (seed, epoch, index) for
    the call and restored afterwards, so the caller's random state is not disturbed.

    An item is ``(image, target, skipped)``. With ``skip_bad``, a sample that fails to load
    (``DatasetError``: a file damaged after indexing) is replaced by the next loadable one,
    ``index + 1, index + 2, …``, with the same seed, so batches keep their size, ranks stay in
    step and the run stays reproducible. ``skipped`` carries the messages of what was left
    out — failed samples and the annotations the dataset itself skipped (its ``log``, a
    ``BadInputLog``) — because a worker's own counts never reach the main process.
    """

    def __init__(self, dataset: Dataset, seed: int, skip_bad: bool = False):
        self.dataset = dataset
        self.seed = seed
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = _key_seed(self.seed, epoch, index)
        bad_input_log = getattr(self.dataset, "log", None)
        seen = len(bad_input_log.skipped) if bad_input_log is not None else 0
        failed: list[str] = []
        n = len(self.dataset)
        for attempt in range(n):
            try:
                image, target = self._load_seeded((index + attempt) % n, s)
                break
            except DatasetError as exc:
                if not self.skip_bad:
                    raise
                failed.append(str(exc))
        else:
            raise DatasetError(f"none of the {n} training samples could be loaded; the first failure: {failed[0]}")
        left_out = bad_input_log.skipped[seen:] if bad_input_log is not None else []
        return image, target, (*left_out, *failed)

    def _load_seeded(self, index: int, s: int):
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], group_factor: int) -> list[int]:
    """Group id per image: aspect ratio (w/h) bins, 2·group_factor+1 of them, log-spaced in [0.5, 2].

    Batches drawn from one group need little padding. ``group_factor < 0`` puts all in one group.
    """
    if group_factor < 0:
        return [0] * len(sizes)
    bins = np.logspace(-1, 1, 2 * group_factor + 1, base=2.0) if group_factor > 0 else np.array([1.0])
    ratios = np.array([w / h for h, w in sizes], dtype=np.float64)
    return np.digitize(ratios, bins).tolist()


class TrainBatchSampler(Sampler):
    """Shuffled, sharded over ranks, grouped by aspect ratio, deterministic per epoch, resumable.

    Every rank gets ``ceil(ceil(M / world) / batch_size)`` batches, so ranks never wait on each
    other at the end of an epoch. ``M`` is the dataset size ``N``, or for a tiny dataset as many
    passes over it (each freshly shuffled) as give every rank at least ``min_batches`` batches:
    three images would otherwise make epochs of two steps, each paying for loader start-up,
    a checkpoint and an evaluation. ``start_batch`` skips batches already trained (for resume;
    it applies to the first epoch iterated only).
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 min_batches: int = 1):
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        n = max(len(self.groups), 1)
        self.passes = max(1, math.ceil(min_batches * batch_size * world_size / n))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        order = [i for _ in range(self.passes) for i in torch.randperm(len(self.groups), generator=g).tolist()]
        per_rank = math.ceil(len(order) / self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad by repeating, as DistributedSampler
        return order[self.rank::self.world_size]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the one set by ``set_epoch``), whole."""
        full, buffers = [], {}
        for index in self._shard(self.epoch if epoch is None else epoch):
            buf = buffers.setdefault(self.groups[index], [])
            buf.append(index)
            if len(buf) == self.batch_size:
                full.append(buf)
                buffers[self.groups[index]] = []
        leftover = [i for buf in buffers.values() for i in buf]
        full += [leftover[k:k + self.batch_size] for k in range(0, len(leftover), self.batch_size)]
        return full

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.passes * len(self.groups) / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """The set epoch's batches from ``start_batch``, as ``(index, epoch)`` keys."""
        return self.epoch_keys(self.epoch, self.start_batch)

    def epoch_keys(self, epoch: int, start_batch: int = 0) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches(epoch)[start_batch:]:
            yield [(i, epoch) for i in batch]


class RunBatches(Sampler):
    """Every epoch's batches of ``sampler``, one epoch after another without end, starting at
    the sampler's ``(epoch, start_batch)`` when iteration begins.

    One loader iterator then serves the whole run: the workers start once and load the next
    epoch's first batches while this epoch's last ones train. Restarting them at every epoch
    cost about 2 s per epoch on a 2-core CPU (MoNuSeg: 29 epochs of 19 steps in a 20-minute
    budget). The consumer takes ``len(sampler)`` batches per epoch and shuts the workers down
    when the run ends (``Trainer._close_batches``); Detectron2's training sampler is endless too.
    """

    def __init__(self, sampler: TrainBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.sampler.epoch, self.sampler.start_batch
        if len(self.sampler) == 0:
            return
        while True:
            yield from self.sampler.epoch_keys(epoch, start)
            epoch, start = epoch + 1, 0


class EvalSampler(Sampler):
    """In-order shard of ``range(N)`` for this rank, padded by repetition like DistributedSampler."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        per_rank = math.ceil(length / world_size)
        order = list(range(length))
        order += order[: per_rank * world_size - length]
        self.indices = order[rank::world_size]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def collate_train(batch):
    """``(images, targets, skipped)``: ``skipped`` joins the batch's ``SeededDataset`` messages."""
    images, targets, skipped = zip(*batch)
    return images, targets, tuple(message for messages in skipped for message in messages)


def collate_without_masks(batch):
    """Evaluation needs the images and image ids only (ground truth comes from ``coco_gt()``):
    dropping the ``N×H×W`` masks in the worker saves moving them through shared memory."""
    images, targets = collate(batch)
    return images, tuple({k: v for k, v in t.items() if k != "masks"} for t in targets)


def _worker_init(worker_id: int) -> None:
    # The stop signals are the main process's (module docstring). They were blocked while this
    # worker was created (StopSignalSafeLoader): ignoring them first drops any that arrived
    # meanwhile, then they are unblocked.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # Each worker uses one thread: N workers × default threads oversubscribes small machines.
    torch.set_num_threads(1)


class StopSignalSafeLoader(DataLoader):
    """A DataLoader whose workers start with SIGTERM/SIGINT blocked (a new process inherits
    the mask), so that a signal arriving while they start cannot kill one before
    ``_worker_init`` makes it ignore them. Workers end when the main process shuts them down,
    or, if it dies, when torch's worker watchdog sees their parent gone (within seconds)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()   # starts the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def train_loader(dataset: Dataset, batch_sampler: TrainBatchSampler, seed: int, workers: int,
                 skip_bad: bool = False) -> DataLoader:
    """Batches ``(images, targets, skipped)`` of every epoch from ``batch_sampler``'s
    ``(epoch, start_batch)`` on, without end (``RunBatches``): iterate it once per run and take
    ``len(batch_sampler)`` batches per epoch. See ``SeededDataset`` for ``skip_bad``."""
    # The loader's own generator keeps worker seeding off the global RNG, whose state the
    # checkpoint restores: creating an iterator must not shift the training random stream.
    return StopSignalSafeLoader(SeededDataset(dataset, seed, skip_bad), batch_sampler=RunBatches(batch_sampler),
                                num_workers=workers, collate_fn=collate_train,
                                worker_init_fn=_worker_init if workers else None, persistent_workers=False,
                                generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    return StopSignalSafeLoader(dataset, batch_size=batch_size, sampler=EvalSampler(len(dataset), rank, world_size),
                                num_workers=workers, collate_fn=collate_without_masks,
                                worker_init_fn=_worker_init if workers else None)
