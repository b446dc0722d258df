"""Checkpoint contract: atomic directories with a manifest, `latest`, verification,
fallback from a corrupt newest checkpoint, keep-last-K, best/ and the mirror; loading
restores weights, optimizer and the recorded state exactly and never unpickles code; `locate`
without a run picks the run written most recently, with or without a `latest`."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer import checkpoint as ckpt
from trainer import runs
from trainer.errors import UserError


def tiny():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    opt.step()
    return model, opt


def save(run_dir, step, model, opt, **kw):
    return ckpt.save_checkpoint(run_dir, ckpt.step_name(step), model, opt, {ckpt.STEP: step},
                                {"step": step}, "run: {}\n", **kw)


def resign(step_dir, fname):
    """Rewrite MANIFEST.json to match fname as it is now: only the parser stands in the way."""
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
    data = (step_dir / fname).read_bytes()
    manifest["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_save_load_round_trip(tmp_path):
    model, opt = tiny()
    recorded = {ckpt.STEP: 3, ckpt.DATA: {"train.bin": "ab" * 32}, ckpt.THREADS: 2}
    path = ckpt.save_checkpoint(tmp_path, ckpt.step_name(3), model, opt, recorded, {"step": 3}, "run: {}\n")
    assert path.name == "step_000003" and ckpt.latest_name(tmp_path) == "step_000003"
    assert ckpt.verify(path) is None
    assert not list(tmp_path.glob("*.tmp"))
    other, other_opt = GPT2LMHeadModel(model.config), torch.optim.AdamW(GPT2LMHeadModel(model.config).parameters())
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert {k: state[k] for k in recorded} == recorded
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied
    a, b = opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b)


def test_a_snapshot_holds_the_weights_of_its_step_while_training_goes_on(tmp_path):
    """AsyncSaver encodes a Snapshot on its thread while the loop trains on: what is written is
    the weights and moments at the snapshot, byte for byte what a save at that moment writes."""
    model, opt = tiny()
    now = ckpt.serialize(model, opt, {ckpt.STEP: 1}, {"step": 1}, "run: {}\n")
    snap = ckpt.Snapshot(model, opt, {ckpt.STEP: 1}, {"step": 1}, "run: {}\n")
    model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    opt.step()  # in place: the live tensors move on
    assert snap.files() == now != ckpt.serialize(model, opt, {ckpt.STEP: 1}, {"step": 1}, "run: {}\n")
    saver = ckpt.AsyncSaver()
    saver.save(tmp_path, ckpt.step_name(1), snap)
    assert {f.name: f.read_bytes() for f in saver.wait().iterdir() if f.name != ckpt.MANIFEST} == now
    saver.close()


def test_saves_reuse_their_host_buffers_and_write_each_steps_bytes(tmp_path):
    """AsyncSaver.snapshot copies into the same host buffers every save (HostBuffers) after the
    previous write has read them: each checkpoint still holds its own step's bytes."""
    model, opt = tiny()
    saver = ckpt.AsyncSaver()
    expected, snaps = {}, []
    for step in (1, 2, 3):
        model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
        opt.step()
        expected[step] = ckpt.serialize(model, opt, {ckpt.STEP: step}, {"step": step}, "run: {}\n")
        snaps.append(saver.snapshot(model, opt, {ckpt.STEP: step}, {"step": step}, "run: {}\n"))
        saver.save(tmp_path, ckpt.step_name(step), snaps[-1])
    saver.close()
    for step in (1, 2, 3):
        written = tmp_path / ckpt.step_name(step)
        assert {f.name: f.read_bytes() for f in written.iterdir() if f.name != ckpt.MANIFEST} == expected[step]
    first, last = snaps[0], snaps[-1]
    assert all(first.weights[k] is last.weights[k] for k in first.weights)  # the same memory, reused
    assert first.optimizer["state"][0]["exp_avg"] is last.optimizer["state"][0]["exp_avg"]


def test_host_buffers_follow_a_tensor_that_changes_shape():
    buffers = ckpt.HostBuffers()
    a = buffers.copy({"w": torch.ones(2, 3)}, "weights")["w"]
    b = buffers.copy({"w": torch.zeros(4)}, "weights")["w"]
    assert b.shape == (4,) and torch.equal(b, torch.zeros(4)) and torch.equal(a, torch.ones(2, 3))
    assert buffers.copy({"w": torch.full((4,), 2.0)}, "weights")["w"] is b


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
    model, opt = tiny()
    good = save(tmp_path, 1, model, opt)
    bad = save(tmp_path, 2, model, opt)
    target = bad / ckpt.MODEL
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (bad / ckpt.MANIFEST).unlink()
    else:
        (bad / ckpt.OPTIMIZER).unlink()
    assert ckpt.verify(bad) is not None
    with caplog.at_level("WARNING", logger="trainer"):
        assert ckpt.find_valid(tmp_path) == good
    assert "falling back to step_000001" in caplog.text


def test_leftover_tmp_dir_is_never_a_candidate(tmp_path):
    model, opt = tiny()
    good = save(tmp_path, 1, model, opt)
    (tmp_path / "step_000002.tmp").mkdir()  # a save killed mid-write
    assert ckpt.find_valid(tmp_path) == good


def test_no_valid_checkpoint_is_a_user_error(tmp_path):
    model, opt = tiny()
    only = save(tmp_path, 1, model, opt)
    (only / ckpt.STATE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="no valid checkpoint"):
        ckpt.find_valid(tmp_path)


def test_keep_last_and_best(tmp_path):
    model, opt = tiny()
    for step in range(1, 6):
        path = save(tmp_path, step, model, opt, keep_last=2)
        if step == 2:
            ckpt.update_best(tmp_path, path, {"val_loss": 1.0})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000005"]
    assert ckpt.verify(tmp_path / "best") is None  # survives pruning of step_000002
    assert '"checkpoint": "step_000002"' in (tmp_path / "best.json").read_text()


def test_a_grpo_runs_best_copy_verifies(tmp_path):
    """best/ copies either loop's checkpoint: a GRPO iteration's trainer_state.json holds its
    iteration, not a step (sample, export and evaluate of a GRPO best/ called it corrupt)."""
    model, opt = tiny()
    path = ckpt.save_checkpoint(tmp_path, ckpt.step_name(3, "iter"), model, opt, {ckpt.STEP: 3},
                                {"iteration": 3, "eval_reward": 0.9}, "run: {}\n", best={"iteration": 3})
    assert ckpt.verify(path) is None and ckpt.verify(tmp_path / "best") is None
    for name, text in ((ckpt.MANIFEST, None), (ckpt.TRAINER_STATE, '{"eval_reward": 0.9}')):
        copy = tmp_path / "best" / name  # hard links: the iteration keeps its files
        text = text or copy.read_text()
        copy.unlink()
        copy.write_text(text)
    resign(tmp_path / "best", ckpt.TRAINER_STATE)
    assert ckpt.verify(tmp_path / "best") == f"{ckpt.TRAINER_STATE} does not hold step or iteration (a number)"
    assert ckpt.verify(path) is None


def test_mirror_copies_each_checkpoint(tmp_path):
    model, opt = tiny()
    run_dir, mirror_root = tmp_path / "primary" / "run1", tmp_path / "backup"
    for step in (1, 2, 3):
        save(run_dir, step, model, opt, keep_last=2, mirror_dir=str(mirror_root))
    mirrored = mirror_root / "run1"
    assert ckpt.latest_name(mirrored) == "step_000003"
    assert sorted(p.name for p in mirrored.glob("step_*")) == ["step_000002", "step_000003"]
    assert ckpt.verify(mirrored / "step_000003") is None
    assert ckpt.find_valid(mirrored) == mirrored / "step_000003"


def test_loading_never_unpickles_code(tmp_path):
    model, opt = tiny()
    path = save(tmp_path, 1, model, opt)
    marker = tmp_path / "code_ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for target in (ckpt.STATE, ckpt.OPTIMIZER):
        good = (path / target).read_bytes()
        (path / target).write_bytes(pickle.dumps({"step": Evil()}))
        resign(path, target)  # so that only the unpickler stands in the way
        with pytest.raises(UserError, match=f"{target} is unreadable") as err:
            ckpt.load_checkpoint(path, GPT2LMHeadModel(model.config))
        assert "\n" not in str(err.value) and not marker.exists()
        (path / target).write_bytes(good)
        resign(path, target)


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """Resuming from an older step: the newer steps are set aside, and the new branch's
    checkpoints survive keep_last (set-aside folders are the first to go)."""
    model, opt = tiny()
    for step in (100, 200, 300, 400):
        save(tmp_path, step, model, opt, keep_last=2)
    ckpt.set_aside_newer(tmp_path, 200)  # what resume_training does when continuing step_000200
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000300.abandoned", "step_000400.abandoned"]
    save(tmp_path, 237, model, opt, keep_last=2)
    assert ckpt.find_valid(tmp_path) == tmp_path / "step_000237"
    (tmp_path / "step_000400.abandoned").rename(tmp_path / "step_000400")  # even with a newer step present
    save(tmp_path, 240, model, opt, keep_last=2)
    assert (tmp_path / "step_000240").is_dir() and ckpt.latest_name(tmp_path) == "step_000240"


def test_exports_and_tmp_dirs_are_not_checkpoints(tmp_path):
    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    (tmp_path / "export_step_000001").mkdir()
    (tmp_path / "step_000002.old").mkdir()
    for step in (2, 3):
        save(tmp_path, step, model, opt, keep_last=2)
    assert (tmp_path / "export_step_000001").is_dir()
    assert sorted(p.name for p in tmp_path.glob("step_00000?")) == ["step_000002", "step_000003"]


def test_locate_without_a_run_picks_the_most_recently_written_run(tmp_path, monkeypatch):
    """A run killed before its first `latest` (or whose `latest` was lost) still counts."""
    monkeypatch.delenv("CHECKPOINT_PATH", raising=False)
    model, opt = tiny()
    root = tmp_path / "checkpoints"
    older = save(root / "older", 1, model, opt)
    newer = save(root / "newer", 5, model, opt)
    (root / "newer" / ckpt.LATEST).unlink()
    (root / "empty").mkdir()
    for path, when in ((older, 1000), (root / "older" / ckpt.LATEST, 1000), (newer, 2000)):
        os.utime(path, (when, when))
    assert runs.locate(out_dir=str(tmp_path)) == newer
    os.utime(root / "older" / ckpt.LATEST, (3000, 3000))
    assert runs.locate(out_dir=str(tmp_path)) == older


def test_a_tracker_value_of_the_wrong_kind_is_a_corrupt_checkpoint(tmp_path):
    from trainer import runtime

    model, opt = tiny()
    state = {ckpt.STEP: 3, ckpt.RNG: runtime.rng_state(), ckpt.TRACKER: {"recent": 5, "tokens": 10}}
    step_dir = ckpt.save_checkpoint(tmp_path, ckpt.step_name(3), model, opt, state, {"step": 3}, "run: {}\n")
    with pytest.raises(UserError, match="tracker.recent"):
        ckpt.resume_training(step_dir, model, opt, {"recent": [], "tokens": 0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_models_snapshot_in_pinned_buffers_writes_the_same_bytes(tmp_path):
    """On a GPU, AsyncSaver.snapshot copies into page-locked buffers with non-blocking copies and
    one synchronize: every save, the first (buffers allocated) and the next (reused), writes the
    bytes a plain blocking copy to the CPU gives, and the weights keep changing in between."""
    model, _ = tiny()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    saver = ckpt.AsyncSaver()
    for step in (1, 2):
        model(torch.randint(0, 50, (2, 8), device="cuda"), labels=torch.randint(0, 50, (2, 8), device="cuda")) \
            .loss.backward()
        opt.step()
        expected = ckpt.serialize(model, opt, {ckpt.STEP: step}, {"step": step}, "run: {}\n")
        snap = saver.snapshot(model, opt, {ckpt.STEP: step}, {"step": step}, "run: {}\n")
        assert all(t.is_pinned() for t in snap.weights.values())
        saver.save(tmp_path, ckpt.step_name(step), snap)
        written = saver.wait()
        assert {f.name: f.read_bytes() for f in written.iterdir() if f.name != ckpt.MANIFEST} == expected
    saver.close()
