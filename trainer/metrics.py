"""Metric rows (CSV + JSONL, flushed per row so `tail -f` works), the console/train.log
logger, and the loss plot."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

TRAIN_FIELDS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tok_per_s", "samples_per_s", "elapsed_s")


def setup_logging(log_file: Path | None = None, level=logging.INFO) -> logging.Logger:
    """The `trainer` logger prints plain lines to stdout and appends them to train.log."""
    logging.raiseExceptions = False  # a full disk under train.log must not print tracebacks to stderr
    logger = logging.getLogger("trainer")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
    return logger


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a line cut short by a crash or a full disk is skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Metrics:
    """Appends one row per step to metrics.csv and metrics.jsonl. On resume, rows past the
    checkpoint's step (written before a crash) are dropped, so every step appears once."""

    def __init__(self, metrics_dir: Path, fields=TRAIN_FIELDS, resume_step: int | None = None, key: str = "step"):
        self.dir = Path(metrics_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fields, self.key = list(fields), key
        self.csv_path, self.jsonl_path = self.dir / "metrics.csv", self.dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate(resume_step)
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv = open(self.csv_path, "a", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self._writer.writeheader()
        self._jsonl = open(self.jsonl_path, "a")

    def _truncate(self, last: int) -> None:
        """Rewrite both files without rows whose step is past `last` (tmp file + rename)."""
        rows = [r for r in read_rows(self.csv_path) if int(r[self.key]) <= last]
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)
        if self.jsonl_path.exists():
            kept = [json.dumps(row) for row in read_jsonl(self.jsonl_path) if row.get(self.key, 0) <= last]
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.jsonl_path)

    def log(self, row: dict) -> None:
        try:
            self._writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fields})
            self._csv.flush()
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:
            from trainer import atomic
            from trainer.errors import UserError

            raise UserError(f"cannot write {self.csv_path} ({e.strerror or e}); {atomic.advice(e)}, then "
                            "`trainer resume` (the rows past the last checkpoint are rewritten)") from None

    def close(self) -> None:
        for f in (self._csv, self._jsonl):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def plot_loss(metrics_dir: Path, out: Path | None = None) -> Path | None:
    """loss.png: train loss per step, val loss at eval steps, and evaluator rows if any."""
    metrics_dir = Path(metrics_dir)
    rows = read_rows(metrics_dir / "metrics.csv")
    if not rows or "loss" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=0.8, alpha=0.8, label="train loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    evals = metrics_dir / "eval.jsonl"
    if evals.exists():
        val += [(e["step"], e["val_loss"]) for e in read_jsonl(evals)
                if e.get("val_loss") is not None and e.get("step") is not None]
    if val:
        val = sorted(dict(val).items())
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(metrics_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out or metrics_dir / "loss.png")
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
