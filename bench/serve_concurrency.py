"""`trainer serve` under concurrent clients: completion tok/s for R requests sent at once,
the same R requests one after another, and the same work as one batched request.

    python bench/serve_concurrency.py                      # ~1 minute on 2 busy cores
    python bench/serve_concurrency.py --repo /tmp/old      # another checkout's trainer serve
    python bench/serve_concurrency.py --url http://127.0.0.1:8000/v1 --model NAME

Without --url it writes a tiny random GPT-2 (float32, 2 layers, width 64) to a temp folder
and starts `python -m trainer serve` on it from --repo (default: this checkout) in a
subprocess, so client and server do not share a GIL. --vocab gpt2 (default) gives it the
real 50257-token vocabulary and 128 positions: each step's vocabulary-wide work (the LM
head, softmax, CDF) grows with the batch, so batching gains less. --vocab char is the GRPO
tests' 27-character tokenizer and 64 positions, where the fixed cost per step dominates.
Each request is `--prompts` prompts x `--n` completions of up to `--max-tokens` tokens,
seeded (the concurrent and sequential modes send the same requests, the batched one the
same prompts and n); tok/s counts the completion tokens the server reports (with the char
vocabulary many completions end early on eos).
Rounds interleave the three modes; each figure is the median round. The `load:` line is the
1-minute load average before and after, next to the CPU count: on a shared machine the
figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def write_fixture(path: Path, vocab: str, n_embd: int, n_layer: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from trainer.tokenizer import load_gpt2, to_hf

    if vocab == "char":
        from tests.grpo.conftest import char_tokenizer, save_hf_folder

        tok = char_tokenizer()
        size, positions, eos = tok.get_vocab_size(), 64, 0
    else:
        tok, size, positions, eos = None, 50257, 128, 50256
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_positions=positions, n_embd=n_embd, n_layer=n_layer,
                                       n_head=2, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    if tok is not None:
        save_hf_folder(path, model, tok)
    else:
        model.save_pretrained(path)
        to_hf(load_gpt2(path)).save_pretrained(path)


def start_server(repo: Path, model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--model", str(model_dir), "--name", "bench",
                             "--port", str(port)], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"trainer serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("trainer serve did not answer within 120 s")


def run(url: str, bodies: list[dict], concurrent: bool) -> tuple[int, float]:
    """(completion tokens, seconds) for the requests, all at once or one after another."""
    answers: list[dict] = [{}] * len(bodies)

    def one(i: int) -> None:
        answers[i] = post(url, bodies[i])

    t = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for i in range(len(bodies)):
            one(i)
    seconds = time.perf_counter() - t
    return sum(a["usage"]["completion_tokens"] for a in answers), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server's /v1 URL (default: start trainer serve)")
    ap.add_argument("--model", default="bench", help="model name to ask --url for")
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose `trainer serve` is started")
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests (R)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per request")
    ap.add_argument("--n", type=int, default=16, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", choices=("gpt2", "char"), default="gpt2", help="the started server's tokenizer")
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the started server")
    args = ap.parse_args()

    load0 = os.getloadavg()[0]
    proc, tmp = None, None
    url, name = args.url, args.model
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
        write_fixture(tmp, args.vocab, args.n_embd, args.n_layer)
        proc, url = start_server(Path(args.repo), tmp, args.threads)
        name = "bench"
    try:
        prompts = [f"a*{i % 10}=" for i in range(args.requests * args.prompts)]  # in both vocabularies
        common = dict(model=name, n=args.n, max_tokens=args.max_tokens, temperature=1.0)
        bodies = [{**common, "prompt": prompts[i * args.prompts:(i + 1) * args.prompts], "seed": 1000 * i}
                  for i in range(args.requests)]
        batched = [{**common, "prompt": prompts, "seed": 0}]
        post(url, {**common, "prompt": prompts[:1], "n": 1, "max_tokens": 2})  # warm up
        figures: dict[str, list[float]] = {"concurrent": [], "sequential": [], "one batched request": []}
        for _ in range(args.rounds):
            for mode, reqs, conc in (("concurrent", bodies, True), ("sequential", bodies, False),
                                     ("one batched request", batched, False)):
                tokens, seconds = run(url, reqs, conc)
                figures[mode].append(tokens / seconds)
        rows = args.requests * args.prompts * args.n
        where = args.url or f"trainer serve from {args.repo}, {args.vocab} vocabulary, {args.threads} thread(s)"
        print(f"server: {where}; {args.requests} requests x "
              f"{args.prompts} prompt(s) x n={args.n} x {args.max_tokens} tokens = {rows * args.max_tokens} tokens "
              f"per mode per round, {args.rounds} rounds")
        for mode, values in figures.items():
            print(f"  {mode:>20}: {statistics.median(values):8,.0f} tok/s   (rounds: "
                  f"{', '.join(f'{v:,.0f}' for v in values)})")
        print(f"load: {load0:.2f} before, {os.getloadavg()[0]:.2f} after (1-min average), {os.cpu_count()} CPUs")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
