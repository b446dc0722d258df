"""Crash-safe checkpoints: atomic save, manifest verification, `latest`, keep-last-K, best, mirror.

Only this module reads or writes checkpoint directories. A checkpoint is named data:

    step_000200/  model.safetensors            full weights (tied tensors stored once)
                  | adapter_model.safetensors  LoRA weights, with adapter_config.json (a peft folder)
                  optimizer.pt  state.pt        torch.save of plain dicts, read with weights_only=True
                  trainer_state.json  config.yaml
                  MANIFEST.json                 sha256 + size of every file above, written last

Save order: files into step_N.tmp/, each fsynced -> MANIFEST -> fsync dir -> rename ->
fsync parent -> replace `latest`. A kill -9 at any point leaves either no step_N or a
complete one; loading verifies the manifest and falls back to the previous step.
"""

from __future__ import annotations

import hashlib
import io
import re
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trainer.errors import UserError

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
STEP, RNG, SAMPLER, SCHEDULER, TRACKER = "step", "rng", "sampler", "scheduler", "tracker"


def step_name(step: int, prefix: str = "step") -> str:
    return f"{prefix}_{step:06d}"


def _fsync_dir(path: Path) -> None:
    # fsync the directory too, or a rename in it can be lost on power failure
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _model_files(model) -> dict[str, bytes]:
    """Weights as safetensors bytes: the adapter alone under LoRA, else the full state dict."""
    from safetensors.torch import save

    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        config = model.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        return {ADAPTER: save(adapter), ADAPTER_CONFIG: (json.dumps(config, indent=2, default=str) + "\n").encode()}
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:  # tied weights (lm_head = wte) are stored once and re-tied on load
            continue
        seen.add(key)
        tensors[name] = tensor.detach().cpu().contiguous()
    return {MODEL: save(tensors, metadata={"format": "pt"})}


def serialize(model, optimizer, state: dict, trainer_state: dict, config_yaml: str,
              extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Snapshot everything a checkpoint holds as bytes. This is the only part of a save that
    must happen between two optimizer steps; writing can then go on in the background."""
    files = _model_files(model)
    files[OPTIMIZER] = _torch_bytes(optimizer.state_dict())
    files[STATE] = _torch_bytes({"format_version": FORMAT_VERSION, **state})
    files[TRAINER_STATE] = (json.dumps(trainer_state, indent=2) + "\n").encode()
    files[CONFIG] = config_yaml.encode()
    files.update(extra_files or {})
    return files


def write_checkpoint(run_dir: Path, name: str, files: dict[str, bytes], keep_last: int = 0,
                     mirror_dir: str = "", best: dict | None = None) -> Path:
    """Write run_dir/name atomically and point `latest` at it; then prune, update best/ (when
    `best` gives its metric) and mirror. On a write error (disk full, read-only) the partial
    directory is removed, older checkpoints stay intact, and a UserError says what happened."""
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = run_dir / (name + ".tmp")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        manifest = {"format_version": FORMAT_VERSION, "name": name,
                    "files": {fname: _write(tmp / fname, data) for fname, data in files.items()}}
        _write(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        old = run_dir / (name + ".old")
        if final.exists():  # re-saving a step: keep the old copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        _set_latest(run_dir, name)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = latest_name(run_dir)
        raise UserError(f"could not save checkpoint {final} ({e.strerror or e}); the older checkpoints are intact"
                        f"{f' (newest: {good})' if good else ''}; free disk space or lower checkpoint.keep_last, "
                        "then `trainer resume`") from None
    if keep_last:
        prune(run_dir, keep_last, keep=final)
    if best is not None:
        try:
            update_best(run_dir, final, best)
        except OSError as e:
            raise UserError(f"checkpoint {final} is saved, but best/ could not be updated ({e.strerror or e}); "
                            "free disk space, then `trainer resume`") from None
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
    """Writes checkpoints on one background thread, so the training loop stalls only for
    `serialize`. At most one write is in flight: the next save, and `wait()` (called on
    signals, at the end and on errors), first finish the previous one and re-raise its error.
    A kill -9 mid-write leaves a step_N.tmp that loading ignores, exactly as a synchronous save."""

    def __init__(self) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = None

    def save(self, run_dir: Path, name: str, files: dict[str, bytes], on_done=None, **kwargs) -> None:
        self.wait()

        def job():
            path = write_checkpoint(run_dir, name, files, **kwargs)
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


def _set_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / (LATEST + ".tmp")
    _write(tmp, (name + "\n").encode())
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def latest_name(run_dir: Path) -> str | None:
    try:
        return (Path(run_dir) / LATEST).read_text().strip() or None
    except OSError:
        return None


STEP_DIR = re.compile(r"^(step|iter)_(\d+)$")  # completed checkpoints; *.tmp, *.old, best/, export_* are not


def _step_dirs(run_dir: Path) -> list[Path]:
    """Completed step/iter directories, newest first."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if run_dir.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(2)), reverse=True)


def prune(run_dir: Path, keep_last: int, keep: Path | None = None) -> None:
    """Keep `keep_last` step dirs: `keep` (the one just written) and the newest others;
    best/ is separate and unaffected."""
    others = [d for d in _step_dirs(run_dir) if keep is None or d.name != Path(keep).name]
    for old in others[max(keep_last - (keep is not None), 0):]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Resuming from an older checkpoint abandons the steps saved after it: rename them to
    <name>.abandoned (kept, never loaded), so pruning and `find_valid` follow the new branch."""
    for newer in _step_dirs(run_dir):
        if int(STEP_DIR.match(newer.name).group(2)) > step:
            target = newer.with_name(newer.name + ".abandoned")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(newer, target)
            log.warning(f"resuming from step {step}: {newer.name} belongs to the abandoned continuation and was "
                        f"renamed {target.name}")


def verify(step_dir: Path) -> str | None:
    """None when every file matches MANIFEST.json, else what is wrong."""
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "no MANIFEST.json (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable MANIFEST.json ({e})"
    for fname, want in manifest.get("files", {}).items():
        path = step_dir / fname
        if not path.is_file():
            return f"{fname} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{fname} has {path.stat().st_size} bytes, manifest says {want['bytes']}"
        if _file_sha256(path) != want["sha256"]:
            return f"{fname} does not match its sha256"
    return None


def find_valid(run_dir: Path) -> Path:
    """The newest checkpoint that verifies: `latest` first, then older ones, with a warning
    for each one skipped. No valid checkpoint is a UserError."""
    run_dir = Path(run_dir)
    candidates = _step_dirs(run_dir)
    named = latest_name(run_dir)
    if named and (run_dir / named) in candidates:
        candidates.remove(run_dir / named)
        candidates.insert(0, run_dir / named)
    problems = []
    for i, step_dir in enumerate(candidates):
        problem = verify(step_dir)
        if problem is None:
            return step_dir
        problems.append(f"{step_dir.name}: {problem}")
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        log.warning(f"checkpoint {step_dir} is corrupt: {problem}; "
                    + (f"falling back to {nxt}" if nxt else "no older checkpoint left"))
    found = f" ({'; '.join(problems)})" if problems else ""
    raise UserError(f"no valid checkpoint in {run_dir}{found}; start a new run with `trainer train` "
                    "or pass a run that has one (--run NAME or CHECKPOINT_PATH=<step dir>)")


def read_config(step_dir: Path) -> str:
    return (Path(step_dir) / CONFIG).read_text()


def read_trainer_state(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / TRAINER_STATE).read_text())


def _upgrade_state(state: dict) -> dict:
    """The one place where older checkpoint layouts are brought up to FORMAT_VERSION."""
    version = state.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint format {version} is newer than this trainer ({FORMAT_VERSION}); upgrade Airlock")
    return state


def load_checkpoint(step_dir: Path, model, optimizer=None, map_location="cpu", verified: bool = False) -> dict:
    """Load weights (and optimizer state) in place; -> the state.pt dict. Never unpickles code.
    The manifest is checked first unless the caller just did (`verified`)."""
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    problem = None if verified else verify(step_dir)
    if problem:
        raise UserError(f"checkpoint {step_dir} is corrupt: {problem}")
    if (step_dir / ADAPTER).is_file():
        if not hasattr(model, "peft_config"):
            raise UserError(f"checkpoint {step_dir} holds a LoRA adapter but the config has model.lora=false")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(step_dir / ADAPTER, device=str(map_location)))
    else:
        if hasattr(model, "peft_config"):
            raise UserError(f"checkpoint {step_dir} holds full weights but the config has model.lora=true")
        weights = load_file(step_dir / MODEL, device=str(map_location))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise UserError(f"checkpoint {step_dir} does not fit the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); the architecture changed")
        model.tie_weights()
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(step_dir / OPTIMIZER, weights_only=True, map_location=map_location))
    return _upgrade_state(torch.load(step_dir / STATE, weights_only=True, map_location="cpu"))


def resume_training(step_dir: Path, model, optimizer, tracker: dict, map_location="cpu") -> int:
    """Load weights and optimizer in place, restore every RNG and update `tracker` from the
    checkpoint: what a loop needs to continue bit-exactly. -> the step (or iteration) saved."""
    from trainer import runtime

    state = load_checkpoint(step_dir, model, optimizer, map_location=map_location)
    runtime.set_rng_state(state[RNG])
    tracker.update(state[TRACKER])
    set_aside_newer(Path(step_dir).parent, state[STEP])
    return state[STEP]


def run_config_for(step_dir: Path, run_cfg):
    """The run section a resume writes to: the checkpoint's own run when it sits in the
    <out_dir>/checkpoints/<run>/ layout; a copy elsewhere (a mirror) keeps the configured one."""
    import dataclasses

    run_dir = Path(step_dir).parent
    if run_dir.parent.name == "checkpoints":
        return dataclasses.replace(run_cfg, name=run_dir.name, out_dir=str(run_dir.parent.parent))
    return run_cfg


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # files are never modified after save, so a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def _replace_dir(src_dir: Path, dst: Path, link: bool) -> None:
    """Copy (or link) src_dir to dst atomically: dst.tmp, fsync, then swap in."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src_dir.iterdir()):
        if link:
            _link_or_copy(f, tmp / f.name)
        else:
            shutil.copyfile(f, tmp / f.name)
            with open(tmp / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def update_best(run_dir: Path, step_dir: Path, metric: dict) -> None:
    """best/ = a hard-linked copy of step_dir plus best.json naming the step and metric."""
    run_dir = Path(run_dir)
    _replace_dir(step_dir, run_dir / BEST, link=True)
    tmp = run_dir / "best.json.tmp"
    _write(tmp, (json.dumps({"checkpoint": Path(step_dir).name, **metric}, indent=2) + "\n").encode())
    os.replace(tmp, run_dir / "best.json")


def mirror(step_dir: Path, mirror_run_dir: Path, keep_last: int = 0) -> None:
    """Copy a completed checkpoint to a second location with the same atomic protocol.
    A failing mirror is a warning: the primary checkpoint is already safe."""
    try:
        mirror_run_dir.mkdir(parents=True, exist_ok=True)
        _replace_dir(step_dir, mirror_run_dir / step_dir.name, link=False)
        _set_latest(mirror_run_dir, step_dir.name)
        if keep_last:
            prune(mirror_run_dir, keep_last, keep=step_dir)
    except OSError as e:
        log.warning(f"could not mirror {step_dir} to {mirror_run_dir}: {e}; the primary checkpoint is intact")


def storage_report(run_dir: Path) -> str:
    """'3 checkpoints, 12.1 MB each, 36.3 MB in all' for the log."""
    dirs = _step_dirs(run_dir)
    sizes = [sum(f.stat().st_size for f in d.iterdir()) for d in dirs]
    if not sizes:
        return "no checkpoints"
    return f"{len(sizes)} checkpoint(s) kept, {sizes[0] / 1e6:.1f} MB each, {sum(sizes) / 1e6:.1f} MB in all"


def locate(run: str | None = None, checkpoint: str | None = None, out_dir: str = "volumes") -> Path:
    """The step dir to resume, sample or export from:
    `checkpoint` (or $CHECKPOINT_PATH) names a step dir or run dir; `run` names a run under
    out_dir/checkpoints (or a path to one); neither = the most recently saved run."""
    explicit = checkpoint or (None if run else os.environ.get("CHECKPOINT_PATH"))
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise UserError(f"checkpoint {path} does not exist; give a step directory such as "
                            f"{out_dir}/checkpoints/<run>/step_000100")
        if (path / MANIFEST).exists() or path.name.rsplit("_", 1)[-1].isdigit():
            problem = verify(path)
            if problem:
                raise UserError(f"checkpoint {path} is corrupt: {problem}; pick an older step or its run "
                                "(the run falls back to its newest valid checkpoint)")
            return path
        return find_valid(path)
    root = Path(out_dir) / "checkpoints"
    if run:
        run_dir = Path(run) if Path(run).is_dir() and not (root / run).is_dir() else root / run
        if not run_dir.is_dir():
            raise UserError(f"no run {run!r} in {root}; `ls {root}` lists the runs")
        return find_valid(run_dir)
    runs = [p for p in root.iterdir() if (p / LATEST).is_file()] if root.is_dir() else []
    if not runs:
        raise UserError(f"no checkpoint to resume in {root}; start with `trainer train --config ...` "
                        "or pass --run NAME / CHECKPOINT_PATH=<step dir>")
    return find_valid(max(runs, key=lambda p: (p / LATEST).stat().st_mtime))


def restore(step_dir: Path, device="cpu"):
    """A checkpoint as (model, tokenizer, config, state) for sampling, export and evaluation."""
    import yaml
    from tokenizers import Tokenizer

    from trainer import config as configs
    from trainer import model as models

    step_dir = Path(step_dir)
    problem = verify(step_dir)
    if problem:
        raise UserError(f"checkpoint {step_dir} is corrupt: {problem}")
    cfg = configs.from_dict(yaml.safe_load(read_config(step_dir)))
    tok = Tokenizer.from_file(str(step_dir / TOKENIZER))
    model, _ = models.build_model(cfg.model, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), cfg.run.seed)
    state = load_checkpoint(step_dir, model, map_location=device, verified=True)
    return model.to(device).eval(), tok, cfg, state
