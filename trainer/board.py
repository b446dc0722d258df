"""What a dashboard shows, from the run folders alone: `trainer runs` (one row per run under
run.out_dir) and `trainer evaluate --compare` (runs' curves on one plot, best and last values).

A run's status comes from what it leaves on disk:

    running    its lock (checkpoints/<run>/.lock) is held: by the process named in the lock
    failed     train.log ends with the error that ended it (metrics.Metrics.close records it)
    damaged    `latest` is not a readable pointer to a step dir (resume falls back to the newest
               valid one, and the next save writes it anew)
    finished   pretraining: summary.json names the newest checkpoint's step (written last);
               GRPO: the newest iteration is grpo.iterations
    stopped    anything else with checkpoints: stopped by a signal (train.log ends with the
               stop line) or killed (it does not); `trainer resume` continues it
    no checkpoints   a run that saved none yet (or keeps none: checkpoint.enabled=false)

Whether a lock is held is read from /proc/locks, never by taking the lock (a probe that held
it for a moment could make a starting writer think the run taken). Runs of a sweep are those
its metrics/<base>-sweep/summary.csv lists. Reading never changes a run, and a run whose files
are damaged is a row with the reason, not an error.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fnmatch
import json
import os
import time
from pathlib import Path

from trainer import checkpoint as ckpt
from trainer import atomic, metrics, runlock
from trainer.errors import UserError
from trainer.runs import RunPaths

SUMMARY = "summary.json"  # written last by train.finish: the run is complete
CURVES = {"train": ("val_loss", "val loss", min), "grpo": ("eval_reward", "eval reward", max)}


@dataclasses.dataclass
class Run:
    """One row of `trainer runs` (and of `trainer runs --json`)."""

    name: str
    kind: str  # train | grpo | sweep (a GRPO run of a sweep)
    status: str  # running | stopped | finished | failed | damaged | no checkpoints
    detail: str = ""  # the status in words: "held by pid 12 on host ...", "failed after step 40: ...", the damage
    step: int | None = None  # the newest checkpoint's step (running: the newest logged step)
    max_steps: int | None = None  # train.max_steps or grpo.iterations
    metric: str = ""  # val_loss (pretraining) or eval_reward (GRPO)
    best: float | None = None
    last: float | None = None
    checkpoint: str | None = None  # the step dir a resume would start from
    checkpoint_age_s: float | None = None
    disk_bytes: int = 0  # checkpoints, metrics and GRPO sync versions, each file once
    sweep: str | None = None


def _metrics_root(out_dir) -> Path:
    return RunPaths(Path(out_dir), "-").metrics.parent


def _dirs(root: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []


def _config(paths: RunPaths) -> dict:
    """The run's config as last started (metrics/<run>/config.yaml), or {} when unreadable."""
    import yaml

    for path in (paths.metrics / ckpt.CONFIG, paths.checkpoints / ckpt.CONFIG):
        try:
            tree = yaml.safe_load(atomic.read_small(path))  # a regular file only: a FIFO would hang
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(tree, dict):
            return tree
    return {}


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN is no value


def _rows(path: Path) -> list[dict]:
    """A metrics CSV's rows; [] when it is missing or not a CSV (a damaged file is no error here)."""
    try:
        return metrics.read_rows(path)
    except (OSError, ValueError, csv.Error):  # ValueError: UnicodeDecodeError of a file that is not text
        return []


def _step_of(name: str | None) -> int | None:
    return int(name.rsplit("_", 1)[1]) if name and ckpt.STEP_DIR.match(name) else None


def disk_usage(*folders: Path) -> int:
    """Bytes of the files under folders, each file once (best/ hard-links a step dir's files)."""
    seen, total = set(), 0
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, name))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def curve(metrics_dir: Path, kind: str) -> list[tuple[int, float]]:
    """(step, value) of the run's validation curve: val loss of pretraining (metrics.csv), or
    held-out eval reward of GRPO (metrics.csv, and iteration 0's eval_iter_000.json, written
    before the first update)."""
    column = CURVES["train" if kind == "train" else "grpo"][0]
    points = {}
    if kind != "train":
        with contextlib.suppress(OSError, ValueError, AttributeError):
            start = json.loads((metrics_dir / "eval_iter_000.json").read_text())
            if _number(start.get("mean_reward")) is not None:
                points[0] = float(start["mean_reward"])
    for row in _rows(metrics_dir / "metrics.csv"):
        key = row.get("step") or row.get("iteration")
        value = _number(row.get(column))
        if key is not None and str(key).isdigit() and value is not None:
            points[int(key)] = value
    return sorted(points.items())


def _sweeps(metrics_root: Path) -> dict[str, str]:
    """run name -> the sweep (its <base>-sweep metrics folder) whose summary.csv lists it."""
    member = {}
    for name in _dirs(metrics_root):
        table = metrics_root / name / "summary.csv"
        if not table.is_file():
            continue
        for row in _rows(table):
            if row.get("run"):
                member[row["run"]] = name
    return member


def run_info(out_dir, name: str, sweep: str | None = None, now: float | None = None) -> Run:
    """One run's row. Never raises for what is on disk: damage is the row's status and detail."""
    paths = RunPaths(Path(out_dir), name)
    run_dir, metrics_dir = paths.checkpoints, paths.metrics
    now = time.time() if now is None else now
    rows = _rows(metrics_dir / "metrics.csv")
    steps = ckpt.step_dirs(run_dir)
    latest, problem = ckpt.read_latest(run_dir)
    if latest and not (run_dir / latest).is_dir():
        latest, problem = None, f"`latest` names {latest}, which is missing"
    newest = run_dir / latest if latest else (steps[0] if steps else None)
    kind = ("grpo" if newest.name.startswith("iter_") else "train") if newest is not None else \
        ("grpo" if rows and "iteration" in rows[0] else "train")
    config = _config(paths)
    section = config.get("grpo" if kind == "grpo" else "train")
    total = section.get("iterations" if kind == "grpo" else "max_steps") if isinstance(section, dict) else None
    column, _, better = CURVES[kind]
    values = [v for _, v in curve(metrics_dir, kind)]
    info = Run(name=name, kind="sweep" if sweep else kind, status="stopped", sweep=sweep,
               max_steps=total if isinstance(total, int) else None, metric=column,
               best=better(values) if values else None, last=values[-1] if values else None,
               disk_bytes=disk_usage(run_dir, metrics_dir, paths.sync))
    if newest is not None:
        info.checkpoint, info.step = newest.name, _step_of(newest.name)
        with contextlib.suppress(OSError):
            info.checkpoint_age_s = max(0.0, now - newest.stat().st_mtime)

    failed = metrics.failure(metrics_dir / "train.log")
    holder = runlock.holder(run_dir)
    if holder is not None:
        info.status, info.detail = "running", f"held by {holder}"
        logged = next((_number(r.get("step") or r.get("iteration")) for r in reversed(rows)), None)
        if logged is not None:
            info.step = int(logged)
    elif failed is not None:
        info.status, info.detail = "failed", failed
    elif problem is not None:
        info.status = "damaged"
        info.detail = problem + (f"; a resume falls back to the newest valid step dir (newest: {steps[0].name})"
                                 if steps else "; no step dir is left")
    elif newest is None:
        info.status = "no checkpoints"
        info.detail = "nothing saved yet" if rows else "no checkpoint and no metrics"
    elif kind == "train" and _summary_step(metrics_dir) == info.step:
        info.status = "finished"
    elif kind == "grpo" and info.max_steps is not None and info.step is not None and info.step >= info.max_steps:
        info.status = "finished"
    else:
        info.detail = "stopped by a signal" if _stopped_cleanly(metrics_dir / "train.log") else \
            "killed or crashed (train.log ends mid-run); `trainer resume` continues it"
    return info


def _summary_step(metrics_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        step = atomic.parse_json(atomic.read_small(metrics_dir / SUMMARY)).get("step")
        return step if isinstance(step, int) else None
    return None


def _stopped_cleanly(log_file: Path) -> bool:
    """A stop by a signal ends train.log with the loop's "stopped ..." line."""
    last = metrics.last_line(log_file, 4096)
    return bool(last) and " stopped " in f" {last} "


def list_runs(out_dir) -> list[Run]:
    """Every run under out_dir (a folder in checkpoints/ that holds checkpoints or a lock, or
    one in metrics/ with metrics), by name. Sweep summary folders are not runs."""
    ckpt_root, metrics_root = RunPaths.checkpoints_root(out_dir), _metrics_root(out_dir)
    sweeps = _sweeps(metrics_root)
    names = set()
    for name in _dirs(ckpt_root):
        run_dir = ckpt_root / name
        if ckpt.has_checkpoints(run_dir) or (run_dir / runlock.LOCK).exists():
            names.add(name)
    for name in _dirs(metrics_root):
        folder = metrics_root / name
        if any((folder / f).exists() for f in ("metrics.csv", "train.log", ckpt.CONFIG)):
            names.add(name)
    now, runs = time.time(), []
    for name in sorted(names):
        try:
            runs.append(run_info(out_dir, name, sweeps.get(name), now))
        except Exception as e:  # run_info reads every file defensively; this is the last guard of the listing
            runs.append(Run(name=name, kind="?", status="unreadable", detail=f"{type(e).__name__}: {e}"))
    return runs


# ---------------------------------------------------------------- the table

def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _value(run: Run, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{'val' if run.metric == 'val_loss' else 'reward'} {value:.4g}"


def table(runs: list[Run]) -> str:
    """Runs as an aligned text table (`docker ps` style); each row's detail follows as a note."""
    if not runs:
        return "no runs"
    head = ("RUN", "KIND", "STATUS", "STEP", "BEST", "LAST", "CHECKPOINT", "SAVED", "DISK")
    rows = [(r.name, r.kind, r.status,
             f"{'-' if r.step is None else r.step}/{'?' if r.max_steps is None else r.max_steps}",
             _value(r, r.best), _value(r, r.last), r.checkpoint or "-", _age(r.checkpoint_age_s),
             _size(r.disk_bytes)) for r in runs]
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    notes = [f"  {r.name}: {r.detail}" for r in runs if r.detail]
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------- comparison

def resolve(out_dir, names) -> list[Run]:
    """The runs `names` picks (names, or glob patterns such as 'grpo_repeat-*'), in that order;
    a name that matches nothing is a UserError naming it."""
    if isinstance(names, (list, tuple)):
        wanted = [str(n) for n in names]
    else:
        wanted = str(names or "").replace(",", " ").split()
    if not wanted:
        raise UserError("--compare needs runs: --compare=RUN,RUN (or a pattern such as 'grpo_repeat-*'); "
                        "`trainer runs` lists them")
    runs = {r.name: r for r in list_runs(out_dir)}
    picked = []
    for want in wanted:
        found = sorted(n for n in runs if fnmatch.fnmatchcase(n, want)) if any(c in want for c in "*?[") else \
            ([want] if want in runs else [])
        if not found:
            raise UserError(f"--compare: no run {want!r} under {out_dir}; `trainer runs --run.out_dir={out_dir}` "
                            "lists the runs")
        picked += [runs[n] for n in found if runs[n] not in picked]
    return picked


def compare(out_dir, names, out: Path | None = None) -> tuple[str, Path]:
    """Draw the runs' val loss (pretraining) and eval reward (GRPO) curves on one compare.png
    (a panel per metric) and -> (a markdown table of their best and last values, the png)."""
    runs = resolve(out_dir, names)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("train", "grpo") if any((r.kind == "train") == (k == "train") for r in runs)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(8 * len(kinds), 4.5), dpi=100, squeeze=False)
    lines = ["| run | metric | best | at | last | at | points |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for ax, kind in zip(axes[0], kinds):
        column, label, better = CURVES[kind]
        for r in runs:
            if (r.kind == "train") != (kind == "train"):
                continue
            points = curve(RunPaths(Path(out_dir), r.name).metrics, r.kind)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], "o-", ms=3, label=r.name)
                best = better(points, key=lambda p: p[1])
                lines.append(f"| {r.name} | {label} | {best[1]:.4f} | {best[0]} | {points[-1][1]:.4f} | "
                             f"{points[-1][0]} | {len(points)} |")
            else:
                lines.append(f"| {r.name} | {label} | - | - | - | - | 0 |")
        ax.set_xlabel("iteration" if kind == "grpo" else "step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} ({'higher' if better is max else 'lower'} is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else _metrics_root(out_dir) / "compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return "\n".join(lines), out
