"""The bounded queue between HTTP requests and the one model.

``capacity`` requests at most are admitted at a time (uploading, waiting, or in the model);
one more gets 503 at once, before its body is read. Waiting uploads sit on disk, not in memory.
One worker thread takes up to ``batch_size`` waiting images of the same TTA setting and runs
them through ``Predictor.predict_paths`` in one forward pass, so the decoded images and model
activations in memory never exceed one batch, however many clients upload at once.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from pathlib import Path

from utils.image_files import ImageReadError


class QueueFull(Exception):
    """Every admission slot is taken; the message says how many and what to do."""


@dataclass(eq=False)
class Job:
    path: Path                        # the upload on disk (random name, suffix from its content)
    name: str                         # output name (image id of the COCO/Kaggle rows)
    tta: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class Slot:
    """One admitted request; leaving its ``with`` block frees the slot."""

    def __init__(self, queue: "InferenceQueue"):
        self._queue = queue

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self._queue._release()


@dataclass
class QueueStats:
    admitted: int = 0                 # requests holding a slot now
    waiting: int = 0                  # images waiting for the model now
    in_model: int = 0                 # images in the model now
    peak_in_model: int = 0
    peak_admitted: int = 0
    completed: int = 0
    failed: int = 0                   # images the predictor could not read
    rejected: int = 0                 # requests turned away with 503


class InferenceQueue:
    """``predictors[tta]``: the ``Predictor`` for each TTA setting (sharing one model)."""

    def __init__(self, predictors: dict, capacity: int = 64, batch_size: int = 1):
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"queue capacity and batch size must be ≥ 1, got {capacity} and {batch_size}")
        self.predictors, self.capacity, self.batch_size = predictors, capacity, batch_size
        for predictor in predictors.values():
            predictor.batch_size = batch_size
        self.stats = QueueStats()
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for job in self._jobs:
            self._resolve(job, None, RuntimeError("the server is shutting down"))
        self._jobs.clear()

    # ------------------------------------------------------------------------- requests

    def admit(self) -> "Slot":
        """Take one of the ``capacity`` slots now (``QueueFull`` if none is free); the returned
        ``Slot`` gives it back when its ``with`` block ends."""
        with self._cond:
            if self.stats.admitted >= self.capacity:
                self.stats.rejected += 1
                raise QueueFull(f"the server is busy with {self.stats.admitted} uploads (its limit, "
                                f"serve.py --queue-size); try again in a moment")
            self.stats.admitted += 1
            self.stats.peak_admitted = max(self.stats.peak_admitted, self.stats.admitted)
        return Slot(self)

    def _release(self) -> None:
        with self._cond:
            self.stats.admitted -= 1

    async def predict(self, path: Path, name: str, tta: bool):
        """Predict the image at ``path`` → ``Prediction``; ``ImageReadError`` when it cannot be
        decoded (the message names the file by ``name``, never by its path on disk)."""
        loop = asyncio.get_running_loop()
        job = Job(path, name, bool(tta), loop, loop.create_future())
        with self._cond:
            self._jobs.append(job)
            self.stats.waiting = len(self._jobs)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:          # client gone: do not run its image
            with self._cond:
                if job in self._jobs:
                    self._jobs.remove(job)
                    self.stats.waiting = len(self._jobs)
            raise

    # ------------------------------------------------------------------------- worker

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            batch = [first]
            for job in list(self._jobs):
                if len(batch) == self.batch_size:
                    break
                if job.tta == first.tta:
                    batch.append(job)
                    self._jobs.remove(job)
            self.stats.waiting = len(self._jobs)
            self.stats.in_model = len(batch)
            self.stats.peak_in_model = max(self.stats.peak_in_model, len(batch))
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self.stats.in_model = 0

    def _run(self, batch: list[Job]) -> None:
        by_path = {str(job.path): job for job in batch}
        done: set[Job] = set()

        def on_error(message: str) -> None:
            for path, job in by_path.items():
                if message.startswith(path):           # the predictor names the file by its path
                    reason = message[len(path):].lstrip(": ") or "cannot be read"
                    with self._cond:                   # counted before the client hears of it
                        self.stats.failed += 1
                    done.add(job)
                    self._resolve(job, None, ImageReadError(reason))
                    return

        predictor = self.predictors[batch[0].tta]
        try:
            for prediction in predictor.predict_paths([job.path for job in batch], [job.name for job in batch],
                                                      on_error=on_error):
                job = by_path[str(prediction.path)]
                with self._cond:
                    self.stats.completed += 1
                done.add(job)
                self._resolve(job, prediction, None)
        except Exception as exc:                       # answer every waiting request, keep serving
            for job in batch:
                if job not in done:
                    self._resolve(job, None, RuntimeError(f"prediction failed ({type(exc).__name__}: {exc})"))
            return
        for job in batch:
            if job not in done:
                self._resolve(job, None, ImageReadError("cannot be read"))

    @staticmethod
    def _resolve(job: Job, result, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():                      # cancelled meanwhile
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:                           # the event loop is closed: nobody waits
            pass
