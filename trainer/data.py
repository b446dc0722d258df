"""Corpus sources -> prepared token files; the seeded, resumable batch sampler.

Only this module reads or writes token files. A prepared folder holds train.bin and
val.bin (flat uint16, or uint32 when the vocab needs it), meta.json and tokenizer.json.
The same source and settings give byte-identical files, and meta.json records those
settings: a folder is reused only by a config with the same ones (`find_prepared`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trainer import atomic
from trainer import tokenizer as tk
from trainer.errors import UserError, one_line

CHUNK = 1024  # tokens per split unit: val takes a seeded sample of these chunks
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
TOKEN_SUFFIXES = (".bin", ".npy", ".pt")
STDLIB = "python-stdlib"


# ---------------------------------------------------------------------------- sources

def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name}`, or remove it from data.source") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path}:{lineno}: broken JSONL line ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0]}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object of fields; write one "
                                "object per line")
            yield f"{path}:{lineno}", row


def _arrow_batches(path: Path):
    """Record batches of a parquet file, or of the .arrow files a `datasets` save_to_disk
    folder lists in its state.json (Arrow IPC streams): pyarrow reads both, `datasets` is not needed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet and `datasets` folders needs pyarrow (pip install pyarrow; the "
                        "image has it)") from None
    try:
        if path.is_file():
            yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
            return
        state = json.loads((path / "state.json").read_text())
        for entry in state["_data_files"]:
            with pa.memory_map(str(path / Path(entry["filename"]).name)) as source:
                yield from pa.ipc.open_stream(source)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable {'parquet file' if path.is_file() else 'datasets folder'} "
                        f"({one_line(e, 200)})") from None


def is_dataset_dir(path: Path) -> bool:
    """A folder `datasets`' save_to_disk wrote (one split: state.json + dataset_info.json)."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def read_records(path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a .jsonl file, a .parquet file, a `datasets` save_to_disk
    folder, or a folder of .parquet files; `where` names the file and line or row for messages.
    Streams: one batch of rows in memory at a time."""
    path = Path(path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise UserError(f"{path} holds several splits ({', '.join(splits)}); name one split's folder, e.g. "
                        f"{path / (splits[0] if splits else 'train')}")
    if path.is_dir() and not is_dataset_dir(path):
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise UserError(f"{path}: no .parquet files and not a `datasets` save_to_disk folder")
    else:
        files = [path]
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl(file)
            continue
        if file.is_file() and file.suffix != ".parquet":
            raise UserError(f"{file}: read .jsonl, .parquet or a `datasets` save_to_disk folder")
        n = 0
        for batch in _arrow_batches(file):
            for row in batch.to_pylist():
                n += 1
                yield f"{file} row {n}", row


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for where, row in read_records(path):
        if not isinstance(row.get(field), str):
            raise UserError(f"{where}: no string field {field!r} (has: {', '.join(row)}); "
                            f"set data.text_field to the field holding the text")
        docs.append(row[field])
    return docs


SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


def _is_test_dir(name: str) -> bool:
    """The stdlib's test suites and their fixtures (test/, idlelib/idle_test/, lib2to3/tests/,
    test/ziptestdata/...): deliberately odd files (latin-1, bad syntax), not code to learn from."""
    name = name.lower()
    return name in ("test", "tests", "testing") or name.startswith("test_") or \
        name.endswith(("_test", "_tests", "testdata", "test_data"))


def _files(root: Path, suffixes: tuple[str, ...], skip_tests: bool = False) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for folder, dirs, names in os.walk(root):  # pruned, so site-packages is never even listed
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not (skip_tests and _is_test_dir(d))]
        found += [Path(folder, n) for n in names if Path(n).suffix in suffixes and Path(folder, n).is_file()]
    return sorted(found)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_source(source: str, text_field: str, max_bytes: int) -> tuple[list[str] | None, np.ndarray | None, str]:
    """-> (documents, None, description) for text, (None, tokens, description) for token files.
    With max_bytes, files are read in sorted order until that many bytes of text are in hand:
    the document that reaches the limit is cut there and no later file is opened."""
    stdlib = source == STDLIB
    if stdlib:
        root = stdlib_dir()
        files = _files(root, (".py",), skip_tests=True)
    else:
        root = Path(source)
        if not root.exists():
            raise UserError(f"data.source={source!r} does not exist; give a file or folder "
                            f"(.txt, .md, .jsonl, .bin, .npy, .pt) or {STDLIB!r}")
        if root.is_file() and root.suffix in TOKEN_SUFFIXES:
            return None, _read_tokens(root), f"token file {root.name}"
        files = _files(root, TEXT_SUFFIXES + (".jsonl",))
    if not files:
        where = f" ({root})" if stdlib else ""
        raise UserError(f"data.source={source!r}{where} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl)")
    docs, skipped = [], 0
    left = max_bytes or None  # bytes of text still wanted; None = all
    for path in files:
        if left == 0:
            break
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        elif stdlib:
            # the stdlib is a corpus Airlock picks, not the user's data: a file it cannot use
            # (latin-1, unreadable) is skipped and counted rather than failing the run
            try:
                texts = [path.read_bytes().decode("utf-8")]
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
        else:
            texts = [_read_text(path)]
        for text in texts:
            if left is not None:
                raw = text.encode()[:left]
                text, left = raw.decode("utf-8", "ignore"), left - len(raw)  # cut on a character boundary
            docs.append(text)
            if left == 0:
                break
    total = sum(len(d.encode()) for d in docs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data.source={source!r} is empty: no non-blank text found")
    label = STDLIB if stdlib else root.name
    skip_note = f", {skipped} file(s) skipped (not UTF-8 or unreadable)" if skipped else ""
    return docs, None, f"{label}: {len(docs)} documents, {total} bytes{skip_note}"


def _read_tokens(path: Path) -> np.ndarray:
    """A flat integer array from .bin (raw uint16, the nanoGPT convention), .npy or .pt."""
    size = path.stat().st_size
    if path.suffix == ".bin" and size % 2:
        raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens (2 bytes each); the file "
                        "is cut short or not uint16 (save other dtypes as .npy)")
    obj = None
    try:
        if path.suffix == ".bin":
            arr = np.fromfile(path, dtype=np.uint16)
        elif path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu")
            arr = obj.numpy() if isinstance(obj, torch.Tensor) else \
                np.asarray(obj) if isinstance(obj, (list, tuple)) else None
    except Exception as e:  # numpy/torch raise many types for a bad file, some with pages of text
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: cannot read token file ({e.__class__.__name__}: {first}); it must hold one flat "
                        "integer array (.bin raw uint16, .npy from np.save, .pt a torch.save'd tensor)") from None
    if arr is None:
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a tensor of token ids; torch.save the 1-D "
                        "tensor itself")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: token file must hold a flat integer array, got shape {arr.shape} {arr.dtype}; "
                        "save the ids as a 1-D integer array")
    if arr.size == 0:
        raise UserError(f"{path}: token file holds no tokens ({size} bytes)")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= 2**32:  # a prepared file is at most uint32
        raise UserError(f"{path}: token file holds ids outside 0..{2**32 - 1} (min {lo}, max {hi})")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------- prepare

def prepared_name(source: str, kind: str, vocab_size: int, tokenizer_path: str = "") -> str:
    stem = STDLIB if source == STDLIB else Path(source.rstrip("/")).stem or "data"
    if kind == "model":  # the model folder's name: two models' tokenizers are two folders
        return f"{stem}-model-{Path(os.path.normpath(tokenizer_path)).name or 'tokenizer'}"
    return f"{stem}-{kind}{vocab_size if kind == 'bpe' else ''}"


PREPARED_FALLBACK_ENV = "AIRLOCK_PREPARED_FALLBACK"  # read-only folders searched after prepared_dir


def settings(data_cfg) -> dict:
    """The data.* keys that determine a prepared folder's bytes; meta.json records them under
    "settings" and a folder is reused only for a config with the same ones."""
    source = data_cfg.source
    if source != STDLIB:  # a path; "./python-stdlib" stays a path, not the stdlib
        source = os.path.normpath(source)
        source = os.path.join(os.curdir, source) if source == STDLIB else source
    out = {"source": source, "tokenizer": data_cfg.tokenizer}
    if data_cfg.tokenizer == "bpe":
        out["vocab_size"] = data_cfg.vocab_size
    if data_cfg.tokenizer in ("gpt2", "model"):
        out["tokenizer_path"] = os.path.normpath(data_cfg.tokenizer_path)
    if data_cfg.tokenizer == "model":  # which tokenizer, not only where: a folder's files may be replaced
        out["tokenizer_sha256"] = _tokenizer_sha256(data_cfg.tokenizer_path)
    out.update(text_field=data_cfg.text_field, val_fraction=data_cfg.val_fraction,
               split_seed=data_cfg.split_seed, max_bytes=data_cfg.max_bytes)
    return json.loads(json.dumps(out))  # as meta.json will hold them


_tokenizer_hashed: dict[tuple, str | None] = {}  # (folder, its files' stats) -> model_tokenizer_sha256


def _tokenizer_sha256(folder: str) -> str | None:
    """tk.model_tokenizer_sha256 of a model folder, hashed again only when its files change."""
    stats = []
    for name in tk.MODEL_TOKENIZER_FILES:
        try:
            st = (Path(folder) / name).stat()
        except OSError:
            continue
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    key = (os.path.abspath(folder), tuple(stats))
    if key not in _tokenizer_hashed:
        _tokenizer_hashed[key] = tk.model_tokenizer_sha256(folder) if stats else None
    return _tokenizer_hashed[key]


def _names(data_cfg, want: dict) -> list[str]:
    """Folder names this config may use, in order: data.name, or the derived name and then the
    derived name plus the settings hash (where the derived name holds other data)."""
    if data_cfg.name:
        return [data_cfg.name]
    derived = prepared_name(data_cfg.source, data_cfg.tokenizer, data_cfg.vocab_size, data_cfg.tokenizer_path)
    digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:8]
    return [derived, f"{derived}-{digest}"]


def _conflict(path: Path, want: dict, replace_old: bool = False) -> str:
    """'' when `path` is free or holds data prepared with `want`; else why this config may not
    use it. replace_old: a folder from an Airlock that recorded no settings may be prepared
    again (an explicit `trainer prepare`), never silently reused."""
    if not os.path.lexists(path):
        return ""
    if not (path / "meta.json").is_file():
        return f"{path} exists and is not an Airlock prepared folder (no meta.json), so Airlock leaves it alone"
    try:
        have = read_meta(path).get("settings")
    except UserError:
        have = None
    if not isinstance(have, dict):
        return "" if replace_old else (f"{path} was prepared by an older Airlock that recorded no settings, or its "
                                       "meta.json is unreadable (`trainer prepare` with this config prepares it again)")
    keys = [*want, *(have.keys() - want.keys())]
    if have.get("tokenizer") != want["tokenizer"]:  # vocab_size, tokenizer_path belong to one kind only
        keys = [k for k in keys if k in have and k in want]
    diff = [f"data.{k}={have.get(k)!r} there but {want.get(k)!r} in the config" for k in keys
            if have.get(k) != want.get(k)]
    return f"{path} holds data prepared with other settings ({'; '.join(diff)})" if diff else ""


def _target(data_cfg, replace_old: bool) -> Path:
    """The folder in prepared_dir that `prepare` writes for this config; UserError if taken."""
    want = settings(data_cfg)
    paths = [Path(data_cfg.prepared_dir) / name for name in _names(data_cfg, want)]
    for path in paths:
        why = _conflict(path, want, replace_old and bool(data_cfg.name))
        if not why:
            return path
    if data_cfg.name:
        raise UserError(f"data.name={data_cfg.name!r}: {why}; pick another data.name, or leave it empty so a name "
                        "is derived from the settings")
    raise UserError(f"{why}; set data.name to a new folder name")


def prepared_path(data_cfg) -> Path:
    """Where `prepare` writes this config's data (raises if that folder holds other data)."""
    return _target(data_cfg, replace_old=True)


def find_prepared(data_cfg, expect: dict | None = None) -> Path:
    """The folder to read: one whose recorded settings match the config, in prepared_dir first,
    then in the folders of $AIRLOCK_PREPARED_FALLBACK (the image's corpora, prepared at build
    time, which a ./data bind mount would otherwise hide); else where `prepare` will write it.
    `expect` ({file: sha256}, a checkpoint's record) first picks a folder holding exactly those
    files, even one an older Airlock wrote without settings: a resume wants its own data."""
    want = settings(data_cfg)
    fallback = list(filter(None, os.environ.get(PREPARED_FALLBACK_ENV, "").split(os.pathsep)))
    candidates = [Path(root) / name for root in (data_cfg.prepared_dir, *fallback) for name in _names(data_cfg, want)]
    candidates = [path for path in candidates if (path / "meta.json").is_file()]
    if expect:
        for path in candidates:
            recorded = _recorded_sha256(path)
            if all(recorded.get(name) == sha for name, sha in expect.items()):
                return path
    for path in candidates:
        if not _conflict(path, want):
            return path
    return _target(data_cfg, replace_old=False)


def _recorded_sha256(path: Path) -> dict:
    try:
        recorded = read_meta(path).get("sha256")
    except UserError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


_hashed: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: the evaluator checks every checkpoint


def fingerprint(path: Path, names=("train.bin", "val.bin", tk.TOKENIZER_FILE)) -> dict:
    """sha256 of the files as they are now (not as meta.json says they were). A file is hashed
    again only when its size, mtime or inode changed (a re-prepare replaces the file)."""
    out = {}
    for name in names:
        file = Path(path) / name
        try:
            st = file.stat()
        except OSError:
            out[name] = None
            continue
        key = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _hashed:
            _hashed[key] = atomic.file_sha256(file)
        out[name] = _hashed[key]
    return out


def source_stamp(source: str) -> dict:
    """Count, size and newest mtime of the files a source is read from: only stat calls, and it
    changes when the text is edited, which settings alone cannot see. {} when it cannot be read."""
    try:
        if source == STDLIB:
            files = _files(stdlib_dir(), (".py",), skip_tests=True)
        else:
            root = Path(source)
            files = [root] if root.is_file() else _files(root, TEXT_SUFFIXES + (".jsonl",))
        stats = [f.stat() for f in files]
    except OSError:
        return {}
    return {"files": len(stats), "bytes": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


def source_changed(path: Path, data_cfg) -> bool:
    """True when the source was edited after `path` was prepared from it."""
    try:
        recorded = read_meta(path).get("source_stamp")
    except UserError:
        return False
    now = source_stamp(data_cfg.source)
    return bool(recorded) and bool(now) and recorded != now


def split_chunks(n_tokens: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over CHUNK-sized pieces: True = validation. Seeded, so reproducible."""
    n_chunks = -(-n_tokens // CHUNK)
    if n_chunks < 2:
        return np.array([False, True]) if n_tokens >= 2 else np.array([False])
    n_val = min(n_chunks - 1, max(1, round(n_chunks * val_fraction)))
    mask = np.zeros(n_chunks, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_chunks)[:n_val]] = True
    return mask


def prepare(data_cfg, log=print) -> Path:
    """Tokenize `data_cfg.source` into the prepared folder; returns its path."""
    out = prepared_path(data_cfg)
    stamp = source_stamp(data_cfg.source)  # before reading: an edit during prepare shows up next time
    docs, tokens, description = read_source(data_cfg.source, data_cfg.text_field, data_cfg.max_bytes)
    tok = tk.build(data_cfg.tokenizer, docs, data_cfg.vocab_size, data_cfg.tokenizer_path)
    vocab = tok.get_vocab_size()
    eot = tk.eot_id(tok)
    declared = tk.declared_eos(data_cfg.tokenizer_path) if data_cfg.tokenizer == "model" else None
    if declared and tok.token_to_id(declared) not in (None, eot):
        log(f"documents are joined with {tok.id_to_token(eot)} (the tokenizer's end-of-text token); the model "
            f"folder's eos_token is {declared}")
    n_chars = sum(len(d) for d in docs) if docs else 0
    if docs is not None:
        ids = [i for enc in tok.encode_batch(docs) for i in (*enc.ids, eot)]
        tokens = np.asarray(ids, dtype=np.int64)
    if tokens.size == 0:
        raise UserError(f"data.source={data_cfg.source!r} gave no tokens")
    if int(tokens.max()) >= vocab:
        raise UserError(f"{data_cfg.source}: token id {int(tokens.max())} is outside the {data_cfg.tokenizer} "
                        f"vocabulary ({vocab}); pick the tokenizer the ids were made with")
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    # a corpus of one chunk or less is split in halves, the two pieces split_chunks expects for it
    chunk = CHUNK if len(tokens) > CHUNK else -(-len(tokens) // 2)
    padded = np.pad(tokens, (0, -len(tokens) % chunk), constant_values=-1).reshape(-1, chunk)
    mask = split_chunks(len(tokens), data_cfg.val_fraction, data_cfg.split_seed)
    train = padded[~mask].ravel()
    val = padded[mask].ravel()
    train, val = train[train >= 0].astype(dtype), val[val >= 0].astype(dtype)

    try:
        with atomic.staging_dir(out) as tmp:  # removed again if anything (Ctrl-C too) interrupts
            train.tofile(tmp / "train.bin")
            val.tofile(tmp / "val.bin")
            tok.save(str(tmp / tk.TOKENIZER_FILE))
            meta = {
                "tokenizer": data_cfg.tokenizer,
                "vocab_size": vocab,
                "eot_id": eot,
                "dtype": np.dtype(dtype).name,
                "train_tokens": int(train.size),
                "val_tokens": int(val.size),
                "chars": n_chars,
                "source": description,
                "split": {"chunk": chunk, "val_fraction": data_cfg.val_fraction, "seed": data_cfg.split_seed},
                "settings": settings(data_cfg),
                "source_stamp": stamp,
                "sha256": {name: atomic.file_sha256(tmp / name)
                           for name in ("train.bin", "val.bin", tk.TOKENIZER_FILE)},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            atomic.replace_dir(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write prepared data to {out} ({e.strerror or e}); set data.prepared_dir "
                        "to a writable folder") from None
    cpt = f", {n_chars / tokens.size:.2f} chars/token" if n_chars else ""
    log(f"prepared {out}: {description}; {data_cfg.tokenizer} vocab {vocab}; {tokens.size:,} tokens{cpt}; "
        f"train {train.size:,} ({(out / 'train.bin').stat().st_size / 1e6:.1f} MB), "
        f"val {val.size:,} ({(out / 'val.bin').stat().st_size / 1e6:.1f} MB)")
    return out


META_KEYS = ("tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens", "val_tokens")


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"prepared data {path} not found; run `trainer prepare --config <same config>`")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        meta = None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS) or \
            meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{meta_file} is not a readable Airlock meta.json; run `trainer prepare --config <same "
                        "config>` to prepare the data again")
    return meta


# ---------------------------------------------------------------------------- sampler

@dataclass
class Batches:
    """Seeded random windows over a token file. The batch for (split, step, micro) is a
    pure function of the seed, so resuming needs only the step: no sampler state can drift."""

    train: np.ndarray
    val: np.ndarray
    block_size: int
    batch_size: int
    seed: int

    @classmethod
    def open(cls, path: Path, block_size: int, batch_size: int, seed: int):
        meta = read_meta(path)
        dtype = np.dtype(meta["dtype"])
        for split in ("train", "val"):  # a cut or swapped file would otherwise be read as other tokens
            file = Path(path) / f"{split}.bin"
            size = file.stat().st_size if file.is_file() else None
            if size != meta[f"{split}_tokens"] * dtype.itemsize:
                raise UserError(f"{file} is {'missing' if size is None else f'{size} bytes'}, but meta.json says "
                                f"{meta[f'{split}_tokens']} {dtype.name} tokens; run `trainer prepare --config "
                                "<same config>` to prepare the data again")
        files = {s: np.memmap(Path(path) / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
        for split, arr in files.items():
            if len(arr) < block_size + 1:
                raise UserError(f"{path}/{split}.bin has {len(arr)} tokens, fewer than model.block_size + 1 = "
                                f"{block_size + 1}; use a larger corpus or a smaller model.block_size")
        return cls(files["train"], files["val"], block_size, batch_size, seed)

    def get_batch(self, split: str, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x, y: (B, T) int64 token ids, y shifted by one. `micro` is the global micro-batch
        index of the step (under torchrun rank r's micro m is r * grad_accum + m), so the global
        batch does not depend on how many processes share it."""
        data = self.train if split == "train" else self.val
        stream = 0 if split == "train" else 1
        # (0, 1) completes the key that runs saved before torchrun support drew their batches with
        key = np.random.SeedSequence([self.seed, stream, step, micro, 0, 1]).generate_state(2)
        g = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=g).numpy()
        window = np.asarray(data[starts[:, None] + np.arange(self.block_size + 1)], dtype=np.int64)
        xy = torch.from_numpy(window)
        return xy[:, :-1], xy[:, 1:]
