"""The evaluator: one checkpoint (`--checkpoint PATH`), or every newly completed checkpoint
under a folder (`--watch DIR`).

For each checkpoint: the val loss over the run's own fixed validation batches (the same
`train.eval_iters` batches training uses, so the numbers compare with metrics.csv), the
perplexity exp(val loss), and one sample with the run's sample settings. Each result is one
line appended to metrics/<run>/eval.jsonl and a TensorBoard event file in metrics/<run>/eval/
(run "<run>/eval": val/loss beside training's, val/perplexity, the sample as text), after
which loss.png is redrawn with the train and val curves.

Restarts are free: a checkpoint whose name and MANIFEST sha256 already have a row in
eval.jsonl is skipped. A checkpoint pruned (checkpoint.keep_last) or still being written
while the evaluator reads it is skipped with a warning, never a crash: the weights are read
once into memory, and a step directory that vanishes before that is simply gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import atomic, data, metrics
from trainer import model as models
from trainer.errors import UserError, reason
from trainer import runs
from trainer.runs import RunPaths

log = logging.getLogger("trainer")

EVAL_FILE = "eval.jsonl"
EVENTS_DIR = "eval"  # in metrics/<run>/: the evaluator's event files, a TensorBoard run of their own


def _manifest_sha(step_dir: Path) -> str:
    return hashlib.sha256(atomic.read_small(step_dir / ckpt.MANIFEST)).hexdigest()


def done(metrics_dir: Path) -> set[tuple[str, str]]:
    """(checkpoint name, manifest sha256) of every row already in eval.jsonl."""
    return {(row.get("checkpoint"), row.get("manifest_sha256")) for row in metrics.read_jsonl(metrics_dir / EVAL_FILE)}


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluate_checkpoint(step_dir: Path, device: torch.device, force: bool = False,
                        strict: bool = False) -> dict | None:
    """Evaluate one completed step directory; -> its eval.jsonl row, or None if skipped. A
    checkpoint that cannot be read, or whose data cannot be found as it was trained, is
    skipped with a warning (the watch goes on), or with `strict` is the error."""
    from trainer.generate import sample_text
    from trainer.lm import check_same_data, estimate_loss, expected_data, sample_prompt

    step_dir = Path(step_dir)
    out = RunPaths.of_step(step_dir).metrics
    atomic.check_appendable(out / EVAL_FILE)  # before the work: a FIFO there would hang the append
    try:
        manifest_sha = _manifest_sha(step_dir)
        if not force and (step_dir.name, manifest_sha) in done(out):
            return None
        t0 = time.time()
        model, tok, cfg, state = runs.restore(step_dir, device=device)
        expect = expected_data(step_dir, out)  # the data it was trained on, hashed: no val loss on other data
        prepared = data.find_prepared(cfg.data, expect)
        check_same_data(expect, prepared, step_dir, step_dir.parent.name)
        prompt = sample_prompt(cfg, tok, prepared)  # sft: a prompt of the held-out split
        positions = models.positions(model)
        batches = data.Batches.open(prepared, min(cfg.model.block_size, positions), cfg.train.batch_size,
                                    cfg.run.seed)
    except Exception as e:  # pruned or damaged under the watcher: any library may raise; the watch goes on
        why = "pruned before it could be read" if not step_dir.exists() else f"unreadable ({reason(e)})"
        if strict:  # one checkpoint asked for: its error is the command's, never "already evaluated"
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot evaluate {step_dir}: {why}") from None
        log.warning(f"evaluate: skipped {step_dir}: {why}")
        return None

    val_loss = estimate_loss(model, batches, cfg.train.eval_iters, device, cfg.run.dtype)  # as the run measured it
    s = cfg.sample
    text = sample_text(model, tok, prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed, device)
    row = {
        "run": step_dir.parent.name,
        "checkpoint": step_dir.name,
        "step": int(state.get(ckpt.STEP, step_dir.name.rsplit("_", 1)[-1])),
        "val_loss": round(val_loss, 6),
        "perplexity": round(math.exp(min(val_loss, 50.0)), 4),  # capped: exp(50) is already meaningless
        "eval_iters": cfg.train.eval_iters,
        "sample": text,
        "manifest_sha256": manifest_sha,
        "seconds": round(time.time() - t0, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.mkdir(parents=True, exist_ok=True)
    _append(out / EVAL_FILE, row)
    metrics.log_events(out / EVENTS_DIR, row["step"], {"val_loss": row["val_loss"], "perplexity": row["perplexity"]},
                       texts={"samples/eval": text})
    metrics.plot_loss(out)
    log.info(f"evaluate: {row['run']}/{row['checkpoint']} val loss {val_loss:.4f}, perplexity {row['perplexity']:.2f} "
             f"-> {out / EVAL_FILE}")
    return row


def completed(root: Path) -> list[Path]:
    """Completed step directories under a run folder or a checkpoints root, oldest first, as the
    checkpoint module lists them (no *.tmp, *.old or *.abandoned). best/ and final/ are copies
    of step directories and are not evaluated twice."""
    root = Path(root)
    runs = [root] if ckpt.has_checkpoints(root) else \
        sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = [p for run_dir in runs for p in ckpt.step_dirs(run_dir) if p.name.startswith("step_")]
    return sorted(found, key=lambda p: (p.parent.name, p.name))


def watch_loop(root: Path, device: torch.device, interval: float, once: bool = False) -> int:
    """Evaluate every completed checkpoint under root as it appears; SIGTERM/SIGINT stop after
    the current one. -> the number evaluated."""
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(f"evaluate: watching {root} every {interval:g} s")
    n = 0
    while not stop["flag"]:
        for step_dir in completed(root):
            if stop["flag"]:
                break
            n += evaluate_checkpoint(step_dir, device) is not None
        if once:
            break
        deadline = time.time() + interval
        while not stop["flag"] and time.time() < deadline:
            time.sleep(min(0.5, interval))
    log.info(f"evaluate: stopped after {n} new evaluation(s)")
    return n
