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


def _tensor_data_offset(path) -> int:
    """Where the first tensor's bytes start inside a torch.save zip archive."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _save_epochs(path, *epochs):
    for e in epochs:
        checkpoint.save_checkpoint(path, {"model": {"w": torch.full((3,), float(e))}, "epoch": e, "iteration": 0})


def test_save_keeps_the_previous_checkpoint_next_to_the_new_one(tmp_path):
    path = tmp_path / "last.pth"
    _save_epochs(path, 1, 2, 3)
    assert checkpoint.load_checkpoint(path)["epoch"] == 3
    assert checkpoint.load_checkpoint(checkpoint.previous_path(path))["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pth", "last.pth"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_damaged_last_resumes_from_previous_with_a_warning_naming_both(tmp_path, caplog, damage):
    path = tmp_path / "last.pth"
    _save_epochs(path, 1, 2)
    data = path.read_bytes()
    if damage == "truncate":      # a copy or a write cut short outside the trainer
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":   # a bad disk: torch.load alone reads such a file without complaint
        i = _tensor_data_offset(path)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    else:
        path.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="last.pth"):
        checkpoint.load_checkpoint(path)
    with caplog.at_level("WARNING", logger="trainer"):
        state, used = checkpoint.load_for_resume(path)
    assert used == tmp_path / "last.prev.pth" and state["epoch"] == 1
    assert str(path) in caplog.text and str(used) in caplog.text


def test_damaged_last_and_previous_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pth"
    _save_epochs(path, 1, 2)
    for p in (path, checkpoint.previous_path(path)):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="previous checkpoint is unusable too") as exc:
        checkpoint.load_for_resume(path)
    assert "last.prev.pth" in str(exc.value) and "truncated" in str(exc.value)


def test_a_damaged_last_never_replaces_a_good_previous(tmp_path):
    path = tmp_path / "last.pth"
    _save_epochs(path, 1, 2)
    path.write_bytes(path.read_bytes()[:100])
    _save_epochs(path, 3)
    assert checkpoint.load_checkpoint(checkpoint.previous_path(path))["epoch"] == 1
    assert checkpoint.load_checkpoint(path)["epoch"] == 3


def test_full_disk_is_refused_before_writing_with_path_and_sizes(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from utils.io import OutputError
    path = tmp_path / "last.pth"
    _save_epochs(path, 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError) as exc:
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(10**6)}, "epoch": 2})
    message = str(exc.value)
    assert str(path) in message and "no space left" in message
    assert "needs about 3.8 MB" in message and "1000 B free" in message
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_read_only_folder_names_the_file(tmp_path, monkeypatch):
    import errno
    import tempfile

    from utils.io import OutputError
    path = tmp_path / "last.pth"
    _save_epochs(path, 1)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="read-only file system") as exc:
        _save_epochs(path, 2)
    assert str(path) in str(exc.value) and exc.value.errno == errno.EROFS
    assert checkpoint.load_checkpoint(path)["epoch"] == 1


def test_stale_temp_files_of_a_killed_write_are_found_and_removed(tmp_path):
    from utils.io import remove_stale_temp_files
    _save_epochs(tmp_path / "last.pth", 1)
    stale = tmp_path / ".last.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "notes.tmp"]
