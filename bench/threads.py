"""Tokens/s of `trainer train` alone and beside one busy process, for OpenMP wait settings.

    python bench/threads.py                              # configs/default.yaml, 25 steps per run
    python bench/threads.py --variants libgomp,airlock,passive --steps 40

Each run is the real CLI (`python -m trainer train`, run.threads=0: torch's count, capped by the
CPUs this process may use) with checkpoints and evaluation off; its figure is the median
tok_per_s of metrics.csv after the first five steps. "Beside a busy process" starts one
pure-Python busy loop for the run's duration: two processes on this host, so the trainer's
fair share is half of the alone speed with libgomp's own setting. Goal (issue 9): beside the
busy process >= 0.9 of that fair share, and alone >= 0.97 of libgomp's alone speed.

Variants set the environment of the training process (libgomp reads it at start-up):
`airlock` (nothing set: the CLI sets GOMP_SPINCOUNT=1000), `libgomp` (GOMP_SPINCOUNT=300000,
libgomp's default spin when OMP_WAIT_POLICY is unset: what the trainer ran with before),
`passive` (OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once), `spinNk`
(GOMP_SPINCOUNT=N*1000: spin that long at a barrier, then sleep).

Measured (2 CPUs, idle but for the busy loop; before the CLI's default changed, so "default"
is libgomp's 300000): default alone 5,386 tok/s, beside the busy process 2,131 (0.79 of the
fair share); spin1k 5,677 (1.05x) and 3,224 (1.20); spin10k 5,716 (1.06x) and 2,567 (0.95);
passive 5,276 (0.98x) and 3,141 (1.17). `--docker IMAGE`
adds a run of the image under `docker run --cpus=1` (the cgroup quota the trainer divides by).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"airlock": {}, "libgomp": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def variant_env(name: str) -> dict:
    if name in VARIANTS:
        return VARIANTS[name]
    if name.startswith("spin") and name.endswith("k"):
        return {"GOMP_SPINCOUNT": str(int(name[4:-1]) * 1000)}
    raise SystemExit(f"unknown variant {name!r}: airlock, libgomp, passive or spinNk")


def run(config: str, steps: int, out: Path, name: str, env: dict, busy: bool) -> float:
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(ROOT / config), f"--run.name={name}",
           f"--run.out_dir={out / 'volumes'}", f"--train.max_steps={steps}", "--checkpoint.interval=0",
           "--checkpoint.enabled=false", "--train.eval_interval=0", "--train.sample_at_end=false",
           "--train.export_at_end=false"]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env})
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    with open(out / "volumes" / "metrics" / name / "metrics.csv", newline="") as f:
        return statistics.median(float(r["tok_per_s"]) for r in list(csv.DictReader(f))[5:])


def docker_run(image: str, config: str, steps: int) -> float:
    script = (f"trainer train --config {config} --run.name q --run.out_dir /tmp/v --train.max_steps={steps} "
              "--checkpoint.enabled=false --train.eval_interval=0 --train.sample_at_end=false "
              "--train.export_at_end=false >/dev/null && python -c \"import csv,statistics;"
              "r=list(csv.DictReader(open('/tmp/v/metrics/q/metrics.csv')))[5:];"
              "print(statistics.median(float(x['tok_per_s']) for x in r))\"")
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", "--cpus=1", "--entrypoint", "sh", image,
                          "-c", script], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--variants", default="libgomp,airlock,passive")
    ap.add_argument("--docker", default="", help="also run this image under docker run --cpus=1")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "trainer", "prepare", "--config", str(ROOT / args.config)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    load0 = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants.split(",")):
            env = variant_env(name)
            rows[name] = (run(args.config, args.steps, Path(tmp), f"{name}-alone", env, busy=False),
                          run(args.config, args.steps, Path(tmp), f"{name}-busy", env, busy=True))
    load1 = os.getloadavg()[0]
    base = rows.get("libgomp", next(iter(rows.values())))[0]
    print(f"config {args.config}, {args.steps} steps per run, {os.cpu_count()} CPUs; "
          f"load: {load0:.2f} before, {load1:.2f} after (1-minute average)")
    print("| setting | alone tok/s | vs libgomp alone | beside a busy process tok/s | of fair share |")
    print("| --- | --- | --- | --- | --- |")
    for name, (alone, busy) in rows.items():
        print(f"| {name} | {alone:,.0f} | {alone / base:.2f} | {busy:,.0f} | {busy / (base / 2):.2f} |")
    if args.docker:
        quota = docker_run(args.docker, args.config, args.steps)
        print(f"docker run --cpus=1 {args.docker}: {quota:,.0f} tok/s ({quota / (base / 2):.2f} of one CPU's share)")


if __name__ == "__main__":
    main()
