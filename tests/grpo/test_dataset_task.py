"""GRPO on your task, through the real CLI (`python -m trainer grpo` in a subprocess): your
prompts in a JSONL file under your own field name, your reward function in your own .py file
(TRL's signature) weighed with a built-in, a held-out split for the evaluation.

1. configs/grpo_dataset.yaml as shipped (a tiny from-scratch policy, 16 iterations) learns the
   task: the held-out reward must rise by at least 0.15 (measured: 0.036 -> 0.057 -> 0.137 ->
   0.289 -> 0.449 at iterations 0/4/8/12/16, 10 s on 2 cores); metrics.csv
   has a column per reward (reward_same_char, reward_exact_match) whose weighted sum is
   reward_mean; no held-out prompt is ever trained on.
2. Stopped after 2 iterations and resumed, it ends where the uninterrupted run ends (the same
   metrics rows but the clocks, the same weights).
3. Wrong inputs are one line, exit 2, before anything is sampled: a reward function that
   raises or is not in its file, weights that do not match the rewards, a missing dataset, a
   prompt field the rows lack, a prompt the model cannot hold.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.grpo import envs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "grpo_task"  # configs/grpo_dataset.yaml's prompts and reward
BROKEN = """

def broken(prompts, completions, **kwargs):
    return [1.0 / 0 for _ in completions]
"""
SMALL = ["--run.threads=1", "--checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The example's 60 rows like {"question": "b x4:", "answer": "bbbb", "level": 4} (28 different
    prompts: a held-out row's prompt may also be a training row's) and its reward file, with two
    more functions."""
    where = tmp_path_factory.mktemp("task")
    shutil.copy(EXAMPLE / "tasks.jsonl", where / "tasks.jsonl")
    (where / "my_rewards.py").write_text((EXAMPLE / "rewards.py").read_text() + BROKEN)
    return where


def grpo(task, *args, name: str) -> subprocess.CompletedProcess:
    """`trainer grpo --config configs/grpo_dataset.yaml` on the task's copy; `args` add or replace keys."""
    base = [f"--grpo.dataset={task / 'tasks.jsonl'}", f"--grpo.reward={task / 'my_rewards.py'}:same_char,exact_match",
            f"--run.out_dir={task / 'runs'}", f"--run.name={name}", *SMALL]
    given = {a.split("=")[0] for a in args}
    cmd = [sys.executable, "-m", "trainer", "grpo", "--config", "configs/grpo_dataset.yaml",
           *[a for a in base if a.split("=")[0] not in given], *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def rows(task, name: str) -> list[dict]:
    with open(task / "runs" / "metrics" / name / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_tiny_policy_learns_your_task_with_your_reward(task):
    done = grpo(task, name="learn")  # the example's own settings: 16 iterations
    assert done.returncode == 0, done.stderr
    metrics = task / "runs" / "metrics" / "learn"
    evals = {int(p.stem[-3:]): json.loads(p.read_text()) for p in metrics.glob("eval_iter_*.json")}
    curve = {i: e["mean_reward"] for i, e in sorted(evals.items())}
    print("held-out reward:", curve)
    assert curve[16] >= curve[0] + 0.15, curve
    assert set(evals[16]["rewards"]) == {"reward_same_char", "reward_exact_match"}

    table = rows(task, "learn")
    assert len(table) == 16 and {"reward_same_char", "reward_exact_match"} <= set(table[0])
    for row in table:  # reward_mean is the weighted sum of the two
        parts = float(row["reward_same_char"]) + 0.5 * float(row["reward_exact_match"])
        assert abs(float(row["reward_mean"]) - parts) < 1e-5, row
    assert len(evals[0]["problems"]) == 6  # 10% of 60 rows
    split = envs.splits(str(task / "tasks.jsonl"), prompt_field="question")
    trained = {g["prompt"] for it in range(1, 17)
               for g in json.loads((metrics / f"train_iter_{it:03d}.json").read_text())["groups"]}
    held_only = {r["prompt"] for r in split["eval"]} - {r["prompt"] for r in split["train"]}
    assert trained == {r["prompt"] for r in split["train"]} and held_only and not trained & held_only


def test_stop_and_resume_ends_where_the_uninterrupted_run_ends(task):
    whole = grpo(task, "--grpo.iterations=4", "--eval.interval=2", name="whole")  # an iteration-2 eval in both
    first = grpo(task, "--grpo.iterations=2", "--eval.interval=2", name="parts")
    assert whole.returncode == 0 and first.returncode == 0, whole.stderr + first.stderr
    rest = subprocess.run([sys.executable, "-m", "trainer", "grpo", "--resume", "parts", "--grpo.iterations=4",
                           f"--run.out_dir={task / 'runs'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr
    clocks = ("rollout_s", "train_s", "sync_s", "eval_s", "iter_s")
    strip = [{k: v for k, v in r.items() if k not in clocks} for r in rows(task, "whole")]
    assert strip == [{k: v for k, v in r.items() if k not in clocks} for r in rows(task, "parts")]
    ckpts = task / "runs" / "checkpoints"
    assert ((ckpts / "whole" / "iter_000004" / "model.safetensors").read_bytes()
            == (ckpts / "parts" / "iter_000004" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("args, says", [
    (["--grpo.reward={task}/my_rewards.py:broken,exact_match"], "reward {task}/my_rewards.py:broken raised ZeroDivisionError"),
    (["--grpo.reward={task}/my_rewards.py:nope,exact_match"], "{task}/my_rewards.py has no function 'nope' (it has: same_char, broken)"),
    (["--grpo.reward_weights=[1]"], "grpo.reward_weights has 1 value(s) for 2 reward(s)"),
    (["--grpo.dataset={task}/nothing.jsonl"], "grpo.dataset='{task}/nothing.jsonl': No such file"),
    (["--grpo.prompt_field=prompt"], "no text field 'prompt' (has: question, answer, level)"),
    (["--model.block_size=12"], "model.block_size=12 is too small for grpo.env=dataset"),
], ids=["reward-raises", "no-function", "weights", "no-dataset", "no-prompt-field", "prompt-too-long"])
def test_wrong_input_is_one_line_before_any_rollout(task, args, says):
    done = grpo(task, "--grpo.iterations=1", *[a.format(task=task) for a in args], name="bad")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says.format(task=task) in lines[0], lines
    assert "Traceback" not in done.stdout + done.stderr and "eval iter" not in done.stdout
    assert not (task / "runs" / "checkpoints" / "bad").exists() or not any((task / "runs" / "checkpoints" / "bad").iterdir())
