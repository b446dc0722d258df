"""The pretrain / fine-tune loop: fresh runs and bit-exact resumes, on one process or many.

A step is: lr for this step -> grad_accum micro-batches (each a pure function of
(seed, step, global micro-batch index)) -> clip -> AdamW. Everything that decides the next
step's numbers (weights, optimizer moments, every RNG, the step) is in the checkpoint, so a
resumed run reproduces the uninterrupted one bit for bit on CPU.

Under torchrun (trainer/distributed.py) each of the `world` processes holds a replica wrapped
in DistributedDataParallel and draws its own micro-batches: rank r's micro-batch m of a step
is the global micro-batch r * grad_accum + m, so the global batch is world x batch_size x
grad_accum sequences, and one process with grad_accum x world draws the same sequences.
Rank 0 is the writer (lock, checkpoints, metrics, logs); every rank's RNG is gathered into
its checkpoints and each rank restores its own. A stop signal is all-reduced with the step's
loss, so every rank stops after the same step and rank 0 saves it.

The loop is `setup` (everything before step 1), then per step `train_step`, `evaluate`,
`Progress.log` and `save`, with the loop's own numbers in a `TrainState`. A step's numbers
(loss, gradient norm, stop flag) are read one step late, while the next step runs, so a GPU
never waits for the host between steps; a step that is saved, evaluated or the last is read
at once, so no checkpoint holds an update whose loss was not finite, and a stop lands at most
one step after the signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import atomic, data, distributed, lm, metrics, offline, profiling, runlock, runtime
from trainer import model as models
from trainer import tokenizer as tk
from trainer.errors import UserError
from trainer.generate import sample_text
from trainer.runs import RunPaths
from trainer.signals import STOP, Stopped

log = logging.getLogger("trainer")

RECENT = 20  # train losses behind the "train loss" of a checkpoint and the end-of-run summary


def lr_at(step: int, t) -> float:
    """Linear warmup to lr, then cosine to min_lr at max_steps (step counts from 1)."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model, cfg, device) -> torch.optim.Optimizer:
    t = cfg.train
    fused = device.type == "cuda"
    return torch.optim.AdamW(models.param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             fused=fused)


@dataclasses.dataclass
class TrainState:
    """The loop's own numbers besides weights, optimizer and RNG. Saved in state.pt under
    checkpoint.TRACKER by name (the step under checkpoint.STEP) and read back by `resume`."""

    step: int = 0
    tokens: int = 0
    first_loss: float | None = None
    last_ckpt_loss: float | None = None
    best_val: float | None = None
    last_val: float | None = None
    recent: list = dataclasses.field(default_factory=list)  # the last RECENT train losses

    def saved(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}

    @classmethod
    def resume(cls, step_dir: Path, model, optimizer, device, run_dir: Path, rank: int) -> TrainState:
        fields = cls().saved()
        step = ckpt.resume_training(step_dir, model, optimizer, fields, map_location=device, run_dir=run_dir,
                                    rank=rank)
        return cls(step=step, **{**fields, "recent": list(fields["recent"])[-RECENT:]})

    @property
    def train_loss(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def record(self, loss: float, tokens: int) -> None:
        self.tokens += tokens
        if self.first_loss is None:
            self.first_loss = loss
        self.recent = (self.recent + [loss])[-RECENT:]


def _check_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror}); set run.out_dir to a writable folder "
                        "or fix the mount's permissions") from None


def provenance(cfg, meta: dict, device, model_cfg, world: int = 1) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "airlock-trainer"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out = {"config_hash": cfg.hash(), "data_sha256": meta.get("sha256", {}), "data_source": meta.get("source"),
           "tokenizer": meta.get("tokenizer"), "vocab_size": meta.get("vocab_size"), "versions": versions,
           "host": socket.gethostname(), "platform": platform.platform(), "device": str(device),
           "world_size": world, "seed": cfg.run.seed, "image_id": os.environ.get("AIRLOCK_IMAGE_ID"),
           "git_commit": os.environ.get("AIRLOCK_GIT_COMMIT") or _git_commit()}
    if model_cfg.type in ("gpt2", "hf"):
        fixture = Path(model_cfg.path) / "FIXTURE.txt"
        out["weights"] = {"path": model_cfg.path, "fixture": fixture.exists()}
    return out


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def train(cfg, resume_dir: Path | None = None) -> dict:
    """Run (or continue) training. -> summary dict with the final step, losses and weights sha256.
    The writer (rank 0) locks the run for the whole call: a second writer of the same run is
    refused."""
    paths = RunPaths.of(cfg)
    r = distributed.ranks()
    try:
        if not r.writer:
            return _train(cfg, resume_dir, paths)
        _check_writable(paths.checkpoints, "checkpoint directory")
        _check_writable(paths.metrics, "metrics directory")
        with runlock.lock_run(paths.checkpoints):
            return _train(cfg, resume_dir, paths)
    except Stopped as e:  # start-up is not a safe point to save at, and nothing needs saving yet
        log.info(f"stopped by {e} during start-up, before any step ran: nothing was saved or changed; "
                 "run the same command again to start")
        return {"run": cfg.run.name, "stopped": True, "step": None}


@dataclasses.dataclass
class Run:
    """What `setup` prepares once: the config as run, the model (DDP-wrapped under torchrun:
    `model`; the plain module: `module`), optimizer, batches and what a checkpoint carries."""

    cfg: configs.Config
    paths: RunPaths
    ranks: distributed.Ranks
    device: torch.device
    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: data.Batches
    tok: object
    tok_json: bytes
    meta: dict
    prompt_ids: list
    clip: float
    params: list
    tokens_per_step: int
    info: dict


def setup(cfg, resume_dir: Path | None, paths: RunPaths) -> tuple[Run, TrainState]:
    """Everything before step 1: data (prepared when missing), model, optimizer, the resumed
    state, and the run's manifest and config on disk (rank 0)."""
    r = distributed.ranks()
    if resume_dir is None and ckpt.has_checkpoints(paths.checkpoints):
        raise UserError(f"run {cfg.run.name!r} already has checkpoints in {paths.checkpoints}; continue it with "
                        f"`trainer resume --run {cfg.run.name}` (or `trainer train --resume=auto`) or pick a new "
                        "run.name")
    if r.writer:
        metrics.setup_logging(paths.metrics / "train.log")
    else:
        logging.getLogger("trainer").setLevel(logging.WARNING)  # one voice: rank 0's
    device = distributed.device_for(runtime.pick_device(cfg.run.device))
    runtime.configure(device, cfg.run.deterministic)
    distributed.init(device)  # before the guard: it lets through the rendezvous host only
    if cfg.run.offline:
        offline.go_offline(allow_hosts=[h for h in [distributed.master_host()] if h])
    # the thread count changes the float reductions, so it is part of the run: recorded in the
    # config (0 becomes the count actually used) and restored by a resume
    threads = runtime.pin_threads(cfg.run.threads, r.local_world)
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, threads=threads))
    if threads > (os.cpu_count() or threads):
        log.warning(f"run.threads={threads} but this host has {os.cpu_count()} CPUs: kept so that the run stays "
                    "bit-exact (slower); pass --run.threads=N to trade exactness for speed")
    if cfg.model.type in ("gpt2", "hf"):
        models.check_pretrained(cfg.model.path)  # before minutes of data preparation, not after
    if r.writer and cfg.train.export_at_end and cfg.checkpoint.enabled:  # before the run, not at its end
        models.check_export_target(paths.checkpoints / "final", cfg.run.name, any_run=True)

    expect = lm.expected_data(resume_dir, paths.metrics) if resume_dir is not None else None
    prepared = Path(distributed.from_writer(lambda: str(_prepared(cfg, expect, resume_dir))))  # one process prepares
    meta = data.read_meta(prepared)
    if expect is not None:
        lm.check_same_data(expect, prepared, resume_dir, cfg.run.name)
    tok = tk.load(prepared)
    # an end-of-run sample that cannot run is refused before step 1 (sft: a held-out prompt)
    prompt_ids = lm.sample_prompt(cfg, tok, prepared)

    runtime.seed_everything(cfg.run.seed)
    module, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed,
                                            device=device)
    if block_size != cfg.model.block_size:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, block_size=block_size))
    if r.rank:  # dropout differs between ranks; rank 0 keeps the stream a single process has
        runtime.seed_everything(runtime.derived_seed(cfg.run.seed, r.rank))
    module.to(device)
    if device.type == "cuda":  # tensor-core shapes for the output head: 1.31x a GPT-2 124M step on an H200
        padded = models.pad_head(module)
        if padded and r.writer:
            log.info(f"output head's matmul padded to {padded:,} rows (a multiple of {models.HEAD_MULTIPLE}, for "
                     "tensor-core kernels); the model, its checkpoints and exports keep their vocabulary")
    optimizer = make_optimizer(module, cfg, device)
    state = TrainState()
    if resume_dir is not None:
        saved_world = ckpt.read_trainer_state(resume_dir).get(ckpt.WORLD, 1)
        if saved_world != r.world and r.writer:
            log.warning(f"{resume_dir} was written by {saved_world} process(es) and resumes on {r.world}: each "
                        "rank's batches and dropout stream differ, so the run goes on, but no longer bit-exactly")
        state = TrainState.resume(resume_dir, module, optimizer, device, paths.checkpoints, r.rank)
        log.info(f"resumed {cfg.run.name} from {resume_dir} at step {state.step}")
    model = module
    if r.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.run.compile:
        model = torch.compile(model)
    model.train()

    t = cfg.train
    clip = configs.grad_clip(cfg)
    total, trainable = models.count_parameters(module)
    log.info(f"run {cfg.run.name}: {cfg.model.type}{' + LoRA' if cfg.model.lora else ''}, {total:,} parameters "
             f"({trainable:,} trainable), vocab {meta['vocab_size']}, block {block_size}, device {device}"
             f"{f' x {r.world} processes' if r.world > 1 else ''}; {t.max_steps} steps x "
             f"{r.world * t.batch_size * t.grad_accum} sequences; grad clip {clip}")
    runtime.check_dtype(device, cfg.run.dtype)  # once the run is accepted: a refused one leaves its log alone
    info = provenance(cfg, meta, device, cfg.model, r.world)
    if r.writer:
        atomic.write_json(paths.metrics / "manifest.json", info)
        atomic.write_bytes(paths.checkpoints / ckpt.CONFIG, cfg.to_yaml().encode())
        atomic.write_bytes(paths.metrics / ckpt.CONFIG, cfg.to_yaml().encode())
    batches = data.Batches.open(prepared, block_size, t.batch_size, cfg.run.seed)
    run = Run(cfg, paths, r, device, model, module, optimizer, batches, tok,
              (prepared / tk.TOKENIZER_FILE).read_bytes(), meta, prompt_ids, clip,
              models.trainable_parameters(module), r.world * t.batch_size * t.grad_accum * block_size, info)
    return run, state


def _prepared(cfg, expect: dict | None, resume_dir: Path | None) -> Path:
    """The prepared data folder of the run, prepared now when missing or its source changed."""
    prepared = data.find_prepared(cfg.data, expect)
    if not (prepared / "meta.json").is_file():
        log.info(f"prepared data {prepared} not found: preparing it now")
        prepared = data.prepare(cfg.data, log=log.info)
    elif resume_dir is None and data.source_changed(prepared, cfg.data):
        log.info(f"data.source={cfg.data.source} changed since {prepared} was prepared: preparing it again")
        prepared = data.prepare(cfg.data, log=log.info)
    return prepared


@dataclasses.dataclass
class StepResult:
    loss: float  # mean over the global batch
    lr: float
    grad_norm: float | None
    stop: bool  # some rank was asked to stop: every rank stops after the step that reads it


@dataclasses.dataclass
class QueuedStep:
    """A step whose work is queued (on a GPU it may still be running) and whose numbers have not
    been read. The loop reads them one step late, while the next step runs, and at once where
    the step is saved, evaluated or the last (`due`)."""

    step: int
    lr: float
    numbers: distributed.StepNumbers

    def result(self) -> StepResult:
        loss, stop, grad_norm = self.numbers.read()
        if not math.isfinite(loss):  # read before any save: no checkpoint holds this update
            raise UserError(f"loss is {loss} at step {self.step}; lower train.lr, check the data, or check that "
                            "the tokenizer's vocab matches the model (see docs/troubleshooting.md)")
        return StepResult(loss, self.lr, grad_norm, stop)


def train_step(run: Run, step: int) -> QueuedStep:
    """One optimizer step on the global batch, queued without a host sync. The gradient is
    all-reduced by DDP in the last micro-batch's backward (no_sync before it); the loss and the
    stop flag in one collective."""
    t = run.cfg.train
    lr = lr_at(step, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # the loss stays on the device until the step is read: no host sync per micro-batch
    # (float64, added in micro-batch order: the same number as adding the Python floats)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    cuda = run.device.type == "cuda"
    for micro in range(t.grad_accum):
        x, y = run.batches.get_batch("train", step, run.ranks.rank * t.grad_accum + micro)
        if cuda:  # page-locked, so the copy overlaps the previous micro-batch's kernels
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        last = micro == t.grad_accum - 1
        with run.model.no_sync() if run.ranks.world > 1 and not last else contextlib.nullcontext():
            with runtime.autocast(run.device, run.cfg.run.dtype):
                loss = lm.lm_loss(run.model, x, y, masked=run.batches.masked) / t.grad_accum
            loss.backward()
        loss_sum += loss.detach().double()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.clip) if run.clip > 0 else None
    numbers = distributed.reduce_step(loss_sum, bool(STOP), grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return QueuedStep(step, lr, numbers)


def evaluation_due(t, step: int) -> bool:
    return bool(t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps


def evaluate(run: Run, state: TrainState, step: int) -> float | None:
    """The val loss at eval_interval steps and the last one (every rank joins: it is all-reduced)."""
    t = run.cfg.train
    if not evaluation_due(t, step):
        return None
    val = lm.estimate_loss(run.module, run.batches, t.eval_iters, run.device, run.cfg.run.dtype)
    state.last_val = val
    return val


class Progress:
    """Rows in metrics.csv/jsonl, the console line with tok/s and ETA every log_interval, and a
    tqdm bar on a terminal (rank 0 only)."""

    def __init__(self, run: Run, start_step: int):
        self.run, self.t = run, run.cfg.train
        self.rows = metrics.Metrics(run.paths.metrics, resume_step=start_step) if run.ranks.writer else None
        self.mfu = metrics.mfu_meter(run.module, run.device, run.cfg.model.block_size, run.ranks.world)  # GPU only
        self.t0 = self.window_t = time.time()
        self.window_steps = 0
        self.bar = None
        if run.ranks.writer and sys.stderr.isatty() and start_step < self.t.max_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=self.t.max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def log(self, step: int, r: StepResult, val: float | None, tokens: int) -> None:
        if self.rows is None:
            return
        t, per_step = self.t, self.run.tokens_per_step
        sequences = self.run.ranks.world * t.batch_size * t.grad_accum
        self.window_steps += 1
        elapsed = time.time() - self.window_t
        rate = self.window_steps / elapsed if elapsed > 0 else 0.0
        row = {"step": step, "loss": round(r.loss, 6), "val_loss": None if val is None else round(val, 6),
               "lr": r.lr, "grad_norm": None if r.grad_norm is None else round(r.grad_norm, 4),
               "tokens": tokens, "tok_per_s": round(rate * per_step, 1),
               "samples_per_s": round(rate * sequences, 2), "elapsed_s": round(time.time() - self.t0, 2)}
        if self.mfu is not None:  # metrics.jsonl and TensorBoard (train/mfu); metrics.csv keeps its columns
            row["mfu"] = round(self.mfu(rate * per_step), 4)
        self.rows.log(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{r.loss:.4f}")
        if step % t.log_interval == 0 or step == t.max_steps or val is not None:
            eta = (t.max_steps - step) / rate if rate else 0
            vs = f"{val:.4f}" if val is not None else "-"
            line = (f"step {step}/{t.max_steps} | loss {r.loss:.4f} | val {vs} | lr {r.lr:.2e} | "
                    f"tok/s {rate * per_step:,.0f} | samples/s {rate * sequences:.1f} | ETA {_fmt_eta(eta)}")
            if self.bar is not None:
                with self.bar.external_write_mode():
                    log.info(line)
            else:
                log.info(line)
            self.window_t, self.window_steps = time.time(), 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.rows is not None:
            self.rows.close()
            self.rows = None


def save(run: Run, state: TrainState, saver: ckpt.AsyncSaver, reason: str, best: dict | None) -> None:
    """Snapshot now (every rank's RNG gathered to rank 0); rank 0's write, fsyncs, `latest`,
    pruning, best/ and mirror run in the background."""
    cfg, step = run.cfg, state.step
    rngs = distributed.gather(runtime.rng_state())
    if not cfg.checkpoint.enabled or not run.ranks.writer:
        return
    now = state.train_loss
    saved = ckpt.training_state(step, state.saved(), rngs)
    trainer_state = {"step": step, "max_steps": cfg.train.max_steps, "reason": reason, "train_loss": now,
                     "val_loss": state.last_val, "best_val": state.best_val, "tokens": state.tokens,
                     "run": cfg.run.name, "saved_at": time.time(), ckpt.DATA: dict(run.meta["sha256"]),
                     ckpt.THREADS: cfg.run.threads, ckpt.WORLD: run.ranks.world}
    files = saver.snapshot(run.module, run.optimizer, saved, trainer_state, cfg.to_yaml(),
                           extra_files={ckpt.TOKENIZER: run.tok_json})  # encoded and written in the background
    first, last = state.first_loss, state.last_ckpt_loss
    change = f"net loss change {now - first:+.4f} since start" if first is not None else ""
    if last is not None:
        change += f", {now - last:+.4f} since last checkpoint"
    ckpt_dir = run.paths.checkpoints
    saver.save(ckpt_dir, ckpt.step_name(step), files, keep_last=cfg.checkpoint.keep_last,
               mirror_dir=cfg.checkpoint.mirror_dir, best=best,
               on_done=lambda path: log.info(f"saved {path} ({reason}); {change}; {ckpt.storage_report(ckpt_dir)}"))
    state.last_ckpt_loss = now


def _train(cfg, resume_dir: Path | None, paths: RunPaths) -> dict:
    run, state = setup(cfg, resume_dir, paths)
    cfg, t = run.cfg, run.cfg.train
    progress = Progress(run, state.step)
    saver = ckpt.AsyncSaver()
    profiler = profiling.StepProfiler(cfg.profile, run.device, paths.metrics, run.ranks.rank, run.ranks.writer)

    def record(step: int, result: StepResult, val: float | None = None) -> bool:
        state.record(result.loss, run.tokens_per_step)
        progress.log(step, result, val, state.tokens)
        return result.stop

    # from here a signal only sets STOP: the step finishes, a checkpoint is saved, exit 0
    with STOP.polling("finishing this step and saving a checkpoint"):
        try:
            queued = None  # the last step run whose numbers are not read yet
            while state.step < t.max_steps:
                step = state.step = state.step + 1
                running, stop = train_step(run, step), False
                profiler.step(step)
                if queued is not None:  # the step before, read while this one runs
                    stop = record(queued.step, queued.result())
                queued = running
                periodic = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
                if not (stop or periodic or step == t.max_steps or evaluation_due(t, step)):
                    continue
                # a step saved, evaluated or the last is read at once
                result = queued.result()
                stop, queued = stop or result.stop, None
                val = evaluate(run, state, step)
                record(step, result, val)
                if val is not None and (state.best_val is None or val < state.best_val):
                    state.best_val = val
                if stop or periodic or step == t.max_steps:
                    reason = (f"signal {STOP.name or 'SIGTERM'}" if stop else "end" if step == t.max_steps
                              else "interval")
                    # best/ is the best of the saved checkpoints: those whose step was also evaluated
                    is_best = cfg.checkpoint.best and val is not None and val == state.best_val
                    save(run, state, saver, reason, {"step": step, "val_loss": val} if is_best else None)
                if stop:
                    saver.close()
                    progress.close()
                    distributed.barrier()  # every rank leaves once rank 0's checkpoint is complete
                    name = ckpt.latest_name(paths.checkpoints) if run.ranks.writer else None
                    log.info(f"stopped at step {step}/{t.max_steps} by {STOP.name or 'a signal to another rank'}; "
                             f"checkpoint {paths.checkpoints / name if name else '(checkpoints disabled)'}; "
                             f"resume with: trainer resume --run {cfg.run.name}"
                             f"{f' --nproc {run.ranks.world}' if run.ranks.world > 1 else ''}")
                    return {"step": step, "stopped": True, "run": cfg.run.name}
        except RuntimeError as e:
            if "does not have a deterministic implementation" not in str(e):
                raise
            raise UserError(f"run.deterministic=true, but {str(e).split(' does not have')[0]} has no deterministic CUDA "
                            f"kernel in torch {torch.__version__}; set run.deterministic=false (the run goes on, "
                            "but a resume is no longer bit-exact) and continue with `trainer resume --run "
                            f"{cfg.run.name}`") from None
        finally:
            saver.close()  # a pending write finishes (or raises its error) before anything else
            progress.close()
            profiler.close()  # a window cut short is written for the steps it holds
        distributed.barrier()
        if not run.ranks.writer:
            return {"run": cfg.run.name, "step": state.step}
        return finish(run, state)


def finish(run: Run, state: TrainState) -> dict:
    """End of run (rank 0): plot, sample, export final/, summary.json, the weights sha256. The
    checkpoint of the last step is already saved: a signal here skips what is left, and
    `trainer resume` does it later (see `run_complete`)."""
    cfg, model, step = run.cfg, run.module, state.step
    ckpt_dir, metrics_dir = run.paths.checkpoints, run.paths.metrics
    with STOP.polling("skipping the rest of the end-of-run work (`trainer resume` completes it)"):
        sha = models.weights_sha256(model)
        metrics.plot_loss(metrics_dir)
        if cfg.train.sample_at_end and not STOP:
            s = cfg.sample
            text = sample_text(model, run.tok, run.prompt_ids, s.max_new_tokens, s.temperature, s.top_k, s.seed,
                               run.device)
            atomic.write_bytes(metrics_dir / "samples.txt", (text + "\n").encode())
            metrics.log_events(metrics_dir, step, texts={"samples/end_of_run": text})  # TensorBoard's Text tab
            held_out = f", after the held-out prompt {run.tok.decode(run.prompt_ids)!r}" \
                if cfg.data.format == "sft" and not s.prompt else ""
            log.info(f"sample ({cfg.sample.max_new_tokens} new tokens, temperature {cfg.sample.temperature}, "
                     f"top-k {cfg.sample.top_k}{held_out}):\n{text}\n")
        if cfg.train.export_at_end and cfg.checkpoint.enabled and not STOP:
            models.export(model, run.tok, ckpt_dir / "final", any_run=True,
                          extra={"run": cfg.run.name, "step": step, "weights_sha256": sha,
                                 "fixture": run.info.get("weights", {}).get("fixture", False)})
        if STOP:
            log.info(f"stopped by {STOP.name} during the end-of-run work; the checkpoint of step {step} is saved; "
                     f"`trainer resume --run {cfg.run.name}` writes the sample, final/ and summary.json")
            return {"run": cfg.run.name, "step": step, "stopped": True}
        summary = {"run": cfg.run.name, "step": step, "train_loss": state.recent[-1] if state.recent else None,
                   "val_loss": state.last_val, "best_val": state.best_val, "weights_sha256": sha}
        atomic.write_json(metrics_dir / "summary.json", summary)  # last: its presence means the run is complete
    log.info(f"done: {cfg.run.name} step {step}, val loss {state.last_val}, "
             f"metrics in {metrics_dir}, checkpoints in {ckpt_dir}")
    log.info(f"weights sha256: {sha}")
    return summary


def run_complete(cfg, step: int) -> bool:
    """True when the end-of-run work for `step` is done: summary.json names it (written last)."""
    try:
        summary = atomic.read_small(RunPaths.of(cfg).metrics / "summary.json")  # a FIFO would hang
        return atomic.parse_json(summary).get("step") == step
    except (OSError, ValueError, AttributeError):
        return False
