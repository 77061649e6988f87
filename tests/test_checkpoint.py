from __future__ import annotations

import pytest
import torch

from engine import checkpoint


def test_crash_mid_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="bad.pth"):
        checkpoint.load_checkpoint(bad)


def test_find_latest_picks_newest(tmp_path):
    import os
    for i, name in enumerate(("a", "b")):
        checkpoint.save_checkpoint(tmp_path / name / "last.pth", {"model": {}})
        os.utime(tmp_path / name / "last.pth", (1000 + i, 1000 + i))
    assert checkpoint.find_latest(tmp_path) == tmp_path / "b" / "last.pth"
    assert checkpoint.find_latest(tmp_path / "none") is None
