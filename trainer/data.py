"""Corpus sources -> prepared token files; the seeded, resumable batch sampler.

Only this module reads or writes token files. A prepared folder holds train.bin and
val.bin (flat uint16, or uint32 when the vocab needs it), meta.json and tokenizer.json.
The same source and settings give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import tokenizer as tk
from trainer.errors import UserError

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


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path}:{lineno}: broken JSONL line ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0]}); fix or delete that line") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path}:{lineno}: no string field {field!r} (has: {keys}); "
                                f"set data.text_field to the field holding the text")
            docs.append(row[field])
    return docs


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes
                  and "__pycache__" not in p.parts and "site-packages" not in p.parts)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_source(source: str, text_field: str, max_bytes: int) -> tuple[list[str] | None, np.ndarray | None, str]:
    """-> (documents, None, description) for text, (None, tokens, description) for token files."""
    if source == STDLIB:
        files, root = _files(stdlib_dir(), (".py",)), stdlib_dir()
    else:
        root = Path(source)
        if not root.exists():
            raise UserError(f"data.source={source!r} does not exist; give a file or folder "
                            f"(.txt, .md, .jsonl, .bin, .npy, .pt) or {STDLIB!r}")
        if root.is_file() and root.suffix in TOKEN_SUFFIXES:
            return None, _read_tokens(root), f"token file {root.name}"
        files = _files(root, TEXT_SUFFIXES + (".jsonl",))
    if not files:
        raise UserError(f"data.source={source!r} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl)")
    docs, total = [], 0
    for path in files:
        texts = _read_jsonl(path, text_field) if path.suffix == ".jsonl" else [_read_text(path)]
        for text in texts:
            if max_bytes and total + len(text.encode()) > max_bytes:
                break
            docs.append(text)
            total += len(text.encode())
        if max_bytes and total >= max_bytes * 0.99:
            break
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data.source={source!r} is empty: no non-blank text found")
    label = STDLIB if source == STDLIB else root.name
    return docs, None, f"{label}: {len(docs)} documents, {total} bytes"


def _read_tokens(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".bin":
            arr = np.fromfile(path, dtype=np.uint16)  # the nanoGPT convention
        elif path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = torch.load(path, weights_only=True, map_location="cpu")
            arr = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    except Exception as e:  # numpy/torch raise many types for a bad file
        raise UserError(f"{path}: cannot read token file ({e.__class__.__name__}: {e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: token file must hold a flat integer array, got shape {arr.shape} {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise UserError(f"{path}: token file holds negative ids")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------- prepare

def prepared_name(source: str, kind: str, vocab_size: int) -> str:
    stem = STDLIB if source == STDLIB else Path(source.rstrip("/")).stem
    return f"{stem}-{kind}{vocab_size if kind == 'bpe' else ''}"


PREPARED_FALLBACK_ENV = "AIRLOCK_PREPARED_FALLBACK"  # read-only folders searched after prepared_dir


def prepared_path(data_cfg) -> Path:
    """Where `prepare` writes this config's data."""
    name = data_cfg.name or prepared_name(data_cfg.source, data_cfg.tokenizer, data_cfg.vocab_size)
    return Path(data_cfg.prepared_dir) / name


def find_prepared(data_cfg) -> Path:
    """Where to read it: prepared_dir first, then the folders in $AIRLOCK_PREPARED_FALLBACK (the
    image's corpora, prepared at build time, which a ./data bind mount would otherwise hide)."""
    path = prepared_path(data_cfg)
    if not (path / "meta.json").is_file():
        for folder in filter(None, os.environ.get(PREPARED_FALLBACK_ENV, "").split(os.pathsep)):
            if (Path(folder) / path.name / "meta.json").is_file():
                return Path(folder) / path.name
    return path


def split_chunks(n_tokens: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over CHUNK-sized pieces: True = validation. Seeded, so reproducible."""
    n_chunks = -(-n_tokens // CHUNK)
    if n_chunks < 2:
        return np.array([False, True]) if n_tokens >= 2 else np.array([False])
    n_val = min(n_chunks - 1, max(1, round(n_chunks * val_fraction)))
    mask = np.zeros(n_chunks, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_chunks)[:n_val]] = True
    return mask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(data_cfg, log=print) -> Path:
    """Tokenize `data_cfg.source` into the prepared folder; returns its path."""
    out = prepared_path(data_cfg)
    docs, tokens, description = read_source(data_cfg.source, data_cfg.text_field, data_cfg.max_bytes)
    tok = tk.build(data_cfg.tokenizer, docs, data_cfg.vocab_size, data_cfg.tokenizer_path)
    vocab = tok.get_vocab_size()
    eot = tk.eot_id(tok)
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

    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
            "sha256": {name: _sha256(tmp / name) for name in ("train.bin", "val.bin", tk.TOKENIZER_FILE)},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write prepared data to {out} ({e.strerror}); set data.prepared_dir "
                        "to a writable folder") from None
    cpt = f", {n_chars / tokens.size:.2f} chars/token" if n_chars else ""
    log(f"prepared {out}: {description}; {data_cfg.tokenizer} vocab {vocab}; {tokens.size:,} tokens{cpt}; "
        f"train {train.size:,} ({(out / 'train.bin').stat().st_size / 1e6:.1f} MB), "
        f"val {val.size:,} ({(out / 'val.bin').stat().st_size / 1e6:.1f} MB)")
    return out


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"prepared data {path} not found; run `trainer prepare --config <same config>`")
    return json.loads(meta_file.read_text())


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
    rank: int = 0
    world: int = 1

    @classmethod
    def open(cls, path: Path, block_size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        meta = read_meta(path)
        files = {s: np.memmap(Path(path) / f"{s}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
                 for s in ("train", "val")}
        for split, arr in files.items():
            if len(arr) < block_size + 1:
                raise UserError(f"{path}/{split}.bin has {len(arr)} tokens, fewer than model.block_size + 1 = "
                                f"{block_size + 1}; use a larger corpus or a smaller model.block_size")
        return cls(files["train"], files["val"], block_size, batch_size, seed, rank, world)

    def get_batch(self, split: str, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x, y: (B, T) int64 token ids, y shifted by one."""
        data = self.train if split == "train" else self.val
        stream = 0 if split == "train" else 1
        key = np.random.SeedSequence([self.seed, stream, step, micro, self.rank, self.world]).generate_state(2)
        g = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=g).numpy()
        window = np.asarray(data[starts[:, None] + np.arange(self.block_size + 1)], dtype=np.int64)
        xy = torch.from_numpy(window)
        return xy[:, :-1], xy[:, 1:]


def prepare_command(config: str | None = None, **overrides) -> str:
    """Tokenize a corpus into data/prepared/<name>/ (train.bin, val.bin, meta.json, tokenizer.json).

    Args:
      config: YAML file; its data section says what to prepare. Override with --data.source=PATH
        (.txt/.md file or folder, .jsonl, .bin/.npy/.pt tokens, or python-stdlib),
        --data.tokenizer=gpt2|bpe|char, --data.vocab_size=N, --data.text_field=NAME.
    """
    from trainer import config as configs
    from trainer.offline import go_offline

    cfg = configs.load(config, **overrides)
    if cfg.run.offline:
        go_offline()
    return str(prepare(cfg.data))
