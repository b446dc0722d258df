"""Shared tiny components: a char tokenizer, the real GPT-2 tokenizer, a 2-layer random GPT-2
and its HF folder, and a real uvicorn server for apps under test."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOT = "<|endoftext|>"
ALPHABET = "\n *=0123456789abcd+-()SATn:"


def char_tokenizer(alphabet: str = ALPHABET) -> Tokenizer:
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(sorted(set(alphabet)))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # BPE with no merges = one token per char
    tok.add_special_tokens([EOT])
    tok.decoder = decoders.Fuse()
    return tok


def tiny_model(vocab_size: int, seed: int = 0, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_layer=2, n_head=2, n_embd=n_embd,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def pretrain_repeat_base(tok: Tokenizer, steps: int = 200, seed: int = 0, chars: str = "abcd") -> GPT2LMHeadModel:
    """A tiny GPT-2 (2 layers, width 64) after `steps` of next-token training on lines in the
    `repeat` env's format whose answers are unrelated to the prompt: "c*L=" followed by random
    runs of random characters ("b*6=ddaccc"). The base learns the alphabet, the format and
    that characters come in runs; not that the answer repeats the prompt's character L
    times, which GRPO must teach (its held-out reward starts near 0.12). About 15 s on
    2 cores. A random base cannot be steered by LoRA at all: with GPT-2's init the tied
    embeddings are so small that ln_f-bounded hidden states move the logits by < 1.5 nats."""
    import random

    rng = random.Random(seed)

    def runs(n: int) -> str:
        out = ""
        while len(out) < n:
            out += rng.choice(chars) * rng.randint(1, 6)
        return out[:n]

    def line(width: int = 32) -> str:
        text = ""
        while len(text) < width:
            text += f"{rng.choice(chars)}*{rng.randint(1, 9)}={runs(rng.randint(1, 9))}\n"
        return text[:width]

    model = tiny_model(tok.get_vocab_size(), seed=seed, n_embd=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        ids = torch.tensor([tok.encode(line()).ids for _ in range(32)])  # (32, 32)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def pretrain_lm(model: GPT2LMHeadModel, rows, steps: int, lr: float, vocab: list[int] | None = None) -> GPT2LMHeadModel:
    """`steps` of next-token AdamW training of a GPT-2 with tied embeddings; `rows()` gives one
    batch of equal-length id lists.

    `vocab` (every id the rows use) makes a large vocabulary cheap without changing the result:
    every other token's embedding row is first set to one shared vector. Those tokens are never
    inputs, so under the full softmax they keep equal logits, probabilities and gradients, and
    the full softmax equals one over `vocab` plus that shared row counted once per token it
    stands for (log of the count added to its logit). Training runs on that small softmax (the
    shared row's gradient divided by the count: what each row gets) and the shared row is
    copied back to every such token at the end. GPT-2's 50,257-way output layer, ~95% of a
    step's time, shrinks to len(vocab) + 1 rows. Checked against the full softmax: after 5
    steps the logits agree to 2e-5 (float rounding, which AdamW amplifies only on parameters
    whose gradient is ~0, such as attention key biases)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    wte = model.get_input_embeddings().weight
    if vocab is not None:
        assert model.get_output_embeddings().weight is wte, "needs tied input and output embeddings"
        keep = sorted(set(vocab))
        rest = torch.ones(len(wte), dtype=torch.bool)
        rest[keep] = False
        shared = int(rest.nonzero()[0])
        count = int(rest.sum())
        with torch.no_grad():
            wte[rest] = wte[shared].clone()
        rows_used = torch.tensor(keep + [shared])
        compact = torch.full((len(wte),), -1, dtype=torch.long)
        compact[keep] = torch.arange(len(keep))
        offset = torch.zeros(len(keep) + 1)
        offset[-1] = math.log(count)
    for _ in range(steps):
        ids = torch.tensor(rows())
        if vocab is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            hidden = model.transformer(input_ids=ids).last_hidden_state[:, :-1]
            logits = hidden @ wte[rows_used].T + offset
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     compact[ids[:, 1:]].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if vocab is not None:
            wte.grad[shared] /= count
        opt.step()
    if vocab is not None:
        with torch.no_grad():
            wte[rest] = wte[shared].clone()
    return model.eval()


def gpt2_vllm_model(seed: int = 0, n_positions: int = 64) -> GPT2LMHeadModel:
    """A tiny GPT-2 with the real 50,257-token vocabulary that vLLM-CPU serves: 2 layers, width
    128, 2 heads (vLLM's CPU attention needs head_dim 64), <|endoftext|> = 50256."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=n_positions, n_layer=2, n_head=2, n_embd=128,
                     bos_token_id=50256, eos_token_id=50256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def pretrain_repeat_gpt2_base(tok: Tokenizer, steps: int = 60, seed: int = 0, chars: str = "abcd",
                              batch: int = 32, width: int = 24) -> GPT2LMHeadModel:
    """gpt2_vllm_model after `steps` of next-token training on `repeat`-format lines whose answers
    are unrelated to the prompt, as pretrain_repeat_base, in GPT-2's BPE. Each line is encoded
    as GRPO sees it: the prompt "c*L=" on its own, then the answer and "\\n" (the ids a policy
    samples after the prompt), so the base learns the format in the tokens it will be asked
    for. Rows of `width` ids start at a line. Trained on the compact softmax of pretrain_lm."""
    import random

    rng = random.Random(seed)

    def runs(n: int) -> str:
        out = ""
        while len(out) < n:
            out += rng.choice(chars) * rng.randint(1, 6)
        return out[:n]

    def row() -> list[int]:
        ids: list[int] = []
        while len(ids) < width:
            ids += tok.encode(f"{rng.choice(chars)}*{rng.randint(1, 9)}=").ids
            ids += tok.encode(runs(rng.randint(1, 9)) + "\n").ids
        return ids[:width]

    batches = [[row() for _ in range(batch)] for _ in range(steps)]
    vocab = sorted({i for b in batches for r in b for i in r})
    return pretrain_lm(gpt2_vllm_model(seed), iter(batches).__next__, steps, lr=3e-3, vocab=vocab)


def save_hf_folder(path, model, tok: Tokenizer) -> None:
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT).save_pretrained(path)


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tok() -> Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens), from the files every install has."""
    from trainer import tokenizer as tk

    return tk.load_gpt2("vendor/tokenizers/gpt2")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_hf_folder(path, tiny_model(tok.get_vocab_size()), tok)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server(model_dir):
    from trainer.serve import create_app

    s = RunningServer(create_app(str(model_dir), name="tiny"))
    yield s
    s.stop()
