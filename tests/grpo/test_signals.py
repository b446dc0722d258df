"""SIGTERM during `python -m trainer grpo` (a real subprocess through the CLI) finishes the
current iteration, saves it, prints the resume command and exits 0; resuming through the
CLI with `--config X --resume RUN` gives the same final weights and optimizer state
(sha256 of the saved files) and the same metrics rows as an uninterrupted run, with every
iteration in metrics.csv exactly once."""

import csv
import json
import os
import signal

import torch

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer.grpo.loop import CLOCKS, grpo
from tests.conftest import ROOT, run_cli, start_cli, wait_for

CONFIG = """# trainer grpo --config run.yaml
run: {device: cpu, seed: 5, threads: 1}
model: {type: from_scratch, n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, dropout: 0.0}
grpo: {env: repeat, iterations: 6, prompts_per_iter: 4, group_size: 4, max_tokens: 8, lr: 0.003,
       beta: 0.05, ppo_epochs: 2, minibatch_size: 8}
eval: {interval: 2, num_problems: 4, replicates: 2}
checkpoint: {keep_last: 0}
"""

ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def rows(metrics_dir):
    with open(metrics_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in CLOCKS} for r in csv.DictReader(f)]


def saved_sha(step_dir):
    files = json.loads((step_dir / ckpt.MANIFEST).read_text())["files"]
    return {name: files[name]["sha256"] for name in (ckpt.MODEL, ckpt.OPTIMIZER)}


def test_sigterm_saves_exits_0_and_resume_is_exact(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "vol"
    proc = start_cli(["grpo", "--config", str(config), "--run.name=sig", f"--run.out_dir={out}"], tmp_path, ENV)
    run = out / "checkpoints" / "sig"
    wait_for(lambda: ckpt.latest_name(run), timeout=120, interval=0.01, proc=proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped = int(ckpt.latest_name(run).rsplit("_", 1)[1])
    assert stopped < 6, "the run finished before SIGTERM arrived; the test proves nothing"
    assert ckpt.verify(run / ckpt.latest_name(run)) is None
    assert f"stopped by signal after iteration {stopped}" in output
    assert f"trainer grpo --resume sig --run.out_dir={out}" in output
    assert [r["iteration"] for r in rows(out / "metrics" / "sig")] == [str(i) for i in range(1, stopped + 1)]

    resumed = run_cli(["grpo", "--config", str(config), "--resume", "sig", f"--run.out_dir={out}"], tmp_path, ENV)
    assert f"resumed sig from {run / ckpt.step_name(stopped, 'iter')} at iteration {stopped}" in resumed.stdout

    threads = torch.get_num_threads()
    try:  # the same config uninterrupted, in this process (run.threads=1 like the subprocess)
        grpo(configs.load(str(config), **{"run.name": "whole", "run.out_dir": str(out)}))
    finally:
        torch.set_num_threads(threads)
    final = ckpt.step_name(6, "iter")
    assert saved_sha(run / final) == saved_sha(out / "checkpoints" / "whole" / final)
    assert rows(out / "metrics" / "sig") == rows(out / "metrics" / "whole")
    assert [r["iteration"] for r in rows(out / "metrics" / "sig")] == [str(i) for i in range(1, 7)]
