"""train.py with an injected fault, run as a child process by the fault tests.

    python tests/faulty_train.py [--slow-save SECONDS [--slow-from N]] [--refuse-save N --refuse ENOSPC|EROFS]
                                 -- TRAIN.PY FLAGS

``--slow-save``: checkpoint writes from the ``N``-th on (1-based; default 1) take about
``SECONDS``, written in small pieces, so a test can signal or ``kill -9`` the process while
a checkpoint is half written. ``--refuse-save N``: the ``N``-th checkpoint write is refused as a
full disk (``ENOSPC``: after its first bytes) or a read-only folder (``EROFS``: its temporary
file cannot be created). Everything else is the real train.py.
"""
from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402


def slow_torch_save(seconds: float, first_slow: int):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < first_slow or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data, pieces = buffer.getvalue(), 20
        step = len(data) // pieces + 1
        for k in range(0, len(data), step):
            f.write(data[k:k + step])
            f.flush()
            time.sleep(seconds / pieces)

    return save


def refuse_save(nth: int, code: int) -> None:
    import tempfile

    real_save, real_mkstemp, calls = torch.save, tempfile.mkstemp, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and code == errno.ENOSPC and hasattr(f, "write"):
            f.write(b"the first bytes")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    def mkstemp(*args, prefix="", **kwargs):
        if prefix.startswith(".last.pth") and calls["n"] == nth - 1 and code == errno.EROFS:
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    torch.save = save
    tempfile.mkstemp = mkstemp


def main(argv: list[str]) -> int:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--slow-from", type=int, default=1)
    parser.add_argument("--refuse-save", type=int, default=0)
    parser.add_argument("--refuse", choices=("ENOSPC", "EROFS"), default="ENOSPC")
    faults = parser.parse_args(argv[:split])
    if faults.refuse_save:
        refuse_save(faults.refuse_save, getattr(errno, faults.refuse))
    if faults.slow_save:
        torch.save = slow_torch_save(faults.slow_save, faults.slow_from)
    return train.run_cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
