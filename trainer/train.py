"""The pretrain / fine-tune loop: fresh runs and bit-exact resumes.

A step is: lr for this step -> grad_accum micro-batches (each a pure function of
(seed, step, micro)) -> clip -> AdamW. Everything that decides the next step's numbers
(weights, optimizer moments, every RNG, the step) is in the checkpoint, so a resumed run
reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import socket
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import atomic, data, metrics, offline, runtime
from trainer import model as models
from trainer import tokenizer as tk
from trainer.errors import UserError
from trainer.generate import sample_text
from trainer.signals import STOP, Stopped

log = logging.getLogger("trainer")


def run_dirs(cfg) -> tuple[Path, Path]:
    root = Path(cfg.run.out_dir)
    return root / "checkpoints" / cfg.run.name, root / "metrics" / cfg.run.name


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


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; x, y (B, T) ids."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, batches: data.Batches, iters: int, device) -> float:
    """Mean val loss over the same `iters` batches every time, so evaluations compare."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(iters):
        x, y = batches.get_batch("val", i)
        with runtime.autocast(device):
            losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def _check_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror}); set run.out_dir to a writable folder "
                        "or fix the mount's permissions") from None


def provenance(cfg, meta: dict, device, model_cfg) -> dict:
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
           "seed": cfg.run.seed, "image_id": os.environ.get("AIRLOCK_IMAGE_ID"),
           "git_commit": os.environ.get("AIRLOCK_GIT_COMMIT") or _git_commit()}
    if model_cfg.type == "gpt2":
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
    The run is locked for the whole call: a second writer of the same run is refused."""
    ckpt_dir, metrics_dir = run_dirs(cfg)
    _check_writable(ckpt_dir, "checkpoint directory")
    _check_writable(metrics_dir, "metrics directory")
    try:
        with ckpt.lock_run(ckpt_dir):
            return _train(cfg, resume_dir, ckpt_dir, metrics_dir)
    except Stopped as e:  # start-up is not a safe point to save at, and nothing needs saving yet
        log.info(f"stopped by {e} during start-up, before any step ran: nothing was saved or changed; "
                 "run the same command again to start")
        return {"run": cfg.run.name, "stopped": True, "step": None}


def _train(cfg, resume_dir: Path | None, ckpt_dir: Path, metrics_dir: Path) -> dict:
    if resume_dir is None and ckpt.has_checkpoints(ckpt_dir):
        raise UserError(f"run {cfg.run.name!r} already has checkpoints in {ckpt_dir}; continue it with "
                        f"`trainer resume --run {cfg.run.name}` or pick a new run.name")
    metrics.setup_logging(metrics_dir / "train.log")
    if cfg.run.offline:
        offline.go_offline()
    # the thread count changes the float reductions, so it is part of the run: recorded in the
    # config (0 becomes the count actually used) and restored by a resume
    threads = runtime.pin_threads(cfg.run.threads)
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, threads=threads))
    if threads > (os.cpu_count() or threads):
        log.warning(f"run.threads={threads} but this host has {os.cpu_count()} CPUs: kept so that the run stays "
                    "bit-exact (slower); pass --run.threads=N to trade exactness for speed")
    device = runtime.pick_device(cfg.run.device)
    if cfg.model.type == "gpt2":
        models.check_pretrained(cfg.model.path)  # before minutes of data preparation, not after

    expect = expected_data(resume_dir, metrics_dir) if resume_dir is not None else None
    prepared = data.find_prepared(cfg.data, expect)
    if not (prepared / "meta.json").is_file():
        log.info(f"prepared data {prepared} not found: preparing it now")
        prepared = data.prepare(cfg.data, log=log.info)
    elif resume_dir is None and data.source_changed(prepared, cfg.data):
        log.info(f"data.source={cfg.data.source} changed since {prepared} was prepared: preparing it again")
        prepared = data.prepare(cfg.data, log=log.info)
    meta = data.read_meta(prepared)
    if expect is not None:
        check_same_data(expect, prepared, resume_dir, cfg.run.name)
    tok = tk.load(prepared)
    tok_json = (prepared / tk.TOKENIZER_FILE).read_bytes()
    prompt_ids = sample_prompt(cfg, tok)  # an end-of-run sample that cannot run is refused before step 1

    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    if block_size != cfg.model.block_size:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, block_size=block_size))
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    batches = data.Batches.open(prepared, block_size, cfg.train.batch_size, cfg.run.seed)
    clip = configs.grad_clip(cfg)

    start_step, tracker = 0, {"first_loss": None, "last_ckpt_loss": None, "best_val": None, "tokens": 0,
                              "recent": []}
    if resume_dir is not None:
        start_step = ckpt.resume_training(resume_dir, model, optimizer, tracker, map_location=device,
                                          run_dir=ckpt_dir)
        log.info(f"resumed {cfg.run.name} from {resume_dir} at step {start_step}")
    if cfg.run.compile:
        model = torch.compile(model)
    model.train()

    t = cfg.train
    total, trainable = models.count_parameters(model)
    log.info(f"run {cfg.run.name}: {cfg.model.type}{' + LoRA' if cfg.model.lora else ''}, {total:,} parameters "
             f"({trainable:,} trainable), vocab {meta['vocab_size']}, block {block_size}, device {device}; "
             f"{t.max_steps} steps x {t.batch_size * t.grad_accum} sequences; grad clip {clip}")
    run_info = provenance(cfg, meta, device, cfg.model)
    atomic.write_json(metrics_dir / "manifest.json", run_info)
    atomic.write_bytes(ckpt_dir / ckpt.CONFIG, cfg.to_yaml().encode())
    atomic.write_bytes(metrics_dir / ckpt.CONFIG, cfg.to_yaml().encode())

    rows = metrics.Metrics(metrics_dir, resume_step=start_step)
    tokens_per_step = t.batch_size * t.grad_accum * block_size
    recent = deque(tracker["recent"], maxlen=20)
    progress = None
    if sys.stderr.isatty() and start_step < t.max_steps:
        from tqdm import tqdm

        progress = tqdm(total=t.max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    saver = ckpt.AsyncSaver()

    def save(step: int, reason: str, best: dict | None) -> None:
        """Snapshot now; the write, fsyncs, `latest`, pruning, best/ and mirror run in the background."""
        if not cfg.checkpoint.enabled:
            return
        tracker["recent"] = list(recent)
        now = sum(recent) / len(recent) if recent else float("nan")
        state = {ckpt.STEP: step, ckpt.RNG: runtime.rng_state(),
                 ckpt.SAMPLER: {"seed": cfg.run.seed, "next_step": step + 1},
                 ckpt.SCHEDULER: {"step": step, "lr": lr_at(max(step, 1), t)}, ckpt.TRACKER: dict(tracker)}
        trainer_state = {"step": step, "max_steps": t.max_steps, "reason": reason, "train_loss": now,
                         "val_loss": tracker.get("last_val"), "best_val": tracker["best_val"],
                         "tokens": tracker["tokens"], "run": cfg.run.name, "saved_at": time.time(),
                         ckpt.DATA: {k: v for k, v in meta["sha256"].items()}, ckpt.THREADS: cfg.run.threads}
        files = ckpt.serialize(model, optimizer, state, trainer_state, cfg.to_yaml(),
                               extra_files={ckpt.TOKENIZER: tok_json})
        first, last = tracker["first_loss"], tracker["last_ckpt_loss"]
        change = f"net loss change {now - first:+.4f} since start" if first is not None else ""
        if last is not None:
            change += f", {now - last:+.4f} since last checkpoint"
        saver.save(ckpt_dir, ckpt.step_name(step), files, keep_last=cfg.checkpoint.keep_last,
                   mirror_dir=cfg.checkpoint.mirror_dir, best=best,
                   on_done=lambda path: log.info(f"saved {path} ({reason}); {change}; {ckpt.storage_report(ckpt_dir)}"))
        tracker["last_ckpt_loss"] = now

    params = models.trainable_parameters(model)  # once, not per step
    t0 = time.time()
    window_t, window_steps = time.time(), 0
    step = start_step
    # from here a signal only sets STOP: the step finishes, a checkpoint is saved, exit 0
    with STOP.polling("finishing this step and saving a checkpoint"):
        try:
            while step < t.max_steps:
                step += 1
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(t.grad_accum):
                    x, y = batches.get_batch("train", step, micro)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with runtime.autocast(device):
                        loss = lm_loss(model, x, y) / t.grad_accum
                    loss.backward()
                    loss_sum += loss.item()
                if not math.isfinite(loss_sum):  # before the update: the weights on disk and in memory stay finite
                    raise UserError(f"loss is {loss_sum} at step {step}; lower train.lr, check the data, or check that "
                                    "the tokenizer's vocab matches the model (see README, Troubleshooting)")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item() if clip > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker["tokens"] += tokens_per_step
                if tracker["first_loss"] is None:
                    tracker["first_loss"] = loss_sum
                recent.append(loss_sum)

                val = None
                if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps:
                    val = estimate_loss(model, batches, t.eval_iters, device)
                    tracker["last_val"] = val
                window_steps += 1
                elapsed = time.time() - window_t
                rate = window_steps / elapsed if elapsed > 0 else 0.0
                rows.log({"step": step, "loss": round(loss_sum, 6), "val_loss": None if val is None else round(val, 6),
                          "lr": lr, "grad_norm": None if grad_norm is None else round(grad_norm, 4),
                          "tokens": tracker["tokens"], "tok_per_s": round(rate * tokens_per_step, 1),
                          "samples_per_s": round(rate * t.batch_size * t.grad_accum, 2),
                          "elapsed_s": round(time.time() - t0, 2)})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_sum:.4f}")
                if step % t.log_interval == 0 or step == t.max_steps or val is not None:
                    eta = (t.max_steps - step) / rate if rate else 0
                    vs = f"{val:.4f}" if val is not None else "-"
                    line = (f"step {step}/{t.max_steps} | loss {loss_sum:.4f} | val {vs} | lr {lr:.2e} | "
                            f"tok/s {rate * tokens_per_step:,.0f} | samples/s {rate * t.batch_size * t.grad_accum:.1f}"
                            f" | ETA {_fmt_eta(eta)}")
                    if progress is not None:
                        with progress.external_write_mode():
                            log.info(line)
                    else:
                        log.info(line)
                    window_t, window_steps = time.time(), 0

                best_improved = val is not None and (tracker["best_val"] is None or val < tracker["best_val"])
                if best_improved:
                    tracker["best_val"] = val
                periodic = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
                if STOP or periodic or step == t.max_steps:
                    reason = (f"signal {STOP.name}" if STOP else "end" if step == t.max_steps else "interval")
                    # best/ is the best of the saved checkpoints: those whose step was also evaluated
                    is_best = cfg.checkpoint.best and val is not None and val == tracker["best_val"]
                    save(step, reason, {"step": step, "val_loss": val} if is_best else None)
                if STOP:
                    saver.close()
                    rows.close()
                    name = ckpt.latest_name(ckpt_dir)
                    log.info(f"stopped at step {step}/{t.max_steps} by {STOP.name}; checkpoint "
                             f"{ckpt_dir / name if name else '(checkpoints disabled)'}; "
                             f"resume with: trainer resume --run {cfg.run.name}")
                    return {"step": step, "stopped": True, "run": cfg.run.name}
        finally:
            saver.close()  # a pending write finishes (or raises its error) before anything else
            if progress is not None:
                progress.close()

        rows.close()
        tracker["recent"] = list(recent)
        unwrapped = getattr(model, "_orig_mod", model)
        return finish(cfg, unwrapped, tok, ckpt_dir, metrics_dir, device, step, tracker, run_info, prompt_ids)


def finish(cfg, model, tok, ckpt_dir: Path, metrics_dir: Path, device, step: int, tracker: dict,
           run_info: dict, prompt_ids: list[int]) -> dict:
    """End of run: plot, sample, export final/, summary.json, the weights sha256. The checkpoint
    of the last step is already saved: a signal here skips what is left, and `trainer resume`
    does it later (see `run_complete`)."""
    with STOP.polling("skipping the rest of the end-of-run work (`trainer resume` completes it)"):
        sha = models.weights_sha256(model)
        metrics.plot_loss(metrics_dir)
        if cfg.train.sample_at_end and not STOP:
            s = cfg.sample
            text = sample_text(model, tok, prompt_ids, s.max_new_tokens, s.temperature, s.top_k, s.seed, device)
            atomic.write_bytes(metrics_dir / "samples.txt", (text + "\n").encode())
            log.info(f"sample ({cfg.sample.max_new_tokens} new tokens, temperature {cfg.sample.temperature}, "
                     f"top-k {cfg.sample.top_k}):\n{text}\n")
        if cfg.train.export_at_end and cfg.checkpoint.enabled and not STOP:
            models.export(model, tok, ckpt_dir / "final", any_run=True,
                          extra={"run": cfg.run.name, "step": step, "weights_sha256": sha,
                                 "fixture": run_info.get("weights", {}).get("fixture", False)})
        if STOP:
            log.info(f"stopped by {STOP.name} during the end-of-run work; the checkpoint of step {step} is saved; "
                     f"`trainer resume --run {cfg.run.name}` writes the sample, final/ and summary.json")
            return {"run": cfg.run.name, "step": step, "stopped": True}
        summary = {"run": cfg.run.name, "step": step,
                   "train_loss": tracker["recent"][-1] if tracker["recent"] else None,
                   "val_loss": tracker.get("last_val"), "best_val": tracker["best_val"], "weights_sha256": sha}
        atomic.write_json(metrics_dir / "summary.json", summary)  # last: its presence means the run is complete
    log.info(f"done: {cfg.run.name} step {step}, val loss {tracker.get('last_val')}, "
             f"metrics in {metrics_dir}, checkpoints in {ckpt_dir}")
    log.info(f"weights sha256: {sha}")
    return summary


def run_complete(cfg, step: int) -> bool:
    """True when the end-of-run work for `step` is done: summary.json names it (written last)."""
    try:
        return json.loads((run_dirs(cfg)[1] / "summary.json").read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):
        return False


def expected_data(step_dir: Path, metrics_dir: Path) -> dict:
    """{file: sha256} of the prepared data a checkpoint was trained on: its own record, or for
    checkpoints older than that record, the run's provenance and the checkpoint's tokenizer copy."""
    saved = ckpt.read_trainer_state(step_dir).get(ckpt.DATA)
    if saved is None:
        try:
            saved = json.loads((Path(metrics_dir) / "manifest.json").read_text()).get("data_sha256") or {}
        except (OSError, ValueError, AttributeError):
            saved = {}
        tokenizer = ckpt.recorded_sha256(step_dir, ckpt.TOKENIZER)
        saved = {**saved, **({tk.TOKENIZER_FILE: tokenizer} if tokenizer else {})} if isinstance(saved, dict) else saved
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in saved.items()):
        raise UserError(f"checkpoint {step_dir} is corrupt: {ckpt.TRAINER_STATE} {ckpt.DATA!r} is not a mapping of "
                        "file names to sha256; resume from an older step with --checkpoint")
    return saved


def check_same_data(expect: dict, prepared: Path, step_dir: Path, run: str) -> None:
    """A resume must read the tokens and tokenizer the checkpoint was trained on: the files as
    they are now are hashed, not what meta.json says of them."""
    if not expect:
        log.warning(f"{step_dir} records no data fingerprint: cannot check that {prepared} is its data")
        return
    now = data.fingerprint(prepared, names=tuple(expect))
    differ = [name for name in expect if now.get(name) != expect[name]]
    if differ:
        raise UserError(f"prepared data {prepared} is not what run {run} was trained on ({', '.join(differ)} "
                        "differ from the checkpoint's sha256); re-prepare it from the run's original source and "
                        "settings, or start a new run with `trainer train`")


def sample_prompt(cfg, tok) -> list[int]:
    """The seeds' end-of-run sample prompt as ids: `QUESTION: ` for gpt2, the start token for
    from-scratch, or sample.prompt, which must encode to at least one token."""
    s = cfg.sample
    if s.prompt:
        ids = tok.encode(s.prompt).ids
        if not ids:
            raise UserError(f"sample.prompt={s.prompt!r} encodes to no tokens with this tokenizer "
                            f"({cfg.data.tokenizer}); use text the corpus contains")
        return ids
    if cfg.model.type == "gpt2":
        return tok.encode("QUESTION: ").ids
    return [tk.eot_id(tok)]


def train_command(config: str | None = None, **overrides) -> dict:
    """Train a model from scratch or fine-tune one.

    Args:
      config: YAML file (configs/*.yaml). Any key can be overridden as --section.key=value,
        e.g. --train.max_steps=50 --model.lora=true, or via TRAINER_SECTION_KEY variables.
        Short forms: --steps, --seed, --lr, --batch_size, --block_size, --name.
    """
    return train(configs.load(config, **overrides))


def resume_command(run: str | None = None, checkpoint: str | None = None, extra_steps: int = 0,
                   **overrides) -> dict:
    """Continue a run from its newest valid checkpoint, bit-exactly.

    Args:
      run: run name under volumes/checkpoints (or its path); default: the most recent run.
      checkpoint: a step directory to continue from (also $CHECKPOINT_PATH).
      extra_steps: train this many steps past the checkpoint (sets train.max_steps).
      overrides: --section.key=value for length, intervals and logging; model.*, data.* and
        run.seed are fixed by the checkpoint; keys that change the numbers (threads, batch,
        learning rate...) may change, with a warning that the run is no longer bit-exact.
    """
    probe = configs.build(overrides={k: v for k, v in overrides.items() if k.startswith("run.out_dir")})
    checkpoint = checkpoint or (None if run else os.environ.get("CHECKPOINT_PATH"))
    source = ckpt.run_folder(run, checkpoint, probe.run.out_dir)
    # a run resumed where it lies is locked before anything is read (a live writer would prune
    # what we read); a copy elsewhere (a mirror, a read-only folder) is only read, and train()
    # locks the run it writes
    with ckpt.lock_run(source) if ckpt.writes_in_place(source) else contextlib.nullcontext():
        step_dir = ckpt.locate(run or (None if checkpoint else str(source)), checkpoint, probe.run.out_dir)
        return _resume(step_dir, extra_steps, overrides)


def _resume(step_dir: Path, extra_steps: int, overrides: dict) -> dict:
    import yaml

    if step_dir.name.startswith("iter_"):
        raise UserError(f"{step_dir} is a GRPO iteration; continue that run with "
                        f"`trainer grpo --resume {step_dir.parent.name}`")
    saved = configs.from_dict(yaml.safe_load(ckpt.read_config(step_dir)), f"{step_dir / ckpt.CONFIG}")
    cfg = configs.build(base=saved.to_dict(), overrides=overrides)
    cfg = cfg.replace(run=ckpt.run_config_for(step_dir, cfg.run))
    step = ckpt.read_trainer_state(step_dir)["step"]
    if extra_steps < 0:
        raise UserError(f"--extra_steps={extra_steps} must not be negative")
    if extra_steps:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, max_steps=step + extra_steps))
    cfg, inexact = configs.for_resume(saved, cfg)
    if inexact:
        log.warning(configs.inexact_warning(inexact))
    if step >= cfg.train.max_steps and run_complete(cfg, step):
        raise UserError(f"run {cfg.run.name} already reached step {step} of train.max_steps={cfg.train.max_steps}; "
                        "pass --train.max_steps=N (larger) or --extra_steps=N to train further")
    if step >= cfg.train.max_steps:
        log.info(f"run {cfg.run.name} reached step {step} but its end-of-run work is missing: completing it")
    return train(cfg, resume_dir=step_dir)
