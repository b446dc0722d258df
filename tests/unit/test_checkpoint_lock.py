"""One run, one writer: while a live process holds a run's lock, a second process is refused
with one line naming the holder, and so are its checkpoint writes; once the holder is
SIGKILLed the lock is free again whatever its file still says. Within one process the lock
is re-entrant and held until the last handle is released. The lock file is never listed,
copied or pruned as a checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.unit.test_checkpoint import save, tiny
from trainer import checkpoint as ckpt
from trainer import runlock, runs
from trainer.errors import UserError

HOLD = """
import sys, time
from trainer import runlock
lock = runlock.lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(300)
"""


def held_elsewhere(run_dir) -> bool:
    """Whether some open file (this process's lock included) holds the flock: a fresh open file
    description conflicts with every other one, in this process too."""
    fd = os.open(run_dir / runlock.LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_second_writer_is_refused_until_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "checkpoints" / "run1"  # does not exist yet: taking the lock creates it
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as err:
            runlock.lock_run(run_dir)
        message = str(err.value)
        assert "\n" not in message and str(run_dir) in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "since" in message
        model, opt = tiny()
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            save(run_dir, 1, model, opt)
        assert ckpt.latest_name(run_dir) is None and not list(run_dir.glob("step_*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / runlock.LOCK).read_text())["pid"] == holder.pid  # stale text, no flock
    with runlock.lock_run(run_dir):
        assert json.loads((run_dir / runlock.LOCK).read_text())["pid"] == os.getpid()
        save(run_dir, 1, model, opt)  # re-entrant: the save takes the lock this process holds
    assert ckpt.find_valid(run_dir) == run_dir / "step_000001"


def test_lock_is_reentrant_and_held_until_the_last_release(tmp_path):
    model, opt = tiny()
    outer = runlock.lock_run(tmp_path)
    with runlock.lock_run(tmp_path):
        saver = ckpt.AsyncSaver()  # the saver thread takes it a third time
        saver.save(tmp_path, ckpt.step_name(1), ckpt.serialize(model, opt, {ckpt.STEP: 1}, {"step": 1}, "run: {}\n"))
        saver.close()
    assert held_elsewhere(tmp_path)
    outer.release()
    outer.release()  # a second release of one handle is harmless
    assert not held_elsewhere(tmp_path)
    assert ckpt.find_valid(tmp_path) == tmp_path / "step_000001"


def test_lock_file_is_not_a_checkpoint(tmp_path):
    model, opt = tiny()
    run_dir, mirror_root = tmp_path / "run", tmp_path / "mirror"
    with runlock.lock_run(run_dir):
        for step in (1, 2, 3):
            save(run_dir, step, model, opt, keep_last=1, mirror_dir=str(mirror_root))
    assert (run_dir / runlock.LOCK).is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["step_000003"]
    assert not list(run_dir.glob(f"*/{runlock.LOCK}")) and not list(mirror_root.glob(f"*/*/{runlock.LOCK}"))
    assert ckpt.find_valid(run_dir) == run_dir / "step_000003"
    assert ckpt.storage_report(run_dir).startswith("1 checkpoint(s)")


def test_run_folder_names_what_locate_reads(tmp_path, monkeypatch):
    """What a resume locks before it reads: the run of a step dir, a named run, or the newest."""
    monkeypatch.delenv("CHECKPOINT_PATH", raising=False)
    model, opt = tiny()
    root = tmp_path / "checkpoints"
    step = save(root / "a", 1, model, opt)
    assert runs.run_folder(checkpoint=str(step), out_dir=str(tmp_path)) == root / "a"
    assert runs.run_folder(checkpoint=str(root / "a"), out_dir=str(tmp_path)) == root / "a"
    assert runs.run_folder(run="a", out_dir=str(tmp_path)) == root / "a"
    assert runs.run_folder(out_dir=str(tmp_path)) == root / "a"
    with runlock.lock_run(runs.run_folder(run="a", out_dir=str(tmp_path))):
        assert runs.locate(run="a", out_dir=str(tmp_path)) == step


def test_a_planted_lock_is_refused_and_what_it_points_to_is_untouched(tmp_path):
    """A symlink or folder in the lock's place: the lock is written to, so following the link
    would write elsewhere. One line names it and the fix; nothing outside the run changes."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    linked, folder = tmp_path / "linked", tmp_path / "folder"
    linked.mkdir()
    (linked / runlock.LOCK).symlink_to(outside)
    (folder / runlock.LOCK).mkdir(parents=True)
    for run_dir, kind in ((linked, "symbolic link"), (folder, "directory")):
        with pytest.raises(UserError) as refused:
            runlock.lock_run(run_dir)
        message = str(refused.value)
        assert str(run_dir / runlock.LOCK) in message and kind in message and "move it away" in message
        assert "\n" not in message
        assert runlock.holder(run_dir) is None
    assert outside.read_text() == "keep me\n" and (linked / runlock.LOCK).is_symlink()
    held, pointing = tmp_path / "held", tmp_path / "pointing"  # a link to another run's live lock
    pointing.mkdir()
    with runlock.lock_run(held):
        (pointing / runlock.LOCK).symlink_to(held / runlock.LOCK)
        assert runlock.holder(held) is not None and runlock.holder(pointing) is None
