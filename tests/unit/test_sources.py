"""More sources, bounded memory (issue 17, item 4): a .parquet file, a folder of parquet files
and a `datasets` save_to_disk folder (Arrow IPC streams listed in state.json, written here
with pyarrow the way `datasets` lays them out) give the same prepared tokens and tokenizer as
the same rows in JSONL, with data.max_bytes cutting them alike; SFT rows too, loss mask
included. Preparation streams: encoding a few bytes at a time and splitting a few chunks at a
time gives the same files as the defaults and as tokenizing the whole corpus in memory (the
pre-streaming algorithm, written out here), and a progress line reports documents, bytes and
ETA. Edits to parquet and `datasets` sources are seen; bad ones are one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer import config as C
from trainer import data as D
from trainer import tokenizer as tk
from trainer.errors import UserError

QUIET = {"log": lambda *_: None}
WORDS = "alpha beta gamma delta def class return import lambda caf\u00e9 na\u00efve \u65e5\u672c".split()
FILES = ("train.bin", "val.bin", tk.TOKENIZER_FILE)


def rows(n=400, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = [{"id": i, "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 40)))) + "\n"} for i in range(n)]
    out[7]["text"] = "   \n"  # a blank document: counted in the bytes, not kept
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, records, row_group=37):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group)
    return path


def save_to_disk(folder, records, files=2):
    """A folder as `datasets.Dataset.save_to_disk` writes one: data-0000k-of-0000n.arrow (Arrow
    IPC streams), state.json naming them in order, dataset_info.json."""
    import pyarrow as pa

    folder.mkdir()
    table = pa.Table.from_pylist(records)
    names, per = [], -(-len(records) // files)
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.slice(k * per, per).to_batches(max_chunksize=29):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        name: {"dtype": "string" if name == "text" else "int64", "_type": "Value"} for name in records[0]}}))
    return folder


def sources(tmp_path, records) -> dict:
    """The same rows as JSONL, one parquet file, a folder of two parquet files, a datasets folder."""
    out = {"jsonl": write_jsonl(tmp_path / "rows.jsonl", records),
           "parquet": write_parquet(tmp_path / "rows.parquet", records)}
    folder = tmp_path / "parquet-folder"
    folder.mkdir()
    half = len(records) // 2
    write_parquet(folder / "part-0.parquet", records[:half])
    write_parquet(folder / "part-1.parquet", records[half:])
    out["parquet folder"] = folder
    out["datasets folder"] = save_to_disk(tmp_path / "saved", records)
    return out


def prepare(tmp_path, source, tag, **kw):
    cfg = C.build(environ={}, overrides={"data.prepared_dir": str(tmp_path / f"prepared-{tag}"),
                                         "data.source": str(source), **kw}).data
    return D.prepare(cfg, **QUIET)


def same_files(a, b, names=FILES) -> list[str]:
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_parquet_and_datasets_sources_give_the_jsonl_tokens(tmp_path, tokenizer):
    kw = {"data.tokenizer": tokenizer, "data.vocab_size": 300}
    paths = sources(tmp_path, rows())
    ref = prepare(tmp_path, paths["jsonl"], "jsonl", **kw)
    ref_meta = D.read_meta(ref)
    assert ref_meta["source"].endswith(": 399 documents, " + str(sum(len(r["text"].encode()) for r in rows()))
                                       + " bytes")
    for kind, path in paths.items():
        out = prepare(tmp_path, path, kind.replace(" ", "-"), **kw)
        assert same_files(ref, out) == [], kind
        meta = D.read_meta(out)
        for key in ("train_tokens", "val_tokens", "chars", "split"):
            assert meta[key] == ref_meta[key], (kind, key)
        assert meta["source"].split(": ", 1)[1] == ref_meta["source"].split(": ", 1)[1], kind


def test_max_bytes_cuts_every_source_alike(tmp_path):
    paths = sources(tmp_path, rows())
    kw = {"data.tokenizer": "char", "data.max_bytes": 3001}
    ref = prepare(tmp_path, paths["jsonl"], "jsonl", **kw)
    described = int(D.read_meta(ref)["source"].rsplit(" bytes", 1)[0].rsplit(" ", 1)[1])
    assert 3001 - 3 <= described <= 3001  # the document reaching the limit is cut on a character boundary
    for kind in ("parquet", "datasets folder"):
        assert same_files(ref, prepare(tmp_path, paths[kind], kind.replace(" ", "-"), **kw)) == [], kind


def whole_corpus_reference(docs: list[str], tok, val_fraction: float, seed: int):
    """What preparation did before it streamed: every document in memory, encoded at once,
    joined with the end-of-text token, cut into CHUNK pieces, a seeded sample of them val."""
    eot = tk.eot_id(tok)
    tokens = np.asarray([i for enc in tok.encode_batch(docs) for i in (*enc.ids, eot)], dtype=np.int64)
    chunk = D.CHUNK if len(tokens) > D.CHUNK else -(-len(tokens) // 2)
    padded = np.pad(tokens, (0, -len(tokens) % chunk), constant_values=-1).reshape(-1, chunk)
    val = D.split_chunks(len(tokens), val_fraction, seed)
    train, held = padded[~val].ravel(), padded[val].ravel()
    return train[train >= 0].astype(np.uint16), held[held >= 0].astype(np.uint16)


def test_streaming_in_small_pieces_gives_the_whole_corpus_result(tmp_path, corpus_dir, monkeypatch):
    kw = {"data.tokenizer": "bpe", "data.vocab_size": 300, "data.val_fraction": 0.2}
    default = prepare(tmp_path, corpus_dir, "default", **kw)
    monkeypatch.setattr(D, "ENCODE_BYTES", 100)  # a batch of a document or two
    monkeypatch.setattr(D, "ENCODE_DOCS", 3)
    monkeypatch.setattr(D, "SPLIT_BYTES", 3000)  # one chunk per block of the split pass
    small = prepare(tmp_path, corpus_dir, "small", **kw)
    assert same_files(default, small, FILES + ("meta.json",)) == []
    docs, _, _ = D.read_source(str(corpus_dir), "text", 0)
    train, val = whole_corpus_reference(docs, tk.load(small), 0.2, 1337)
    assert len(train) > 4 * D.CHUNK and len(val) >= D.CHUNK
    assert np.array_equal(np.fromfile(small / "train.bin", np.uint16), train)
    assert np.array_equal(np.fromfile(small / "val.bin", np.uint16), val)


def test_progress_line_names_documents_bytes_and_eta(tmp_path, monkeypatch):
    paths = sources(tmp_path, rows())
    monkeypatch.setattr(D, "PROGRESS_EVERY", 0.0)
    lines = []
    cfg = C.build(environ={}, overrides={"data.prepared_dir": str(tmp_path / "p"), "data.source": str(paths["jsonl"]),
                                         "data.tokenizer": "char"}).data
    D.prepare(cfg, log=lines.append)
    total = paths["jsonl"].stat().st_size / 1e6
    training = [line for line in lines if line.startswith("training the char tokenizer: ")]
    tokenizing = [line for line in lines if line.startswith("tokenizing: ")]
    assert training and tokenizing, lines
    assert tokenizing[-1].startswith(f"tokenizing: 399 documents, {total:,.1f} of {total:,.1f} MB read (100%), ")
    assert "MB/s, ETA 0:00" in tokenizing[-1]
    assert lines[-1].startswith("prepared ")


def test_edits_to_parquet_and_datasets_sources_are_seen(tmp_path):
    paths = sources(tmp_path, rows())
    for kind in ("parquet", "parquet folder", "datasets folder"):
        out = prepare(tmp_path, paths[kind], kind.replace(" ", "-"), **{"data.tokenizer": "char"})
        cfg = C.build(environ={}, overrides={"data.prepared_dir": str(out.parent), "data.source": str(paths[kind]),
                                             "data.tokenizer": "char"}).data
        assert not D.source_changed(out, cfg)
        edited = paths[kind] if kind == "parquet" else \
            sorted([*paths[kind].glob("*.parquet"), *paths[kind].glob("*.arrow")])[-1]
        stat = edited.stat()
        os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert D.source_changed(out, cfg), kind


def sft_rows() -> list[dict]:
    pairs = [{"prompt": f"name: {w}\n", "completion": w[::-1], "messages": None} for w in WORDS * 3]
    chats = [{"prompt": None, "completion": None, "messages": [
        {"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in WORDS]
    return pairs + chats


def test_sft_rows_from_parquet_and_datasets_match_jsonl(tmp_path):
    records = sft_rows()
    paths = sources(tmp_path, records)
    kw = {"data.tokenizer": "char", "data.format": "sft"}
    ref = prepare(tmp_path, paths["jsonl"], "jsonl", **kw)
    names = FILES + ("train_mask.bin", "val_mask.bin")
    for kind in ("parquet", "datasets folder"):
        assert same_files(ref, prepare(tmp_path, paths[kind], kind.replace(" ", "-"), **kw), names) == [], kind


def test_bad_sources_are_one_line(tmp_path):
    paths = sources(tmp_path, rows())
    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    cases = [(splits, {}, ["holds several splits (train, test)", str(splits / "train")]),
             (paths["parquet"], {"data.text_field": "body"}, ["rows.parquet row 1", "'body'", "data.text_field"]),
             (paths["datasets folder"], {"data.text_field": "id"}, ["saved row 1", "'id'"]),
             (tmp_path / "nothing.parquet", {}, ["does not exist", ".parquet"])]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    cases.append((broken, {}, ["broken.parquet: not a readable parquet file"]))
    for source, kw, says in cases:
        with pytest.raises(UserError) as err:
            prepare(tmp_path, source, "bad", **{"data.tokenizer": "char", **kw})
        line = str(err.value)
        assert "\n" not in line and all(s in line for s in says), (line, says)
