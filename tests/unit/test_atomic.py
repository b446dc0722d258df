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


def test_prune_killed_mid_delete_leaves_no_checkpoint_half_deleted(tmp_path):
    """`kill -9` while prune deletes old checkpoints: every step folder still in view is whole
    (its MANIFEST and every file), the others are gone or hidden, and the next prune clears
    what the kill left. Checkpoints of many files make the delete long enough to land in."""
    import signal
    import subprocess
    import sys
    import time

    from trainer import checkpoint as ckpt

    files = {f"f{i:04d}": b"x" * 64 for i in range(1500)}
    for kill_after in (0.002, 0.01, 0.03):
        run = tmp_path / f"run-{kill_after}"
        for step in (1, 2, 3, 4):
            atomic.write_dir(run / ckpt.step_name(step), {**files, ckpt.MANIFEST: b"{}"})
        child = subprocess.Popen([sys.executable, "-c", "import sys, pathlib; from trainer import checkpoint as c; "
                                  "print('ready', flush=True); sys.stdin.readline(); c.prune(pathlib.Path(sys.argv[1]), 1)",
                                  str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"  # imports done: the kill lands in the delete
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        child.wait()
        for step_dir in ckpt.step_dirs(run):
            assert sorted(p.name for p in step_dir.iterdir()) == sorted([*files, ckpt.MANIFEST]), step_dir.name
        assert ckpt.step_name(4) in [d.name for d in ckpt.step_dirs(run)]
        ckpt.prune(run, 1)
        assert [p.name for p in run.iterdir()] == [ckpt.step_name(4)]
