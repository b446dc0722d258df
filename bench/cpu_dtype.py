"""The main job in float32 and in bf16 autocast on this CPU: tokens/s and the val loss it reaches.

    python bench/cpu_dtype.py                        # configs/default.yaml, 1,200 steps each (~10 min on 2 cores)
    python bench/cpu_dtype.py --steps 200 --dtypes fp32,bf16
    python bench/cpu_dtype.py --steps 60 --model.n_layer=6 --model.n_embd=384   # any config override

Each run is the real CLI (`python -m trainer train`, checkpoints and evaluation as the config
sets them) on one prepared folder, with `--run.dtype` the only difference; its speed is the
median tok_per_s of metrics.csv after the first five steps, its loss the val_loss rows the
evaluations wrote. bf16 pays on a CPU with native bf16 (AVX512-BF16 or AMX: oneDNN's kernels);
elsewhere torch emulates it and the trainer warns. Issue 18, item 5: the figures that choose
run.dtype=auto's CPU default are in docs/config.md's note on run.dtype.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer import runtime  # noqa: E402


def run(config: str, steps: int, out: Path, dtype: str, overrides: list[str]) -> dict:
    name = f"dtype-{dtype}"
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(ROOT / config), f"--run.name={name}",
           f"--run.out_dir={out}", f"--train.max_steps={steps}", f"--run.dtype={dtype}",
           "--train.sample_at_end=false", "--train.export_at_end=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(out / "metrics" / name / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sha = next((line.split("weights sha256:")[1].split()[0] for line in (done.stdout + done.stderr).splitlines()
                if "weights sha256:" in line), "?")
    return {"tok_per_s": statistics.median(float(r["tok_per_s"]) for r in rows[5:] or rows),
            "val": {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")},
            "wall": wall, "sha": sha[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args, overrides = ap.parse_known_args()
    subprocess.run([sys.executable, "-m", "trainer", "prepare", "--config", str(ROOT / args.config)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {d: run(args.config, args.steps, Path(tmp), d, overrides) for d in args.dtypes.split(",")}
    load1 = os.getloadavg()[0]
    print(f"config {args.config} {' '.join(overrides)}, {args.steps} steps, {os.cpu_count()} CPUs, "
          f"native bf16: {runtime.native_bf16()}; load: {load0:.2f} before, {load1:.2f} after (1-minute average)")
    base = next(iter(results.values()))
    evals = sorted(set.intersection(*(set(r["val"]) for r in results.values())))
    shown = [s for s in evals if s in (evals[0], evals[len(evals) // 2], evals[-1])] if evals else []
    print("| run.dtype | tok/s | vs first | wall s | " + " | ".join(f"val loss @{s}" for s in shown)
          + " | weights sha256 |")
    print("| --- " * (5 + len(shown)) + "|")
    for dtype, r in results.items():
        print(f"| {dtype} | {r['tok_per_s']:,.0f} | {r['tok_per_s'] / base['tok_per_s']:.2f}x | {r['wall']:.0f} | "
              + " | ".join(f"{r['val'][s]:.4f}" for s in shown) + f" | {r['sha']} |")


if __name__ == "__main__":
    main()
