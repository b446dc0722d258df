"""`trainer runs` on one volume holding real runs in every state: running (a live `trainer
train`, named by its pid and host), stopped (the same run after SIGTERM), finished, failed (a
resume whose loss became NaN: the error is the row's detail), damaged (`latest` naming no step
dir, and one that is a directory), one with no checkpoints, and the GRPO runs of a sweep. Each
is listed with the right status, step and values, with `--json` for scripts and never a
traceback, also when its files are not what they claim (binary CSV, log, YAML, JSON, `latest`). `trainer evaluate --compare` draws the runs' curves into compare.png with a
markdown table of best and last values; an unknown run is one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket

import pytest

from tests.conftest import start_cli, tiny_args, wait_for
from trainer import board, cli, metrics, train
from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer.errors import UserError


def tiny_cfg(corpus, root, name, **extra):
    args = tiny_args(corpus, root, name, **{"train.max_steps": 10, "checkpoint.interval": 5,
                                            "train.eval_interval": 5, **extra})
    return configs.load(None, **dict(a[2:].split("=", 1) for a in args))


@pytest.fixture(scope="module")
def volume(tmp_path_factory, corpus_dir):
    """The runs, and what was seen of the live one while it ran."""
    root = tmp_path_factory.mktemp("runs")
    out = root / "volumes"
    train.train(tiny_cfg(corpus_dir, root, "finished"))

    # failed: resumed with a learning rate that makes the loss NaN at once
    train.train(tiny_cfg(corpus_dir, root, "failed"))
    from trainer.commands import resume_command

    with pytest.raises(UserError, match="loss is nan"):
        resume_command(run="failed", extra_steps=5, **{"run.out_dir": str(out), "train.lr": 1e6,
                                                       "train.grad_clip": 0.0})

    # damaged: copies of the finished run with `latest` naming nothing, and `latest` a directory
    for name, damage in (("damaged", "text"), ("damaged-dir", "dir")):
        shutil.copytree(out / "checkpoints" / "finished", out / "checkpoints" / name)
        shutil.copytree(out / "metrics" / "finished", out / "metrics" / name)
        latest = out / "checkpoints" / name / ckpt.LATEST
        latest.unlink()
        if damage == "text":
            latest.write_text("../../etc\n")
        else:
            latest.mkdir()
    (out / "checkpoints" / "damaged" / "step_000010").rename(out / "checkpoints" / "damaged" / "step_000010.tmp")

    # no checkpoints: metrics only (a run killed before its first save)
    shutil.copytree(out / "metrics" / "finished", out / "metrics" / "unsaved")
    (out / "metrics" / "unsaved" / "summary.json").unlink()
    (out / "checkpoints" / "sync" / "a-v0001").mkdir(parents=True)  # GRPO sync versions: not a run

    # a sweep of two one-iteration GRPO runs
    from trainer.grpo import sweep

    sweep.run(None, "grpo.lr=[1e-3,2e-3]", {
        "run.name": "sw", "run.out_dir": str(out), "run.device": "cpu", "model.n_layer": 1, "model.n_head": 2,
        "model.n_embd": 32, "model.block_size": 32, "grpo.iterations": 1, "grpo.prompts_per_iter": 4,
        "grpo.group_size": 4, "grpo.max_tokens": 6, "grpo.minibatch_size": 16, "eval.num_problems": 4,
        "eval.replicates": 2})

    # running, then stopped: a live run, listed while it holds its lock, then sent SIGTERM
    args = tiny_args(corpus_dir, root, "live", **{"train.max_steps": 100000, "checkpoint.interval": 5})
    proc = start_cli(["train", *args], cwd=root)
    try:
        wait_for(lambda: ckpt.latest_name(out / "checkpoints" / "live"), proc=proc)
        running = {r.name: r for r in board.list_runs(out)}["live"]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, running, proc.pid


@pytest.fixture(scope="module")
def runs(volume):
    return {r.name: r for r in board.list_runs(volume[0])}


def test_every_state(volume, runs):
    out, running, pid = volume
    assert sorted(runs) == ["damaged", "damaged-dir", "failed", "finished", "live", "sw-lr0.001", "sw-lr0.002",
                            "unsaved"]
    assert running.status == "running" and f"pid {pid} on {socket.gethostname()}" in running.detail
    assert running.step >= 5 and running.max_steps == 100000

    live = runs["live"]
    assert live.status == "stopped" and live.detail == "stopped by a signal"
    assert live.checkpoint == ckpt.latest_name(out / "checkpoints" / "live") and live.step >= 5

    done = runs["finished"]
    rows = metrics.read_rows(out / "metrics" / "finished" / "metrics.csv")
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert (done.status, done.kind, done.step, done.max_steps) == ("finished", "train", 10, 10)
    assert (done.metric, done.best, done.last) == ("val_loss", min(vals), vals[-1])
    assert done.checkpoint == "step_000010" and 0 <= done.checkpoint_age_s < 600 and done.disk_bytes > 10_000

    failed = runs["failed"]
    assert failed.status == "failed" and re.match(r"failed after step 1\d: loss is nan at step 1\d; ", failed.detail)
    assert failed.step == 10 and failed.checkpoint == "step_000010"

    assert runs["damaged"].status == "damaged"
    assert "`latest` names '../../etc'" in runs["damaged"].detail and "step_000005" in runs["damaged"].detail
    assert runs["damaged"].checkpoint == "step_000005"  # step_000010 is only a leftover now
    assert runs["damaged-dir"].status == "damaged" and "is a directory" in runs["damaged-dir"].detail
    assert (runs["unsaved"].status, runs["unsaved"].checkpoint) == ("no checkpoints", None)

    for name in ("sw-lr0.001", "sw-lr0.002"):
        r = runs[name]
        assert (r.kind, r.sweep, r.status, r.step, r.max_steps, r.metric) == \
            ("sweep", "sw-sweep", "finished", 1, 1, "eval_reward")
        assert r.last is not None and r.best >= r.last


def test_cli_table_and_json(volume, runs, capsys):
    out = volume[0]
    cli.main(["runs", f"--run.out_dir={out}"])
    text = capsys.readouterr().out
    assert "RUN" in text and "STATUS" in text and "Traceback" not in text
    for name, r in runs.items():
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert r.status in line and r.kind in line, line
    assert "  damaged: `latest` names" in text and "  failed: failed after step 1" in text
    cli.main(["runs", f"--run.out_dir={out}", "--json"])
    got = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert got["finished"]["status"] == "finished" and got["finished"]["best"] == runs["finished"].best
    assert got["sw-lr0.001"]["kind"] == "sweep"


def test_compare(volume, capsys, tmp_path):
    out = volume[0]
    png = tmp_path / "compare.png"
    cli.main(["evaluate", "--compare", "finished,failed,sw-*", f"--out_dir={out}", f"--out={png}"])
    text = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | metric | best")
    assert [line.split(" | ")[0][2:] for line in table[2:]] == ["finished", "failed", "sw-lr0.001", "sw-lr0.002"]
    finished = table[2].split(" | ")
    assert float(finished[2]) == pytest.approx(runs_best(out, "finished"), abs=1e-4) and finished[3] in ("5", "10")
    sweep_row = table[4].split(" | ")
    assert sweep_row[1] == "eval reward" and sweep_row[-1].rstrip(" |") == "2"  # iterations 0 and 1


def runs_best(out, name):
    return min(float(r["val_loss"]) for r in metrics.read_rows(out / "metrics" / name / "metrics.csv")
               if r["val_loss"])


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--compare", "finished,nosuch"], "no run 'nosuch'"),
    (["evaluate", "--compare", "zz-*"], "no run 'zz-*'"),
    (["evaluate", "--compare", ""], "--compare needs runs"),
])
def test_bad_compare_is_one_line(volume, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + [f"--out_dir={volume[0]}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_empty_or_missing_volume(tmp_path):
    assert board.list_runs(tmp_path / "nothing") == []
    assert board.table([]) == "no runs"
    os.makedirs(tmp_path / "v" / "checkpoints" / "x")
    assert board.list_runs(tmp_path / "v") == []  # an empty folder is no run


def test_files_that_are_not_what_they_claim_are_a_row(tmp_path):
    metrics_dir = tmp_path / "metrics" / "junk"
    metrics_dir.mkdir(parents=True)
    (metrics_dir / "metrics.csv").write_bytes(b"\xff\xfe\x00step,loss\n\x80\x81")
    (metrics_dir / "train.log").write_bytes(b"\xff\x00")
    (metrics_dir / "config.yaml").write_bytes(b"{[: \xff")
    (metrics_dir / "summary.json").write_bytes(b"[1, 2")
    run_dir = tmp_path / "checkpoints" / "junk"
    (run_dir / "step_000003").mkdir(parents=True)  # no manifest: `trainer runs` lists, it does not verify
    (run_dir / ckpt.LATEST).write_bytes(b"\xff" * 5000)
    (junk,) = board.list_runs(tmp_path)
    assert (junk.status, junk.checkpoint, junk.max_steps) == ("damaged", "step_000003", None)
    assert "`latest` is unreadable" in junk.detail or "not a step directory" in junk.detail, junk.detail
