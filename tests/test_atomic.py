"""write_text_atomically: the old file survives a failed write, and no temp file is left behind."""

from __future__ import annotations

import pytest

from mathtune.atomic import write_text_atomically


def test_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "log.json"
    target.write_text("old")
    write_text_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "log.json"
    target.write_text("old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("mathtune.atomic.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomically(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]  # the temp file is cleaned up


def _fsync_log(monkeypatch):
    """Record os.fsync (by the path its fd names) and os.replace, in order."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc to name fds")
def test_data_is_fsynced_before_the_rename_and_the_dir_after(tmp_path, monkeypatch):
    """README promises a run dir survives kill -9 or a power cut: a rename alone can publish a file
    whose data never reached the disk."""
    events = _fsync_log(monkeypatch)
    target = tmp_path / "log.json"
    write_text_atomically(target, "new")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".log.json.tmp-"))  # the temp file's data, before
    assert events[2][1] == str(tmp_path)  # the directory entry, after


def test_written_file_honours_the_umask(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
