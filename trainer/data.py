"""Corpus sources -> prepared token files; the seeded, resumable batch sampler.

Only this module reads or writes token files. A prepared folder holds train.bin and
val.bin (flat uint16, or uint32 when the vocab needs it), meta.json and tokenizer.json, and
for data.format=sft also train_mask.bin and val_mask.bin (uint8, one per token). The same
source and settings give byte-identical files, and meta.json records those settings: a
folder is reused only by a config with the same ones (`find_prepared`).

Sources (data.format=text, pretraining): python-stdlib; a .txt/.md/.py/.rst file (one
document) or a folder of them; .jsonl and .parquet files (one document per row, the
data.text_field column), folders holding them, and a folder `datasets`' save_to_disk wrote
(`read_records`); or token ids (.bin/.npy/.pt), taken as they are (read whole). A parquet or
`datasets` source gives the same tokens as the same rows in JSONL.

Preparation streams (`prepare`): documents are read one at a time, tokenized a batch of
about ENCODE_BYTES at a time with the tokenizer's batch encoding, and appended to train.bin.
The train/val split needs the token count (val is a seeded sample of CHUNK-token pieces of
the whole stream, `split_chunks`), so it is a second pass over that file: the val pieces are
copied to val.bin and train.bin is closed up in place. A bpe or char tokenizer is first
trained in one more pass over the source. Memory is one batch, not the corpus (a single
document is read whole, so the largest document still counts); a progress line (documents,
bytes read, rate, ETA) is logged every PROGRESS_EVERY seconds.

SFT (data.format=sft): rows of a .jsonl or .parquet file, a folder of them or a `datasets`
folder, each one of
  - prompt/completion (data.prompt_field, data.completion_field) strings: the prompt's
    tokens, then the completion's, each encoded on its own (the prompt with the tokenizer's
    BOS where it adds one, as a document gets), then the end-of-text token;
  - prompt/completion lists of chat messages (TRL's conversational form): one chat, the
    completion's messages trained;
  - a chat (data.messages_field, a list of {"role": ..., "content": ...}): the assistant
    messages trained.
A chat is rendered with the tokenizer's chat template where it has one (data.tokenizer=model
and the folder's tokenizer_config.json or chat_template.jinja holds it; transformers'
apply_chat_template, local files only): each trained message is what the template adds
from the conversation before it, with the generation prompt, to the conversation up to and
including it. Without a template, Airlock's plain one:

    <|system|>\\n{content}\\n    <|user|>\\n{content}\\n    <|assistant|>\\n{content}<eot>

(any role is written as <|role|>; <eot> is the tokenizer's end-of-text token, not text; of an
assistant turn "{content}<eot>" is trained, its header is not). Every example ends with one
end-of-text token; it counts for the loss when the example ends with a trained part (the model
learns to stop). The loss mask holds 1 for a token the loss counts as a target, 0 for a
prompt token; meta.json adds "format": "sft", the count of counted targets per split and
which template rendered the chats. With data.max_bytes, rows are read in order while their
text fits in it: the row that would pass the limit ends the reading (an example is never
cut). The end-of-run sample starts from the first whole prompt in val.bin (`heldout_prompt`).

Packing, not padding: SFT examples are packed back to back into one token stream, as text
documents are, and the sampler draws the same seeded block_size windows from it; the mask
decides which targets count (a window may start inside one example and end inside the
next; attention runs across that boundary, as in the text path). No compute goes to pad
tokens and the sampler, resume and the split stay the text path's. A window of prompt
tokens only has no target: its loss is 0 with no gradient, not NaN (trainer/lm.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from trainer import atomic
from trainer import tokenizer as tk
from trainer.errors import UserError, one_line

CHUNK = 1024  # tokens per split unit: val takes a seeded sample of these chunks
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".parquet")  # one document (or SFT example) per row
TOKEN_SUFFIXES = (".bin", ".npy", ".pt")
STDLIB = "python-stdlib"
FORMATS = ("text", "sft")
IGNORE_INDEX = -100  # a target the loss skips (a prompt token of an SFT example): the HF/PyTorch convention
ENCODE_BYTES = 1 << 20  # text per encode_batch call: memory stays a few tens of MB whatever the corpus
ENCODE_DOCS = 4096  # ... and at most this many documents per call
SPLIT_BYTES = 8 << 20  # bytes of train.bin read at a time by the split pass
PROGRESS_EVERY = 10.0  # seconds between progress lines
EOT_SEGMENT = None  # an SFT segment that is the end-of-text token itself, not text


# ---------------------------------------------------------------------------- sources

def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name}`, or remove it from data.source") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl(path: Path, on_bytes: Callable[[int], None] | None = None):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if on_bytes is not None:
                on_bytes(len(raw))
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


def _dataset_files(path: Path) -> list[Path]:
    """The .arrow files of a `datasets` save_to_disk folder, as its state.json lists them."""
    state = json.loads((path / "state.json").read_text())
    return [path / Path(entry["filename"]).name for entry in state["_data_files"]]


def _arrow_batches(path: Path, on_bytes: Callable[[int], None] | None = None):
    """Record batches of a parquet file, or of the .arrow files a `datasets` save_to_disk
    folder lists in its state.json (Arrow IPC streams): pyarrow reads both, `datasets` is not needed.
    on_bytes(n): about n more bytes of the files were read (for a progress line)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet and `datasets` folders needs pyarrow (pip install pyarrow; the "
                        "image has it)") from None
    try:
        if path.is_file():
            file = pq.ParquetFile(path)
            rows, size, done = max(1, file.metadata.num_rows), path.stat().st_size, 0
            for batch in file.iter_batches(batch_size=1024):
                if on_bytes is not None:
                    now = size * min(rows, done + batch.num_rows) // rows
                    on_bytes(now - size * done // rows)
                    done += batch.num_rows
                yield batch
            return
        for arrow in _dataset_files(path):
            with pa.memory_map(str(arrow)) as source:
                last = 0
                for batch in pa.ipc.open_stream(source):
                    if on_bytes is not None:
                        on_bytes(source.tell() - last)
                        last = source.tell()
                    yield batch
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable {'parquet file' if path.is_file() else 'datasets folder'} "
                        f"({one_line(e, 200)})") from None


def is_dataset_dir(path: Path) -> bool:
    """A folder `datasets`' save_to_disk wrote (one split: state.json + dataset_info.json)."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def read_records(path, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a .jsonl file, a .parquet file, a `datasets` save_to_disk
    folder, or a folder of .parquet files; `where` names the file and line or row for messages.
    Streams: one batch of rows in memory at a time. on_bytes(n), when given, is told as the
    files are read (about n more bytes of them), for a progress line."""
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
            yield from _jsonl(file, on_bytes)
            continue
        if file.is_file() and file.suffix != ".parquet":
            raise UserError(f"{file}: read .jsonl, .parquet or a `datasets` save_to_disk folder")
        n = 0
        for batch in _arrow_batches(file, on_bytes):
            for row in batch.to_pylist():
                n += 1
                yield f"{file} row {n}", row


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


def _is_records_dir(path: Path) -> bool:
    """A folder read as one table of rows: a `datasets` save_to_disk folder (or a DatasetDict's,
    which read_records refuses with the names of its splits)."""
    return path.is_dir() and (is_dataset_dir(path) or (path / "dataset_dict.json").is_file())


def _source_files(source: str, suffixes: tuple[str, ...] = TEXT_SUFFIXES + RECORD_SUFFIXES) -> list[Path]:
    """What a source is read from, in reading order: its files, or a `datasets` folder as one entry."""
    if source == STDLIB:
        return _files(stdlib_dir(), (".py",), skip_tests=True)
    root = Path(source)
    return [root] if _is_records_dir(root) else _files(root, suffixes)


def _stamp_files(files: list[Path]) -> list[Path]:
    """The files behind _source_files' entries (a `datasets` folder's state.json and .arrow files)."""
    out = []
    for path in files:
        if path.is_dir():
            out.append(path / "state.json")
            try:
                out += _dataset_files(path)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        else:
            out.append(path)
    return out


@dataclass
class SourceStats:
    """What a pass over a source has read so far: the documents (examples for sft) kept, the
    bytes and characters of their text, the stdlib files skipped, and the bytes of the files
    read (`read`, against `total`, for the progress line)."""

    documents: int = 0
    bytes: int = 0
    chars: int = 0
    skipped: int = 0
    read: int = 0
    total: int = 0
    chats: int = 0

    def add_read(self, n: int) -> None:
        self.read += n


def _missing(source: str) -> UserError:
    return UserError(f"data.source={source!r} does not exist; give a file or folder (.txt, .md, .jsonl, .parquet, "
                     f"a `datasets` save_to_disk folder, .bin, .npy, .pt) or {STDLIB!r}")


def _text_files(source: str) -> tuple[list[Path], str]:
    """The files a text source is read from, in order, and its label; refuses a missing or empty source."""
    stdlib = source == STDLIB
    root = stdlib_dir() if stdlib else Path(source)
    if not stdlib and not root.exists():
        raise _missing(source)
    files = _source_files(source)
    if not files:
        where = f" ({root})" if stdlib else ""
        raise UserError(f"data.source={source!r}{where} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl, "
                        ".parquet)")
    return files, STDLIB if stdlib else root.name


def _file_texts(path: Path, text_field: str, stdlib: bool, stats: SourceStats) -> Iterator[str]:
    """The texts of one entry of a text source: a file's text, or a column of its rows."""
    if path.is_dir() or path.suffix in RECORD_SUFFIXES:
        for where, row in read_records(path, stats.add_read):
            if not isinstance(row.get(text_field), str):
                raise UserError(f"{where}: no string field {text_field!r} (has: {', '.join(row)}); "
                                f"set data.text_field to the field holding the text")
            yield row[text_field]
        return
    if stdlib:
        # the stdlib is a corpus Airlock picks, not the user's data: a file it cannot use
        # (latin-1, unreadable) is skipped and counted rather than failing the run
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            stats.skipped += 1
            return
    else:
        text = _read_text(path)
    try:
        stats.add_read(path.stat().st_size)
    except OSError:
        pass
    yield text


def iter_documents(source: str, text_field: str, max_bytes: int, stats: SourceStats | None = None) -> Iterator[str]:
    """The non-blank documents of a text source, one at a time, in order. With max_bytes, files
    are read in sorted order until that many bytes of text are in hand: the document that
    reaches the limit is cut there (on a character boundary) and no later file is opened.
    `stats` counts what was read (blank documents' bytes too)."""
    stats = stats if stats is not None else SourceStats()
    files, _ = _text_files(source)
    stdlib = source == STDLIB
    left = max_bytes or None  # bytes of text still wanted; None = all
    for path in files:
        if left == 0:
            break
        for text in _file_texts(path, text_field, stdlib, stats):
            if left is not None:
                raw = text.encode()[:left]
                text, left = raw.decode("utf-8", "ignore"), left - len(raw)  # cut on a character boundary
            stats.bytes += len(text.encode())
            if text.strip():
                stats.documents += 1
                stats.chars += len(text)
                yield text
            if left == 0:
                break


def _describe(label: str, stats: SourceStats) -> str:
    skip_note = f", {stats.skipped} file(s) skipped (not UTF-8 or unreadable)" if stats.skipped else ""
    return f"{label}: {stats.documents} documents, {stats.bytes} bytes{skip_note}"


def _token_file(source: str) -> Path | None:
    """The path of a token-file source (.bin/.npy/.pt), None for any other."""
    root = Path(source)
    return root if source != STDLIB and root.is_file() and root.suffix in TOKEN_SUFFIXES else None


def read_source(source: str, text_field: str, max_bytes: int) -> tuple[list[str] | None, np.ndarray | None, str]:
    """-> (documents, None, description) for text, (None, tokens, description) for token files:
    the whole source in memory (`prepare` streams it instead; this is for small corpora and
    tests). With max_bytes, as iter_documents."""
    if source != STDLIB and not Path(source).exists():
        raise _missing(source)
    token_file = _token_file(source)
    if token_file is not None:
        return None, _read_tokens(token_file), f"token file {token_file.name}"
    stats = SourceStats()
    _, label = _text_files(source)
    docs = list(iter_documents(source, text_field, max_bytes, stats))
    if not docs:
        raise UserError(f"data.source={source!r} is empty: no non-blank text found")
    return docs, None, _describe(label, stats)


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


# ---------------------------------------------------------------------------- SFT examples

PLAIN_TEMPLATE = "plain"  # meta.json's name for Airlock's own chat layout (see the module docstring)


def chat_template(data_cfg) -> str | None:
    """The chat template a data.tokenizer=model folder declares (chat_template.jinja, else
    tokenizer_config.json's chat_template, the "default" one of a list); None for any other
    tokenizer or a folder without one (Airlock's plain template is used then)."""
    if data_cfg.tokenizer != "model":
        return None
    folder = Path(data_cfg.tokenizer_path)
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8") or None
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template.strip() else None


class _Chat:
    """Renders chats into SFT segments: with the tokenizer's chat template, or the plain one."""

    def __init__(self, data_cfg):
        self.folder = data_cfg.tokenizer_path
        self.hf = None
        if chat_template(data_cfg) is not None:
            try:
                from transformers import AutoTokenizer

                self.hf = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - transformers raises many types for a folder it cannot read
                raise UserError(f"data.format=sft: the chat template of {self.folder} cannot be loaded with "
                                f"transformers' AutoTokenizer ({one_line(e, 200)}); fix the tokenizer files, or "
                                "remove chat_template from tokenizer_config.json to use Airlock's plain template") \
                    from None

    @property
    def template(self) -> bool:
        return self.hf is not None

    def _render(self, messages: list[dict], generation: bool, where: str) -> str:
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception, a Jinja error ...
            raise UserError(f"{where}: the chat template of {self.folder} refuses this conversation "
                            f"({one_line(e, 200)}); fix the row, or check the roles the template accepts") from None
        return text if isinstance(text, str) else str(text)

    def segments(self, messages: list[dict], trained: list[bool], where: str) -> tuple[list, bool]:
        """-> ([(text or EOT_SEGMENT, trained)], whether the first segment gets the tokenizer's
        special tokens (BOS): not for a template, which writes its own)."""
        if not self.template:
            out = []
            for message, train in zip(messages, trained):
                if message["role"] == "assistant":
                    out += [("<|assistant|>\n", False), (message["content"], train), (EOT_SEGMENT, train)]
                else:
                    out.append((f"<|{message['role']}|>\n{message['content']}\n", False))
            return out, True
        out, done = [], ""
        for i, (message, train) in enumerate(zip(messages, trained)):
            if not train:
                continue
            before = self._render(messages[:i], message["role"] == "assistant", where) if i else ""
            after = self._render(messages[:i + 1], False, where)
            if not before.startswith(done) or not after.startswith(before):
                raise UserError(f"{where}: the chat template of {self.folder} does not render this conversation "
                                f"message by message (message {i}'s text does not extend the conversation before "
                                "it), so its trained part cannot be told apart; Airlock's plain template (remove "
                                "chat_template) or single-turn rows work")
            out += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = self._render(messages, False, where)
        if not full.startswith(done):
            raise UserError(f"{where}: the chat template of {self.folder} renders the whole conversation otherwise "
                            "than message by message, so its trained part cannot be told apart; Airlock's plain "
                            "template (remove chat_template) or single-turn rows work")
        out.append((full[len(done):], False))
        return out, False


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key} must be a non-empty list of {{\"role\": ..., \"content\": ...}} messages, "
                        f"got {type(value).__name__}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise UserError(f"{where}: {key}[{i}] is not a {{\"role\": str, \"content\": str}} message "
                            f"({one_line(repr(message), 80)})")
    return [dict(message) for message in value]


def _example(row: dict, where: str, data_cfg, chat: _Chat) -> tuple[list, bool, bool]:
    """One SFT row -> (segments, special first, is a chat). Segments are (text, trained) pairs
    or (EOT_SEGMENT, trained); adjacent texts alike in training are joined, empty ones dropped,
    and the example ends with one end-of-text token, trained when its last part is."""
    mf, pf, cf = data_cfg.messages_field, data_cfg.prompt_field, data_cfg.completion_field
    is_chat = True
    if row.get(mf) is not None:
        messages = _messages(row[mf], where, f"data.messages_field {mf!r}")
        segments, special = chat.segments(messages, [m["role"] == "assistant" for m in messages], where)
    elif row.get(pf) is not None and row.get(cf) is not None:
        prompt, completion = row[pf], row[cf]
        if isinstance(prompt, str) and isinstance(completion, str):
            segments, special, is_chat = [(prompt, False), (completion, True)], True, False
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(prompt, where, f"data.prompt_field {pf!r}") + \
                _messages(completion, where, f"data.completion_field {cf!r}")
            segments, special = chat.segments(messages, [False] * len(prompt) + [True] * len(completion), where)
        else:
            raise UserError(f"{where}: {pf!r} and {cf!r} must both be strings, or both lists of chat messages (got "
                            f"{type(prompt).__name__} and {type(completion).__name__})")
    else:
        raise UserError(f"{where}: no {mf!r} list of messages and no {pf!r}/{cf!r} pair (has: {', '.join(row)}); set "
                        "data.messages_field, or data.prompt_field and data.completion_field, to the fields holding "
                        "them")
    joined: list = []
    for text, train in segments:
        if text == "" and not (special and not joined):
            continue
        if joined and text is not EOT_SEGMENT and joined[-1][0] is not EOT_SEGMENT and joined[-1][1] == train:
            joined[-1] = (joined[-1][0] + text, train)
        else:
            joined.append((text, train))
    if not joined or joined[-1][0] is not EOT_SEGMENT:
        joined.append((EOT_SEGMENT, bool(joined) and joined[-1][1]))
    return joined, special, is_chat


def _sft_files(source: str) -> list[Path]:
    root = Path(source)
    if source == STDLIB or not root.exists():
        raise UserError(f"data.format=sft reads rows of prompt/completion pairs or chats from a .jsonl or .parquet "
                        f"file, a folder of them or a `datasets` save_to_disk folder; data.source={source!r} "
                        f"{'is the python-stdlib corpus' if source == STDLIB else 'does not exist'}")
    if root.is_file() and root.suffix not in RECORD_SUFFIXES:
        raise UserError(f"data.format=sft reads rows from .jsonl or .parquet files or a `datasets` folder; "
                        f"data.source={source!r} is a {root.suffix or 'suffix-less'} file (for plain text use "
                        "data.format=text)")
    files = _source_files(source, RECORD_SUFFIXES)
    if not files:
        raise UserError(f"data.source={source!r} holds no .jsonl or .parquet files for data.format=sft")
    return files


def iter_examples(data_cfg, stats: SourceStats | None = None, chat: _Chat | None = None) -> Iterator[tuple[list, bool]]:
    """The SFT examples of data.source, one at a time, in order: (segments, special first)
    as `_example` makes them. With max_bytes, rows are read while their text fits in it."""
    stats = stats if stats is not None else SourceStats()
    chat = chat or _Chat(data_cfg)
    left = data_cfg.max_bytes or None
    for path in _sft_files(data_cfg.source):
        for where, row in read_records(path, stats.add_read):
            segments, special, is_chat = _example(row, where, data_cfg, chat)
            texts = [text for text, _ in segments if text is not EOT_SEGMENT]
            size = sum(len(text.encode()) for text in texts)
            if left is not None:
                if size > left:
                    return
                left -= size
            stats.documents += 1
            stats.chats += is_chat
            stats.bytes += size
            stats.chars += sum(len(text) for text in texts)
            yield segments, special


def _example_text(example: tuple[list, bool]) -> str:
    """An example's text, to train a bpe or char tokenizer on (the end-of-text token is no text)."""
    return "".join(text for text, _ in example[0] if text is not EOT_SEGMENT)


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
    if _format(data_cfg) == "sft":  # recorded only for sft: a text folder's settings stay as they were
        template = chat_template(data_cfg)
        out.update(format="sft", prompt_field=data_cfg.prompt_field, completion_field=data_cfg.completion_field,
                   messages_field=data_cfg.messages_field,
                   chat_template=hashlib.sha256(template.encode()).hexdigest() if template else PLAIN_TEMPLATE)
    return json.loads(json.dumps(out))  # as meta.json will hold them


def _format(data_cfg) -> str:
    return getattr(data_cfg, "format", "text")


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
    derived += "-sft" if _format(data_cfg) == "sft" else ""
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
    have, want = {"format": "text", **have}, {"format": "text", **want}  # a text folder records no format
    if have["format"] != want["format"]:  # the sft keys belong to sft only
        keys = [k for k in keys if k == "format" or k in have and k in want]
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
            try:
                _hashed[key] = atomic.file_sha256(file)
            except OSError:  # a folder, a FIFO, a device in its place: no bytes of the data
                out[name] = None
                continue
        out[name] = _hashed[key]
    return out


def source_stamp(source: str) -> dict:
    """Count, size and newest mtime of the files a source is read from: only stat calls, and it
    changes when the text is edited, which settings alone cannot see. {} when it cannot be read."""
    try:
        stats = [f.stat() for f in _stamp_files(_source_files(source))]
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


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """A line every PROGRESS_EVERY seconds while a pass over the source runs: documents, bytes of
    the source's files read of the total, rate and ETA (with max_bytes, of the text wanted)."""

    def __init__(self, log, what: str, stats: SourceStats, max_bytes: int):
        self.log, self.what, self.stats, self.max_bytes = log, what, stats, max_bytes
        self.t0 = self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        s, elapsed = self.stats, now - self.t0
        done = s.read / s.total if s.total else 0.0
        if self.max_bytes:
            done = max(done, s.bytes / self.max_bytes)
        done = min(done, 1.0)
        eta = f"ETA {_fmt_seconds(elapsed * (1 - done) / done)}" if done > 0 else "ETA -"
        self.log(f"{self.what}: {s.documents:,} documents, {s.read / 1e6:,.1f} of {s.total / 1e6:,.1f} MB read "
                 f"({done:.0%}), {s.read / 1e6 / elapsed:,.1f} MB/s, {eta}")


def _with_progress(items, progress: _Progress):
    for item in items:
        yield item
        progress()


def _batched(items, size_of) -> Iterator[list]:
    """Lists of items of about ENCODE_BYTES (size_of(item) bytes each) or ENCODE_DOCS items."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += size_of(item)
        if size >= ENCODE_BYTES or len(batch) >= ENCODE_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_ids(ids: np.ndarray, vocab: int, data_cfg) -> None:
    if ids.size and int(ids.max()) >= vocab:
        raise UserError(f"{data_cfg.source}: token id {int(ids.max())} is outside the {data_cfg.tokenizer} "
                        f"vocabulary ({vocab}); pick the tokenizer the ids were made with")


def _encode_docs(tok, docs: list[str], eot: int) -> np.ndarray:
    """The documents' ids, each followed by the end-of-text token, as one int64 array."""
    encodings = tok.encode_batch(docs)
    out = np.empty(sum(len(e.ids) + 1 for e in encodings), dtype=np.int64)
    pos = 0
    for e in encodings:
        n = len(e.ids)
        out[pos:pos + n] = e.ids
        out[pos + n] = eot
        pos += n + 1
    return out


def _encode_examples(tok, examples: list[tuple[list, bool]], eot: int) -> tuple[np.ndarray, np.ndarray]:
    """SFT examples -> (ids, loss mask). Each text segment is encoded on its own, the first of an
    example with the tokenizer's special tokens where `special` (its BOS), the rest without."""
    first, rest = [], []
    for segments, special in examples:
        for j, (text, _) in enumerate(segments):
            if text is not EOT_SEGMENT:
                (first if j == 0 and special else rest).append(text)
    encoded = [iter(tok.encode_batch(first, add_special_tokens=True)) if first else iter(()),
               iter(tok.encode_batch(rest, add_special_tokens=False)) if rest else iter(())]
    ids, mask = [], []
    for segments, special in examples:
        for j, (text, train) in enumerate(segments):
            piece = [eot] if text is EOT_SEGMENT else next(encoded[0 if j == 0 and special else 1]).ids
            ids += piece
            mask += [train] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def _split_in_place(folder: Path, n: int, chunk: int, val_chunks: np.ndarray, files) -> list[int]:
    """train-named files hold the whole stream of n items: the val chunks (val_chunks[i] for
    items [i * chunk, (i + 1) * chunk)) go to the val file and the train file is closed up in
    place (written behind where it is read, so it never needs a second copy). files: (train
    name, val name, dtype). -> the sum of each val file's values (what an SFT mask counts)."""
    sums = []
    for train_name, val_name, dtype in files:
        dtype = np.dtype(dtype)
        per_block = max(1, SPLIT_BYTES // (chunk * dtype.itemsize))
        total = 0
        with open(folder / train_name, "r+b") as f, open(folder / val_name, "wb") as v:
            written = 0
            for c0 in range(0, len(val_chunks), per_block):
                lo, hi = c0 * chunk, min(n, (c0 + per_block) * chunk)
                f.seek(lo * dtype.itemsize)
                block = np.frombuffer(f.read((hi - lo) * dtype.itemsize), dtype=dtype)
                val = np.repeat(val_chunks[c0:c0 + per_block], chunk)[:hi - lo]
                v.write(block[val].tobytes())
                total += int(block[val].sum(dtype=np.int64)) if dtype == np.uint8 else 0
                keep = block[~val].tobytes()
                f.seek(written)
                f.write(keep)
                written += len(keep)
            f.truncate(written)
        sums.append(total)
    return sums


def _count_ones(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(SPLIT_BYTES), b""):
            total += int(np.frombuffer(block, dtype=np.uint8).sum(dtype=np.int64))
    return total


@contextlib.contextmanager
def _tokenizer_threads():
    """The tokenizers library's own threads for the batch encoding and tokenizer training of
    `prepare` (1.6x on 2 cores), whatever TOKENIZERS_PARALLELISM the CLI set to keep them off
    elsewhere; the variable is restored after, so a later fork stays quiet. The ids do not
    depend on it: encode_batch keeps the order."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def prepare(data_cfg, log=print) -> Path:
    """Tokenize `data_cfg.source` into the prepared folder, streaming (see the module
    docstring); returns its path."""
    with _tokenizer_threads():
        return _prepare(data_cfg, log)


def _prepare(data_cfg, log) -> Path:
    out = prepared_path(data_cfg)
    stamp = source_stamp(data_cfg.source)  # before reading: an edit during prepare shows up next time
    sft = _format(data_cfg) == "sft"
    source = data_cfg.source
    token_file = None
    if sft:
        files = _sft_files(source)
        label = Path(source).name
        chat = _Chat(data_cfg)
    else:
        if source != STDLIB and not Path(source).exists():
            raise _missing(source)
        token_file = _token_file(source)
        files, label = _text_files(source) if token_file is None else ([token_file], token_file.name)
    total = sum(st.st_size for st in (f.stat() for f in _stamp_files(files) if f.is_file()))

    def stream(what: str) -> tuple[Iterator, SourceStats]:
        stats = SourceStats(total=total)
        items = iter_examples(data_cfg, stats, chat) if sft else \
            iter_documents(source, data_cfg.text_field, data_cfg.max_bytes, stats)
        return _with_progress(items, _Progress(log, what, stats, data_cfg.max_bytes)), stats

    tokens = None
    if token_file is not None:
        tokens = _read_tokens(token_file)
        texts = None
    elif data_cfg.tokenizer in ("bpe", "char"):  # trained on the corpus: one more pass over it
        items, _ = stream(f"training the {data_cfg.tokenizer} tokenizer")
        texts = (_example_text(item) for item in items) if sft else items
    else:
        texts = ()
    tok = tk.build(data_cfg.tokenizer, texts, data_cfg.vocab_size, data_cfg.tokenizer_path)
    vocab = tok.get_vocab_size()
    eot = tk.eot_id(tok)
    declared = tk.declared_eos(data_cfg.tokenizer_path) if data_cfg.tokenizer == "model" else None
    if declared and tok.token_to_id(declared) not in (None, eot):
        log(f"documents are joined with {tok.id_to_token(eot)} (the tokenizer's end-of-text token); the model "
            f"folder's eos_token is {declared}")
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    names = ["train.bin", "val.bin", tk.TOKENIZER_FILE] + (["train_mask.bin", "val_mask.bin"] if sft else [])

    try:
        with atomic.staging_dir(out) as tmp:  # removed again if anything (Ctrl-C too) interrupts
            n = 0
            with contextlib.ExitStack() as stack:
                f = stack.enter_context(open(tmp / "train.bin", "wb"))
                m = stack.enter_context(open(tmp / "train_mask.bin", "wb")) if sft else None
                if tokens is not None:
                    _check_ids(tokens, vocab, data_cfg)
                    for lo in range(0, len(tokens), SPLIT_BYTES):
                        f.write(tokens[lo:lo + SPLIT_BYTES].astype(dtype).tobytes())
                    n, stats = len(tokens), SourceStats()
                    description = f"token file {token_file.name}"
                else:
                    items, stats = stream("tokenizing")
                    if sft:
                        for batch in _batched(items, lambda ex: sum(len(t) for t, _ in ex[0] if t is not EOT_SEGMENT)):
                            ids, mask = _encode_examples(tok, batch, eot)
                            _check_ids(ids, vocab, data_cfg)
                            f.write(ids.astype(dtype).tobytes())
                            m.write(mask.tobytes())
                            n += len(ids)
                    else:
                        for batch in _batched(items, len):
                            ids = _encode_docs(tok, batch, eot)
                            _check_ids(ids, vocab, data_cfg)
                            f.write(ids.astype(dtype).tobytes())
                            n += len(ids)
                    if not stats.documents:
                        raise UserError(f"data.source={source!r} is empty: "
                                        f"{'no rows' if sft else 'no non-blank text'} found")
                    description = _describe(label, stats)
                    if sft:
                        template = "its chat template" if chat.template else "the plain template"
                        chats = f" ({stats.chats} chats, {template})" if stats.chats else ""
                        description = f"{label}: {stats.documents} examples{chats}, {stats.bytes} bytes"
            if n == 0:
                raise UserError(f"data.source={source!r} gave no tokens")
            # a corpus of one chunk or less is split in halves, the two pieces split_chunks expects for it
            chunk = CHUNK if n > CHUNK else -(-n // 2)
            val_chunks = split_chunks(n, data_cfg.val_fraction, data_cfg.split_seed)
            split_files = [("train.bin", "val.bin", dtype)] + ([("train_mask.bin", "val_mask.bin", np.uint8)] if sft
                                                              else [])
            sums = _split_in_place(tmp, n, chunk, val_chunks, split_files)
            n_train = (tmp / "train.bin").stat().st_size // np.dtype(dtype).itemsize
            n_val = n - n_train
            tok.save(str(tmp / tk.TOKENIZER_FILE))
            meta = {
                "tokenizer": data_cfg.tokenizer,
                "vocab_size": vocab,
                "eot_id": eot,
                "dtype": np.dtype(dtype).name,
                "train_tokens": int(n_train),
                "val_tokens": int(n_val),
            }
            if sft:
                val_targets = sums[1]
                train_targets = _count_ones(tmp / "train_mask.bin")
                meta.update({"format": "sft", "train_targets": train_targets, "val_targets": val_targets,
                             "chat_template": "tokenizer" if chat.template else PLAIN_TEMPLATE})
            meta.update({
                "chars": stats.chars,
                "source": description,
                "split": {"chunk": chunk, "val_fraction": data_cfg.val_fraction, "seed": data_cfg.split_seed},
                "settings": settings(data_cfg),
                "source_stamp": stamp,
                "sha256": {name: atomic.file_sha256(tmp / name) for name in names},
            })
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            atomic.replace_dir(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write prepared data to {out} ({e.strerror or e}); set data.prepared_dir "
                        "to a writable folder") from None
    cpt = f", {stats.chars / n:.2f} chars/token" if stats.chars else ""
    targets = f"; loss on {meta['train_targets'] / max(1, n_train):.0%} of train tokens (completions)" if sft else ""
    log(f"prepared {out}: {description}; {data_cfg.tokenizer} vocab {vocab}; {n:,} tokens{cpt}; "
        f"train {n_train:,} ({(out / 'train.bin').stat().st_size / 1e6:.1f} MB), "
        f"val {n_val:,} ({(out / 'val.bin').stat().st_size / 1e6:.1f} MB){targets}")
    return out


def heldout_prompt(path: Path, search: int = 1 << 20) -> list[int] | None:
    """An SFT folder's first whole prompt in val.bin (the held-out split): the tokens after an
    end-of-text token up to the first completion token, all in one split chunk (val.bin joins
    chunks that were apart in the stream). None for a text folder or when there is none in the
    first `search` tokens."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != "sft" or not meta["val_tokens"]:
        return None
    chunk = int(meta.get("split", {}).get("chunk") or CHUNK)
    n = min(int(meta["val_tokens"]), search)
    tokens = np.memmap(path / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["val_tokens"],))[:n]
    mask = np.memmap(path / "val_mask.bin", dtype=np.uint8, mode="r", shape=(meta["val_tokens"],))[:n]
    for end in np.flatnonzero(tokens == meta["eot_id"]):
        start = int(end) + 1
        if start % chunk == 0 or start >= n:  # the next token starts another chunk: not what followed
            continue
        stop = min(n, (start // chunk + 1) * chunk)
        targets = np.flatnonzero(mask[start:stop])
        if len(targets) and targets[0] > 0:
            return [int(i) for i in tokens[start:start + targets[0]]]
    return None


META_KEYS = ("tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens", "val_tokens")


def _count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _valid_meta(meta) -> bool:
    """The keys every reader relies on, each of its type: a hand-edited or damaged meta.json
    must be refused here, not fail as a library's error deep in a model build or a sampler."""
    return (isinstance(meta, dict) and all(k in meta for k in META_KEYS) and meta["dtype"] in ("uint16", "uint32")
            and isinstance(meta["tokenizer"], str) and _count(meta["vocab_size"], 1) and _count(meta["eot_id"])
            and meta["eot_id"] < meta["vocab_size"] <= np.iinfo(meta["dtype"]).max + 1
            and _count(meta["train_tokens"]) and _count(meta["val_tokens"])
            and isinstance(meta.get("sha256", {}), dict)
            and all(isinstance(v, str) for v in meta.get("sha256", {}).values()))


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"prepared data {path} not found; run `trainer prepare --config <same config>`")
    try:
        meta = atomic.parse_json(atomic.read_small(meta_file))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        meta = None
    if not _valid_meta(meta):
        raise UserError(f"{meta_file} is not a readable Airlock meta.json; run `trainer prepare --config <same "
                        "config>` to prepare the data again")
    return meta


# ---------------------------------------------------------------------------- sampler

@dataclass
class Batches:
    """Seeded random windows over a token file. The batch for (split, step, micro) is a
    pure function of the seed, so resuming needs only the step: no sampler state can drift.
    An SFT folder's loss mask is read at the same windows: a target it does not count is
    IGNORE_INDEX in y (`masked`)."""

    train: np.ndarray
    val: np.ndarray
    block_size: int
    batch_size: int
    seed: int
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None

    @property
    def masked(self) -> bool:
        """y holds IGNORE_INDEX for the targets the loss skips (data.format=sft)."""
        return self.train_mask is not None

    @classmethod
    def open(cls, path: Path, block_size: int, batch_size: int, seed: int):
        meta = read_meta(path)
        dtype = np.dtype(meta["dtype"])
        sft = meta.get("format") == "sft"
        checks = [(f"{split}.bin", dtype, split) for split in ("train", "val")]
        checks += [(f"{split}_mask.bin", np.dtype(np.uint8), split) for split in ("train", "val")] if sft else []
        for name, kind, split in checks:  # a cut or swapped file would otherwise be read as other tokens
            file = Path(path) / name
            size = file.stat().st_size if file.is_file() else None
            if size != meta[f"{split}_tokens"] * kind.itemsize:
                raise UserError(f"{file} is {'missing' if size is None else f'{size} bytes'}, but meta.json says "
                                f"{meta[f'{split}_tokens']} {kind.name} {'tokens' if kind == dtype else 'mask bytes'}; "
                                "run `trainer prepare --config <same config>` to prepare the data again")
        files = {s: np.memmap(Path(path) / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
        for split, arr in files.items():
            if len(arr) < block_size + 1:
                raise UserError(f"{path}/{split}.bin has {len(arr)} tokens, fewer than model.block_size + 1 = "
                                f"{block_size + 1}; use a larger corpus or a smaller model.block_size")
        masks = {s: np.memmap(Path(path) / f"{s}_mask.bin", dtype=np.uint8, mode="r") if sft else None
                 for s in ("train", "val")}
        return cls(files["train"], files["val"], block_size, batch_size, seed, masks["train"], masks["val"])

    def get_batch(self, split: str, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x, y: (B, T) int64 token ids, y shifted by one (IGNORE_INDEX where an SFT mask
        says the target does not count). `micro` is the global micro-batch index of the step
        (under torchrun rank r's micro m is r * grad_accum + m), so the global batch does not
        depend on how many processes share it."""
        data = self.train if split == "train" else self.val
        stream = 0 if split == "train" else 1
        # (0, 1) completes the key that runs saved before torchrun support drew their batches with
        key = np.random.SeedSequence([self.seed, stream, step, micro, 0, 1]).generate_state(2)
        g = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=g).numpy()
        window = np.asarray(data[starts[:, None] + np.arange(self.block_size + 1)], dtype=np.int64)
        xy = torch.from_numpy(window)
        mask = self.train_mask if split == "train" else self.val_mask
        if mask is None:
            return xy[:, :-1], xy[:, 1:]
        counted = np.asarray(mask[starts[:, None] + np.arange(1, self.block_size + 1)], dtype=bool)
        return xy[:, :-1], xy[:, 1:].masked_fill(torch.from_numpy(~counted), IGNORE_INDEX)
