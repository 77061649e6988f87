"""Progress lines with ETA, a JSON-lines metrics file, TensorBoard when installed, a loss plot.

Only rank 0 writes files; ``setup_logging`` silences other ranks below WARNING.
"""
from __future__ import annotations

import datetime
import json
import logging
import resource
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable, Iterator

import torch

from utils.io import WRITE_REFUSALS, output_error

log = logging.getLogger("trainer")


def setup_logging(is_main: bool, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True)


class SmoothedValue:
    """Running window median/mean plus the global average of a scalar."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2] if ordered else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricLogger:
    """Wraps an iterable; measures data and iteration time, prints every ``print_freq`` steps."""

    def __init__(self, device: torch.device, print_freq: int, header: str = ""):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.device = device
        self.print_freq = print_freq
        self.header = header

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters[k].update(float(v))

    def log_every(self, iterable: Iterable, total: int, start: int = 0) -> Iterator:
        """Yield from ``iterable`` (whose first item is step ``start`` of ``total``)."""
        data_time, iter_time = SmoothedValue(), SmoothedValue()
        end = time.perf_counter()
        step = start
        for item in iterable:
            data_time.update(time.perf_counter() - end)
            yield item
            iter_time.update(time.perf_counter() - end)
            step += 1
            if step % self.print_freq == 0 or step == total:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - step)))
                meters = "  ".join(f"{k} {m.median:.4f} ({m.global_avg:.4f})" for k, m in self.meters.items())
                log.info("%s [%d/%d] eta %s  %s  time %.3f s  data %.3f s  peak mem %.0f MB", self.header, step,
                         total, eta, meters, iter_time.median, data_time.median, peak_memory_mb(self.device))
            end = time.perf_counter()


class MetricsWriter:
    """JSON-lines records in ``metrics.jsonl``, mirrored to TensorBoard when it is installed.

    Records are appended (one ``write`` each); a line cut short by a process killed mid-write
    is removed when the next run opens the file, so every line in it is a complete record.
    """

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            drop_partial_last_line(self.path)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSON lines still have everything
                log.info("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            if exc.errno in WRITE_REFUSALS:
                raise output_error(self.path, exc.errno) from exc
            raise
        if self.tb is not None:
            kind = record.get("type", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iteration", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def drop_partial_last_line(path: Path) -> None:
    """Cut a text file back to its last complete line (one ending in a newline)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        text = f.read()
        f.truncate(text.rfind(b"\n") + 1)
    log.warning("%s ended in a partial line (a process killed mid-write): removed it", path)


def plot_metrics(metrics_file: Path, out_png: Path) -> Path | None:
    """Loss curves and evaluation metrics over steps → a PNG. Returns None without matplotlib/data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = [], []
    for line in metrics_file.read_text().splitlines() if metrics_file.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:   # a line cut short by a full disk
            continue
        (evals if rec.get("type") == "eval" else train).append(rec)
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in train]
    for key in sorted(k for k in train[-1] if k.startswith("loss")):
        axes[0].plot(steps, [r.get(key) for r in train], label=key, linewidth=1.2 if key == "loss" else 0.8)
    axes[0].set_xlabel("iteration")
    axes[0].set_yscale("log")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=7)
    if evals:
        for key in ("segm_AP", "segm_AP50", "bbox_AP", "sartorius"):
            if key in evals[-1]:
                axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("iteration")
    axes[1].set_title("validation")
    fig.tight_layout()
    from utils.io import atomic_path
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png
