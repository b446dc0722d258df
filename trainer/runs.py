"""The run layout and who may write a run.

    <out_dir>/checkpoints/<run>/   step_N/ or iter_N/ (trainer/checkpoint.py), latest, best/, final/, .lock
    <out_dir>/metrics/<run>/       metrics.csv/jsonl, train.log, manifest.json, ... (trainer/metrics.py)
    <out_dir>/sync/<run>/          GRPO policy versions for the generation server (trainer/grpo/sync.py)

`RunPaths` is the only code that spells this layout. `locate` picks the checkpoint a command
reads (a step dir, a run's newest valid one, or the most recent run's); `restore` builds the
model, tokenizer and config of one for sampling, export and evaluation. `continuation` is the
one resume recipe every command that continues a run calls: lock a run that is resumed where
it lies (runlock.lock_run, which saving and pruning take too), locate the step to continue
from, and rebuild its config with this command's changes under the resume rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from trainer import checkpoint as ckpt
from trainer import distributed
from trainer.checkpoint import LATEST, MANIFEST, find_valid, has_checkpoints, listdir, step_dirs, verify
from trainer.errors import UserError, reason
from trainer.runlock import lock_run

log = logging.getLogger("trainer")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where run `name` under `out_dir` keeps its checkpoints, metrics and sync versions."""

    out_dir: Path
    name: str
    CHECKPOINTS = "checkpoints"

    @classmethod
    def of(cls, cfg) -> RunPaths:
        return cls(Path(cfg.run.out_dir), cfg.run.name)

    @classmethod
    def of_step(cls, step_dir: Path) -> RunPaths:
        """The run a step dir in the <out_dir>/checkpoints/<run>/ layout belongs to."""
        run_dir = Path(step_dir).parent
        return cls(run_dir.parent.parent, run_dir.name)

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / self.CHECKPOINTS / self.name

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics" / self.name

    @property
    def sync(self) -> Path:
        return self.out_dir / "sync" / self.name

    @staticmethod
    def checkpoints_root(out_dir) -> Path:
        return Path(out_dir) / RunPaths.CHECKPOINTS


def writes_in_place(run_dir: Path) -> bool:
    """Whether resuming `run_dir` writes into it: a run in the <out_dir>/checkpoints/<run>/
    layout that this process may write (see run_config_for); else it is only read."""
    run_dir = Path(run_dir)
    return run_dir.parent.name == RunPaths.CHECKPOINTS and os.access(run_dir, os.W_OK)


def run_config_for(step_dir: Path, run_cfg):
    """The run section a resume writes to: the checkpoint's own run when it sits in the
    <out_dir>/checkpoints/<run>/ layout and may be written; a copy elsewhere (a mirror, a
    read-only mount) keeps the configured one."""
    run_dir = Path(step_dir).parent
    if writes_in_place(run_dir):
        return dataclasses.replace(run_cfg, name=run_dir.name, out_dir=str(run_dir.parent.parent))
    return run_cfg


def _last_written(run_dir: Path) -> float:
    """When a run last saved: the newest mtime of `latest` and its step dirs (seconds)."""
    times = []
    for path in [run_dir / LATEST, *step_dirs(run_dir)]:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def _resolve(run: str | None, checkpoint: str | None, out_dir: str) -> tuple[Path, bool]:
    """(what `locate` reads, whether it is one step dir rather than a run folder)."""
    explicit = checkpoint or (None if run else os.environ.get("CHECKPOINT_PATH"))
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise UserError(f"checkpoint {path} {what}; give a step directory such as "
                            f"{out_dir}/checkpoints/<run>/step_000100")
        return path, (path / MANIFEST).exists() or path.name.rsplit("_", 1)[-1].isdigit()
    root = RunPaths.checkpoints_root(out_dir)
    if run:
        run_dir = Path(run) if Path(run).is_dir() and not (root / run).is_dir() else root / run
        if not run_dir.is_dir():
            raise UserError(f"no run {run!r} in {root}; `ls {root}` lists the runs")
        return run_dir, False
    runs = [p for p in listdir(root) if p.is_dir() and has_checkpoints(p)]
    if not runs:
        raise UserError(f"no checkpoint to resume in {root}; start with `trainer train --config ...` "
                        "or pass --run NAME / CHECKPOINT_PATH=<step dir>")
    return max(runs, key=_last_written), False


def run_folder(run: str | None = None, checkpoint: str | None = None, out_dir: str = "volumes") -> Path:
    """The run folder `locate` reads with the same arguments. A command that will write that
    run locks it first (`lock_run`), so a live writer cannot prune what `locate` is reading."""
    path, is_step = _resolve(run, checkpoint, out_dir)
    return path.parent if is_step else path


def locate(run: str | None = None, checkpoint: str | None = None, out_dir: str = "volumes") -> Path:
    """The step dir to resume, sample or export from:
    `checkpoint` (or $CHECKPOINT_PATH) names a step dir or run dir; `run` names a run under
    out_dir/checkpoints (or a path to one); neither = the run written most recently (by its
    `latest` or step dirs: a run killed before its first `latest` counts)."""
    path, is_step = _resolve(run, checkpoint, out_dir)
    if not is_step:
        return find_valid(path)
    problem = verify(path)
    if problem:
        raise ckpt.corrupt(path, problem)
    return path


@contextlib.contextmanager
def resume_point(run: str | None, checkpoint: str | None, out_dir: str):
    """-> the step dir to continue from, as a context. A run resumed where it lies is locked
    before anything is read (a live writer would prune what is read) and stays locked for the
    block; a copy elsewhere (a mirror, a read-only folder) is only read, and the loop locks the
    run it writes."""
    source = run_folder(run, checkpoint, out_dir)
    writer = writes_in_place(source) and distributed.is_writer()  # under torchrun only rank 0 writes and locks
    with lock_run(source) if writer else contextlib.nullcontext():
        if writer:  # a `latest` that is not a file would stop every save: set aside before anything reads it
            ckpt.set_aside_latest(source)
        yield locate(run or (None if checkpoint else str(source)), checkpoint, out_dir)


def saved_config(step_dir: Path):
    """The config a checkpoint was written with (config.yaml), read back as untrusted input."""
    from trainer import config as configs

    try:
        return configs.from_dict(ckpt.read_config(step_dir), f"{Path(step_dir) / ckpt.CONFIG}")
    except (TypeError, ValueError, AttributeError) as e:  # parsed, but not a config this trainer knows
        raise ckpt.corrupt(step_dir, f"{ckpt.CONFIG} is not a valid config ({reason(e)})") from None


def restore(step_dir: Path, device="cpu"):
    """A checkpoint as (model, tokenizer, config, state) for sampling, export and evaluation."""
    import torch
    from tokenizers import Tokenizer

    from trainer import model as models
    from trainer import tokenizer as tk

    step_dir = Path(step_dir)
    problem = verify(step_dir)
    if problem:
        raise ckpt.corrupt(step_dir, problem)
    cfg = saved_config(step_dir)
    try:
        tok = Tokenizer.from_file(str(step_dir / ckpt.TOKENIZER))
    except Exception as e:  # missing (a hand-made checkpoint) or not a tokenizer: any error says so
        raise ckpt.corrupt(step_dir, f"{ckpt.TOKENIZER} is missing or unreadable ({reason(e)})") from None
    model, _ = models.build_model(cfg.model, tok.get_vocab_size(), tk.eot_id(tok), cfg.run.seed,
                                  device=torch.device(device))
    state = ckpt.load_checkpoint(step_dir, model, map_location=device, verified=True)
    return model.to(device).eval(), tok, cfg, state


def locate_and_restore(run: str | None = None, checkpoint: str | None = None, out_dir: str = "volumes",
                       device="cpu"):
    """-> (step_dir, (model, tokenizer, config, state)) for the checkpoint `locate` picks. A
    reader does not lock the run, so a live writer may prune that checkpoint between the
    listing and the reading: then the newest one is looked for again, not called corrupt."""
    for attempt in range(4):
        step_dir = locate(run, checkpoint, out_dir)
        try:
            return step_dir, restore(step_dir, device)
        except UserError:
            if os.path.lexists(step_dir) or attempt == 3:
                raise


KINDS = {"step": "a pretraining checkpoint; continue that run with `trainer resume --run {run}`, or start GRPO "
                 "from it with model.path",
         "iter": "a GRPO iteration; continue that run with `trainer grpo --resume {run}`"}


def refuse_other_loop(step_dir: Path, kind: str) -> None:
    """A UserError naming the command that continues `step_dir` when the other loop wrote it."""
    found = ckpt.loop_of(step_dir)
    if found != kind:
        raise UserError(f"{step_dir} is {KINDS[found].format(run=step_dir.parent.name)}")


@contextlib.contextmanager
def continuation(run: str | None = None, checkpoint: str | None = None, config: str | None = None,
                 overrides: dict | None = None, kind: str = "step", extra_steps: int = 0):
    """The one way a command continues a run. -> (cfg, step_dir), as a context in which the run
    stays locked.

    `run` names a run (or a run folder; None: the most recent run) and `checkpoint` a step dir
    (also $CHECKPOINT_PATH): `resume_point` locks the run where it is resumed in place, then
    locates the step to continue from. Its saved config is the base; `config` (a YAML) and
    `overrides` go on top. The resume rules follow: `kind` ("step" for pretraining, "iter" for
    GRPO) refuses the other loop's checkpoint with the command that continues it; a changed
    frozen key is refused, a change that costs bit-exactness is warned about, the run section
    points at the checkpoint's own run (config.for_resume, run_config_for); `extra_steps` sets
    train.max_steps that far past the saved step. The data checks need the prepared data, so
    the loop makes them (train.setup)."""
    from trainer import config as configs

    overrides = overrides or {}
    if extra_steps < 0:
        raise UserError(f"--extra_steps={extra_steps} must not be negative")
    probe = configs.build(yaml_path=config, overrides={k: v for k, v in overrides.items() if k == "run.out_dir"})
    with resume_point(run, checkpoint, probe.run.out_dir) as step_dir:
        refuse_other_loop(step_dir, kind)
        saved = saved_config(step_dir)
        cfg = configs.build(base=saved.to_dict(), yaml_path=config, overrides=overrides)
        if extra_steps:
            step = ckpt.read_trainer_state(step_dir)["step"]
            cfg = cfg.replace(train=dataclasses.replace(cfg.train, max_steps=step + extra_steps))
        cfg = cfg.replace(run=run_config_for(step_dir, cfg.run))
        cfg, inexact = configs.for_resume(saved, cfg)
        if inexact:
            log.warning(configs.inexact_warning(inexact))
        yield cfg, step_dir
