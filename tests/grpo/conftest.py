"""Shared tiny components: a char tokenizer, the real GPT-2 tokenizer, a 2-layer random GPT-2
and its HF folder, and a real uvicorn server for apps under test."""

from __future__ import annotations

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
