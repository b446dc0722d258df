"""profile.steps from the real CLI: torch.profiler traces a window of training steps into
metrics/<run>/profile/ (a table of the ops that took the time and a Chrome trace) and changes no
number of the run; a window the run ends inside is written for the steps it holds, and a resume
traces its own window."""

from __future__ import annotations

import gzip
import json
import re

from tests.conftest import run_cli, tiny_args


def weights_sha(stdout: str) -> str:
    return re.search(r"weights sha256: ([0-9a-f]{64})", stdout).group(1)


def profile_dir(tmp_path, run: str):
    return tmp_path / "volumes" / "metrics" / run / "profile"


def test_a_profiled_run_writes_its_window_and_changes_no_number(corpus_dir, tmp_path):
    steps = {"train.max_steps": 8, "checkpoint.interval": 0}
    plain = run_cli(["train", *tiny_args(corpus_dir, tmp_path, "plain", **steps)], tmp_path)
    traced = run_cli(["train", *tiny_args(corpus_dir, tmp_path, "traced", **steps, **{
        "profile.steps": 3, "profile.start": 2, "profile.memory": "true"})], tmp_path)

    assert weights_sha(traced.stdout) == weights_sha(plain.stdout)
    assert not profile_dir(tmp_path, "plain").exists()
    folder = profile_dir(tmp_path, "traced")
    assert sorted(p.name for p in folder.iterdir()) == ["steps_000003-000005.rank0.json.gz", "steps_000003-000005.txt"]

    table = (folder / "steps_000003-000005.txt").read_text()
    assert table.startswith("profile of steps 3-5 (3 steps) on cpu")
    assert "aten::mm" in table and "Self CPU Mem" in table  # the ops, and their memory with profile.memory
    assert "trace: steps_000003-000005.rank0.json.gz" in table
    line = next(li for li in traced.stdout.splitlines() if li.startswith("profile of "))
    assert re.match(r"profile of steps 3-5 on cpu: [\d.]+ ms/step wall, [\d.]+ ms/step busy on the host; "
                    r"largest: .+ \d+%", line), line  # a tiny model's largest may be AdamW's own Python

    events = json.loads(gzip.decompress((folder / "steps_000003-000005.rank0.json.gz").read_bytes()))["traceEvents"]
    steps_traced = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps_traced) == 3, steps_traced  # the window, not the warm-up step before it
    assert any(e.get("name") == "Optimizer.step#AdamW.step" for e in events)


def test_a_window_cut_short_is_written_and_a_resume_traces_its_own(corpus_dir, tmp_path):
    args = tiny_args(corpus_dir, tmp_path, "cut", **{"train.max_steps": 4, "profile.steps": 10,
                                                    "profile.start": 2})
    run_cli(["train", *args], tmp_path)
    folder = profile_dir(tmp_path, "cut")
    assert (folder / "steps_000003-000004.txt").read_text().startswith("profile of steps 3-4 (2 steps)")

    # the window counts from the resumed process's first step (5): start 1, so steps 6 and 7
    out = run_cli(["resume", "--run", "cut", f"--run.out_dir={tmp_path / 'volumes'}", "--train.max_steps=9",
                   "--profile.steps=2", "--profile.start=1"], tmp_path)
    assert "profile of steps 6-7 on cpu" in out.stdout
    assert sorted(p.name for p in folder.iterdir()) == [
        "steps_000003-000004.rank0.json.gz", "steps_000003-000004.txt",
        "steps_000006-000007.rank0.json.gz", "steps_000006-000007.txt"]
