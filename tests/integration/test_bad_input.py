"""The bad-input table, through the real CLI in subprocesses.

Every user mistake below, and every damaged file read back from a checkpoint or a prepared
folder, exits 2 with exactly one non-empty line on stderr that names the file, key or value
at fault, shows no traceback (`--debug` does), writes no checkpoint, and leaves every file
that was already on disk (a finished run's checkpoints, prepared data, a user's folder)
byte-identical. Command arguments are checked like config keys. A disk
that fills up during a save fails the same way and keeps the older checkpoint valid and
named by `latest` (on a real, small tmpfs; skipped where mounting is not permitted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, tiny_args
from trainer import checkpoint as ckpt

# the finished run every case must leave untouched: 4 steps, checkpoints at 2 and 4
BASE = {"train.max_steps": 4, "checkpoint.interval": 2, "train.eval_interval": 0,
        "train.sample_at_end": "false", "train.export_at_end": "false"}


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path; run locks name their last holder."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_bad_input(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, one stderr line naming every one of `names`, no traceback. -> that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr + proc.stdout
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{proc.stderr}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_dir) -> Path:
    """A folder with prepared data and the finished run `base` (step_000002, step_000004)."""
    ws = tmp_path_factory.mktemp("badinput")
    run_cli(["train", *tiny_args(corpus_dir, ws, "base", **BASE)], cwd=ws)
    (ws / "a_file").write_text("a regular file, not a folder\n")
    return ws


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, gpt2_dir) -> Path:
    """The fixture GPT-2 cut to a 1000-token vocabulary: too small for GPT-2's tokenizer."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-vocab1000")
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir, local_files_only=True)
    model.resize_token_embeddings(1000)
    for config in (model.config, model.generation_config):  # keep <|endoftext|> inside the smaller vocab
        config.bos_token_id = config.eos_token_id = 999
    model.save_pretrained(root, safe_serialization=True)
    return root


# ------------------------------------------------------------------ the table
# Each case gets (its copy of the workspace, a folder for its inputs, corpus_dir) and returns
# (argv, env, names that the error line must contain). `train` runs use the tiny from-scratch
# model on a fresh run name.

def _train(ws, corpus, name, **extra):
    return ["train", *tiny_args(corpus, ws, name, **extra)]


def missing_config(ws, tmp, corpus):
    return [*_train(ws, corpus, "c1"), f"--config={tmp}/nope.yaml"], {}, ["nope.yaml"]


def malformed_yaml(ws, tmp, corpus):
    (tmp / "broken.yaml").write_text("train:\n  max_steps: 5\n  lr: [0.1\n")
    return [*_train(ws, corpus, "c2"), f"--config={tmp}/broken.yaml"], {}, ["broken.yaml"]


def yaml_list(ws, tmp, corpus):
    (tmp / "list.yaml").write_text("- train\n- model\n")
    return [*_train(ws, corpus, "c3"), f"--config={tmp}/list.yaml"], {}, ["list.yaml"]


def unknown_cli_key(ws, tmp, corpus):
    return [*_train(ws, corpus, "c4"), "--train.max_step=5"], {}, ["train.max_step", "max_steps"]


def unknown_yaml_key(ws, tmp, corpus):
    (tmp / "typo.yaml").write_text("train:\n  max_stepz: 5\n")
    return [*_train(ws, corpus, "c5"), f"--config={tmp}/typo.yaml"], {}, ["typo.yaml", "max_stepz", "max_steps"]


def unknown_section(ws, tmp, corpus):
    (tmp / "section.yaml").write_text("trian:\n  max_steps: 5\n")
    return [*_train(ws, corpus, "c6"), f"--config={tmp}/section.yaml"], {}, ["section.yaml", "trian", "train"]


def unknown_env_key(ws, tmp, corpus):
    return _train(ws, corpus, "c7"), {"TRAINER_TRAIN_MAX_STEP": "5"}, ["TRAINER_TRAIN_MAX_STEP", "max_steps"]


def unknown_env_section(ws, tmp, corpus):
    return _train(ws, corpus, "c8"), {"TRAINER_TRIAN_MAX_STEPS": "5"}, ["TRAINER_TRIAN_MAX_STEPS", "train"]


def wrong_type_cli(ws, tmp, corpus):
    return _train(ws, corpus, "c9", **{"train.max_steps": "abc"}), {}, ["train.max_steps", "abc"]


def wrong_type_env(ws, tmp, corpus):
    return _train(ws, corpus, "c10"), {"TRAINER_TRAIN_BATCH_SIZE": "four"}, ["TRAINER_TRAIN_BATCH_SIZE", "four"]


def wrong_type_yaml(ws, tmp, corpus):
    (tmp / "types.yaml").write_text("train:\n  batch_size: [1]\n")
    # tiny_args sets train.batch_size on the command line, which would win over the YAML
    argv = [a for a in _train(ws, corpus, "c11") if not a.startswith("--train.batch_size")]
    return [*argv, f"--config={tmp}/types.yaml"], {}, ["types.yaml", "train.batch_size"]


def missing_corpus(ws, tmp, corpus):
    return _train(ws, tmp / "no_such_corpus", "d1"), {}, ["no_such_corpus"]


def blank_corpus(ws, tmp, corpus):
    (tmp / "blank.txt").write_text("  \n\n\t  \n")
    return _train(ws, tmp / "blank.txt", "d2"), {}, ["blank.txt"]


def empty_folder(ws, tmp, corpus):
    (tmp / "empty_corpus").mkdir()
    return _train(ws, tmp / "empty_corpus", "d3"), {}, ["empty_corpus"]


def short_corpus(ws, tmp, corpus):
    (tmp / "short.txt").write_text("print('hi')\n")  # 13 char tokens < block_size + 1 = 33
    return _train(ws, tmp / "short.txt", "d4"), {}, ["short", "block_size"]


def not_utf8(ws, tmp, corpus):
    (tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50)
    return _train(ws, tmp / "latin1.txt", "d5"), {}, ["latin1.txt"]


def broken_jsonl(ws, tmp, corpus):
    (tmp / "broken.jsonl").write_text('{"text": "def f(): pass"}\n{"text": "x = 1"\n{"text": "y"}\n')
    return _train(ws, tmp / "broken.jsonl", "d6"), {}, ["broken.jsonl:2"]


def jsonl_no_field(ws, tmp, corpus):
    (tmp / "fields.jsonl").write_text('{"body": "def f(): pass"}\n')
    return _train(ws, tmp / "fields.jsonl", "d7"), {}, ["fields.jsonl:1", "'text'"]


def token_ids_over_vocab(ws, tmp, corpus):
    np.save(tmp / "ids.npy", np.array([1, 2, 3, 60000] * 100, dtype=np.int64))
    argv = ["prepare", f"--data.source={tmp}/ids.npy", "--data.tokenizer=gpt2",
            f"--data.prepared_dir={ws}/prepared"]
    return argv, {}, ["ids.npy", "60000", "50257"]


def model_vocab_too_small(ws, tmp, corpus, small_vocab_model):
    argv = _train(ws, corpus, "v2", **{"model.type": "gpt2", "model.path": small_vocab_model,
                                       "data.tokenizer": "gpt2"})
    return argv, {}, ["50257", "1000", str(small_vocab_model)]


def resume_no_runs(ws, tmp, corpus):
    return ["resume", f"--run.out_dir={tmp}/fresh_volumes"], {}, ["fresh_volumes"]


def resume_only_checkpoint_corrupt(ws, tmp, corpus):
    run = tmp / "volumes" / "checkpoints" / "base"
    shutil.copytree(ws / "volumes" / "checkpoints" / "base", run)
    shutil.rmtree(run / "step_000002")
    weights = run / "step_000004" / ckpt.MODEL
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, wrong sha256: the MANIFEST no longer matches
    weights.write_bytes(bytes(data))
    return ["resume", "--run=base", f"--run.out_dir={tmp}/volumes"], {}, ["step_000004", ckpt.MODEL]


def resume_changed_architecture(ws, tmp, corpus):
    return (["resume", "--run=base", f"--run.out_dir={ws}/volumes", "--train.max_steps=6", "--model.n_layer=3"],
            {}, ["model.n_layer"])


def out_dir_under_file(ws, tmp, corpus):
    return _train(ws, corpus, "w1", **{"run.out_dir": ws / "a_file" / "sub"}), {}, [str(ws / "a_file" / "sub")]


def prepared_dir_under_file(ws, tmp, corpus):
    argv = ["prepare", f"--data.source={corpus}", "--data.tokenizer=char", "--data.name=w2",
            f"--data.prepared_dir={ws}/a_file/prepared"]
    return argv, {}, [str(ws / "a_file" / "prepared")]


def bad_sample_value_in_train(ws, tmp, corpus):
    # used only by the end-of-run sample, so it must be refused before step 1, not after the last
    return _train(ws, corpus, "e1", **{"sample.top_k": -5}), {}, ["sample.top_k", "-5"]


def prompt_with_no_tokens(ws, tmp, corpus):
    # the char tokenizer knows only the corpus's characters: the end-of-run sample could not run
    return _train(ws, corpus, "e8", **{"sample.prompt": "\u20ac\u20ac"}), {}, ["sample.prompt"]


def negative_threads(ws, tmp, corpus):
    return _train(ws, corpus, "e2", **{"run.threads": -2}), {}, ["run.threads", "-2"]


def threads_past_any_machine(ws, tmp, corpus):
    return _train(ws, corpus, "e5", **{"run.threads": 10**12}), {}, ["run.threads", str(10**12)]


def steps_past_a_checkpoint_name(ws, tmp, corpus):
    # a step folder's name holds 12 digits: a longer run could never be saved or resumed
    return _train(ws, corpus, "e6", **{"train.max_steps": 10**12}), {}, ["train.max_steps", str(10**12)]


def repeated_override(ws, tmp, corpus):
    return [*_train(ws, corpus, "e3"), "--train.max_steps=3", "--train.max_steps=5"], {}, ["train.max_steps", "twice"]


def stray_positional(ws, tmp, corpus):
    return [*_train(ws, corpus, "e4"), "leftover"], {}, ["leftover"]


def resume_non_numeric_extra_steps(ws, tmp, corpus):
    return ["resume", "--run=base", f"--run.out_dir={ws}/volumes", "--extra_steps=abc"], {}, ["extra_steps", "abc"]


def sample_non_numeric_tokens(ws, tmp, corpus):
    return ["sample", "--run=base", f"--out_dir={ws}/volumes", "--max_new_tokens=abc"], {}, ["max_new_tokens", "abc"]


def sample_negative_top_k(ws, tmp, corpus):
    return ["sample", "--run=base", f"--out_dir={ws}/volumes", "--top_k=-5"], {}, ["top_k", "-5"]


def lora_targets_not_in_model(ws, tmp, corpus, gpt2_dir):
    argv = _train(ws, corpus, "e5", **{"model.type": "gpt2", "model.path": gpt2_dir, "data.tokenizer": "gpt2",
                                       "model.lora": "true", "model.lora_targets": "q_proj,v_proj"})
    return argv, {}, ["model.lora_targets", "q_proj"]


def model_folder_without_weights(ws, tmp, corpus, gpt2_dir):
    (tmp / "noweights").mkdir()
    shutil.copy(Path(gpt2_dir) / "config.json", tmp / "noweights" / "config.json")
    argv = _train(ws, corpus, "e6", **{"model.type": "gpt2", "model.path": tmp / "noweights", "data.tokenizer": "gpt2"})
    return argv, {}, [str(tmp / "noweights"), "weights"]


def model_folder_broken_config(ws, tmp, corpus, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp / "broken")
    (tmp / "broken" / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    argv = _train(ws, corpus, "e7", **{"model.type": "gpt2", "model.path": tmp / "broken", "data.tokenizer": "gpt2"})
    return argv, {}, [str(tmp / "broken")]


def odd_length_bin(ws, tmp, corpus):
    (tmp / "odd.bin").write_bytes(np.arange(400, dtype=np.uint16).tobytes() + b"\x01")
    argv = ["prepare", f"--data.source={tmp}/odd.bin", "--data.tokenizer=gpt2", f"--data.prepared_dir={ws}/prepared"]
    return argv, {}, ["odd.bin"]


def export_onto_a_file(ws, tmp, corpus):
    return ["export", "--run=base", f"--out_dir={ws}/volumes", f"--out={ws}/a_file"], {}, [str(ws / "a_file")]


def export_onto_a_users_folder(ws, tmp, corpus):
    (ws / "my_models").mkdir()
    (ws / "my_models" / "notes.txt").write_text("mine\n")
    return ["export", "--run=base", f"--out_dir={ws}/volumes", f"--out={ws}/my_models"], {}, [str(ws / "my_models")]


def resume_on_changed_data(ws, tmp, corpus):
    """The prepared folder re-made from edited text: same name, same settings, other tokens."""
    def point_at_this_copy(step_dir):  # the run's config names the original workspace's data
        text = (step_dir / ckpt.CONFIG).read_text()
        (step_dir / ckpt.CONFIG).write_text(text.replace(str(ws_original(ws) / "prepared"), str(ws / "prepared")))
    _damage_every_checkpoint(ws, point_at_this_copy)
    prepared = next((ws / "prepared").iterdir())
    tokens = np.fromfile(prepared / "train.bin", dtype=np.uint16)
    tokens[:50] = tokens[50:100]
    tokens.tofile(prepared / "train.bin")
    meta = json.loads((prepared / "meta.json").read_text())
    meta["sha256"]["train.bin"] = hashlib.sha256((prepared / "train.bin").read_bytes()).hexdigest()
    (prepared / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ["resume", "--run=base", f"--run.out_dir={ws}/volumes", "--extra_steps=2"], {}, [str(prepared), "train.bin"]


def ws_original(ws: Path) -> Path:
    """The workspace a case's copy was made from (its runs' configs name it)."""
    config = (ws / "volumes" / "checkpoints" / "base" / "step_000004" / ckpt.CONFIG).read_text()
    return Path(next(line.split(": ", 1)[1].strip().strip("'") for line in config.splitlines()
                     if line.strip().startswith("prepared_dir:"))).parent


def rewrite_manifest(step_dir: Path) -> None:
    """Make MANIFEST.json agree with the files as they are now: damage a hash check cannot see."""
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (step_dir / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _damage_every_checkpoint(ws, damage) -> None:
    run = ws / "volumes" / "checkpoints" / "base"
    for step_dir in sorted(run.glob("step_*")):
        damage(step_dir)
        rewrite_manifest(step_dir)


def checkpoint_state_with_code(ws, tmp, corpus):
    # a pickle that would call os.system on load: GLOBAL 'os system', a string, REDUCE
    evil = b"cos\nsystem\n(S'touch " + str(tmp / "pwned").encode() + b"'\ntR."
    _damage_every_checkpoint(ws, lambda d: (d / ckpt.STATE).write_bytes(evil))
    return ["resume", "--run=base", f"--run.out_dir={ws}/volumes", "--extra_steps=2"], {}, ["base", ckpt.STATE]


def checkpoint_config_with_python_tag(ws, tmp, corpus):
    tag = f"!!python/object/apply:os.system ['touch {tmp}/pwned']\n"
    _damage_every_checkpoint(ws, lambda d: (d / ckpt.CONFIG).write_text(tag))
    return ["sample", "--run=base", f"--out_dir={ws}/volumes"], {}, ["base", ckpt.CONFIG]


def checkpoint_truncated_weights(ws, tmp, corpus):
    def cut(d):
        data = (d / ckpt.MODEL).read_bytes()
        (d / ckpt.MODEL).write_bytes(data[: len(data) // 2])
    _damage_every_checkpoint(ws, cut)
    return ["export", "--run=base", f"--out_dir={ws}/volumes"], {}, ["base", ckpt.MODEL]


def checkpoint_empty_manifest_and_bad_latest(ws, tmp, corpus):
    run = ws / "volumes" / "checkpoints" / "base"
    for step_dir in run.glob("step_*"):
        (step_dir / ckpt.MANIFEST).write_text('{"format_version": 1, "files": {}}\n')
    (run / ckpt.LATEST).write_bytes(b"step_\xff\xfe\n")
    return ["resume", "--run=base", f"--run.out_dir={ws}/volumes", "--extra_steps=2"], {}, ["base", "MANIFEST"]


def model_too_large_for_memory(ws, tmp, corpus):
    """A model whose embedding alone is terabytes: the allocator's error is one line with the fix
    (a GPU's torch.OutOfMemoryError takes the same path: errors.out_of_memory)."""
    return _train(ws, corpus, "m1", **{"model.n_embd": 2**28, "model.n_head": 1}), {}, \
        ["out of host memory", "GiB", "train.batch_size"]


CASES = [missing_config, malformed_yaml, yaml_list, unknown_cli_key, unknown_yaml_key, unknown_section,
         unknown_env_key, unknown_env_section, wrong_type_cli, wrong_type_env, wrong_type_yaml,
         missing_corpus, blank_corpus, empty_folder, short_corpus, not_utf8, broken_jsonl, jsonl_no_field,
         token_ids_over_vocab, model_vocab_too_small, resume_no_runs, resume_only_checkpoint_corrupt,
         resume_changed_architecture, out_dir_under_file, prepared_dir_under_file,
         bad_sample_value_in_train, prompt_with_no_tokens, negative_threads, threads_past_any_machine,
         steps_past_a_checkpoint_name, repeated_override, stray_positional,
         resume_non_numeric_extra_steps, sample_non_numeric_tokens, sample_negative_top_k, lora_targets_not_in_model,
         model_folder_without_weights, model_folder_broken_config, odd_length_bin, export_onto_a_file,
         export_onto_a_users_folder, resume_on_changed_data, checkpoint_state_with_code,
         checkpoint_config_with_python_tag, checkpoint_truncated_weights, checkpoint_empty_manifest_and_bad_latest,
         model_too_large_for_memory]
NEEDS_GPT2 = (lora_targets_not_in_model, model_folder_without_weights, model_folder_broken_config)


@pytest.fixture(scope="module")
def launched(request, workspace, corpus_dir, tmp_path_factory) -> dict:
    """Start every selected case at once, each in its own copy of the workspace, so the table
    costs about one CLI start-up per core instead of one per case.
    -> {case: (future CompletedProcess, its workspace copy, names, digest before)}."""
    selected = {item.callspec.params["case"] for item in request.session.items  # this module's cases only
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "case" in item.callspec.params}
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    started = {}
    slow_first = sorted(selected, key=lambda c: (c not in (short_corpus, model_vocab_too_small), CASES.index(c)))
    for case in slow_first:
        ws = tmp_path_factory.mktemp(case.__name__)
        shutil.copytree(workspace, ws, dirs_exist_ok=True)
        extra = [request.getfixturevalue("small_vocab_model")] if case is model_vocab_too_small else \
            [request.getfixturevalue("gpt2_dir")] if case in NEEDS_GPT2 else []
        argv, env, names = case(ws, tmp_path_factory.mktemp(case.__name__ + "-input"), corpus_dir, *extra)
        before = digest(ws)  # after the case set its input up: what the command must leave alone
        proc = pool.submit(run_cli, [str(a) for a in argv], cwd=ws, env=env, check=False)
        started[case] = (proc, ws, names, before)
    yield started
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, launched):
    proc, ws, names, before = launched[case]
    assert_bad_input(proc.result(), *names)
    after = digest(ws)
    damaged = [path for path, sha in before.items() if after.get(path) != sha]
    assert not damaged, f"files changed or removed: {damaged}"
    new_checkpoints = [p for p in after if p not in before and ("/step_" in p or "/final/" in p)]
    assert not new_checkpoints, f"a refused command wrote {new_checkpoints}"
    assert not list(ws.parent.glob("*/pwned")), "a file read back from a checkpoint ran code"


def test_debug_shows_the_traceback(workspace, corpus_dir, tmp_path):
    proc = run_cli([*_train(workspace, corpus_dir, "dbg"), f"--config={tmp_path}/nope.yaml", "--debug"],
                   cwd=workspace, check=False)
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr and "nope.yaml" in proc.stderr


def _pages(step_dir: Path) -> int:
    """Bytes the step directory takes on tmpfs (whole 4 KiB pages per file)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in step_dir.iterdir())


def test_full_disk_during_save_keeps_older_checkpoints(workspace, corpus_dir, tmp_path):
    """A tmpfs sized for one checkpoint and a half: step_000002 fits, step_000004 does not."""
    one = _pages(workspace / "volumes" / "checkpoints" / "base" / "step_000002")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(one * 3 // 2) // 1024}k", "tmpfs", str(mnt)],
                                 capture_output=True, text=True)
        why = (mounted.stderr or mounted.stdout).strip() if mounted.returncode else None
    except OSError as e:  # no mount binary
        why = str(e)
    if why is not None:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root with CAP_SYS_ADMIN): {why}")
    try:
        before = digest(workspace)
        proc = run_cli(_train(workspace, corpus_dir, "full", **{**BASE, "run.out_dir": mnt}), cwd=workspace,
                       check=False)
        run_dir = mnt / "checkpoints" / "full"
        assert_bad_input(proc, str(run_dir / "step_000004"), "step_000002")
        assert (run_dir / "step_000002").is_dir(), proc.stdout
        assert ckpt.verify(run_dir / "step_000002") is None
        assert ckpt.latest_name(run_dir) == "step_000002"
        assert not (run_dir / "step_000004").exists() and not (run_dir / "step_000004.tmp").exists()
        assert digest(workspace) == before
        state = json.loads((run_dir / "step_000002" / ckpt.TRAINER_STATE).read_text())
        assert state["step"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
