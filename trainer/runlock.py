"""One run, one writer: `lock_run` holds flock on <run>/.lock for as long as a process may write
the run (train, resume, grpo, and the saves, prunes and mirrors of checkpoint.py). flock belongs
to the open file, so the kernel drops it when the holder dies (kill -9 included): a stale .lock
never blocks, and its text only names the holder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from trainer import atomic
from trainer.errors import UserError

log = logging.getLogger("trainer")

LOCK = ".lock"  # in the run folder: never a step dir, so never listed, copied or pruned
_held: dict[str, list] = {}  # lock file realpath -> [fd or None, handles in this process, created run_dir]
_held_guard = threading.Lock()
_unlockable: set[str] = set()  # folders whose filesystem refused flock (warned once)


class RunLock:
    """This process's hold on a run folder; a context manager. The lock is re-entrant within a
    process (the training loop and its saver thread share one hold) and is released when the
    last handle is released or the process ends."""

    def __init__(self, key: str, run_dir: Path) -> None:
        self._key, self.run_dir = key, run_dir

    def release(self) -> None:
        with _held_guard:
            if self._key is None:
                return
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                if entry[2]:  # a run folder this hold created and nothing was written to: leave no trace
                    with contextlib.suppress(OSError):
                        if [p.name for p in self.run_dir.iterdir()] == [LOCK]:
                            os.unlink(self._key)
                            self.run_dir.rmdir()
                if entry[0] is not None:
                    os.close(entry[0])  # the only descriptor of this open file: the flock goes with it
            self._key = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds a lock, from the JSON its holder wrote (untrusted: may be stale or empty)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        text = f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:160]


def _lock_held(lock_file: Path) -> bool:
    """Whether a process holds the flock on lock_file, read from /proc/locks: taking the lock,
    even shared and for a moment, could make a starting writer refuse the run. Where
    /proc/locks cannot be read (not Linux), a non-blocking shared flock probes it."""
    try:
        st = os.lstat(lock_file)  # a symlink is no lock of this run's, whatever it points to
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _probe(lock_file)
    # "3: FLOCK  ADVISORY  WRITE 3211 fe:00:1499665 0 EOF" (device in hex, inode); a waiter's has "->" after the id
    held = [parts[5] for parts in map(str.split, table.splitlines())
            if len(parts) > 5 and parts[1:3] == ["FLOCK", "ADVISORY"]]
    if f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}" in held:
        return True
    # overlayfs and other filesystems without a device of their own (major 0) may show the
    # underlying one there: then the inode alone
    return os.major(st.st_dev) == 0 and any(h.rsplit(":", 1)[-1] == str(st.st_ino) for h in held)


def _probe(lock_file: Path) -> bool:
    try:
        fd = atomic.open_file(lock_file, follow=False)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock with the descriptor


def holder(run_dir: Path) -> str | None:
    """Who holds the run's lock (pid, host, since, command), or None when nobody does; read
    without taking the lock (`trainer runs`)."""
    lock_file = Path(run_dir) / LOCK
    if not _lock_held(lock_file):
        return None
    try:
        fd = atomic.open_file(lock_file, follow=False)
    except OSError:
        return "holder unknown"
    try:
        return _holder(fd)
    finally:
        os.close(fd)


def lock_run(run_dir: Path) -> RunLock:
    """Take the run's writer lock (creating run_dir if needed), or raise a UserError naming the
    process that holds it. Hold it for as long as the process may write the run."""
    run_dir = Path(run_dir)
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.join(os.path.realpath(run_dir), LOCK)  # the folder resolved, never the lock itself
        with _held_guard:
            if key in _held:  # this process is the writer already
                _held[key][1] += 1
                return RunLock(key, run_dir)
            fd = atomic.open_file(key, os.O_RDWR | os.O_CREAT, follow=False)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(f"run {run_dir} is being written by another process ({holder}); wait for it to "
                                f"finish or stop it, then run this command again") from None
            except OSError as e:  # ENOLCK / EOPNOTSUPP: this filesystem cannot lock
                os.close(fd)
                fd = None
                if key not in _unlockable:
                    _unlockable.add(key)
                    log.warning(f"cannot lock {run_dir} ({e.strerror or e}); make sure only one process writes this run")
            if fd is not None:
                info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                except OSError:  # a full disk may refuse the text; the flock is what counts
                    pass
            _held[key] = [fd, 1, created]
            return RunLock(key, run_dir)
    except OSError as e:
        if isinstance(e, atomic.NotAFile):  # something planted in the lock's place: not Airlock's to delete
            raise UserError(f"cannot lock run {run_dir}: {run_dir / LOCK} {e.strerror}; move it away, then run "
                            "this command again") from None
        raise UserError(f"cannot lock run {run_dir} ({e.strerror or e}); check that the folder is writable") from None
