"""TensorBoard event files of real runs, read back with TensorBoard's EventAccumulator.
Pretraining through the CLI, killed with SIGKILL after a checkpoint with rows past it and
resumed: every CSV column's scalars equal metrics.csv, each step once (before the resume the
events did hold the steps past the checkpoint, so the purge is what removed them); the
end-of-run sample is text; the evaluator's val loss and perplexity (run <run>/eval) equal
eval.jsonl. GRPO stopped after 2 iterations and resumed: every number of its metrics rows,
each iteration once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import start_cli, tiny_args, wait_for
from trainer import checkpoint as ckpt
from trainer import evaluate, metrics
from trainer.commands import resume_command

STEPS = 30


def accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def assert_scalars_equal_rows(log_dir: Path, rows: list[dict], key: str) -> int:
    """Each numeric column of the rows is a tag whose points are the rows' (step, value), once
    each. -> the number of tags checked."""
    acc = accumulator(log_dir)
    checked = 0
    for column in rows[0]:
        want = [(int(r[key]), float(r[column])) for r in rows if r[column] not in ("", None)
                and column != key and _is_number(r[column])]
        if not want:
            continue
        got = [(e.step, e.value) for e in acc.Scalars(metrics.tag(column))]
        assert [s for s, _ in got] == [s for s, _ in want], f"{column}: steps {[s for s, _ in got]}"
        for (step, value), (_, expected) in zip(got, want):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-12), f"{column} at {key} {step}"
        checked += 1
    return checked


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def test_pretraining_events_after_sigkill_and_resume(tmp_path, corpus_dir):
    name = "tb"
    volumes = tmp_path / "volumes"
    run_dir, metrics_dir = volumes / "checkpoints" / name, volumes / "metrics" / name
    args = tiny_args(corpus_dir, tmp_path, name, **{"train.max_steps": STEPS, "checkpoint.interval": 10,
                                                     "train.eval_interval": 5})
    proc = start_cli(["train", *args], cwd=tmp_path)
    try:
        wait_for(lambda: (ckpt.latest_name(run_dir) or "") >= "step_000010"
                 and len(metrics.read_rows(metrics_dir / "metrics.csv")) >= 13, proc=proc)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = int(ckpt.latest_name(run_dir).split("_")[1])
    logged = [e.step for e in accumulator(metrics_dir).Scalars("train/loss")]
    assert logged[-1] > saved and logged[-1] < STEPS, "the kill should leave points past the checkpoint"

    resume_command(run=name, **{"run.out_dir": str(volumes)})
    rows = metrics.read_rows(metrics_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    checked = assert_scalars_equal_rows(metrics_dir, rows, "step")
    assert checked == len(metrics.TRAIN_FIELDS) - 1  # every column but the step itself
    (sample,) = accumulator(metrics_dir).Tensors("samples/end_of_run/text_summary")
    assert sample.step == STEPS
    assert sample.tensor_proto.string_val[0].decode() == (metrics_dir / "samples.txt").read_text().strip("\n")

    # the evaluator's rows, in a TensorBoard run of their own beside training's
    assert evaluate.watch_loop(run_dir, torch.device("cpu"), interval=0.1, once=True) == STEPS // 10
    evals = [json.loads(line) for line in (metrics_dir / "eval.jsonl").read_text().splitlines()]
    acc = accumulator(metrics_dir / "eval")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("val/loss")] == \
        [(r["step"], r["val_loss"]) for r in evals]
    assert [e.value for e in acc.Scalars("val/perplexity")] == pytest.approx([r["perplexity"] for r in evals])
    assert len(acc.Tensors("samples/eval/text_summary")) == len(evals) == STEPS // 10


def test_grpo_events_after_a_stop_and_resume(tmp_path):
    from trainer import config as configs
    from trainer.commands import grpo_command
    from trainer.grpo.loop import FIELDS, grpo

    small = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
             "grpo.prompts_per_iter": 4, "grpo.group_size": 4, "grpo.max_tokens": 6, "grpo.minibatch_size": 16,
             "grpo.beta": 0.05, "eval.interval": 1, "eval.num_problems": 4, "eval.replicates": 2, "checkpoint.keep_last": 0,
             "run.device": "cpu", "run.out_dir": str(tmp_path), "run.name": "g"}
    grpo(configs.load(None, **{**small, "grpo.iterations": 2}))
    grpo_command(resume="g", **{"run.out_dir": str(tmp_path), "grpo.iterations": 3})
    metrics_dir = tmp_path / "metrics" / "g"
    rows = metrics.read_rows(metrics_dir / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    # the evaluation before iteration 1 has no CSV row but starts the eval curves at step 0
    first = json.loads((metrics_dir / "eval_iter_000.json").read_text())
    zero = {**{k: "" for k in rows[0]}, "iteration": "0", "eval_reward": first["mean_reward"],
            "eval_pass_rate": first["pass_rate"]}
    checked = assert_scalars_equal_rows(metrics_dir, [zero, *rows], "iteration")
    numeric = [f for f in rows[0] if f != "iteration" and all(_is_number(r[f]) for r in rows)]
    assert set(rows[0]) == set(FIELDS) | {"reward_repeat"}  # and a column per reward
    assert checked == len(numeric) and {"reward_mean", "reward_repeat", "zero_std_frac", "kl", "eval_reward"} <= set(numeric)
