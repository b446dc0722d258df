"""Peak memory (RSS) of `trainer prepare` as the corpus grows: preparation streams, so it stays flat.

    python bench/prepare_memory.py                        # 2 GB of JSONL, the issue's figure (17, item 4)
    python bench/prepare_memory.py --sizes 200,400        # two sizes: RSS flat as the corpus doubles
    python bench/prepare_memory.py --sizes 300 --kind txt --tokenizer char

For each size (MB of source files) a corpus is generated into --dir (deterministic
pseudo-English: words from a fixed 20,000-word vocabulary, documents of 1-16 KB), then the
real CLI prepares it in a child process (`python -m trainer prepare --data.source=...`),
and os.wait4 returns that child's own peak RSS (ru_maxrss). Printed per size: source MB,
tokens, seconds, MB/s, peak RSS. The goal is a peak under 1 GB on a corpus of at least 2 GB,
and a peak that does not grow with the corpus. The corpus and the prepared folder are removed
at the end unless --keep; the disk needs about 2.5x the largest size free.

--kind: jsonl (one {"text": ...} row per document, the default), parquet (the same rows, one
file), txt (a folder of .txt files, one document each). --tokenizer: gpt2 (the vendored
files, no training pass), char or bpe (trained first, in one more pass over the corpus).

Measured on the 2-core development VM, shared with other jobs (load 2-3.5, so the seconds are
rough), gpt2 tokenizer (2.6 characters per token on this pseudo-English):

| source | tokens | seconds | peak RSS |
|---|---|---|---|
| 2,003 MB JSONL, tokenizer threads off | 772.2 M | 812 | 337 MB |
| 200 MB JSONL, threads off | 77.2 M | 88 | 332 MB |
| 501 MB JSONL, threads off | 193.1 M | 276 | 332 MB |
| 84 MB parquet (200 MB of text), threads off | 77.2 M | 88 | 475 MB |
| 210 MB parquet (500 MB of text), threads off | 193.1 M | 213 | 478 MB |
| 50 MB JSONL, threads on | 19.3 M | 25 | 356 MB |
| 200 MB JSONL, threads on | 77.2 M | 90 | 378 MB |
| 501 MB JSONL, threads on | 193.1 M | 220 | 370 MB |

"Threads off" is how `trainer prepare` ran before data.prepare turned the tokenizers library's
threads on for itself (the CLI sets TOKENIZERS_PARALLELISM=false); on an idle 2-core host they
encode 1.6x faster. The whole-corpus preparation streaming replaced peaked at 1.5 GB on 20 MB of
the same JSONL (Python lists of token ids, about 75 bytes a token); the streaming one at 340 MB
there, of which about 225 MB is the interpreter with torch imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 20_000


def words(seed: int = 0) -> np.ndarray:
    """A fixed vocabulary of pronounceable pseudo-words, common ones short (Zipf-like draw below)."""
    rng = np.random.default_rng(seed)
    syllables = np.array([c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"])
    lengths = rng.integers(1, 5, VOCAB)
    return np.array(["".join(rng.choice(syllables, n)) for n in lengths])


def documents(total_bytes: int, seed: int = 0):
    """Documents of 1-16 KB until total_bytes of text: Zipf-distributed words."""
    vocab = words(seed)
    rng = np.random.default_rng(seed + 1)
    ranks = np.minimum(rng.zipf(1.2, 1 << 22) - 1, VOCAB - 1)  # drawn once, sliced at random offsets
    made = 0
    while made < total_bytes:
        n_words = int(rng.integers(150, 2500))
        start = int(rng.integers(0, len(ranks) - n_words))
        text = " ".join(vocab[ranks[start:start + n_words]]) + ".\n"
        made += len(text)
        yield text


def generate(kind: str, path: Path, size_mb: int) -> Path:
    total = size_mb * 1_000_000
    if kind == "txt":
        path.mkdir(parents=True)
        for i, text in enumerate(documents(total)):
            folder = path / f"{i // 1000:04d}"
            folder.mkdir(exist_ok=True)
            (folder / f"{i:07d}.txt").write_text(text)
        return path
    if kind == "jsonl":
        with open(path, "w") as f:
            for text in documents(total):
                f.write(json.dumps({"text": text}) + "\n")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        batch = []
        for text in documents(total):
            batch.append(text)
            if len(batch) == 2000:
                writer.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}, schema=schema))
    return path


def source_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(source: Path, prepared: Path, tokenizer: str) -> dict:
    """The real CLI in a child; -> seconds, the child's peak RSS and what it printed."""
    argv = [sys.executable, "-m", "trainer", "prepare", f"--data.source={source}", f"--data.tokenizer={tokenizer}",
            f"--data.prepared_dir={prepared}", "--data.name=bench", "--data.vocab_size=4096"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # progress lines as they come
        print("   ", line.rstrip(), flush=True)
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"trainer prepare exited {proc.returncode}:\n{''.join(lines[-20:])}")
    meta = json.loads((prepared / "bench" / "meta.json").read_text())
    return {"seconds": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "tokens": meta["train_tokens"] + meta["val_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000", help="corpus sizes in MB, comma-separated (default 2000)")
    ap.add_argument("--kind", default="jsonl", choices=("jsonl", "parquet", "txt"))
    ap.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "char", "bpe"))
    ap.add_argument("--dir", default="", help="where the corpus and prepared data go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora and prepared folders")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="airlock-prepare-memory-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "txt": ""}[args.kind]
            source = base / f"corpus-{size}mb{suffix}"
            if not source.exists():
                t0 = time.time()
                generate(args.kind, source, size)
                print(f"generated {source} ({source_bytes(source) / 1e6:,.0f} MB) in {time.time() - t0:.0f} s",
                      flush=True)
            prepared = base / f"prepared-{size}mb"
            shutil.rmtree(prepared, ignore_errors=True)
            result = prepare(source, prepared, args.tokenizer)
            result.update(size_mb=source_bytes(source) / 1e6)
            rows.append(result)
            print(f"{result['size_mb']:,.0f} MB {args.kind}, {args.tokenizer}: {result['tokens']:,} tokens in "
                  f"{result['seconds']:.0f} s ({result['size_mb'] / result['seconds']:.2f} MB/s), peak RSS "
                  f"{result['peak_rss_mb']:,.0f} MB", flush=True)
            if not args.keep:
                shutil.rmtree(prepared, ignore_errors=True)
                shutil.rmtree(source, ignore_errors=True) if source.is_dir() else source.unlink()
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print("\n| source | tokens | seconds | MB/s | peak RSS |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_mb']:,.0f} MB {args.kind} | {r['tokens']:,} | {r['seconds']:.0f} | "
              f"{r['size_mb'] / r['seconds']:.2f} | {r['peak_rss_mb']:,.0f} MB |")
    goal = all(r["peak_rss_mb"] < 1024 for r in rows)
    print(f"\npeak RSS under 1 GB at every size: {'yes' if goal else 'NO'}")


if __name__ == "__main__":
    main()
