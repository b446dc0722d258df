"""`latest` is a regular file or nothing. Anything else there (a directory, a symlink, a
dangling link, a FIFO, a socket) is a damaged pointer: a save sets it aside as
latest.damaged-<time>, kept with one warning, and writes a new `latest`; a resume sets it aside
before reading; a reader that does not write (find_valid, locate) neither blocks on it nor
moves it. A failed save names its real cause, and says to free disk space only when space or
quota ran out."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import threading

import pytest

from tests.unit.test_checkpoint_corrupt import one_line_user_error, save, tiny
from trainer import atomic, runs
from trainer import checkpoint as ckpt

KINDS = ["directory", "symlink_to_directory", "dangling_symlink", "fifo", "socket"]


def put_in_place_of_latest(run_dir, kind):
    """Replace `latest` with `kind`; -> what must still be there afterwards (a socket: its object)."""
    pointer = run_dir / ckpt.LATEST
    pointer.unlink(missing_ok=True)
    if kind == "directory":
        pointer.mkdir()
        (pointer / "notes.txt").write_text("mine\n")
    elif kind == "symlink_to_directory":
        (run_dir.parent / "elsewhere").mkdir(exist_ok=True)
        pointer.symlink_to(run_dir.parent / "elsewhere", target_is_directory=True)
    elif kind == "dangling_symlink":
        pointer.symlink_to(run_dir / "gone")
    elif kind == "fifo":
        os.mkfifo(pointer)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(pointer))
        return sock
    return None


def assert_kept(aside, kind):
    mode = os.lstat(aside).st_mode
    if kind == "directory":
        assert (aside / "notes.txt").read_text() == "mine\n"
    elif "symlink" in kind:
        assert stat.S_ISLNK(mode)
    elif kind == "fifo":
        assert stat.S_ISFIFO(mode)
    else:
        assert stat.S_ISSOCK(mode)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer" and r.levelname == "WARNING"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_sets_aside_a_latest_that_is_not_a_file(tmp_path, kind, caplog):
    run_dir = tmp_path / "run"
    model, opt = tiny()
    save(run_dir, 1, model, opt)
    sock = put_in_place_of_latest(run_dir, kind)
    try:
        with caplog.at_level("WARNING", logger="trainer"):
            save(run_dir, 2, model, opt)
    finally:
        if sock is not None:
            sock.close()
    pointer = run_dir / ckpt.LATEST
    assert stat.S_ISREG(os.lstat(pointer).st_mode) and ckpt.latest_name(run_dir) == "step_000002"
    (aside,) = run_dir.glob(f"{ckpt.LATEST}.damaged-*")
    assert_kept(aside, kind)
    (warning,) = warnings_of(caplog)
    assert aside.name in warning and "not a file" in warning
    assert ckpt.verify(run_dir / "step_000002") is None


def test_a_mirror_sets_aside_its_damaged_latest_too(tmp_path):
    run_dir, mirror_root = tmp_path / "run", tmp_path / "mirror"
    model, opt = tiny()
    ckpt.save_checkpoint(run_dir, ckpt.step_name(1), model, opt, {ckpt.STEP: 1}, {"step": 1}, "run: {}\n",
                         mirror_dir=str(mirror_root))
    put_in_place_of_latest(mirror_root / "run", "directory")
    ckpt.save_checkpoint(run_dir, ckpt.step_name(2), model, opt, {ckpt.STEP: 2}, {"step": 2}, "run: {}\n",
                         mirror_dir=str(mirror_root))
    assert ckpt.latest_name(mirror_root / "run") == "step_000002"
    (aside,) = (mirror_root / "run").glob(f"{ckpt.LATEST}.damaged-*")
    assert_kept(aside, "directory")


def test_a_reader_neither_blocks_on_nor_moves_a_damaged_latest(tmp_path, caplog):
    """find_valid and locate read a run that someone else may be writing: they fall back to the
    step dirs with a warning and leave `latest` as it is. A FIFO must not block them."""
    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    newest = save(tmp_path, 2, model, opt)
    for kind in ["fifo", "directory", "symlink_to_directory"]:
        put_in_place_of_latest(tmp_path, kind)
        found = {}

        def read():
            found["find_valid"] = ckpt.find_valid(tmp_path)
            found["locate"] = runs.locate(checkpoint=str(tmp_path))

        reader = threading.Thread(target=read, daemon=True)
        caplog.clear()
        with caplog.at_level("WARNING", logger="trainer"):
            reader.start()
            reader.join(timeout=20)
        if reader.is_alive() and kind == "fifo":  # blocked in open(): a writer lets it go
            os.close(os.open(tmp_path / ckpt.LATEST, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(timeout=20)
        assert found == {"find_valid": newest, "locate": newest}, f"a reader blocked on `latest` ({kind})"
        assert warnings_of(caplog) and all("`latest`" in w for w in warnings_of(caplog)), kind
        assert not list(tmp_path.glob(f"{ckpt.LATEST}.damaged-*")), kind  # a reader writes nothing
        assert ckpt.latest_name(tmp_path) is None
        if kind == "directory":
            shutil.rmtree(tmp_path / ckpt.LATEST)


def test_a_resume_sets_aside_a_damaged_latest_before_reading(tmp_path, caplog):
    out = tmp_path / "volumes"
    run_dir = runs.RunPaths(out, "r").checkpoints
    model, opt = tiny()
    save(run_dir, 1, model, opt)
    newest = save(run_dir, 2, model, opt)
    put_in_place_of_latest(run_dir, "directory")
    with caplog.at_level("WARNING", logger="trainer"):
        with runs.resume_point("r", None, str(out)) as step_dir:
            assert step_dir == newest
            assert not os.path.lexists(run_dir / ckpt.LATEST)  # set aside while the run is locked
    (aside,) = run_dir.glob(f"{ckpt.LATEST}.damaged-*")
    assert_kept(aside, "directory")
    (warning,) = warnings_of(caplog)  # one warning: the fallback that follows does not repeat it
    assert aside.name in warning


def test_a_failed_save_names_its_cause_and_asks_for_space_only_when_space_ran_out(tmp_path, monkeypatch):
    model, opt = tiny()
    good = save(tmp_path, 1, model, opt)
    real_write = atomic._write_synced
    for code, expected, advice in [
            (errno.ENOSPC, "No space left on device", "free disk space"),
            (errno.EDQUOT, "Disk quota exceeded", "free disk space"),
            (errno.EACCES, "Permission denied", "write permission"),
            (errno.EROFS, "Read-only file system", "writable"),
            (errno.EISDIR, "Is a directory", "in the way")]:
        def failing(path, data, code=code):
            raise OSError(code, os.strerror(code), str(path))
        monkeypatch.setattr(atomic, "_write_synced", failing)
        message = one_line_user_error(lambda: save(tmp_path, 2, model, opt))
        assert expected in message and advice in message and "step_000002" in message, message
        assert ("free disk space" in message) == (code in (errno.ENOSPC, errno.EDQUOT)), message
        assert "newest: step_000001" in message and ckpt.verify(good) is None
        assert not (tmp_path / "step_000002").exists() and not list(tmp_path.glob(".step_000002*"))
    monkeypatch.setattr(atomic, "_write_synced", real_write)
    save(tmp_path, 2, model, opt)

    # the shared writer too: a file where a folder should be is no full disk
    (tmp_path / "a_file").write_text("x")
    message = one_line_user_error(lambda: atomic.write_bytes(tmp_path / "a_file" / "s.json", b"{}"))
    assert "Not a directory" in message and "free disk space" not in message, message
