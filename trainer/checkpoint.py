"""Crash-safe checkpoints, the format: save, verification, reading, `latest`, keep-last-K, best, mirror.

Only this module lists, reads or writes checkpoint directories. A checkpoint is named data:

    step_000200/  model.safetensors            full weights (tied tensors stored once)
                  | adapter_model.safetensors  LoRA weights, with adapter_config.json (a peft folder)
                  optimizer.pt  state.pt        torch.save of plain dicts, read with weights_only=True
                  trainer_state.json  config.yaml  tokenizer.json (when the loop saves one)
                  MANIFEST.json                 sha256 + size of every file above, written last

state.pt keys: STEP, RNG (rank 0's generators), RNG_RANKS (every rank's, in rank order, when
torchrun ran several processes) and TRACKER (the loop's named state, e.g. train.TrainState).
DATA (sha256 of the prepared train.bin/val.bin/tokenizer.json trained on), THREADS (torch
intra-op threads) and WORLD (processes) are what train.py records besides (in
trainer_state.json); older checkpoints lack them (older ones also carry the unused keys
"sampler" and "scheduler", which are ignored).
`_upgrade_state` is the one place older layouts are handled.

Save order (trainer.atomic.write_dir): files into a hidden staging folder beside step_N, each
fsynced -> MANIFEST -> fsync dir -> rename to step_N -> fsync parent -> replace `latest`. A
kill -9 at any point leaves either no step_N or a complete one (plus a staging folder that the
next save removes: atomic.tidy). `latest` is a regular file or nothing: anything else there
is set aside by `set_aside_latest` (resume, save).

Every file read back is untrusted (a damaged disk, a hand edit, a copy from elsewhere):
`verify` checks the manifest, the hashes, and parses every file cheaply; anything wrong is a
reason string, which readers turn into a fallback to an older checkpoint or one UserError line.

One run, one writer: saving, pruning and mirroring take the run's lock (trainer.runlock).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path

import torch

from trainer import atomic
from trainer.atomic import fsync_dir
from trainer.errors import UserError, one_line, reason
from trainer.runlock import lock_run

log = logging.getLogger("trainer")

# file names and state keys: the checkpoint contract
MODEL = "model.safetensors"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.pt"
STATE = "state.pt"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"  # a copy, so a checkpoint samples and exports on its own
MANIFEST = "MANIFEST.json"
LATEST = "latest"
BEST = "best"
FORMAT_VERSION = 1
# keys inside state.pt
STEP, RNG, RNG_RANKS, TRACKER = "step", "rng", "rng_ranks", "tracker"
DATA, THREADS, WORLD = "data", "threads", "world_size"  # prepared files' sha256; intra-op threads; processes

REQUIRED = (CONFIG, STATE, TRAINER_STATE, OPTIMIZER)  # plus MODEL, or ADAPTER + ADAPTER_CONFIG
KNOWN = {MODEL, ADAPTER, ADAPTER_CONFIG, OPTIMIZER, STATE, TRAINER_STATE, CONFIG, TOKENIZER}
STEP_LIMIT = 10**12  # steps (iterations) a checkpoint may hold: 12 digits at most
STEP_DIR = re.compile(r"^(step|iter)_([0-9]{1,12})$")  # completed checkpoints; best/, final/, export_* are not
COUNTS = {"step": "step", "iter": "iteration"}  # each loop's folder prefix -> its trainer_state.json counter
LEFTOVER = re.compile(r"^(step|iter)_([0-9]{1,12})\.(tmp|old)$")  # what a save killed by Airlock before 2026-12 left
ABANDONED = re.compile(r"^(step|iter)_([0-9]{1,12})\.abandoned(?:\.([0-9]+))?$")  # set aside by a resume from older
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # what a manifest may name: no paths, no odd bytes
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_name(step: int, prefix: str = "step") -> str:
    return f"{prefix}_{step:06d}"


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _copy(tree):
    """`tree` (dicts, lists, tuples) with every tensor copied to the CPU, detached, contiguous: what
    stays valid while training goes on and changes the originals in place."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.detach().to("cpu", copy=True).contiguous() if isinstance(x, torch.Tensor) else x,
                    tree)


class HostBuffers:
    """The host memory saves copy the model and optimizer into, kept from one save to the next
    (AsyncSaver owns one): a save then writes into memory that is already mapped instead of
    faulting in a fresh checkpoint's worth, and a GPU's tensors go to page-locked (pinned)
    buffers with non-blocking copies and one synchronize, at the bus's speed rather than
    through the driver's pageable staging. The price is one checkpoint's size of host memory
    held for the run, as torch.distributed.checkpoint's async save holds it. A buffer is reused
    only for a tensor of the same place in the tree, shape and dtype, and only once the save
    that read it has finished (AsyncSaver.snapshot waits for it)."""

    def __init__(self) -> None:
        self._held: dict[tuple, torch.Tensor] = {}
        self._copying = False  # non-blocking copies from a GPU not yet waited for

    def copy(self, tree, group: str):
        """`tree` with every tensor copied into this object's buffer for it (see _copy)."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten(tree)
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                continue
            pin = x.device.type == "cuda"
            buf = self._held.get((group, i))
            if buf is None or buf.shape != x.shape or buf.dtype != x.dtype or (pin and not buf.is_pinned()):
                buf = self._held[group, i] = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
            buf.copy_(x.detach(), non_blocking=pin)
            self._copying |= pin
            leaves[i] = buf
        return tree_unflatten(leaves, spec)

    def ready(self) -> None:
        """Wait for the copies still on their way from the GPU."""
        if self._copying:
            torch.cuda.synchronize()
            self._copying = False


def _weights(model, copy=None) -> tuple[str, dict[str, torch.Tensor], bytes | None]:
    """-> (file name, CPU copies of the tensors it holds, adapter_config.json or None): the adapter
    alone under LoRA, else the full state dict with tied tensors (lm_head = wte) stored once.
    `copy(tree)` makes the copies (default: fresh ones, _copy)."""
    copy = copy or _copy
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        config = model.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        return ADAPTER, copy(get_peft_model_state_dict(model)), \
            (json.dumps(config, indent=2, default=str) + "\n").encode()
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:  # re-tied on load
            continue
        seen.add(key)
        tensors[name] = tensor
    return MODEL, copy(tensors), None


class Snapshot:
    """A checkpoint's contents, copied off the live model and optimizer (`snapshot`): the only part
    of a save that must happen between two optimizer steps. `files()` encodes it (safetensors,
    torch.save), which AsyncSaver does on its thread, so on a GPU the loop stalls for the
    device-to-host copy alone."""

    def __init__(self, model, optimizer, state: dict, trainer_state: dict, config_yaml: str,
                 extra_files: dict[str, bytes] | None = None, buffers: HostBuffers | None = None) -> None:
        def copy(group: str):
            return _copy if buffers is None else lambda tree: buffers.copy(tree, group)

        self.weights_file, self.weights, self.adapter_config = _weights(model, copy("weights"))
        self.optimizer = copy("optimizer")(optimizer.state_dict())
        self.state = _copy({"format_version": FORMAT_VERSION, **state})  # RNG states: small, fresh each time
        if buffers is not None:
            buffers.ready()
        self.trainer_state, self.config_yaml, self.extra_files = trainer_state, config_yaml, dict(extra_files or {})

    def files(self) -> dict[str, bytes]:
        from safetensors.torch import save

        files = {self.weights_file: save(self.weights, metadata=None if self.adapter_config else {"format": "pt"})}
        if self.adapter_config is not None:
            files[ADAPTER_CONFIG] = self.adapter_config
        files[OPTIMIZER] = _torch_bytes(self.optimizer)
        files[STATE] = _torch_bytes(self.state)
        files[TRAINER_STATE] = (json.dumps(self.trainer_state, indent=2) + "\n").encode()
        files[CONFIG] = self.config_yaml.encode()
        files.update(self.extra_files)
        return files


def serialize(model, optimizer, state: dict, trainer_state: dict, config_yaml: str,
              extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Everything a checkpoint holds, as bytes, now (Snapshot, then its files)."""
    return Snapshot(model, optimizer, state, trainer_state, config_yaml, extra_files).files()


def write_checkpoint(run_dir: Path, name: str, files: dict[str, bytes], keep_last: int = 0,
                     mirror_dir: str = "", best: dict | None = None) -> Path:
    """Write run_dir/name with its MANIFEST (atomic.write_dir) and point `latest` at it; then
    prune, update best/ (when `best` gives its metric) and mirror. On a write error (disk
    full, read-only) or an interrupt nothing partial is left and older checkpoints stay
    intact; an OSError becomes a UserError saying what happened. Takes the run lock (free if
    the caller holds it)."""
    run_dir = Path(run_dir)
    final = run_dir / name
    manifest = {"format_version": FORMAT_VERSION, "name": name,
                "files": {fname: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for fname, data in files.items()}}
    with lock_run(run_dir):
        try:
            atomic.tidy(run_dir)  # what an earlier killed save left, whatever its keep_last
            atomic.write_dir(final, {**files, MANIFEST: (json.dumps(manifest, indent=2) + "\n").encode()})
            _set_latest(run_dir, name)
        except OSError as e:
            good = latest_name(run_dir)
            todo = atomic.advice(e, space="free disk space or lower checkpoint.keep_last")
            raise UserError(f"could not save checkpoint {final} ({atomic.cause(e)}); the older checkpoints are "
                            f"intact{f' (newest: {good})' if good else ''}; {todo}, then `trainer resume`") from None
        if keep_last:
            prune(run_dir, keep_last, keep=final)
        if best is not None:
            try:
                update_best(run_dir, final, best)
            except OSError as e:
                raise UserError(f"checkpoint {final} is saved, but best/ could not be updated ({atomic.cause(e)}); "
                                f"{atomic.advice(e)}, then `trainer resume`") from None
    if mirror_dir:
        mirror(final, Path(mirror_dir) / run_dir.name, keep_last)
    return final


def save_checkpoint(run_dir: Path, name: str, model, optimizer, state: dict, trainer_state: dict,
                    config_yaml: str, keep_last: int = 0, mirror_dir: str = "",
                    extra_files: dict[str, bytes] | None = None, best: dict | None = None) -> Path:
    """serialize + write_checkpoint in the caller's thread."""
    files = serialize(model, optimizer, state, trainer_state, config_yaml, extra_files)
    return write_checkpoint(run_dir, name, files, keep_last, mirror_dir, best)


class AsyncSaver:
    """Encodes and writes checkpoints on one background thread, so the training loop stalls only
    for the Snapshot's copies. At most one write is in flight: the next save, and `wait()` (called on
    signals, at the end and on errors), first finish the previous one and re-raise its error.
    A kill -9 mid-write leaves a staging folder that loading ignores, exactly as a synchronous save."""

    def __init__(self) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = None
        self.buffers = HostBuffers()

    def snapshot(self, model, optimizer, state: dict, trainer_state: dict, config_yaml: str,
                 extra_files: dict[str, bytes] | None = None) -> Snapshot:
        """A Snapshot in this saver's reused host buffers (HostBuffers), for `save`. The previous
        save is finished first (and its error raised): its encoding reads those buffers."""
        self.wait()
        return Snapshot(model, optimizer, state, trainer_state, config_yaml, extra_files, buffers=self.buffers)

    def save(self, run_dir: Path, name: str, files: dict[str, bytes] | Snapshot, on_done=None, **kwargs) -> None:
        """Write `files` (or a Snapshot, encoded on the background thread) as run_dir/name."""
        self.wait()

        def job():
            path = write_checkpoint(run_dir, name, files.files() if isinstance(files, Snapshot) else files, **kwargs)
            if on_done is not None:
                on_done(path)
            return path

        self._pending = self._pool.submit(job)

    def wait(self) -> Path | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _not_a_file(path: Path) -> str | None:
    """What `path` is when it exists but is not a regular file ("a directory", "a FIFO", ...);
    None for a regular file or nothing. lstat: a symlink is named as one, never followed."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there, or no way to look: the read or write that follows says why
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISLNK: "a symbolic link", stat.S_ISFIFO: "a FIFO",
             stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def set_aside_latest(run_dir: Path) -> Path | None:
    """A `latest` that is not a regular file (a directory, a symlink, a FIFO, a socket) is a
    damaged pointer: a save cannot replace it and a read can block on it. Rename it
    latest.damaged-<UTC time> beside it, with one warning: nothing of the user's is deleted,
    the step directories say which checkpoint is newest, and the next save writes `latest`
    anew. Resume (runs.resume_point) and every save (`_set_latest`) call it; nothing else
    moves `latest`. -> the new name, or None when `latest` is a file or missing. Call it under the run lock."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    kind = _not_a_file(pointer)
    if kind is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = run_dir / f"{LATEST}.damaged-{stamp}", 1
    while os.path.lexists(target):  # damaged twice in one second: keep both
        n += 1
        target = run_dir / f"{LATEST}.damaged-{stamp}-{n}"
    try:
        os.rename(pointer, target)
    except OSError as e:
        raise UserError(f"`latest` in {run_dir} is {kind}, not a file, and could not be renamed "
                        f"({atomic.cause(e)}); move it elsewhere, then `trainer resume`") from None
    fsync_dir(run_dir)
    log.warning(f"`latest` in {run_dir} is {kind}, not a file: renamed it {target.name} (kept, not deleted); "
                "the newest valid step directory is used and the next save writes a new `latest`")
    return target


def _set_latest(run_dir: Path, name: str) -> None:
    """Point `latest` at step dir `name` (atomic.replace_file); a damaged one is set aside first."""
    set_aside_latest(run_dir)
    atomic.replace_file(Path(run_dir) / LATEST, (name + "\n").encode())


def read_latest(run_dir: Path) -> tuple[str | None, str | None]:
    """(the step dir `latest` names, what is wrong with `latest`): at most one is not None."""
    pointer = Path(run_dir) / LATEST
    kind = _not_a_file(pointer)
    if kind:
        return None, f"`latest` is {kind}, not a file"
    try:  # a symlink or FIFO put there since the lstat is refused, never followed or waited on
        name = atomic.read_small(pointer, 4096, follow=False).decode("utf-8").strip()  # a step dir name: a few bytes
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, not a file, too large, not text
        return None, f"`latest` is unreadable ({reason(e)})"
    if not STEP_DIR.match(name):  # never a path: `../x` must not lead a reader out of the run
        return None, f"`latest` names {name[:60]!r}, which is not a step directory"
    return name, None


def latest_name(run_dir: Path) -> str | None:
    """The step dir name `latest` holds; None when it is missing or damaged."""
    return read_latest(run_dir)[0]


def listdir(path: Path) -> list[Path]:
    try:
        return list(Path(path).iterdir())
    except OSError:  # missing, a file, or unreadable: nothing to list
        return []


def _rank(path: Path) -> tuple[int, ...]:
    """step_000300 -> (300,); step_000300.abandoned.2 -> (300, 2): sorts by step, then by age."""
    return tuple(int(n) for n in re.findall(r"[0-9]+", path.name))


def _step_entries(run_dir: Path) -> list[Path]:
    """Whatever bears a step/iter directory's name: a folder, or damage (a file, a symlink)."""
    return [p for p in listdir(run_dir) if STEP_DIR.match(p.name)]


def step_dirs(run_dir: Path) -> list[Path]:
    """Completed step/iter directories, newest first: real folders in the run, never a symlink
    (followed, it could lead out of the run or nowhere)."""
    return sorted((p for p in _step_entries(run_dir) if p.is_dir() and not p.is_symlink()), key=_rank, reverse=True)


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run folder holds a `latest` (even a damaged one) or a completed step dir."""
    return os.path.lexists(Path(run_dir) / LATEST) or bool(step_dirs(run_dir))


def prune(run_dir: Path, keep_last: int, keep: Path | None = None) -> None:
    """Keep `keep_last` checkpoints: `keep` (the one just written) and the newest others.
    Folders set aside by a resume (*.abandoned) count as the oldest, so they go first, and
    leftovers of interrupted saves go too (atomic.tidy; step_N.tmp and step_N.old are what
    Airlock before 2026-12 left): the disk stays bounded. Call it under the run lock; best/ is
    separate and unaffected."""
    atomic.tidy(run_dir)
    entries = listdir(run_dir)
    abandoned = sorted((p for p in entries if ABANDONED.match(p.name) and p.is_dir()), key=_rank, reverse=True)
    others = [d for d in step_dirs(run_dir) if keep is None or d.name != Path(keep).name] + abandoned
    doomed = others[max(keep_last - (keep is not None), 0):]
    # step_N.old without step_N is the only copy left by a kill between two renames: kept
    doomed += [p for p in entries if LEFTOVER.match(p.name) and p.is_dir()
               and (p.suffix == ".tmp" or (p.parent / p.stem).is_dir())]
    for old in doomed:
        atomic.remove_dir(old)  # a kill leaves it whole or hidden; never follows a symlink out of the run


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Resuming from an older checkpoint abandons the steps saved after it: rename them to
    <name>.abandoned (never loaded; pruned first), so pruning and `find_valid` follow the new branch.
    Whatever else bears a newer step's name (a file, a symlink) is set aside the same way, before
    a step is trained, so the save of that step finds its name free."""
    with lock_run(run_dir):
        for newer in sorted(_step_entries(run_dir), key=_rank, reverse=True):
            if int(STEP_DIR.match(newer.name).group(2)) > step:
                target, n = newer.with_name(newer.name + ".abandoned"), 1
                while os.path.lexists(target):  # an earlier abandoned branch reached this step too: keep both
                    n += 1
                    target = newer.with_name(f"{newer.name}.abandoned.{n}")
                os.replace(newer, target)
                log.warning(f"continuing from step {step}: {newer.name} belongs to the abandoned continuation and "
                            f"was renamed {target.name}")


def _manifest_files(step_dir: Path) -> tuple[dict, str | None]:
    """MANIFEST.json's {file: {sha256, bytes}} when it is well formed and lists every file a
    checkpoint cannot be without, else ({}, what is wrong)."""
    try:
        manifest = atomic.parse_json(atomic.read_small(step_dir / MANIFEST))
    except FileNotFoundError:
        return {}, "no MANIFEST.json (the save did not finish)"
    except (OSError, ValueError) as e:
        return {}, f"unreadable MANIFEST.json ({reason(e)})"
    if not isinstance(manifest, dict):
        return {}, "MANIFEST.json is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return {}, "MANIFEST.json lists no files"
    for fname, want in files.items():
        if not FILE_NAME.match(fname) or fname == MANIFEST:
            return {}, f"MANIFEST.json lists an invalid file name {fname[:60]!r}"
        if not (isinstance(want, dict) and type(want.get("bytes")) is int
                and isinstance(want.get("sha256"), str) and SHA256.match(want["sha256"])):
            return {}, f"MANIFEST.json gives no sha256 and size for {fname}"
    missing = [f for f in REQUIRED if f not in files]
    if MODEL not in files and not (ADAPTER in files and ADAPTER_CONFIG in files):
        missing.append(f"{MODEL} (or {ADAPTER} + {ADAPTER_CONFIG})")
    if missing:
        return {}, f"MANIFEST.json does not list {', '.join(missing)}"
    unlisted = sorted(f for f in KNOWN - files.keys() if os.path.lexists(step_dir / f))
    if unlisted:  # a reader would take it unchecked
        return {}, f"{unlisted[0]} is not in MANIFEST.json"
    return files, None


def _load_pt(path: Path, mmap: bool = False):
    """torch.load that never runs code: weights_only, and only torch.save's zip format (mmap
    then maps tensors instead of reading them, so a large optimizer.pt costs little)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError("not a torch.save zip archive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pickle protocol N" notes on odd files: the error says enough
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")


def _load_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # safe: no Python tags


def _check_contents(step_dir: Path, files: dict) -> str | None:
    """Parse each file as its reader will, cheaply, so a file that hashes right but cannot be
    loaded (a re-signed manifest, a bug) is caught here rather than as a traceback later."""
    from safetensors import safe_open

    named = STEP_DIR.match(step_dir.name)  # best/ is a copy: any step
    number = int(named.group(2)) if named else None
    # what resume reads back; best/ copies either loop's checkpoint, so its file says which
    keys = (COUNTS[named.group(1)],) if named else tuple(COUNTS.values())

    def wrong_step(value) -> bool:
        return type(value) is not int or not 0 <= value < STEP_LIMIT or number not in (None, value)

    for fname in sorted(files):
        path = step_dir / fname
        try:
            if fname.endswith(".safetensors"):
                with safe_open(str(path), "pt"):  # header parsed; offsets checked against the file size
                    pass
            elif fname == STATE:
                state = _load_pt(path)
                if not isinstance(state, dict) or wrong_step(state.get(STEP)):
                    return f"{STATE} does not hold step {number if named else '(a number)'}"
            elif fname == OPTIMIZER:
                opt = _load_pt(path, mmap=True)
                if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                        and isinstance(opt.get("param_groups"), list)):
                    return f"{OPTIMIZER} is not an optimizer state dict"
                del opt  # unmap now
            elif fname == CONFIG:
                cfg = _load_yaml(atomic.read_small(path).decode("utf-8"))
                if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
                    return f"{CONFIG} is not a mapping of config sections"
            elif fname in (TRAINER_STATE, ADAPTER_CONFIG):
                doc = atomic.parse_json(atomic.read_small(path))
                if not isinstance(doc, dict):
                    return f"{fname} is not a JSON object"
                if fname == TRAINER_STATE and all(wrong_step(doc.get(key)) for key in keys):
                    return f"{TRAINER_STATE} does not hold {' or '.join(keys)} {number if named else '(a number)'}"
        except Exception as e:  # untrusted bytes: whatever a parser raises means the file is damaged
            return f"{fname} is unreadable ({reason(e)})"
    return None


def verify(step_dir: Path) -> str | None:
    """None when the checkpoint is whole (manifest complete, every file's size and sha256
    match, every file parses), else what is wrong. Every reader calls it first."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "it is not a directory (or it was removed while being read)"
    files, problem = _manifest_files(step_dir)
    if problem:
        return problem
    for fname, want in files.items():
        path = step_dir / fname
        if not path.is_file():
            return f"{fname} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{fname} has {path.stat().st_size} bytes, manifest says {want['bytes']}"
        if atomic.file_sha256(path) != want["sha256"]:
            return f"{fname} does not match its sha256"
    return _check_contents(step_dir, files)


def find_valid(run_dir: Path, attempt: int = 0) -> Path:
    """The newest checkpoint that verifies: `latest` first, then older ones, with a warning
    for each one skipped. No valid checkpoint is a UserError. A folder that vanishes while it
    is read (a live writer pruned it) is no damage: the list is read again."""
    run_dir = Path(run_dir)
    candidates = step_dirs(run_dir)
    named, problem = read_latest(run_dir)
    if named and (run_dir / named) not in candidates:  # a file, a symlink or nothing under its name
        kind = _not_a_file(run_dir / named) if os.path.lexists(run_dir / named) else "missing"
        problem = f"`latest` names {named}, which is {'a file' if kind is None else kind}, not a checkpoint folder"
    problems = [problem] if problem else []
    if problem:
        log.warning(f"{run_dir}: {problem}; using the newest valid step directory")
    if named and (run_dir / named) in candidates:
        candidates.remove(run_dir / named)
        candidates.insert(0, run_dir / named)
    for i, step_dir in enumerate(candidates):
        problem = verify(step_dir)
        if problem is None:
            return step_dir
        if not os.path.lexists(step_dir) and attempt < 3:  # pruned by the run's live writer mid-read
            return find_valid(run_dir, attempt + 1)
        problems.append(f"{step_dir.name}: {problem}")
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        log.warning(f"checkpoint {step_dir} is corrupt: {problem}; "
                    + (f"falling back to {nxt}" if nxt else "no older checkpoint left"))
    found = f" ({'; '.join(problems)})" if problems else ""
    raise UserError(f"no valid checkpoint in {run_dir}{found}; start a new run with `trainer train` "
                    "or pass a run that has one (--run NAME or CHECKPOINT_PATH=<step dir>)")


def corrupt(step_dir: Path, problem: str) -> UserError:
    return UserError(f"checkpoint {step_dir} is corrupt: {problem}; pick an older step or its run "
                     "(a run falls back to its newest valid checkpoint)")


def read_config(step_dir: Path):
    """config.yaml as parsed YAML (runs.saved_config makes it a Config)."""
    try:
        return _load_yaml(atomic.read_small(Path(step_dir) / CONFIG).decode("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise corrupt(step_dir, f"{CONFIG} is unreadable ({reason(e)})") from None
    except Exception as e:  # yaml's errors: changed since `verify` parsed it
        raise corrupt(step_dir, f"{CONFIG} is not YAML ({reason(e)})") from None


def loop_of(step_dir: Path) -> str:
    """Which loop wrote a checkpoint: "step" (pretraining) or "iter" (GRPO). By its name, or for
    a name without a step (best/, a copy) by what its trainer_state.json counts."""
    named = STEP_DIR.match(Path(step_dir).name)
    if named:
        return named.group(1)
    return "iter" if COUNTS["iter"] in read_trainer_state(step_dir) else "step"


def read_trainer_state(step_dir: Path) -> dict:
    try:
        doc = atomic.parse_json(atomic.read_small(Path(step_dir) / TRAINER_STATE))
    except (OSError, ValueError) as e:
        raise corrupt(step_dir, f"{TRAINER_STATE} is unreadable ({reason(e)})") from None
    if not isinstance(doc, dict):
        raise corrupt(step_dir, f"{TRAINER_STATE} is not a JSON object")
    return doc


def recorded_sha256(step_dir: Path, fname: str) -> str | None:
    """The sha256 MANIFEST.json records for one of the checkpoint's files (None if unlisted)."""
    files, problem = _manifest_files(Path(step_dir))
    return None if problem or fname not in files else files[fname]["sha256"]


def training_state(step: int, tracker: dict, rngs: list) -> dict:
    """state.pt's dict, the one builder both loops use: the step (or iteration), the loop's
    tracker and every RNG (`rngs`: one state per rank, rank 0's first), read back by
    `resume_training`."""
    state = {STEP: step, RNG: rngs[0], TRACKER: tracker}
    if len(rngs) > 1:
        state[RNG_RANKS] = list(rngs)
    return state


def _upgrade_state(state: dict) -> dict:
    """The one place where older checkpoint layouts are brought up to FORMAT_VERSION."""
    version = state.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint format {version} is newer than this trainer ({FORMAT_VERSION}); upgrade Airlock")
    return state


def load_checkpoint(step_dir: Path, model, optimizer=None, map_location="cpu", verified: bool = False) -> dict:
    """Load weights (and optimizer state) in place; -> the state.pt dict. Never unpickles code.
    The checkpoint is verified first unless the caller just did (`verified`)."""
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    problem = None if verified else verify(step_dir)
    if problem:
        raise corrupt(step_dir, problem)

    def read(fname, load):
        try:
            return load(step_dir / fname)
        except Exception as e:  # it verified a moment ago: changed since (damage, or another writer)
            raise corrupt(step_dir, f"{fname} is unreadable ({reason(e)})") from None

    def misfit(e: Exception) -> UserError:
        return UserError(f"checkpoint {step_dir} does not fit the model ({reason(e)}); the architecture changed")

    lora = hasattr(model, "peft_config")
    if (step_dir / ADAPTER).is_file() != lora:
        held, cfg = ("a LoRA adapter", "false") if not lora else ("full weights", "true")
        raise UserError(f"checkpoint {step_dir} holds {held} but the config has model.lora={cfg}")
    weights = read(ADAPTER if lora else MODEL, lambda p: load_file(p, device=str(map_location)))
    _check_weights(step_dir, ADAPTER if lora else MODEL, weights, None if lora else model.state_dict())
    try:
        if lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, weights)
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise UserError(f"checkpoint {step_dir} does not fit the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}); the architecture changed")
            model.tie_weights()
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches
        raise misfit(e) from None
    state = _upgrade_state(read(STATE, lambda p: torch.load(p, weights_only=True, map_location="cpu")))
    if optimizer is not None:
        opt_state = read(OPTIMIZER, lambda p: torch.load(p, weights_only=True, map_location=map_location))
        try:
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise misfit(e) from None
        problem = _optimizer_problem(optimizer, state.get(STEP))
        if problem:
            raise corrupt(step_dir, f"{OPTIMIZER} {problem}")
    return state


def _check_weights(step_dir: Path, fname: str, weights: dict, own: dict | None) -> None:
    """A checkpoint holds what its run trained: finite values (a non-finite step is never saved),
    each in the model's own dtype (`own`, its state_dict; None for an adapter, whose dtype peft
    chooses). Anything else would load without a word: a cast drops bits, a NaN trains on."""
    for key, tensor in weights.items():
        want = (own or {}).get(key)
        if want is not None and tensor.dtype != want.dtype:
            raise corrupt(step_dir, f"{fname} holds {key} as {tensor.dtype}, not the model's {want.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise corrupt(step_dir, f"{fname} holds non-finite values (NaN or inf) in {key}")


def _optimizer_problem(optimizer, step) -> str | None:
    """What is wrong with the state just loaded into `optimizer`, or None. load_state_dict checks
    the groups' sizes only: moments of another shape fail at the first step, moments missing
    restart from zero without a word (no longer the same run), a NaN moment poisons every update."""
    if isinstance(step, int) and step > 0 and not optimizer.state:
        return "holds no state for any parameter, as if no step had been taken"
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                    continue
                if not isinstance(value, torch.Tensor):
                    return f"holds {name} as {type(value).__name__}, not a tensor"
                if value.dim() and value.shape != param.shape:
                    return f"holds {name} of shape {list(value.shape)} for a parameter of shape {list(param.shape)}"
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"holds non-finite values (NaN or inf) in {name}"
    return None


def resume_training(step_dir: Path, model, optimizer, tracker: dict, map_location="cpu",
                    run_dir: Path | None = None, rank: int = 0) -> int:
    """Load weights and optimizer in place, restore every RNG and update `tracker` from the
    checkpoint: what a loop needs to continue bit-exactly. -> the step (or iteration) saved.
    `tracker` holds the loop's defaults: a saved value of another type is a corrupt checkpoint,
    and keys it does not hold are dropped. Rank r of a torchrun group restores its own RNG
    (RNG_RANKS[r]); a rank the checkpoint has none for keeps the generators it has (the caller
    has seeded them and warned). Newer steps are set aside by rank 0 only, and only where the
    resumed run writes (`run_dir`, default the checkpoint's own run): a copy elsewhere (a mirror,
    a read-only folder) is only read."""
    from trainer import runtime

    step_dir = Path(step_dir)
    state = load_checkpoint(step_dir, model, optimizer, map_location=map_location)
    saved = state.get(TRACKER)
    if not isinstance(saved, dict):
        raise corrupt(step_dir, f"{STATE} has no {TRACKER} mapping")
    for key, value in saved.items():
        default = tracker.get(key)
        if key in tracker and value is not None and not _same_kind(default, value):
            kind = "a list" if isinstance(default, list) else "a number" if default is None or isinstance(
                default, (int, float)) else f"a {type(default).__name__}"
            raise corrupt(step_dir, f"{STATE} {TRACKER}.{key} is {one_line(repr(value), 80)}, not {kind}")
    per_rank = state.get(RNG_RANKS)
    try:
        if rank == 0:
            runtime.set_rng_state(state[RNG])
        elif isinstance(per_rank, list) and rank < len(per_rank):
            runtime.set_rng_state(per_rank[rank])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise corrupt(step_dir, f"{STATE} has no usable {RNG} ({reason(e)})") from None
    tracker.update({k: v for k, v in saved.items() if k in tracker})
    if rank != 0:
        return state[STEP]
    if run_dir is None or os.path.realpath(run_dir) == os.path.realpath(step_dir.parent):
        set_aside_newer(step_dir.parent, state[STEP])
    return state[STEP]


def _same_kind(default, value) -> bool:
    """A tracker value may replace its default: numbers for numbers (a None default stands for
    a number not known yet: a first loss, a best val loss), lists of numbers or of lists of
    numbers for lists."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if default is None or number(default):
        return number(value)
    if isinstance(default, list):
        return isinstance(value, list) and all(number(v) or isinstance(v, list) and all(map(number, v))
                                               for v in value)
    return isinstance(value, type(default))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # files are never modified after save, so a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def _replace_dir(src_dir: Path, dst: Path, link: bool) -> None:
    """Copy (or link) src_dir to dst: built beside it and swapped in (trainer.atomic), so a
    failed or interrupted copy removes its partial folder and never replaces a good one."""
    with atomic.staging_dir(dst) as tmp:
        for f in sorted(src_dir.iterdir()):
            if link:
                _link_or_copy(f, tmp / f.name)
            else:
                shutil.copyfile(f, tmp / f.name)
                with open(tmp / f.name, "rb+") as fh:
                    os.fsync(fh.fileno())
        atomic.replace_dir(tmp, dst)


def update_best(run_dir: Path, step_dir: Path, metric: dict) -> None:
    """best/ = a hard-linked copy of step_dir plus best.json naming the step and metric."""
    run_dir = Path(run_dir)
    _replace_dir(step_dir, run_dir / BEST, link=True)
    atomic.write_json(run_dir / "best.json", {"checkpoint": Path(step_dir).name, **metric})


def mirror(step_dir: Path, mirror_run_dir: Path, keep_last: int = 0) -> None:
    """Copy a completed checkpoint to a second location with the same atomic protocol, and
    follow the primary's branch there (set aside newer steps, prune). A failing mirror is a
    warning: the primary checkpoint is already safe."""
    step_dir, mirror_run_dir = Path(step_dir), Path(mirror_run_dir)
    try:
        with lock_run(mirror_run_dir):  # another run of the same name may mirror here too
            _replace_dir(step_dir, mirror_run_dir / step_dir.name, link=False)
            _set_latest(mirror_run_dir, step_dir.name)
            named = STEP_DIR.match(step_dir.name)
            if named:
                set_aside_newer(mirror_run_dir, int(named.group(2)))
            if keep_last:
                prune(mirror_run_dir, keep_last, keep=step_dir)
    except (OSError, UserError) as e:
        log.warning(f"could not mirror {step_dir} to {mirror_run_dir}: {reason(e)}; the primary checkpoint is intact")


def storage_report(run_dir: Path) -> str:
    """'3 checkpoints, 12.1 MB each, 36.3 MB in all' for the log. Sizes by lstat, and a file
    that vanishes or cannot be looked at counts 0: a report never fails a save."""
    def size(path: Path) -> int:
        try:
            return path.lstat().st_size
        except OSError:
            return 0

    sizes = [sum(size(f) for f in listdir(d)) for d in step_dirs(run_dir)]
    if not sizes:
        return "no checkpoints"
    return f"{len(sizes)} checkpoint(s) kept, {sizes[0] / 1e6:.1f} MB each, {sum(sizes) / 1e6:.1f} MB in all"
