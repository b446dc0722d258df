"""Metric rows (CSV + JSONL + TensorBoard events, flushed per row so `tail -f` and a dashboard
follow a live run), the console/train.log logger, and the loss plot.

The event files (`events.out.tfevents.*`) lie beside metrics.csv in metrics/<run>/, so
`tensorboard --logdir <out_dir>/metrics` shows every run side by side; the evaluator's lie in
metrics/<run>/eval/ (TensorBoard run "<run>/eval"). A column becomes the tag TAGS names.
TensorBoard files are append-only: a resume from step N starts a new file that opens with a
SessionLog START at step N + 1 (what SummaryWriter(purge_step=N + 1) writes), and TensorBoard
drops every point at or past that step from the older files, as metrics.csv drops its rows.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

from trainer import atomic

log = logging.getLogger("trainer")

TRAIN_FIELDS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tok_per_s", "samples_per_s", "elapsed_s")

# metrics columns -> TensorBoard tags. TensorBoard groups charts by the part before the "/" and
# sorts the groups by name, so a pretraining run opens on train/ (loss, lr, grad norm, tok/s,
# samples/s, MFU on a GPU) then val/, and a GRPO run on eval/ (held-out reward), reward/, rollout/,
# time/, train/. A column not named here is shown as other/<column>, and one with a "/" is a tag
# already, so a new metric (one reward per reward function, say) appears without a change here.
TAGS = {
    # pretraining (train.py); mfu only on a GPU
    "loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens": "train/tokens", "tok_per_s": "train/tok_per_s", "samples_per_s": "train/samples_per_s",
    "elapsed_s": "train/elapsed_s", "mfu": "train/mfu",
    # GRPO (grpo/loop.py); its loss and tokens share the train/ tags above
    "reward_mean": "reward/mean", "reward_std": "reward/std", "zero_std_frac": "reward/zero_std_frac",
    "kl": "train/kl", "clip_ratio": "train/clip_ratio", "entropy": "train/entropy",
    "logprob_mismatch": "train/logprob_mismatch", "len_mean": "rollout/len_mean", "len_min": "rollout/len_min",
    "len_max": "rollout/len_max", "truncated_ratio": "rollout/truncated_ratio",
    "skipped_groups": "rollout/skipped_groups", "rollout_s": "time/rollout_s", "train_s": "time/train_s",
    "sync_s": "time/sync_s", "eval_s": "time/eval_s", "iter_s": "time/iter_s", "eval_reward": "eval/reward",
    "eval_pass_rate": "eval/pass_rate",
    # the evaluator (evaluate.py), into metrics/<run>/eval/: its val/loss overlays training's
    "perplexity": "val/perplexity",
}
EVENTS = re.compile(r"^events\.out\.tfevents\.(\d+)\.")  # TensorBoard's own file name: <time>.<host>.<pid>.<n>
FAILED = "failed after "  # how Metrics.close records, in train.log, the error that ended a run
_files = itertools.count()


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
        atomic.check_appendable(log_file)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
    return logger


def _read_text(path: Path) -> str:
    """A rows file's text ("" when missing, or anything but a regular file: a FIFO must not hang
    a reader, /dev/zero not fill memory); bytes that are not UTF-8 read as U+FFFD."""
    try:
        with os.fdopen(atomic.open_file(path), encoding="utf-8", errors="replace", newline="") as f:
            return f.read()
    except OSError:
        return ""


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV file; a line the csv module cannot parse is skipped."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    while True:
        try:
            rows.append(next(reader))
        except StopIteration:
            return rows
        except csv.Error:
            continue


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a line cut short by a crash or a full disk is skipped."""
    rows = []
    for line in _read_text(path).splitlines():
        try:
            row = atomic.parse_json(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def row_step(value) -> int | None:
    """A row's step (or iteration) as an int, from a JSON value or a CSV cell; None for damage."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]{1,15}", value) else None


def tag(column: str) -> str:
    return column if "/" in column else TAGS.get(column, f"other/{column}")


def _scalar(value) -> float | None:
    """A number TensorBoard can plot, or None (strings such as GRPO's adapter name, missing values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Events:
    """One TensorBoard event file, written synchronously by tensorboard's own RecordWriter with
    the protos SummaryWriter writes (the scalar as simple_value, which EventAccumulator.Scalars
    reads back). Synchronous, unlike SummaryWriter's background thread: a full disk is an
    OSError in the caller's thread, which Metrics turns into one line, not a thread's traceback.

    `purge_step`: the first step this file writes again; TensorBoard hides every point of the
    older files at or past it (SummaryWriter's purge_step)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a run's files in name order and never goes back to an older one, so
        # this file's time field must sort after every file there, even after a kill and a
        # resume within one second
        newest = max((int(m.group(1)) for p in self.dir.iterdir() if (m := EVENTS.match(p.name))), default=0)
        stamp = max(int(time.time()), newest + 1)
        self.path = self.dir / f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.{next(_files)}"
        self._Event = Event
        self._file = open(self.path, "xb")
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, row: dict) -> None:
        """Every number of `row` (column -> value) at `step`, as one event."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag(column), simple_value=x) for column, value in row.items()
                  if (x := _scalar(value)) is not None]
        if values:
            self._write(self._Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def text(self, step: int, name: str, text: str) -> None:
        """`text` under TensorBoard's Text tab, as SummaryWriter.add_text writes it."""
        from torch.utils.tensorboard.summary import text as text_summary

        self._write(self._Event(wall_time=time.time(), step=int(step), summary=text_summary(name, text)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _write_error(path: Path, e: OSError):
    from trainer import atomic
    from trainer.errors import UserError

    return UserError(f"cannot write {path} ({e.strerror or e}); {atomic.advice(e)}, then "
                     "`trainer resume` (the rows past the last checkpoint are rewritten)")


def log_events(log_dir: Path, step: int, row: dict | None = None, texts: dict | None = None) -> None:
    """One-off events (the evaluator's row, the end-of-run sample) in a file of their own:
    scalars of `row`, and each text of `texts` (name -> text), at `step`."""
    try:
        events = Events(log_dir)
        try:
            events.scalars(step, row or {})
            for name, text in (texts or {}).items():
                events.text(step, name, text)
        finally:
            events.close()
    except OSError as e:
        raise _write_error(Path(log_dir), e) from None


class Metrics:
    """Appends one row per step to metrics.csv, metrics.jsonl and a TensorBoard event file. On
    resume, rows past the checkpoint's step (written before a crash) are dropped, and the new
    event file purges the points past it, so every step appears once in all three. Closed while
    an error ends the loop (the loops close it in `finally`), it records the error in train.log
    (see `failure`), so `trainer runs` can say the run failed and why."""

    def __init__(self, metrics_dir: Path, fields=TRAIN_FIELDS, resume_step: int | None = None, key: str = "step"):
        self.dir = Path(metrics_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fields, self.key = list(fields), key
        self.csv_path, self.jsonl_path = self.dir / "metrics.csv", self.dir / "metrics.jsonl"
        for path in (self.csv_path, self.jsonl_path):
            atomic.check_appendable(path)
        try:
            if resume_step is not None:
                self._truncate(resume_step)
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            self._csv = open(self.csv_path, "a", newline="")
            self._jsonl = open(self.jsonl_path, "a")
        except OSError as e:
            raise _write_error(self.csv_path, e) from None
        self.last = resume_step or 0
        self._writer = csv.DictWriter(self._csv, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self._writer.writeheader()
        # a fresh start purges from step 0: the points of an earlier attempt that saved nothing go too
        try:
            self.events = Events(self.dir, purge_step=resume_step + 1 if resume_step else 0)
        except OSError as e:
            raise _write_error(self.dir, e) from None

    def _truncate(self, last: int) -> None:
        """Rewrite both files without rows past step `last` (written before a crash), each replaced
        whole (temp file, fsync, rename). A row with no step (damage: a torn line, a disk's NUL
        fill after a power cut) goes too, with a warning that counts them."""
        rows = read_rows(self.csv_path)
        kept = [r for r in rows if (step := row_step(r.get(self.key))) is not None and step <= last]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic.replace_file(self.csv_path, buffer.getvalue().encode())
        damaged = {self.csv_path.name: sum(row_step(r.get(self.key)) is None for r in rows)}
        if self.jsonl_path.exists():
            rows = read_jsonl(self.jsonl_path)
            kept = [r for r in rows if (step := row_step(r.get(self.key))) is not None and step <= last]
            atomic.replace_file(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            damaged[self.jsonl_path.name] = sum(row_step(r.get(self.key)) is None for r in rows)
        for name, n in damaged.items():
            if n:
                log.warning(f"{self.dir / name}: left out {n} damaged row{'s' * (n != 1)} (no {self.key} number)")

    def log(self, row: dict) -> None:
        """One row: the CSV keeps `fields`; the JSONL and the event file take every column."""
        try:
            self._writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fields})
            self._csv.flush()
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise _write_error(self.csv_path, e) from None
        self.last = int(row[self.key])
        self.scalars(self.last, {k: v for k, v in row.items() if k != self.key})

    def scalars(self, step: int, values: dict) -> None:
        """Numbers at `step` for TensorBoard only, with no CSV row: GRPO's evaluation before its
        first update (iteration 0) is one."""
        try:
            self.events.scalars(step, values)
            self.events.flush()
        except OSError as e:
            raise _write_error(self.events.path, e) from None

    def close(self) -> None:
        error = sys.exc_info()[1]  # what ends the loop, when close runs in its `finally`
        if isinstance(error, Exception):  # not a stop (Stopped, KeyboardInterrupt are BaseExceptions)
            _record_failure(f"{FAILED}{self.key} {self.last}: {error}")
        try:
            for f in (self._csv, self._jsonl):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        finally:
            self.events.close()


def _record_failure(message: str) -> None:
    """An ERROR line in train.log only: the console gets the error from the CLI, once."""
    logger = logging.getLogger("trainer")
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def last_line(log_file: Path, tail: int = 8192) -> str:
    """The last non-blank line of a log (read from its last `tail` bytes), "" when there is none
    or it cannot be read. A regular file only: a FIFO planted there would hang the reader."""
    from trainer import atomic

    try:
        with os.fdopen(atomic.open_file(log_file), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.strip()), "")


def failure(log_file: Path) -> str | None:
    """The error that ended a run, when it is the last line of its train.log (a later start
    of the run writes lines after it): "failed after step N: <error>" (N the last step logged),
    else None."""
    _, found, message = last_line(log_file).partition(f" ERROR {FAILED}")
    return FAILED + message if found else None


# dense bf16 tensor-core peak of one GPU in TFLOP/s (the vendors' data sheets), by a part of its
# name; the first match wins, so longer names come first. AIRLOCK_PEAK_TFLOPS sets any other.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0))


def peak_tflops(device_name: str) -> float | None:
    if os.environ.get("AIRLOCK_PEAK_TFLOPS"):
        return float(os.environ["AIRLOCK_PEAK_TFLOPS"])
    return next((peak for part, peak in PEAK_TFLOPS if part in device_name), None)


def flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token (PaLM's appendix B, as nanoGPT's estimate_mfu): 2N forward,
    2N backward through the activations, 2N per trainable weight for its gradient, plus
    attention's 12 x layers x width x context."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "n_embd", None) or getattr(config, "hidden_size", 0)
    return 4.0 * total + 2.0 * trainable + 12.0 * layers * width * block_size


def mfu_meter(model, device, block_size: int, world: int = 1):
    """-> a function from tokens/s (all processes) to model FLOPs utilisation (0..1) of `world`
    GPUs, or None on a CPU or a GPU of unknown peak."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    peak = peak_tflops(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    per_token = flops_per_token(model, block_size)
    return lambda tok_per_s: tok_per_s * per_token / (peak * 1e12 * world)


def _number(value) -> float | None:
    """A finite number from a CSV cell or a JSON value; None for anything else (damage, blanks)."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_loss(metrics_dir: Path, out: Path | None = None) -> Path | None:
    """loss.png: train loss per step, val loss at eval steps, and evaluator rows if any. A
    convenience: rows that are not numbers are left out, and a plot that cannot be written is a
    warning (the numbers are in metrics.csv), never the end of the command. -> the file or None."""
    metrics_dir = Path(metrics_dir)
    rows = read_rows(metrics_dir / "metrics.csv")

    def points(rows, x: str, y: str) -> list[tuple[float, float]]:
        found = ((_number(r.get(x)), _number(r.get(y))) for r in rows)
        return [(a, b) for a, b in found if a is not None and b is not None]

    train = points(rows, "step", "loss")
    if not train:
        return None
    val = points(rows, "step", "val_loss")
    evals = metrics_dir / "eval.jsonl"
    if evals.exists():
        val += points(read_jsonl(evals), "step", "val_loss")
    out = Path(out or metrics_dir / "loss.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    tmp = out.with_name(out.stem + ".tmp.png")
    try:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=0.8, alpha=0.8, label="train loss")
        if val:
            val = sorted(dict(val).items())
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(metrics_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(tmp)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning(f"could not write {out} ({e.strerror or e}); the numbers are in {metrics_dir / 'metrics.csv'}")
        return None
    finally:
        plt.close(fig)  # the evaluator draws one per checkpoint in one process
    return out
