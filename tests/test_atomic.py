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
