"""`trainer sweep` runs a 3x3 grid through the real CLI: nine runs named by their values,
a summary (CSV and markdown) whose final eval rewards are the runs' own eval files, a
partially done run resumed from its last iteration (not redone), a second invocation that
skips every finished run, and bad grid syntax as one line with exit code 2."""

import csv
import json

import pytest

from trainer import cli
from trainer import config as configs
from trainer.grpo.loop import grpo
from trainer.grpo.sweep import parse_grid, plan

TINY = """# trainer sweep --config tiny.yaml --grid 'grpo.lr=[...]'
run: {device: cpu, seed: 3}
model: {type: from_scratch, n_layer: 1, n_head: 1, n_embd: 16, block_size: 32, dropout: 0.0}
grpo: {env: repeat, iterations: 2, prompts_per_iter: 2, group_size: 2, max_tokens: 4, minibatch_size: 4}
eval: {interval: 0, num_problems: 2, replicates: 2}
checkpoint: {keep_last: 1}
"""
GRID = "grpo.lr=[0.001,0.003,0.01] grpo.beta=[0.0,0.05,0.1]"


def snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_three_by_three_sweep_summary_resume_and_skip(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "vol"
    # an earlier sweep that was stopped in its fifth run, after that run's first iteration
    grpo(configs.load(str(config), **{"run.out_dir": str(out), "run.name": "tiny-lr0.003-beta0.05",
                                      "grpo.beta": 0.05, "grpo.lr": 0.003, "grpo.iterations": 1}))
    partial = out / "metrics" / "tiny-lr0.003-beta0.05"
    first_iter = (partial / "train_iter_001.json").stat().st_mtime_ns
    capsys.readouterr()

    cli.main(["sweep", "--config", str(config), "--grid", GRID, f"--run.out_dir={out}"])
    printed = capsys.readouterr().out
    assert "[5/9] tiny-lr0.003-beta0.05: resuming from iteration 1" in printed
    assert printed.count(": starting") == 8
    with open(out / "metrics" / "tiny-sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [f"tiny-lr{lr}-beta{b}" for lr in ("0.001", "0.003", "0.01") for b in ("0.0", "0.05", "0.1")]
    assert [r["run"] for r in rows] == names
    assert {(r["grpo.lr"], r["grpo.beta"]) for r in rows} == {(lr, b) for lr in ("0.001", "0.003", "0.01")
                                                   for b in ("0.0", "0.05", "0.1")}
    for r in rows:
        final = json.loads((out / "metrics" / r["run"] / "eval_iter_002.json").read_text())
        assert r["status"] == "done" and r["iterations"] == "2/2"
        assert float(r["eval_reward"]) == final["mean_reward"] and float(r["pass_rate"]) == final["pass_rate"]
        assert 0.0 <= float(r["eval_reward_start"]) <= 1.0
    md = (out / "metrics" / "tiny-sweep" / "summary.md").read_text().splitlines()
    assert md[0].startswith("| run | grpo.lr | grpo.beta | status |") and len(md) == 2 + 9
    # the partial run continued from iteration 1: iteration 1 was not redone, each row once
    assert (partial / "train_iter_001.json").stat().st_mtime_ns == first_iter
    assert [line.split(",")[0] for line in (partial / "metrics.csv").read_text().splitlines()] == \
        ["iteration", "1", "2"]

    before = snapshot(out / "checkpoints")
    cli.main(["sweep", "--config", str(config), "--grid", GRID, f"--run.out_dir={out}"])
    assert capsys.readouterr().out.count("finished earlier, skipped") == 9
    assert snapshot(out / "checkpoints") == before


@pytest.mark.parametrize("grid, needle", [
    ("grpo.lr=5e-6", "cannot read 'grpo.lr=5e-6'"),
    ("grpo.lr=[1e-5,]", "grpo.lr=[1e-5,] has an empty value"),
    ("lr=[1e-5]", "needs its section"),
    ("grpo.lr=[1e-5] grpo.lr=[2e-5]", "appears twice"),
    ("grpo.lrate=[1e-5]", "unknown key grpo.lrate; did you mean 'lr'"),
    ("grpo.beta=[-1]", "grpo.beta"),
])
def test_bad_grid_is_one_line_and_exit_2(tmp_path, capsys, grid, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--grid", grid, f"--run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_grid_values_are_typed_by_the_config_and_named():
    grid = parse_grid(" grpo.lr=[5e-6, 1e-5]  grpo.env=[repeat,sat] train.lr=[0.1] ")
    assert grid == [("grpo.lr", ["5e-6", "1e-5"]), ("grpo.env", ["repeat", "sat"]), ("train.lr", [0.1])]
    name, runs = plan(None, grid, {"run.name": "base"})
    assert name == "base-sweep"
    assert [r["name"] for r in runs][:2] == ["base-grpo_lr5e-06-envrepeat-train_lr0.1",
                                             "base-grpo_lr5e-06-envsat-train_lr0.1"]
    assert runs[0]["values"] == {"grpo.lr": 5e-6, "grpo.env": "repeat", "train.lr": 0.1}
