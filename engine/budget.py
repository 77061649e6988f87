"""A wall-time budget for a whole run (``--max-time``): measure, then fix the length once.

The first steps of a run pay for worker start-up and allocator warm-up, so the speed is
measured over the steps after them. From that speed and an estimate of what must still happen
after training (the final evaluation, the last checkpoint), the total number of iterations is
fixed once; the LR schedule is then planned for exactly that many (engine/optim.py) and the
number is stored in the checkpoint, so a resumed run keeps it. The trainer checks the speed once
more after a quarter of the remaining steps and re-plans if it is off by more than
``REPLAN_TOLERANCE`` (the first steps run slower than the rest, or a machine was busy or idle
while they were timed); if it slows down later still, training stops early rather than letting
the final evaluation miss the budget.
"""
from __future__ import annotations

import re
import time

SKIP_STEPS = 2        # steps not measured (worker start-up, first allocations)
MEASURE_STEPS = (5, 20)  # steps timed to fix the run length: through the first epoch boundary
                         # (its checkpoint) when an epoch is short, else at least 5
MARGIN = 0.04         # share of the remaining time kept back (speed drift, epoch start-up)
FIXED_RESERVE = 5.0   # seconds kept for the last checkpoint, the plot and the process exit
REPLAN_TOLERANCE = 0.05  # re-plan when the re-checked speed is off by more: on a 2-core EPYC the
                         # first steps measured 1.57 s and the run went on at 1.42 (10 %, 42 s of a
                         # 4½-minute budget unused). A quarter into a cosine run, 10 % more steps
                         # raise the LR by 3 % (0.854 → 0.878 of its peak): a harmless jump.


def parse_duration(text: str) -> float:
    """``"8m"``, ``"20min"``, ``"1h30m"``, ``"90s"``, ``"600"`` (seconds) → seconds."""
    value = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    units = {"h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "m": 60, "min": 60, "mins": 60,
             "minute": 60, "minutes": 60, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", value)
    if not parts or "".join(n + u for n, u in parts) != value or any(u not in units for _, u in parts):
        raise ValueError(f"expected a duration such as 8m, 1h30m, 90s or plain seconds, got {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepTimer:
    """Times the steps of this process after the first ``SKIP_STEPS``."""

    def __init__(self, iters_per_epoch: int):
        self.steps = 0
        self.started: float | None = None
        self.measured = 0
        self.measure = min(max(MEASURE_STEPS[0], iters_per_epoch + 1 - SKIP_STEPS), MEASURE_STEPS[1])

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == SKIP_STEPS:
            self.started = time.time()
        elif self.steps > SKIP_STEPS:
            self.measured += 1

    @property
    def just_measured(self) -> bool:
        """True at exactly one step: the one that completes the measurement."""
        return self.measured == self.measure and self.steps == SKIP_STEPS + self.measure

    def seconds_per_step(self) -> float:
        return (time.time() - self.started) / self.measured if self.measured else float("nan")


def budget_total_iters(done: int, seconds_per_step: float, deadline: float, reserve: float,
                       now: float | None = None) -> int:
    """Total iterations (``done`` included) that fit before ``deadline`` with ``reserve`` seconds
    kept for what follows training. At least one more step, so a run always ends cleanly."""
    now = time.time() if now is None else now
    available = (deadline - now - reserve - FIXED_RESERVE) * (1 - MARGIN)
    return done + max(1, int(available / max(seconds_per_step, 1e-6)))
