"""Shared fixtures: the socket guard for every test, a tiny corpus, a tiny GPT-2 folder with
the real GPT-2 tokenizer, and a helper that runs the real `trainer` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import offline

ROOT = Path(__file__).resolve().parents[1]

CORPUS = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


@pytest.fixture(autouse=True, scope="session")
def socket_guard():
    """Every test runs under the offline guard, as the trainer does with run.offline=true."""
    offline.go_offline()
    yield
    offline.remove_guard()


@pytest.fixture(autouse=True)
def trainer_logger():
    """In-process runs call metrics.setup_logging, which stops the `trainer` logger from
    propagating (and opens a train.log); undo both after each test, so a later test's
    caplog sees the warnings it checks for whatever ran before it."""
    import logging

    yield
    logger = logging.getLogger("trainer")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small code corpus: a few dozen varied files, enough tokens for block_size 32."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"mod_{i:02d}.py").write_text(CORPUS.replace("fibonacci", f"fib_{i}").replace("Stack", f"Stack{i}")
                                              + f"\nVALUE_{i} = {i * 37 % 101}\n")
    return root


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised GPT-2 (real 50257-token vocabulary) saved as an HF folder,
    labelled as a fixture like the vendor step's --fixture output."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-fixture")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    model.save_pretrained(root, safe_serialization=True)
    (root / "FIXTURE.txt").write_text("tiny random GPT-2 for tests; not the real weights\n")
    return root


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m trainer ARGS` in cwd; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float = 120, interval: float = 0.02, proc: subprocess.Popen | None = None):
    """Poll until predicate() is truthy; fail if the process exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited {proc.returncode} before the condition held:\n{out[-3000:]}")
        time.sleep(interval)
    raise AssertionError("timed out waiting for condition")


def tiny_args(corpus: Path, out: Path, name: str, **extra) -> list[str]:
    """CLI overrides for a from-scratch 2-layer model on the tiny corpus, written under out/."""
    opts = {
        "run.name": name, "run.out_dir": str(out / "volumes"), "data.source": str(corpus),
        "data.tokenizer": "char", "data.prepared_dir": str(out / "prepared"), "model.type": "from_scratch",
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "train.batch_size": 4, "train.max_steps": 20, "train.eval_interval": 10, "train.eval_iters": 2,
        "train.log_interval": 5, "train.warmup_steps": 3, "checkpoint.interval": 5, "checkpoint.keep_last": 0,
        "sample.max_new_tokens": 20, "run.threads": 1,
    }
    opts.update(extra)
    return [f"--{k}={v}" for k, v in opts.items()]
