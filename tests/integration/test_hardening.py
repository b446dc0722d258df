"""What the outside reliability battery found, fixed at the cause and proven through the real CLI:

- a signal anywhere in a command's life ends in a defined state: during start-up nothing is
  written and exit is 0; during the end-of-run work the rest is skipped, and `trainer resume`
  completes the run to the same weights sha256 as an uninterrupted one;
- the thread count is part of the run: recorded, and restored by a resume on a host whose
  default differs, so the resumed run stays bit-exact; overriding it warns;
- one run, one writer: a second writer is refused naming the holder, and a holder killed with
  SIGKILL does not block the resume;
- export replaces only its own earlier export, atomically, and leaves nothing behind; a run
  whose final/ holds something else is refused before step 1;
- a `latest` that is not a file (a directory, a symlink to one, a FIFO) put there between a
  stop and the resume is set aside, kept, with one warning: the resume continues from the
  newest step, saves, and ends at the uninterrupted run's weights sha256.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, start_cli, tiny_args, wait_for
from trainer import checkpoint as ckpt
from trainer.metrics import read_rows


def summary(out: Path, name: str) -> dict:
    return json.loads((out / "volumes" / "metrics" / name / "summary.json").read_text())


def read_until(proc, needle: str) -> str:
    """Read the merged output line by line until `needle` shows up (or the process ends)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never printed; exit {proc.wait()}:\n{''.join(seen)[-3000:]}")


def test_signal_during_start_up_writes_nothing_and_exits_0(tmp_path, corpus_dir):
    args = tiny_args(corpus_dir, tmp_path, "early", **{"train.max_steps": 4})
    proc = start_cli(["train", *args], cwd=tmp_path)
    read_until(proc, "preparing it now")  # the corpus is being tokenized: start-up, no step yet
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, out
    assert "during start-up" in out and "Traceback" not in out
    assert not list((tmp_path / "volumes" / "checkpoints" / "early").glob("step_*"))
    leftovers = [p.name for p in (tmp_path / "prepared").iterdir()] if (tmp_path / "prepared").exists() else []
    assert all((tmp_path / "prepared" / name / "meta.json").is_file() for name in leftovers), leftovers
    run_cli(["train", *args], cwd=tmp_path)  # the same command starts it as if nothing happened
    assert summary(tmp_path, "early")["step"] == 4


def test_signal_during_end_of_run_work_then_resume_completes_it(tmp_path, corpus_dir):
    extra = {"train.max_steps": 6, "checkpoint.interval": 3, "sample.max_new_tokens": 4000}
    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "ref", **extra)], cwd=tmp_path)
    run_dir = tmp_path / "volumes" / "checkpoints" / "late"
    proc = start_cli(["train", *tiny_args(corpus_dir, tmp_path, "late", **extra)], cwd=tmp_path)
    wait_for(lambda: ckpt.latest_name(run_dir) == "step_000006", proc=proc)  # the last step is saved
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "end-of-run work" in out and "trainer resume" in out, out
    assert not (tmp_path / "volumes" / "metrics" / "late" / "summary.json").exists()
    assert not (run_dir / "final").exists()

    done = run_cli(["resume", "--run=late", f"--run.out_dir={tmp_path / 'volumes'}"], cwd=tmp_path)
    assert "end-of-run work is missing" in done.stdout
    assert summary(tmp_path, "late")["weights_sha256"] == summary(tmp_path, "ref")["weights_sha256"]
    assert json.loads((run_dir / "final" / "airlock.json").read_text())["step"] == 6
    assert [int(r["step"]) for r in read_rows(tmp_path / "volumes" / "metrics" / "late" / "metrics.csv")] == \
        list(range(1, 7))
    again = run_cli(["resume", "--run=late", f"--run.out_dir={tmp_path / 'volumes'}"], cwd=tmp_path, check=False)
    assert again.returncode == 2 and "already reached step 6" in again.stderr


def test_thread_count_is_recorded_and_restored_on_a_host_with_another_default(tmp_path, corpus_dir):
    """OMP_NUM_THREADS=1 makes torch's default one thread: a host with one core, as far as the
    run can tell. The run started with the default of two keeps two after the resume."""
    # a constant schedule, so that the 4-step run continued to 8 is the 8-step run
    extra = {"run.threads": 0, "train.max_steps": 8, "checkpoint.interval": 4, "train.schedule": "constant"}
    two = {"OMP_NUM_THREADS": "2"}
    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "ref", **extra)], cwd=tmp_path, env=two)
    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "moved", **{**extra, "train.max_steps": 4})], cwd=tmp_path,
            env=two)
    saved = yaml.safe_load((tmp_path / "volumes" / "checkpoints" / "moved" / "step_000004" / ckpt.CONFIG).read_text())
    assert saved["run"]["threads"] == 2  # 0 was recorded as the count actually used

    resumed = run_cli(["resume", "--run=moved", f"--run.out_dir={tmp_path / 'volumes'}", "--train.max_steps=8"],
                      cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert "run.threads" not in resumed.stdout  # nothing changed, nothing to warn about
    assert summary(tmp_path, "moved")["weights_sha256"] == summary(tmp_path, "ref")["weights_sha256"]

    changed = run_cli(["resume", "--run=moved", f"--run.out_dir={tmp_path / 'volumes'}", "--extra_steps=1",
                       "--run.threads=1"], cwd=tmp_path)
    assert "run.threads 2 -> 1" in changed.stdout and "no longer bit-exactly" in changed.stdout


def test_one_run_one_writer(tmp_path, corpus_dir):
    args = tiny_args(corpus_dir, tmp_path, "busy", **{"train.max_steps": 100000, "checkpoint.interval": 2})
    run_dir = tmp_path / "volumes" / "checkpoints" / "busy"
    holder = start_cli(["train", *args], cwd=tmp_path)
    try:
        wait_for(lambda: ckpt.latest_name(run_dir), proc=holder)
        second = run_cli(["resume", "--run=busy", f"--run.out_dir={tmp_path / 'volumes'}"], cwd=tmp_path,
                         check=False)
        line = second.stderr.strip()
        assert second.returncode == 2 and len(line.splitlines()) == 1, second.stderr + second.stdout
        assert "busy" in line and str(holder.pid) in line, line
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock with the process
        holder.wait()
    resumed = run_cli(["resume", "--run=busy", f"--run.out_dir={tmp_path / 'volumes'}", "--extra_steps=1"],
                      cwd=tmp_path)
    assert "resumed busy" in resumed.stdout


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("exports")
    run_cli(["train", *tiny_args(corpus_dir, out, "exp", **{"train.max_steps": 4})], cwd=out)
    return out


def test_export_replaces_only_its_own_earlier_export(finished_run, tmp_path):
    volumes = finished_run / "volumes"
    dest = tmp_path / "exported"
    run_cli(["export", "--run=exp", f"--out_dir={volumes}", f"--out={dest}"], cwd=finished_run)
    first = (dest / "model.safetensors").stat().st_ino
    assert json.loads((dest / "airlock.json").read_text())["run"] == "exp"
    run_cli(["export", "--run=exp", f"--out_dir={volumes}", f"--out={dest}"], cwd=finished_run)
    assert (dest / "model.safetensors").stat().st_ino != first  # a new export took the old one's place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary folder left behind

    (dest / "airlock.json").write_text(json.dumps({"run": "someone-else"}))
    refused = run_cli(["export", "--run=exp", f"--out_dir={volumes}", f"--out={dest}"], cwd=finished_run,
                      check=False)
    assert refused.returncode == 2 and "someone-else" in refused.stderr
    assert json.loads((dest / "airlock.json").read_text()) == {"run": "someone-else"}


def test_a_final_folder_that_is_not_an_export_is_refused_before_step_1(tmp_path, corpus_dir):
    """final/ is checked when the run starts, not found in the way after its last step, and the
    fix named is one a run has (`--out` is export's)."""
    final = tmp_path / "volumes" / "checkpoints" / "fin" / "final"
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("mine")
    done = run_cli(["train", *tiny_args(corpus_dir, tmp_path, "fin")], cwd=tmp_path, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(final) in done.stderr and "train.export_at_end=false" in done.stderr and "--out" not in done.stderr
    assert not ckpt.step_dirs(final.parent) and not (tmp_path / "prepared").exists()  # before any work
    assert sorted(p.name for p in final.iterdir()) == ["notes.txt"]


def _resign(step_dir: Path, edit) -> None:
    """Edit a checkpoint file and make MANIFEST.json agree: what a hash check cannot catch."""
    import hashlib

    edit(step_dir)
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        raw = (step_dir / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_older_checkpoint_without_a_data_record_still_refuses_other_data(tmp_path, corpus_dir):
    """A checkpoint from before data fingerprints: the run's provenance and the checkpoint's own
    tokenizer copy are what it was trained on."""
    args = tiny_args(corpus_dir, tmp_path, "old", **{"train.max_steps": 4})
    run_cli(["train", *args], cwd=tmp_path)
    step_dir = tmp_path / "volumes" / "checkpoints" / "old" / "step_000004"

    def drop_record(d):
        state = json.loads((d / ckpt.TRAINER_STATE).read_text())
        del state[ckpt.DATA]
        (d / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    _resign(step_dir, drop_record)
    prepared = next((tmp_path / "prepared").iterdir())
    (prepared / "tokenizer.json").write_text((prepared / "tokenizer.json").read_text().replace('"a"', '"\\u00e4"', 1))
    resume = ["resume", "--run=old", f"--run.out_dir={tmp_path / 'volumes'}", "--extra_steps=1"]
    refused = run_cli(resume, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "tokenizer.json" in refused.stderr and str(prepared) in refused.stderr


def test_a_saved_value_out_of_range_is_fixed_by_an_override(tmp_path, corpus_dir):
    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "k", **{"train.max_steps": 3})], cwd=tmp_path)
    step_dir = tmp_path / "volumes" / "checkpoints" / "k" / "step_000003"
    _resign(step_dir, lambda d: (d / ckpt.CONFIG).write_text((d / ckpt.CONFIG).read_text().replace(
        "top_k: 50", "top_k: -5")))
    volumes = f"--out_dir={tmp_path / 'volumes'}"
    no_override = run_cli(["sample", "--run=k", volumes], cwd=tmp_path, check=False)
    assert no_override.returncode == 2 and "sample.top_k" in no_override.stderr and "--top_k" in no_override.stderr
    run_cli(["sample", "--run=k", volumes, "--top_k=5", "--max_new_tokens=5"], cwd=tmp_path)
    run_cli(["resume", "--run=k", f"--run.out_dir={tmp_path / 'volumes'}", "--extra_steps=1", "--sample.top_k=10"],
            cwd=tmp_path)


def test_a_copy_outside_the_run_layout_is_read_not_written(tmp_path, corpus_dir):
    """A mirror or a read-only folder: the resume writes to the configured run, never into the copy."""
    import hashlib
    import shutil

    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "src", **{"train.max_steps": 6, "checkpoint.interval": 3})],
            cwd=tmp_path)
    copy = tmp_path / "backup" / "src"
    shutil.copytree(tmp_path / "volumes" / "checkpoints" / "src", copy)
    shutil.rmtree(tmp_path / "volumes" / "checkpoints" / "src")
    (copy / ".lock").unlink()  # the lock file of the run it was copied from
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file()}
    out = run_cli(["resume", f"--checkpoint={copy / 'step_000003'}", "--extra_steps=1",
                   f"--run.out_dir={tmp_path / 'volumes'}", "--run.name=src"], cwd=tmp_path)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file()}
    assert after == before and not (copy / ".lock").exists(), out.stdout
    assert ckpt.latest_name(tmp_path / "volumes" / "checkpoints" / "src") == "step_000004"


def test_a_copied_run_finishes_and_replaces_its_inherited_final(tmp_path, corpus_dir):
    import shutil

    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "orig", **{"train.max_steps": 3})], cwd=tmp_path)
    runs = tmp_path / "volumes" / "checkpoints"
    shutil.copytree(runs / "orig", runs / "twin")
    run_cli(["resume", "--run=twin", f"--run.out_dir={tmp_path / 'volumes'}", "--extra_steps=1"], cwd=tmp_path)
    assert json.loads((runs / "twin" / "final" / "airlock.json").read_text())["run"] == "twin"


def test_an_edited_source_is_prepared_again_for_a_fresh_run(tmp_path, corpus_dir):
    src = tmp_path / "src.txt"
    src.write_text((corpus_dir / "mod_00.py").read_text() * 4)
    base = {"data.source": src, "data.name": "ed", "train.max_steps": 2}
    run_cli(["train", *tiny_args(corpus_dir, tmp_path, "first", **base)], cwd=tmp_path)
    src.write_text("completely different text, no code at all. " * 200)
    second = run_cli(["train", *tiny_args(corpus_dir, tmp_path, "second", **base)], cwd=tmp_path)
    assert "changed since" in second.stdout
    meta = json.loads((tmp_path / "prepared" / "ed" / "meta.json").read_text())
    assert meta["vocab_size"] < 30  # the new text's alphabet, not the code's


POINTER_RUN = {"train.schedule": "constant", "checkpoint.interval": 2, "sample.max_new_tokens": 4}


@pytest.fixture(scope="module")
def constant_reference(tmp_path_factory, corpus_dir):
    """6 steps with a constant schedule, so that a 4-step run continued to 6 is this run."""
    out = tmp_path_factory.mktemp("reference")
    run_cli(["train", *tiny_args(corpus_dir, out, "ref", **{**POINTER_RUN, "train.max_steps": 6})], cwd=out)
    return summary(out, "ref")["weights_sha256"]


@pytest.mark.parametrize("kind, command", [("directory", "resume"), ("symlink", "train"), ("fifo", "resume")])
def test_latest_that_is_not_a_file_is_set_aside_and_the_run_goes_on(tmp_path, corpus_dir, constant_reference,
                                                                      kind, command):
    args = tiny_args(corpus_dir, tmp_path, "ptr", **{**POINTER_RUN, "train.max_steps": 4})
    run_cli(["train", *args], cwd=tmp_path)  # saves step 2 and step 4, then stops
    run_dir = tmp_path / "volumes" / "checkpoints" / "ptr"
    pointer = run_dir / ckpt.LATEST
    pointer.unlink()
    if kind == "directory":  # someone's folder: it must survive with what it holds
        pointer.mkdir()
        (pointer / "notes.txt").write_text("mine\n")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        pointer.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    else:
        os.mkfifo(pointer)  # reading it would wait for a writer forever

    if command == "resume":
        cmd = ["resume", "--run=ptr", f"--run.out_dir={tmp_path / 'volumes'}", "--train.max_steps=6"]
    else:
        cmd = ["train", *tiny_args(corpus_dir, tmp_path, "ptr", **{**POINTER_RUN, "train.max_steps": 6}),
               "--resume=auto"]
    done = run_cli(cmd, cwd=tmp_path, timeout=180)
    out = done.stdout + done.stderr
    assert "at step 4" in out and "Traceback" not in out, out[-3000:]
    (aside,) = run_dir.glob(f"{ckpt.LATEST}.damaged-*")
    assert out.count("not a file") == 1 and aside.name in out, out[-3000:]  # one warning, naming the new name
    if kind == "directory":
        assert (aside / "notes.txt").read_text() == "mine\n"
    elif kind == "symlink":
        assert aside.is_symlink() and aside.resolve() == (tmp_path / "elsewhere").resolve()
        assert (tmp_path / "elsewhere").is_dir()
    else:
        assert stat.S_ISFIFO(os.lstat(aside).st_mode)
    assert pointer.is_file() and not pointer.is_symlink() and ckpt.latest_name(run_dir) == "step_000006"
    assert [int(r["step"]) for r in read_rows(tmp_path / "volumes" / "metrics" / "ptr" / "metrics.csv")] == \
        list(range(1, 7))
    assert summary(tmp_path, "ptr")["weights_sha256"] == constant_reference
    assert f"weights sha256: {constant_reference}" in out
