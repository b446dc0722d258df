"""`trainer sweep`: one GRPO run per combination of a grid of config values, and a summary.

    trainer sweep --config configs/grpo_repeat.yaml --grid 'grpo.lr=[5e-6,1e-5,2e-5] grpo.beta=[0.02,0.05,0.1]'

The grid is `key=[v1,v2,...]` items separated by spaces; keys are config keys as on the
command line, values are YAML scalars. Every combination (the product, first key
outermost) is a run named `<base>-<key><value>...`, e.g. `grpo_repeat-lr1e-05-beta0.05`,
where <base> is run.name or the config's stem and <key> is the key's last part. Names
depend only on the grid, so running the same command again finds the same runs: finished
runs are skipped, a run stopped part-way resumes from its newest valid iteration, and
the rest start. All combinations are validated before the first run starts.

After every run, `metrics/<base>-sweep/summary.csv` and `summary.md` are rewritten with
one row per run: its grid values, status, iterations done, the eval reward before
training and the final eval reward and pass rate (from eval_iter_NNN.json). SIGTERM stops
the current run after its iteration (saved) and the sweep after it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import re
from pathlib import Path

import yaml

from trainer import atomic
from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import runs as runs_
from trainer.runs import RunPaths
from trainer.signals import STOP
from trainer.errors import UserError

log = logging.getLogger("trainer")

GRID_SYNTAX = "write it as 'grpo.lr=[5e-6,1e-5] grpo.beta=[0.02,0.05]' (key=[values], items separated by spaces)"
ITEM = re.compile(r"\s*([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)?)\s*=\s*\[([^\[\]]*)\]\s*")


def parse_grid(text) -> list[tuple[str, list]]:
    """'a.b=[1,2] c.d=[x]' -> [('a.b', [1, 2]), ('c.d', ['x'])]; bad syntax is one UserError line."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--grid {text!r} is empty or not a string; {GRID_SYNTAX}")
    grid, at = [], 0
    while at < len(text):
        m = ITEM.match(text, at)
        if not m or m.end() == at:
            raise UserError(f"--grid: cannot read {text[at:]!r}; {GRID_SYNTAX}")
        key, body = m.group(1), m.group(2)
        if "." not in key:
            raise UserError(f"--grid: key {key!r} needs its section, e.g. grpo.{key}; {GRID_SYNTAX}")
        values = []
        for raw in body.split(","):
            if not raw.strip():
                raise UserError(f"--grid: {key}=[{body}] has an empty value; {GRID_SYNTAX}")
            try:
                values.append(yaml.safe_load(raw.strip()))
            except yaml.YAMLError:
                raise UserError(f"--grid: {key} value {raw.strip()!r} is not a YAML scalar") from None
        if key in dict(grid):
            raise UserError(f"--grid: {key} appears twice; give all its values in one list")
        grid.append((key, values))
        at = m.end()
    return grid


def _labels(keys: list[str]) -> dict[str, str]:
    """The short name of each key in run names: its last part, the full key where two clash."""
    short = [k.split(".")[-1] for k in keys]
    return {k: (s if short.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, short)}


def _value_text(value) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def plan(config: str | None, grid: list[tuple[str, list]], overrides: dict) -> tuple[str, list[dict]]:
    """-> (sweep name, [{name, values, cfg}]) with every combination validated."""
    base_cfg = configs.build(yaml_path=config, overrides=overrides)
    base = base_cfg.run.name or (Path(config).stem if config else "grpo")
    keys = [k for k, _ in grid]
    labels = _labels(keys)
    runs = []
    for combo in itertools.product(*[values for _, values in grid]):
        try:
            given = {**overrides, **dict(zip(keys, combo))}
            cfg = configs.build(yaml_path=config, overrides=given)
        except UserError as e:
            raise UserError(f"--grid {dict(zip(keys, combo))}: {e}") from None
        typed = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in keys}
        name = base + "".join(f"-{labels[k]}{_value_text(v)}" for k, v in typed.items())
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, name=name))
        runs.append({"name": name, "values": typed, "cfg": cfg, "overrides": {**given, "run.name": name}})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"--grid gives two runs the same name ({names}); use distinct values")
    return f"{base}-sweep", runs


def run_state(cfg) -> tuple[int, Path | None]:
    """(iterations done, newest valid iteration dir) of a run; (0, None) before its first."""
    ckpt_dir = RunPaths.of(cfg).checkpoints
    if not ckpt.has_checkpoints(ckpt_dir):
        return 0, None
    step_dir = ckpt.find_valid(ckpt_dir)
    return int(ckpt.read_trainer_state(step_dir)["iteration"]), step_dir


def _eval(metrics_dir: Path, iteration: int) -> dict:
    path = metrics_dir / f"eval_iter_{iteration:03d}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        cfg = r["cfg"]
        done, _ = run_state(cfg)
        total = cfg.grpo.iterations
        metrics_dir = RunPaths.of(cfg).metrics
        start, final = _eval(metrics_dir, 0), (_eval(metrics_dir, total) if done >= total else {})
        status = "done" if done >= total else ("pending" if done == 0 else "partial")
        rows.append({"run": r["name"], **r["values"], "status": status, "iterations": f"{done}/{total}",
                     "eval_reward_start": start.get("mean_reward"), "eval_reward": final.get("mean_reward"),
                     "pass_rate": final.get("pass_rate")})
    return rows


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_summary(out_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """summary.csv (full precision) and summary.md (4 significant digits), each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    md = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    md += ["| " + " | ".join(_cell(row[k]) for k in fields) + " |" for row in rows]
    paths = out_dir / "summary.csv", out_dir / "summary.md"
    for path, text in zip(paths, (buf.getvalue(), "\n".join(md) + "\n")):
        atomic.write_bytes(path, text.encode())
    return paths


def run(config: str | None, grid: str, overrides: dict) -> tuple[list[dict], tuple[Path, Path]]:
    """Run (or continue) every combination of `grid`; -> (summary rows, (summary.csv, summary.md))."""
    from trainer.grpo.loop import grpo

    parsed = parse_grid(grid)
    sweep_name, runs = plan(config, parsed, overrides)
    out_dir = RunPaths(Path(runs[0]["cfg"].run.out_dir), sweep_name).metrics
    # a signal between runs stops the sweep; during a run, grpo() finishes its iteration and saves
    with STOP.polling("finishing this run's iteration and saving a checkpoint"):
        for i, r in enumerate(runs, 1):
            cfg = r["cfg"]
            done, step_dir = run_state(cfg)
            if done >= cfg.grpo.iterations:
                print(f"[{i}/{len(runs)}] {r['name']}: finished earlier, skipped", flush=True)
                continue
            if STOP:
                break
            print(f"[{i}/{len(runs)}] {r['name']}: " + (f"resuming from iteration {done}" if done else "starting"),
                  flush=True)
            if step_dir is None:
                result = grpo(cfg)
            else:
                try:
                    with runs_.continuation(r["name"], None, config, r["overrides"], kind="iter") as (cfg, step_dir):
                        result = grpo(cfg, resume_dir=step_dir)
                except UserError as e:
                    raise UserError(f"sweep run {r['name']}: {e}") from None
            write_summary(out_dir, summary_rows(runs))
            if result["iteration"] < cfg.grpo.iterations:  # the run saw SIGTERM/SIGINT and saved
                break
    rows = summary_rows(runs)
    return rows, write_summary(out_dir, rows)
