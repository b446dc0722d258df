"""Shared tiny components: a char tokenizer, a 2-layer random GPT-2 and its HF folder."""

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


def save_hf_folder(path, model, tok: Tokenizer) -> None:
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT).save_pretrained(path)


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


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
