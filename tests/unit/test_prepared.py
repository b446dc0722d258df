"""Which prepared folder a config reads and writes. A folder is reused only when the settings
its meta.json records match the config: with data.name set, other data under that name is
refused in one line naming the key and both values; with a derived name the config gets its
own folder, named with the settings hash, found again on the next run. A folder Airlock did
not write is never touched, an interrupted prepare leaves nothing behind and keeps the old
folder, broken meta.json and token files are one line, and `trainer doctor` reports the same
matching that train uses."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from trainer import config as C
from trainer import data as D
from trainer import commands
from trainer.errors import UserError

QUIET = {"log": lambda *_: None}


def config(tmp_path, source, **kw):
    """A full config with a char tokenizer on `source`, prepared under tmp_path/prepared."""
    return C.build(environ={}, overrides={"data.prepared_dir": str(tmp_path / "prepared"),
                                          "data.source": str(source), "data.tokenizer": "char", **kw})


def cfg(tmp_path, source, **kw):
    return config(tmp_path, source, **kw).data


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def text_of(path) -> str:
    from trainer import tokenizer as tk

    ids = np.concatenate([np.fromfile(path / "train.bin", np.uint16), np.fromfile(path / "val.bin", np.uint16)])
    return tk.load(path).decode(ids.tolist())


@pytest.fixture
def two_sources(tmp_path):
    """Two corpora with the same file name, so the same derived folder name."""
    a, b = tmp_path / "a" / "code.txt", tmp_path / "b" / "code.txt"
    for path, word in ((a, "alpha"), (b, "omega")):
        path.parent.mkdir()
        path.write_text("".join(f"def {word}_{i}():\n    return {i}\n" for i in range(60)))
    return a, b


def test_data_name_with_another_source_is_refused(tmp_path, two_sources):
    a, b = two_sources
    D.prepare(cfg(tmp_path, a, **{"data.name": "mine"}), **QUIET)
    folder = tmp_path / "prepared" / "mine"
    before = digest(folder)
    other = cfg(tmp_path, b, **{"data.name": "mine"})
    for call in (D.find_prepared, D.prepared_path, lambda c: D.prepare(c, **QUIET),
                 lambda c: commands.prepare_command(**{f"data.{k}": v for k, v in vars(c).items()})):
        with pytest.raises(UserError) as err:
            call(other)
        line = str(err.value)
        assert "\n" not in line and str(folder) in line and "data.source" in line and "data.name" in line
        assert repr(str(a)) in line and repr(str(b)) in line, line
    assert digest(folder) == before
    assert D.find_prepared(cfg(tmp_path, str(a.parent) + "/./code.txt", **{"data.name": "mine"})) == folder


def test_every_setting_that_shapes_the_bytes_is_compared(tmp_path, corpus_dir):
    base = {"data.name": "n", "data.tokenizer": "bpe", "data.vocab_size": 300}
    folder = D.prepare(cfg(tmp_path, corpus_dir, **base), **QUIET)
    assert json.loads((folder / "meta.json").read_text())["settings"]["vocab_size"] == 300
    for key, value, was in [("data.tokenizer", "char", "'bpe'"), ("data.vocab_size", 400, "300"),
                            ("data.val_fraction", 0.2, "0.05"), ("data.split_seed", 1, "1337"),
                            ("data.max_bytes", 5000, "0"), ("data.text_field", "body", "'text'")]:
        with pytest.raises(UserError) as err:
            D.find_prepared(cfg(tmp_path, corpus_dir, **{**base, key: value}))
        assert f"{key}={was} there but {value!r} in the config" in str(err.value), str(err.value)
    # a key that does not shape a char folder's bytes is not compared
    char = D.prepare(cfg(tmp_path, corpus_dir, **{"data.name": "c"}), **QUIET)
    assert D.find_prepared(cfg(tmp_path, corpus_dir, **{"data.name": "c", "data.vocab_size": 999})) == char


def test_derived_name_gets_its_own_folder_and_finds_it_again(tmp_path, two_sources):
    a, b = two_sources
    cfg_a, cfg_b = cfg(tmp_path, a), cfg(tmp_path, b)
    path_a = D.find_prepared(cfg_a)
    assert D.prepare(cfg_a, **QUIET) == path_a == D.find_prepared(cfg_a) == tmp_path / "prepared" / "code-char"
    path_b = D.find_prepared(cfg_b)  # what train does: find, prepare where it said, read it
    assert path_b.name.startswith("code-char-") and len(path_b.name) == len("code-char-") + 8
    assert D.prepare(cfg_b, **QUIET) == path_b == D.find_prepared(cfg_b)
    assert D.find_prepared(cfg_a) == path_a
    assert "alpha_1" in text_of(path_a) and "omega" not in text_of(path_a)
    assert "omega_1" in text_of(path_b) and "alpha" not in text_of(path_b)


def test_fallback_folder_is_used_only_when_it_matches(tmp_path, two_sources, monkeypatch):
    a, b = two_sources
    image = D.prepare(cfg(tmp_path / "image", a, **{"data.name": "n"}), **QUIET)
    monkeypatch.setenv(D.PREPARED_FALLBACK_ENV, str(image.parent))
    assert D.find_prepared(cfg(tmp_path, a, **{"data.name": "n"})) == image
    assert D.find_prepared(cfg(tmp_path, b, **{"data.name": "n"})) == tmp_path / "prepared" / "n"


def test_folder_without_settings_is_not_reused_but_prepare_redoes_it(tmp_path, corpus_dir):
    c = cfg(tmp_path, corpus_dir, **{"data.name": "old"})
    folder = D.prepare(c, **QUIET)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["settings"]  # as an older Airlock wrote it
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="older Airlock.*trainer prepare"):
        D.find_prepared(c)
    commands.prepare_command(**{"data.prepared_dir": c.prepared_dir, "data.source": c.source, "data.name": "old",
                         "data.tokenizer": "char"})
    assert D.find_prepared(c) == folder and "settings" in D.read_meta(folder)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"tokenizer": "char"}', "\udcff"])
def test_broken_meta_json_is_one_line(tmp_path, corpus_dir, content):
    c = cfg(tmp_path, corpus_dir, **{"data.name": "b"})
    folder = D.prepare(c, **QUIET)
    (folder / "meta.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError) as err:
        D.read_meta(folder)
    assert str(folder / "meta.json") in str(err.value) and "trainer prepare" in str(err.value)
    with pytest.raises(UserError):
        D.find_prepared(c)
    assert D.prepare(c, **QUIET) == D.find_prepared(c) == folder


@pytest.mark.parametrize("key, value", [("vocab_size", "52"), ("vocab_size", -3), ("vocab_size", True),
                                        ("vocab_size", 1 << 20), ("eot_id", 10_000), ("train_tokens", 1.5),
                                        ("tokenizer", 7), ("sha256", 5), ("sha256", {"train.bin": 5})])
def test_a_meta_json_value_of_the_wrong_type_is_one_line(tmp_path, corpus_dir, key, value):
    """Each value readers rely on is checked where meta.json is read, not found wrong later as a
    library's traceback (a negative vocabulary reached torch.empty, an int sha256 an iteration)."""
    folder = D.prepare(cfg(tmp_path, corpus_dir, **{"data.name": "b"}), **QUIET)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, key: value}))
    with pytest.raises(UserError, match="meta.json is not a readable Airlock meta.json"):
        D.read_meta(folder)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_token_file_that_is_not_a_file_fingerprints_as_missing(tmp_path, corpus_dir, kind):
    """A resume hashes the data it reads: a FIFO in train.bin's place must not hang it, nor
    /dev/zero be hashed forever; either fingerprints as no file, which check_same_data refuses."""
    import os
    import signal

    folder = D.prepare(cfg(tmp_path, corpus_dir, **{"data.name": "b"}), **QUIET)
    target = folder / "train.bin"
    target.unlink()
    {"fifo": os.mkfifo, "directory": os.mkdir, "device": lambda p: os.symlink("/dev/zero", p)}[kind](target)
    signal.alarm(30)
    try:
        assert D.fingerprint(folder)["train.bin"] is None
    finally:
        signal.alarm(0)


def test_a_folder_airlock_did_not_write_is_never_touched(tmp_path, corpus_dir):
    mine = tmp_path / "prepared" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own\n")
    c = cfg(tmp_path, corpus_dir, **{"data.name": "mine"})
    for call in (D.find_prepared, lambda c: D.prepare(c, **QUIET)):
        with pytest.raises(UserError, match="no meta.json"):
            call(c)
    derived = tmp_path / "prepared" / f"{corpus_dir.name}-char"
    derived.mkdir()
    (derived / "notes.txt").write_text("also the user's\n")
    out = D.prepare(cfg(tmp_path, corpus_dir), **QUIET)
    assert out.name.startswith(derived.name + "-") and D.find_prepared(cfg(tmp_path, corpus_dir)) == out
    assert (mine / "notes.txt").read_text() == "the user's own\n"
    assert (derived / "notes.txt").read_text() == "also the user's\n"


def test_prepare_never_deletes_a_tmp_named_folder_and_leaves_nothing_behind(tmp_path, corpus_dir):
    user = tmp_path / "prepared" / "n.tmp"
    user.mkdir(parents=True)
    (user / "keep.txt").write_text("keep\n")
    c = cfg(tmp_path, corpus_dir, **{"data.name": "n"})
    D.prepare(c, **QUIET)
    D.prepare(c, **QUIET)  # again: the old folder is swapped out
    assert (user / "keep.txt").read_text() == "keep\n"
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["n", "n.tmp"]


def test_interrupted_prepare_keeps_the_old_folder(tmp_path, corpus_dir, monkeypatch):
    c = cfg(tmp_path, corpus_dir, **{"data.name": "n"})
    folder = D.prepare(c, **QUIET)
    before = digest(folder)

    def interrupt(path):  # Ctrl-C while the new files are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(D.atomic, "file_sha256", interrupt)
    with pytest.raises(KeyboardInterrupt):
        D.prepare(c, **QUIET)
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["n"] and digest(folder) == before


def test_cut_prepared_file_is_one_line(tmp_path, corpus_dir):
    folder = D.prepare(cfg(tmp_path, corpus_dir, **{"data.name": "n"}), **QUIET)
    raw = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(raw[:-2])  # one token short: no error from memmap
    with pytest.raises(UserError, match="train.bin.*meta.json says"):
        D.Batches.open(folder, block_size=16, batch_size=4, seed=0)


def test_doctor_compares_the_folder_with_the_config(tmp_path, corpus_dir, capsys):
    D.prepare(cfg(tmp_path, corpus_dir, **{"data.name": "n", "data.tokenizer": "bpe", "data.vocab_size": 300}),
              **QUIET)
    assert commands.doctor(config(tmp_path, corpus_dir, **{"data.name": "n", "data.tokenizer": "gpt2"})) >= 1
    out = capsys.readouterr().out
    assert "[ok] data" not in out and "[FAIL] data" in out and "data.tokenizer='bpe' there but 'gpt2'" in out
    assert commands.doctor(config(tmp_path, corpus_dir, **{"data.name": "fresh"})) == 0
    out = capsys.readouterr().out
    assert "[ok] data" in out and "not prepared yet" in out and "trainer train" in out
