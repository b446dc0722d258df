"""checkpoint.keep_last bounds the disk: a failed or interrupted save or mirror copy removes
its partial folder (the mirror's copy here fails on a real kernel EFBIG), pruning removes
the step_N.tmp / step_N.old leftovers of killed saves (and nothing else), folders set aside
by a resume from an older step go first, and the mirror follows the primary's new branch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.unit.test_checkpoint import save, tiny
from trainer import checkpoint as ckpt


def names(folder, pattern="*"):
    return sorted(p.name for p in folder.glob(pattern))


def test_mirror_out_of_space_leaves_no_partial_copy(tmp_path):
    """The copy hits RLIMIT_FSIZE (EFBIG, as a full disk gives ENOSPC) in a child process."""
    model, opt = tiny()
    run_dir, mirror_run = tmp_path / "run", tmp_path / "mirror" / "run"
    for step in (1, 2):
        save(run_dir, step, model, opt, mirror_dir=str(tmp_path / "mirror"))
    step3 = save(run_dir, 3, model, opt)
    child = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from trainer import checkpoint as ckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        for _ in range(3):
            ckpt.mirror(Path({str(step3)!r}), Path({str(mirror_run)!r}), keep_last=2)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("could not mirror") == 3 and "File too large" in proc.stderr
    assert names(mirror_run, "step_*") == ["step_000001", "step_000002"]  # no step_000003.tmp
    assert ckpt.latest_name(mirror_run) == "step_000002" and ckpt.verify(mirror_run / "step_000002") is None


def test_interrupted_mirror_copy_removes_its_partial_folder(tmp_path, monkeypatch):
    model, opt = tiny()
    step1 = save(tmp_path / "run", 1, model, opt)
    calls = []
    real_copy = ckpt.shutil.copyfile

    def copy_then_interrupt(src, dst, **kw):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(ckpt.shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.mirror(step1, tmp_path / "mirror" / "run")
    assert names(tmp_path / "mirror" / "run", "step_*") == []


def test_interrupted_save_removes_its_partial_folder(tmp_path):
    model, opt = tiny()
    save(tmp_path, 1, model, opt)

    class InterruptedAfterTwoFiles(dict):
        def items(self):
            yield from list(super().items())[:2]
            raise KeyboardInterrupt

    files = InterruptedAfterTwoFiles(ckpt.serialize(model, opt, {ckpt.STEP: 2}, {"step": 2}, "run: {}\n"))
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, ckpt.step_name(2), files)
    assert names(tmp_path, "step_*") == ["step_000001"] and ckpt.latest_name(tmp_path) == "step_000001"


def test_pruning_removes_leftovers_of_killed_saves_and_nothing_else(tmp_path):
    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    leftovers = ["step_000002.tmp", "step_000001.old", "iter_000007.tmp"]
    strangers = ["step_000002.tmp.keep", "notes.tmp", "mystep_000001.tmp", "step_abc.tmp", "step_000002.tmpx",
                 "step_000005.old"]  # the last: the only copy of step 5 (killed between two renames)
    for name in leftovers + strangers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_bytes(b"x" * 100)
    (tmp_path / "step_000009.tmp_file").write_bytes(b"a user's file")
    save(tmp_path, 3, model, opt, keep_last=2)
    for name in leftovers:
        assert not (tmp_path / name).exists(), name
    for name in strangers + ["step_000009.tmp_file"]:
        assert (tmp_path / name).exists(), name
    assert names(tmp_path, "step_??????") == ["step_000001", "step_000003"]


def test_abandoned_folders_are_pruned_first(tmp_path):
    model, opt = tiny()
    for step in (100, 200, 300, 400):
        save(tmp_path, step, model, opt, keep_last=3)
    ckpt.set_aside_newer(tmp_path, 200)  # resuming from step_000200
    save(tmp_path, 201, model, opt, keep_last=3)
    assert names(tmp_path, "step_*") == ["step_000200", "step_000201", "step_000400.abandoned"]
    for step in (202, 203):
        save(tmp_path, step, model, opt, keep_last=3)
    assert names(tmp_path, "step_*") == ["step_000201", "step_000202", "step_000203"]


def test_setting_aside_twice_keeps_both_abandoned_branches(tmp_path):
    """keep_last=0 keeps everything: a second abandoned branch must not overwrite the first."""
    model, opt = tiny()
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt)
    ckpt.set_aside_newer(tmp_path, 1)
    save(tmp_path, 2, model, opt)
    ckpt.set_aside_newer(tmp_path, 1)
    assert names(tmp_path, "step_*") == ["step_000001", "step_000002.abandoned", "step_000002.abandoned.2",
                                          "step_000003.abandoned"]
    assert ckpt.find_valid(tmp_path) == tmp_path / "step_000001"


def test_mirror_follows_the_primary_onto_a_new_branch(tmp_path):
    model, opt = tiny()
    run_dir, mirror_root = tmp_path / "run", tmp_path / "mirror"
    for step in (100, 200, 300, 400):
        save(run_dir, step, model, opt, keep_last=2, mirror_dir=str(mirror_root))
    ckpt.set_aside_newer(run_dir, 300)  # resuming from step_000300 (steps 300 and 400 were kept)
    for step in (305, 310):
        save(run_dir, step, model, opt, keep_last=2, mirror_dir=str(mirror_root))
    assert names(run_dir, "step_*") == names(mirror_root / "run", "step_*") == ["step_000305", "step_000310"]
    assert ckpt.find_valid(mirror_root / "run") == mirror_root / "run" / "step_000310"


def test_a_save_clears_what_a_killed_save_left_and_puts_back_an_only_copy(tmp_path):
    """A kill inside atomic.write_dir leaves a hidden staging folder; one between replace_dir's
    two renames (where RENAME_EXCHANGE is missing) leaves the old step parked beside its empty
    place. The next save, whatever keep_last, removes the first and puts the second back."""
    from trainer import atomic

    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    staged = tmp_path / f".step_000002{atomic.TMP_TAG}0a1b.tmp"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / "step_000001").rename(tmp_path / f".step_000001{atomic.TMP_TAG}2c3d.old")
    stranger = tmp_path / ".step_000003.airlock-notes"  # not what a build leaves: a user's
    stranger.mkdir()
    save(tmp_path, 2, model, opt)  # keep_last=0: nothing is pruned
    assert not staged.exists() and stranger.exists()
    assert names(tmp_path, "step_*") == ["step_000001", "step_000002"]
    assert ckpt.verify(tmp_path / "step_000001") is None and ckpt.verify(tmp_path / "step_000002") is None
    assert names(tmp_path, f"*{atomic.TMP_TAG}*") == [stranger.name]
