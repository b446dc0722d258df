"""The evaluator on a real tiny run: its val loss equals the one training logged for the same
step (same batches), --watch is idempotent across restarts, and a checkpoint pruned while it
is being evaluated is skipped with a warning instead of crashing the watcher."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from trainer import runs
from trainer import config, evaluate, train


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    cfg = config.build(overrides={
        "run.name": "ev", "run.out_dir": str(root / "volumes"),
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "data.source": str(corpus_dir), "data.tokenizer": "char", "data.prepared_dir": str(root / "prepared"),
        "train.max_steps": 6, "train.batch_size": 4, "train.eval_interval": 3, "train.eval_iters": 2,
        "train.export_at_end": False, "train.sample_at_end": False,
        "checkpoint.interval": 3, "checkpoint.keep_last": 0, "sample.max_new_tokens": 8})
    train.train(cfg)
    return root / "volumes"


def rows(metrics_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (metrics_dir / "eval.jsonl").read_text().splitlines()]


def test_watch_matches_training_and_is_idempotent(run):
    import torch

    n = evaluate.watch_loop(run / "checkpoints", torch.device("cpu"), interval=0.1, once=True)
    assert n == 2  # step_000003 and step_000006
    out = run / "metrics" / "ev"
    got = {r["step"]: r for r in rows(out)}
    with open(out / "metrics.csv", newline="") as f:
        logged = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]}
    for step, val in logged.items():
        assert got[step]["val_loss"] == pytest.approx(val, abs=1e-5), f"step {step}"
        assert got[step]["perplexity"] > 1 and isinstance(got[step]["sample"], str)
    assert (out / "loss.png").is_file()
    # a restarted evaluator finds nothing new
    assert evaluate.watch_loop(run / "checkpoints", torch.device("cpu"), interval=0.1, once=True) == 0
    assert len(rows(out)) == 2


def test_pruned_while_evaluating_is_skipped(run, monkeypatch, caplog):
    import torch

    victim = run / "checkpoints" / "ev" / "step_000003"
    copy = victim.with_name("step_000009")  # a new checkpoint that keep_last prunes mid-read
    shutil.copytree(victim, copy)
    real = runs.restore

    def prune_then_restore(step_dir, **kw):
        shutil.rmtree(step_dir)
        return real(step_dir, **kw)

    monkeypatch.setattr(runs, "restore", prune_then_restore)
    assert evaluate.evaluate_checkpoint(copy, torch.device("cpu")) is None
    assert "pruned" in caplog.text
