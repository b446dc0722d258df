"""Folder replacement never leaves a moment, or a failure, without one whole version: with
RENAME_EXCHANGE the swap is one step; without it (NFS and friends) the old copy is parked,
put back when the second rename fails, and recovered by the next build after a kill."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer import atomic


def build(dst: Path, text: str) -> None:
    with atomic.staging_dir(dst) as tmp:
        (tmp / "f").write_text(text)
        atomic.replace_dir(tmp, dst)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_keeps_one_whole_version_and_no_leftovers(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dst = tmp_path / "out"
    build(dst, "one")
    build(dst, "two")
    assert (dst / "f").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_second_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dst = tmp_path / "out"
    build(dst, "old")
    real = os.rename

    def fail_into_place(src, target):
        if Path(target) == dst and str(src).endswith(".tmp"):  # the new version's rename, not the way back
            raise OSError(5, "Input/output error")
        return real(src, target)

    monkeypatch.setattr(atomic.os, "rename", fail_into_place)
    with pytest.raises(OSError):
        build(dst, "new")
    monkeypatch.setattr(atomic.os, "rename", real)
    assert (dst / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_between_the_renames_is_recovered_by_the_next_build(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    build(dst, "old")
    parked = tmp_path / f".out{atomic.TMP_TAG}dead.old"
    os.rename(dst, parked)  # where a kill -9 after the first rename leaves things
    with atomic.staging_dir(dst) as tmp:
        assert (dst / "f").read_text() == "old"  # recovered before anything else
        (tmp / "f").write_text("new")
        atomic.replace_dir(tmp, dst)
    assert (dst / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_build_leaves_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic.staging_dir(dst) as tmp:
            (tmp / "f").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_whole_and_readable_by_others(tmp_path):
    path = tmp_path / "s.json"
    atomic.write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert path.stat().st_mode & 0o044  # the umask's mode, not mkstemp's 0600


def test_a_write_that_cannot_happen_is_one_line_and_keeps_the_old_file(tmp_path):
    from trainer.errors import UserError

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file/s.json"):
        atomic.write_json(tmp_path / "a_file" / "s.json", {"a": 1})
    assert (tmp_path / "a_file").read_text() == "x"
