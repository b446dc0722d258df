"""Tokens/s of `trainer train` on 1 process and on N processes (torchrun, gloo on CPU; NCCL on
a GPU host with --device cuda), the same config and per-process batch, and the scaling
efficiency tok/s(N) / (N x tok/s(1)).

    python bench/ddp_scaling.py                         # configs/default.yaml, 1 vs 2, 30 steps
    python bench/ddp_scaling.py --nproc 4 --steps 50 --config configs/smoke.yaml

It runs the real CLI (`python -m trainer train --nproc N`) in a temporary folder and reads the
tok_per_s column of metrics.csv (global tokens per second, all processes together), median over
the steps after the first five. Each process takes its share of the CPUs (run.threads=0:
usable CPUs / processes), so on a host with C cores one process runs C threads and N processes
run C/N each: on CPU this measures what data parallelism costs or gains against intra-op
threads on the same cores, not a speed-up from more hardware. The `load:` line gives the
1-minute load average before and after; compare runs at similar load only.

Measured (2 CPUs, load 0.85 -> 1.49, default config, 30 steps): 1 process 5,309 tok/s,
2 processes 4,797 tok/s (0.90x, efficiency 0.45: two one-thread processes against one
two-thread process on the same two cores, so 0.5 is the ceiling here).
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


def tok_per_s(config: str, nproc: int, steps: int, out: Path, device: str) -> tuple[float, float]:
    name = f"p{nproc}"
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(ROOT / config), f"--nproc={nproc}",
           f"--run.name={name}", f"--run.out_dir={out / 'volumes'}", f"--train.max_steps={steps}",
           "--checkpoint.interval=0", "--train.eval_interval=0", "--train.sample_at_end=false",
           "--train.export_at_end=false", f"--run.device={device}"]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    with open(out / "volumes" / "metrics" / name / "metrics.csv", newline="") as f:
        rates = [float(r["tok_per_s"]) for r in csv.DictReader(f)][5:]
    return statistics.median(rates), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # prepare the data once, outside the timings
        subprocess.run([sys.executable, "-m", "trainer", "prepare", "--config", str(ROOT / args.config)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        one, wall1 = tok_per_s(args.config, 1, args.steps, out, args.device)
        many, walln = tok_per_s(args.config, args.nproc, args.steps, out, args.device)
    load1 = os.getloadavg()[0]
    print(f"config {args.config}, {args.steps} steps, device {args.device}, {os.cpu_count()} CPUs")
    print(f"load: {load0:.2f} before, {load1:.2f} after (1-minute average)")
    print("| processes | tok/s (global) | wall s (incl. start-up) |")
    print("| --- | --- | --- |")
    print(f"| 1 | {one:,.0f} | {wall1:.1f} |")
    print(f"| {args.nproc} | {many:,.0f} | {walln:.1f} |")
    print(f"scaling efficiency tok/s({args.nproc}) / ({args.nproc} x tok/s(1)) = {many / (args.nproc * one):.2f}; "
          f"speed-up {many / one:.2f}x")


if __name__ == "__main__":
    main()
