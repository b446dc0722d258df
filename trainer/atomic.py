"""Write-then-rename: a reader, a crash or a kill -9 sees the old version or the new one, never a mix.

Temporary names are unique and carry `airlock` (`.<name>.airlock-XXXX.tmp`), so they can never
be a user's file, and a leftover from a killed process can be recognised and removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from trainer.errors import UserError

TMP_TAG = ".airlock-"
LEFTOVER = re.compile(r"^\.(.+)\.airlock-[0-9a-f]+\.(tmp|old)$")  # what a killed build leaves beside its target


def fsync_dir(path: Path) -> None:
    # fsync the directory too, or a rename in it can be lost on power failure
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(dst: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `dst` for its temp file ("tmp") or parked old version ("old"):
    `tidy` knows these names and clears what a kill left."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}{TMP_TAG}{secrets.token_hex(4)}.{kind}"


def advice(e: OSError, space: str = "free disk space") -> str:
    """What a person can do about a failed write, by its cause: `space` only when space or
    quota ran out; a folder in the way or a permission is named as what it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return space
    if e.errno == errno.EROFS:
        return "mount the folder writable"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "give this user write permission on the folder"
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
        return "move what is in the way elsewhere"
    return "fix what the error names"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, prepared data)."""
    h = hashlib.sha256()
    with os.fdopen(open_file(path), "rb") as f:  # a FIFO or /dev/zero there is NotAFile, never read
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cause(e: OSError) -> str:
    """The error and the path it is about, as one line: "Is a directory: '/run/latest'"."""
    text = e.strerror or str(e) or type(e).__name__
    name = e.filename2 if e.filename2 is not None else e.filename  # a rename's is the target
    return f"{text}: {os.fsdecode(name)!r}" if name is not None else text


def _write_synced(path: Path, data: bytes) -> None:
    """A new file holding `data`, on disk before this returns (O_EXCL: never someone else's)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode, as open() gives
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temp file in the same folder, fsync, rename, fsync the folder.
    An error is the OSError itself (the old file stays, the temp file is removed)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """`replace_file`, where an error is a UserError naming the file, its cause and what to do."""
    try:
        replace_file(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); {advice(e)}") from None


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


@contextlib.contextmanager
def staging_dir(dst: Path):
    """A fresh hidden folder beside `dst` to build its new version in; removed if anything
    (an error, a signal) interrupts the build. Leftovers of a killed earlier build go first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tidy(dst.parent, dst.name)  # a kill may have fallen between replace_dir's renames
    # mkdir with a random name (exclusive, like mkdtemp) keeps the umask's mode: mkdtemp's 0700
    # would hide the image's build-time corpora and exports from other users of the volume
    tmp = temp_path(dst)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, dst: Path) -> None:
    """Put the folder `new` in place of `dst` (which may not exist), then remove the old one.
    With RENAME_EXCHANGE there is no moment without a `dst`. Elsewhere the old one is parked
    beside it first, put back if the second rename fails, and recovered by the next
    `staging_dir` for `dst` if a kill falls between the two renames."""
    new, dst = Path(new), Path(dst)
    fsync_dir(new)
    if dst.exists() and _exchange(new, dst):
        old = new  # after the swap, `new` names the old version
    else:
        old = None
        if dst.exists():
            old = temp_path(dst, "old")
            os.rename(dst, old)
        try:
            os.rename(new, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
            raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete the folder `path` so that a kill leaves it whole or gone from view: it is renamed
    to a hidden staging name first (what `tidy` clears), then removed. A plain rmtree killed
    halfway would leave `path` with some of its files, a checkpoint without its MANIFEST."""
    path = Path(path)
    hidden = temp_path(path)
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    if os.path.isdir(hidden) and not os.path.islink(hidden):
        shutil.rmtree(hidden, ignore_errors=True)
    else:  # a symlink or file in a folder's place: removed itself, never what it points to
        with contextlib.suppress(OSError):
            os.unlink(hidden)


SMALL_FILE_LIMIT = 16 << 20  # a manifest, a pointer, a config, a lock: kilobytes; more is damage


class NotAFile(OSError):
    """Something other than a regular file stands at a path: a directory, a FIFO, a device, or
    a symlink where none may be followed."""


def open_file(path, flags: int = os.O_RDONLY, follow: bool = True) -> int:
    """A descriptor of the regular file at `path`, which may be damaged or planted; NotAFile
    where anything else stands there (O_NONBLOCK: a FIFO is never waited on). follow=False: a
    symlink is NotAFile too (for a file that is written, or that names a path). With O_CREAT a
    missing file is made 0644; otherwise a missing one raises FileNotFoundError, as `open` does."""
    try:
        fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW) | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if (e.errno == errno.ELOOP and not follow) or e.errno == errno.EISDIR:
            kind = "a directory" if e.errno == errno.EISDIR else "a symbolic link"
            raise NotAFile(errno.EINVAL, f"is {kind}, not a file", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile(errno.EINVAL, "is not a regular file", str(path))
    return fd


def check_appendable(path: Path) -> None:
    """UserError unless nothing or a regular file (or a symlink to one) stands at `path`, a log or
    a rows file that a command appends to: a FIFO there would hang the writer, a folder, a device
    or a symlink to nothing would fail it halfway. The message names the path and the fix."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not os.path.islink(path):
            return
        what = "is a symbolic link to a missing file"
    except OSError:
        return  # not to be told apart here (a permission): the writer's own error says what
    else:
        if stat.S_ISREG(mode):
            return
        what = ("is a directory" if stat.S_ISDIR(mode) else "is a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "is not a regular file")
    raise UserError(f"{path} {what}, where Airlock keeps a file it appends to; move it away, then run the "
                    "command again")


def read_small(path: Path, limit: int = SMALL_FILE_LIMIT, follow: bool = True) -> bytes:
    """The bytes of a small regular file (open_file), OSError for one larger than `limit`. A
    symlink to a regular file is read as the file (a checkpoint copied with `cp -rs` or checked
    out by git-annex, whose large files are followed too) unless follow=False."""
    with os.fdopen(open_file(path, follow=follow), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return data


def parse_json(data: bytes | str):
    """json.loads where every failure is a ValueError (nesting too deep raises RecursionError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def write_dir(dst: Path, files: dict[str, bytes]) -> None:
    """Replace the folder `dst` with one holding `files` (name -> bytes), written in their
    order and each fsynced: built in a `staging_dir` and put in place by `replace_dir`, so
    a reader, a crash or a kill sees the previous `dst` (or none) or the whole new one."""
    with staging_dir(dst) as tmp:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        replace_dir(tmp, dst)


def tidy(parent: Path, target: str | None = None) -> None:
    """Clear what killed builds left in `parent` (for every target, or the one named
    `target`): staging copies and temp files go; an old version parked by `replace_dir` goes
    when its target is back, and is put back when the kill left it the only copy. Call it
    where no other process builds in `parent` (under the lock that guards it)."""
    parent = Path(parent)
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:  # missing or unreadable: nothing to tidy
        return
    for entry in entries:
        found = LEFTOVER.match(entry.name)
        if not found or (target is not None and found.group(1) != target):
            continue
        path, target = Path(entry.path), parent / found.group(1)
        if found.group(2) == "old" and not os.path.lexists(target):
            os.rename(path, target)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
