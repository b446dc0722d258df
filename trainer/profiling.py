"""`profile.steps`: torch.profiler over a window of training steps, written beside the metrics.

The window is `profile.steps` optimizer steps after `profile.start` steps of this process (a
resume profiles too): compilation, autotuning and the caching allocator settle first, and the
step before the window is the profiler's own warm-up. Evaluations and saves that fall in the
window are traced as they are. Under <metrics>/profile/ it writes, per window:

    steps_<a>-<b>.txt               time per step, then the ops (CUDA: the kernels) that took the
                                    time, by self time on the device (CPU: on the host)
    steps_<a>-<b>.rank<r>.json.gz   each rank's Chrome trace: chrome://tracing or Perfetto, both
                                    open a local file without a network

and logs one line: the time per step and the ops with the largest share. A window cut short
(the run ends or is stopped inside it) is written for the steps it holds. Profiling changes no
number of the run: the weights and losses are those of a run without it; only the traced
steps are slower.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import time
from pathlib import Path

import torch

from trainer import atomic

log = logging.getLogger("trainer")

FOLDER = "profile"
ROWS = 25  # ops in the table
SUMMARY_OPS = 4  # ops named in the log line
RECORDING = (torch.profiler.ProfilerAction.RECORD, torch.profiler.ProfilerAction.RECORD_AND_SAVE)


def folder(metrics_dir: Path) -> Path:
    return Path(metrics_dir) / FOLDER


def window_name(first: int, last: int) -> str:
    return f"steps_{first:06d}-{last:06d}"


class StepProfiler:
    """Call `step(n)` after each optimizer step is queued and `close()` when the loop ends (also
    on an error: the profiler is stopped, a partial window still written). Off (`steps` 0), both
    do nothing."""

    def __init__(self, cfg, device: torch.device, metrics_dir: Path, rank: int = 0, writer: bool = True):
        self.steps, self.device, self.rank, self.writer = cfg.steps, device, rank, writer
        self.dir = folder(metrics_dir)
        self.traced: list[int] = []  # step numbers inside the window, as they finish
        self.t_first = self.t_last = None
        self.prof = None
        if not self.steps:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        warmup = 1 if cfg.start else 0  # the step before the window, traced and dropped
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(skip_first=max(cfg.start - 1, 0), wait=0, warmup=warmup,
                                             active=self.steps, repeat=1),
            on_trace_ready=self._ready, record_shapes=cfg.memory, profile_memory=cfg.memory)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.tidy(self.dir)  # temp files of a trace whose write was killed
        self.prof.start()

    @property
    def recording(self) -> bool:
        return self.prof is not None and self.prof.current_action in RECORDING

    def step(self, step: int) -> None:
        if self.prof is None:
            return
        now = time.perf_counter()
        if self.recording:
            self.traced.append(step)
            self.t_last = now
        elif not self.traced:
            self.t_first = now  # the end of the step before the window
        self.prof.step()
        if self.traced and not self.recording:  # the window is written: stop paying for the profiler
            self.close()

    def close(self) -> None:
        prof, self.prof = self.prof, None
        if prof is not None:
            prof.stop()  # a window under way is written now (torch calls on_trace_ready)

    def _ready(self, prof) -> None:
        if not self.traced:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        name = window_name(self.traced[0], self.traced[-1])
        trace = self.dir / f"{name}.rank{self.rank}.json.gz"
        _export_trace(prof, trace)
        if not self.writer:
            return
        text, line = report(prof, self.device, self.traced, self.t_first, self.t_last)
        table = self.dir / f"{name}.txt"
        try:
            atomic.replace_file(table, (text + f"\ntrace: {trace.name}\n").encode())
        except OSError as e:
            log.warning(f"profile: cannot write {table} ({atomic.cause(e)}); the run goes on without it")
        log.info(f"profile of {line}; table: {table}, trace: {trace}")


def _export_trace(prof, path: Path) -> None:
    """The Chrome trace, gzipped, written by atomic.replace_file (torch writes it plain first)."""
    plain = atomic.temp_path(path)
    try:
        prof.export_chrome_trace(str(plain))
        atomic.replace_file(path, gzip.compress(plain.read_bytes(), compresslevel=5))
    except OSError as e:
        log.warning(f"profile: cannot write {path} ({atomic.cause(e)}); the run goes on without the trace")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(plain)


def report(prof, device: torch.device, traced: list[int], t_first, t_last) -> tuple[str, str]:
    """(the text of steps_<a>-<b>.txt, the log line's summary). On CUDA the ops are ranked by
    their self time on the device (kernels appear as rows of their own), elsewhere on the host."""
    cuda = device.type == "cuda"
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # ProfilerStep#N spans a whole step: on the host its self time is the loop's own Python
    ops = [e for e in averages if not e.key.startswith("ProfilerStep")]
    busy = sum(getattr(e, key) for e in ops)  # microseconds, each op's time counted once
    n = len(traced)
    wall_ms = (t_last - t_first) * 1e3 / n if t_first is not None and t_last is not None else None
    per_step = busy / 1e3 / n
    where = "GPU" if cuda else "host"
    top = sorted(ops, key=lambda e: getattr(e, key), reverse=True)
    shares = ", ".join(f"{_short(e.key)} {100 * getattr(e, key) / busy:.0f}%" for e in top[:SUMMARY_OPS]) \
        if busy else "no op took time"
    steps = f"steps {traced[0]}-{traced[-1]}" if n > 1 else f"step {traced[0]}"
    wall = f"{wall_ms:.1f} ms/step wall, " if wall_ms is not None else ""
    line = f"{steps} on {device}: {wall}{per_step:.1f} ms/step busy on the {where}; largest: {shares}"
    header = [f"profile of {steps} ({n} step{'s' if n > 1 else ''}) on {device}, torch {torch.__version__}",
              f"wall clock: {wall_ms:.2f} ms per step" if wall_ms is not None else "wall clock: not measured",
              f"{'GPU kernels' if cuda else 'ops on the host'}: {per_step:.2f} ms per step"
              + (f" ({100 * per_step / wall_ms:.0f}% of the wall clock; the rest the GPU waits for the host)"
                 if cuda and wall_ms else ""),
              f"ranked by {key} (microseconds over the {n} step{'s' if n > 1 else ''})", ""]
    table = averages.table(sort_by=key, row_limit=ROWS, max_name_column_width=70)
    return "\n".join(header) + table, line


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."
