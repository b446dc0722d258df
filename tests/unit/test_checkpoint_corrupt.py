"""Files read back from a checkpoint are untrusted. A checkpoint whose manifest was rewritten
to match a damaged or hostile file (an unpicklable object, a GLOBAL opcode, a Python YAML
tag, a truncated safetensors file, trainer_state.json without its step), a malformed
manifest, or a damaged `latest` is a corrupt checkpoint everywhere: `find_valid` falls back
to the previous one with a warning, and `locate`, `load_checkpoint` and `restore` give one
UserError line; no code from the checkpoint ever runs."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer import checkpoint as ckpt
from trainer import runs
from trainer.errors import UserError

CONFIG = "run:\n  seed: 1\nmodel:\n  type: from_scratch\n"


class Evil:
    """Unpickling this creates the file `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny(lora: bool = False):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    opt.step()
    return model, opt


def save(run_dir, step, model, opt):
    return ckpt.save_checkpoint(run_dir, ckpt.step_name(step), model, opt, {ckpt.STEP: step}, {"step": step},
                                CONFIG, extra_files={ckpt.TOKENIZER: b'{"version": "1.0"}'})


def manifest(step_dir) -> dict:
    return json.loads((step_dir / ckpt.MANIFEST).read_text())


def put(step_dir, fname, data: bytes) -> None:
    """Replace a file and rewrite its MANIFEST entry to match: only the parser can object."""
    (step_dir / fname).write_bytes(data)
    m = manifest(step_dir)
    m["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(m))


def torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def edit_manifest(step_dir, change) -> None:
    m = manifest(step_dir)
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(change(m)))


def drop(m, fname):
    del m["files"][fname]
    return m


DAMAGE = {
    "optimizer_not_allowlisted": lambda d, mark: put(d, ckpt.OPTIMIZER, torch_bytes(
        {"state": {}, "param_groups": [], "x": Evil(mark)})),
    "state_global_opcode": lambda d, mark: put(d, ckpt.STATE, b"cbuiltins\nopen\n(S'" + str(mark).encode()
                                               + b"'\nS'w'\ntR."),
    "state_not_allowlisted": lambda d, mark: put(d, ckpt.STATE, torch_bytes(argparse.Namespace(step=2))),
    "state_of_another_step": lambda d, mark: put(d, ckpt.STATE, torch_bytes({ckpt.STEP: 7})),
    "config_python_tag": lambda d, mark: put(d, ckpt.CONFIG, f'!!python/object/apply:os.system ["touch {mark}"]\n'
                                             .encode()),
    "config_not_mapping": lambda d, mark: put(d, ckpt.CONFIG, b"- a\n- list\n"),
    "config_section_not_mapping": lambda d, mark: put(d, ckpt.CONFIG, b"run: 5\n"),
    "config_not_utf8": lambda d, mark: put(d, ckpt.CONFIG, b"run: {name: \xff\xfe}\n"),
    "weights_truncated": lambda d, mark: put(d, ckpt.MODEL, (d / ckpt.MODEL).read_bytes()[:-1000]),
    "weights_header_garbage": lambda d, mark: put(d, ckpt.MODEL, b"\xff" * 8 + (d / ckpt.MODEL).read_bytes()[8:]),
    "trainer_state_not_json": lambda d, mark: put(d, ckpt.TRAINER_STATE, b"{not json"),
    "trainer_state_without_step": lambda d, mark: put(d, ckpt.TRAINER_STATE, b'{"reason": "interval"}'),
    "manifest_lists_nothing": lambda d, mark: edit_manifest(d, lambda m: {**m, "files": {}}),
    "manifest_not_a_mapping": lambda d, mark: edit_manifest(d, lambda m: [m]),
    "manifest_entry_without_sha256": lambda d, mark: edit_manifest(
        d, lambda m: {**m, "files": {k: {"bytes": v["bytes"]} for k, v in m["files"].items()}}),
    "manifest_entry_is_a_path": lambda d, mark: edit_manifest(
        d, lambda m: {**m, "files": {**m["files"], "../step_000001/config.yaml": m["files"][ckpt.CONFIG]}}),
    "manifest_without_optimizer": lambda d, mark: ((d / ckpt.OPTIMIZER).unlink(),
                                                   edit_manifest(d, lambda m: drop(m, ckpt.OPTIMIZER))),
    "manifest_without_tokenizer": lambda d, mark: edit_manifest(d, lambda m: drop(m, ckpt.TOKENIZER)),
    # a reader must neither block, nor read without end, nor recurse out of the stack
    "manifest_a_fifo": lambda d, mark: ((d / ckpt.MANIFEST).unlink(), os.mkfifo(d / ckpt.MANIFEST)),
    "manifest_a_symlink_to_a_device": lambda d, mark: ((d / ckpt.MANIFEST).unlink(),
                                                       (d / ckpt.MANIFEST).symlink_to("/dev/zero")),
    "manifest_nested_too_deeply": lambda d, mark: (d / ckpt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000),
    "trainer_state_nested_too_deeply": lambda d, mark: put(d, ckpt.TRAINER_STATE, b"[" * 100_000 + b"]" * 100_000),
    "config_a_symlink": lambda d, mark: ((d / ckpt.CONFIG).unlink(), (d / ckpt.CONFIG).symlink_to("/dev/zero")),
}


def one_line_user_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and len(message) < 1000, message
    return message


@pytest.mark.parametrize("damage", sorted(DAMAGE) + ["adapter_truncated"])
def test_damaged_file_with_matching_manifest_is_corrupt(tmp_path, damage, caplog):
    lora = damage == "adapter_truncated"
    model, opt = tiny(lora)
    run_dir, mark = tmp_path / "run", tmp_path / "code_ran"
    good = save(run_dir, 1, model, opt)
    bad = save(run_dir, 2, model, opt)
    if lora:
        put(bad, ckpt.ADAPTER, (bad / ckpt.ADAPTER).read_bytes()[:-40])
    else:
        DAMAGE[damage](bad, mark)

    problem = ckpt.verify(bad)
    assert problem is not None and "\n" not in problem
    with caplog.at_level("WARNING", logger="trainer"):
        assert ckpt.find_valid(run_dir) == good
    assert "falling back to step_000001" in caplog.text
    assert str(bad) in one_line_user_error(lambda: runs.locate(checkpoint=str(bad)))
    assert "corrupt" in one_line_user_error(lambda: ckpt.load_checkpoint(bad, tiny(lora)[0]))
    assert "corrupt" in one_line_user_error(lambda: runs.restore(bad))
    assert ckpt.verify(good) is None  # a clean checkpoint beside it still verifies
    shutil.rmtree(good)
    assert "no valid checkpoint" in one_line_user_error(lambda: ckpt.find_valid(run_dir))
    assert not mark.exists(), "a file from the checkpoint ran code"


def put_weights(step_dir, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = change(load_file(step_dir / ckpt.MODEL))
    save_file(weights, step_dir / "w.tmp", metadata={"format": "pt"})
    put(step_dir, ckpt.MODEL, (step_dir / "w.tmp").read_bytes())
    (step_dir / "w.tmp").unlink()


def put_optimizer(step_dir, change) -> None:
    state = torch.load(step_dir / ckpt.OPTIMIZER, weights_only=True)
    change(state["state"][0])
    put(step_dir, ckpt.OPTIMIZER, torch_bytes(state))


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# well-formed files holding what this run could not have written: verify passes, so the loader
# must see it (a cast would drop bits, a NaN train on, lost moments restart Adam without a word)
LOADED = {
    "weights_in_float16": (lambda d: put_weights(d, lambda w: {k: v.half() for k, v in w.items()}), "float16"),
    "weights_with_a_nan": (lambda d: put_weights(d, lambda w: {k: with_nan(v) for k, v in w.items()}), "non-finite"),
    "optimizer_without_state": (lambda d: put(d, ckpt.OPTIMIZER, torch_bytes(
        {**torch.load(d / ckpt.OPTIMIZER, weights_only=True), "state": {}})), "no state"),
    "optimizer_moment_of_another_shape": (lambda d: put_optimizer(
        d, lambda s: s.update(exp_avg=s["exp_avg"].flatten()[:3].clone())), "of shape [3]"),
    "optimizer_moment_with_a_nan": (lambda d: put_optimizer(d, lambda s: s.update(exp_avg=with_nan(s["exp_avg"]))),
                                    "non-finite"),
    "optimizer_moment_not_a_tensor": (lambda d: put_optimizer(d, lambda s: s.update(exp_avg=[1.0])), "not a tensor"),
    "tracker_number_a_string": (lambda d: put(d, ckpt.STATE, torch_bytes(
        {ckpt.STEP: 2, ckpt.TRACKER: {"first_loss": "abc"}})), "first_loss is 'abc', not a number"),
    "tracker_list_of_strings": (lambda d: put(d, ckpt.STATE, torch_bytes(
        {ckpt.STEP: 2, ckpt.TRACKER: {"recent": ["a"]}})), "recent is ['a'], not a list"),
}


@pytest.mark.parametrize("damage", sorted(LOADED))
def test_content_no_run_writes_is_corrupt_when_loaded(tmp_path, damage):
    model, opt = tiny()
    bad = save(tmp_path, 2, model, opt)
    change, said = LOADED[damage]
    change(bad)
    assert ckpt.verify(bad) is None
    model, opt = tiny()
    tracker = {"first_loss": None, "recent": []}
    message = one_line_user_error(lambda: ckpt.resume_training(bad, model, opt, tracker))
    assert "corrupt" in message and said in message, message


@pytest.mark.parametrize("named", ["a_file", "a_symlink", "missing"])
def test_latest_naming_no_step_folder_is_said_and_falls_back(tmp_path, named, caplog):
    model, opt = tiny()
    older = save(tmp_path, 1, model, opt)
    newest = save(tmp_path, 2, model, opt)
    shutil.rmtree(newest)
    if named == "a_file":
        newest.write_text("x")
    elif named == "a_symlink":
        newest.symlink_to(older)
    with caplog.at_level("WARNING", logger="trainer"):
        assert ckpt.find_valid(tmp_path) == older
    assert f"`latest` names {newest.name}, which is" in caplog.text, caplog.text


@pytest.mark.parametrize("latest", ["not_utf8", "a_folder", "outside", "garbage"])
def test_damaged_latest_falls_back_to_the_step_dirs(tmp_path, latest, caplog):
    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    newest = save(tmp_path, 2, model, opt)
    pointer = tmp_path / ckpt.LATEST
    pointer.unlink()
    if latest == "not_utf8":
        pointer.write_bytes(b"step_\xff\xfe\n")
    elif latest == "a_folder":
        pointer.mkdir()
    elif latest == "outside":
        (tmp_path / "x").mkdir()
        pointer.write_text("../x\n")
    else:
        pointer.write_text("step_000001 and more\n")
    assert ckpt.latest_name(tmp_path) is None
    with caplog.at_level("WARNING", logger="trainer"):
        assert ckpt.find_valid(tmp_path) == newest
        assert runs.locate(checkpoint=str(tmp_path)) == newest
    assert "`latest`" in caplog.text
    for step_dir in (tmp_path / "step_000001", newest):
        shutil.rmtree(step_dir)
    assert "`latest`" in one_line_user_error(lambda: ckpt.find_valid(tmp_path))


def test_restore_reports_an_unusable_tokenizer_in_one_line(tmp_path):
    """The tokenizer copy is parsed by `restore` only (verify leaves it to its one reader)."""
    model, opt = tiny()
    step_dir = save(tmp_path, 1, model, opt)  # its tokenizer.json is valid JSON but no tokenizer
    assert ckpt.verify(step_dir) is None
    assert ckpt.TOKENIZER in one_line_user_error(lambda: runs.restore(step_dir))


def test_a_step_number_past_the_limit_is_no_checkpoint(tmp_path):
    """Step numbers have 12 digits at most: a folder, `latest` or state.pt naming a larger step
    (damage, or a planted checkpoint) is never resumed, where its number would overflow later."""
    model, opt = tiny()
    good = save(tmp_path, 1, model, opt)
    huge = tmp_path / ckpt.step_name(10**20)
    shutil.copytree(good, huge)
    (tmp_path / ckpt.LATEST).write_text(huge.name + "\n")
    assert ckpt.step_dirs(tmp_path) == [good] and ckpt.latest_name(tmp_path) is None
    assert ckpt.find_valid(tmp_path) == good
    best = tmp_path / "best"  # a folder whose name holds no step: the bound alone refuses the number
    shutil.copytree(good, best)
    put(best, ckpt.TRAINER_STATE, json.dumps({"step": 10**12 - 1}).encode())
    assert ckpt.verify(best) is None
    put(best, ckpt.TRAINER_STATE, json.dumps({"step": 10**12}).encode())
    assert "does not hold step or iteration (a number)" in ckpt.verify(best)


def test_a_checkpoint_copied_as_symlinks_verifies(tmp_path):
    """`cp -rs` of a run, or a git-annex / DVC checkout: every file a symlink to a regular file
    with the same bytes. Small files are followed as the large ones are (only a FIFO, a device
    or an oversized file in a small file's place is damage)."""
    model, opt = tiny()
    good = save(tmp_path / "run", 1, model, opt)
    linked = tmp_path / "linked" / good.name
    linked.mkdir(parents=True)
    for f in good.iterdir():
        (linked / f.name).symlink_to(f)
    assert ckpt.verify(linked) is None
    assert ckpt.find_valid(linked.parent) == linked
    assert ckpt.read_trainer_state(linked)["step"] == 1


def test_planted_entries_never_fail_a_save_or_lead_out_of_the_run(tmp_path, caplog):
    """A dangling symlink inside an older checkpoint does not fail the next save's report; a
    symlink with a newer step's name is set aside before that step is trained (the save then
    finds its name free); a symlink with a step's name is never a checkpoint."""
    model, opt = tiny()
    save(tmp_path, 1, model, opt)
    older = save(tmp_path, 2, model, opt)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    shutil.copytree(older, outside / ckpt.step_name(5))
    (older / "notes.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / ckpt.step_name(4)).symlink_to(tmp_path / "nowhere")
    (tmp_path / ckpt.step_name(5)).symlink_to(outside / ckpt.step_name(5))
    before = {p.name: p.read_bytes() for p in (outside / ckpt.step_name(5)).iterdir()}
    assert [d.name for d in ckpt.step_dirs(tmp_path)] == [ckpt.step_name(2), ckpt.step_name(1)]
    assert "2 checkpoint(s) kept" in ckpt.storage_report(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        ckpt.set_aside_newer(tmp_path, 2)
    assert "step_000004 belongs to the abandoned continuation" in caplog.text
    saved = save(tmp_path, 4, model, opt)  # keep_last 0: nothing pruned
    assert ckpt.verify(saved) is None and ckpt.find_valid(tmp_path) == saved
    # what the planted link pointed to is untouched
    assert {p.name: p.read_bytes() for p in (outside / ckpt.step_name(5)).iterdir()} == before
