"""Any local HF causal LM (issue 17, item 1), through the real CLI in subprocesses.

Tiny random Llama, Qwen2 and GPT-NeoX folders are built here (float32 safetensors, a
tokenizer.json beside the weights: for Llama a small BPE with <s>/</s> and a BOS-adding
post-processor, so its end-of-text token is </s>, not <|endoftext|>; for Qwen2 the vendored
GPT-2 tokenizer; for GPT-NeoX a small BPE with <|endoftext|>/<|padding|>). With
`model.type=hf data.tokenizer=model` this proves, for each architecture:

- full training runs, and its final/ export loads with transformers (and AutoTokenizer) and
  gives exactly the restored checkpoint's logits;
- LoRA training (targets defaulting to the architecture's linear layers, fan_in_fan_out off)
  exports a peft adapter that PeftModel loads with the same logits, and `export --merge` a
  plain folder with the same logits up to the merge's rounding;
- a resume is bit-exact: after SIGTERM (Llama LoRA with attention dropout) and from an earlier
  checkpoint (full training), the weights sha256 equals the uninterrupted run's;

and, once each: the prepared data joins documents with the model's own EOS and records the
tokenizer's sha256; block_size above max_position_embeddings is capped with one line;
`trainer sample`, `trainer evaluate` and `trainer doctor` work on an hf run; `trainer serve`'s
engine serves the export (BOS added to a text prompt, as vLLM does); model.dropout > 0 on an
architecture without a dropout setting (Mamba) is refused in one line (exit 2), as is a
folder whose config.json names an architecture transformers does not know.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli, start_cli, wait_for
from tests.integration.test_resume_exact import losses, summary
from trainer import checkpoint as ckpt
from trainer import runs
from trainer.metrics import read_rows

ARCHS = ("llama", "qwen2", "gpt_neox")
TEXT = (ROOT / "tests" / "conftest.py").read_text()


def restore(step_dir: Path):
    """The checkpoint's model as sample/export/evaluate build it (runs.restore, once checkpoint.restore)."""
    return (getattr(runs, "restore", None) or ckpt.restore)(step_dir)[0]


def small_bpe(specials: list[str], bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    if bos:  # Llama's tokenizer.json adds <s> in front of every text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def build_folder(arch: str, root: Path, **sizes) -> Path:
    """A tiny random `arch` model with its tokenizer, as a user would bring it. `sizes` replace
    config values (hidden_size, num_attention_heads, max_position_embeddings ...)."""
    from tokenizers import Tokenizer
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    folder = root / f"tiny-{arch}"
    if arch == "llama":  # head_dim 64: what vLLM needs to serve it
        tok = small_bpe(["<unk>", "<s>", "</s>"], bos="<s>")
        model = LlamaForCausalLM(LlamaConfig(**{
            "vocab_size": tok.get_vocab_size(), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1,
            "eos_token_id": 2, **sizes}))
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif arch == "qwen2":
        tok = Tokenizer.from_file(str(ROOT / "vendor" / "tokenizers" / "gpt2" / "tokenizer.json"))
        model = Qwen2ForCausalLM(Qwen2Config(**{
            "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, **sizes}))
        config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    else:
        tok = small_bpe(["<|endoftext|>", "<|padding|>"])
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**{
            "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, **sizes}))
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {arch: build_folder(arch, root) for arch in ARCHS}


def hf_args(corpus: Path, out: Path, name: str, folder: Path, **extra) -> list[str]:
    opts = {
        "run.name": name, "run.out_dir": str(out / "volumes"), "data.source": str(corpus),
        "data.prepared_dir": str(out / "prepared"), "model.type": "hf", "model.path": str(folder),
        "data.tokenizer": "model", "model.block_size": 32, "train.batch_size": 4, "train.max_steps": 8,
        "train.eval_interval": 4, "train.eval_iters": 2, "train.log_interval": 4, "train.warmup_steps": 2,
        "train.lr": 3e-3, "checkpoint.interval": 4, "checkpoint.keep_last": 0, "sample.max_new_tokens": 8,
        "run.threads": 1,
    }
    opts.update(extra)
    return [f"--{k}={v}" for k, v in opts.items()]


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, corpus_dir, folders):
    """One uninterrupted full-training run per architecture (8 steps, checkpoints at 4 and 8)."""
    out = tmp_path_factory.mktemp("full")
    procs = {arch: run_cli(["train", *hf_args(corpus_dir, out, f"full-{arch}", folders[arch])], cwd=out)
             for arch in ARCHS}
    return out, procs


@pytest.mark.parametrize("arch", ARCHS)
def test_full_training_exports_what_transformers_loads(full_runs, folders, arch):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, procs = full_runs
    name = f"full-{arch}"
    rows = read_rows(out / "volumes" / "metrics" / name / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]), rows
    assert "run " + name + ": hf, " in procs[arch].stdout + procs[arch].stderr
    run_dir = out / "volumes" / "checkpoints" / name
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True).eval()
    assert type(final).__name__.lower().startswith(arch.replace("_", ""))
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    own = Tokenizer.from_file(str(folders[arch] / "tokenizer.json"))
    ids = own.encode("def fib_1(n):").ids
    assert hf_tok("def fib_1(n):")["input_ids"] == ids  # the model's own tokenizer, BOS included (Llama)
    assert hf_tok.eos_token == {"llama": "</s>"}.get(arch, "<|endoftext|>")
    assert torch.equal(logits(final, ids), logits(restore(ckpt.find_valid(run_dir)), ids))


def test_prepared_data_uses_the_models_tokenizer_and_eos(full_runs, folders):
    import numpy as np

    from trainer import tokenizer as tk

    out, _ = full_runs
    prepared = next((out / "prepared").glob("*-model-tiny-llama"))  # named after the model folder
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"] == "model" and meta["eot_id"] == 2  # </s>, not <|endoftext|>
    assert meta["settings"]["tokenizer_sha256"] == tk.model_tokenizer_sha256(folders["llama"])
    tokens = np.fromfile(prepared / "train.bin", dtype=meta["dtype"])
    assert (tokens == 2).sum() > 1 and (tokens == 1).sum() > 1  # each document: <s> ... </s>
    after_eos = tokens[np.flatnonzero(tokens[:-1] == 2) + 1]
    assert (after_eos == 1).mean() > 0.9  # (a val chunk cut out of train.bin may sit between them)


def test_sample_evaluate_and_doctor_on_an_hf_run(full_runs, corpus_dir, folders):
    out, _ = full_runs
    volumes = str(out / "volumes")
    sampled = run_cli(["sample", "--run", "full-llama", "--out_dir", volumes, "--max_new_tokens", "6"], cwd=out)
    assert "--- sample 1 from" in sampled.stdout
    prompted = run_cli(["sample", "--run", "full-qwen2", "--out_dir", volumes, "--prompt", "def ",
                        "--max_new_tokens", "6"], cwd=out)
    assert "--- sample 1 from" in prompted.stdout and "\ndef " in prompted.stdout
    run_cli(["evaluate", "--run", "full-gpt_neox", "--out_dir", volumes], cwd=out)
    row = json.loads((out / "volumes" / "metrics" / "full-gpt_neox" / "eval.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 8 and row["val_loss"] > 0
    doctor = run_cli(["doctor", *hf_args(corpus_dir, out, "doc", folders["llama"])], cwd=out)
    assert "ok: this config needs no network" in doctor.stdout, doctor.stdout
    assert "llama" in doctor.stdout


def test_resume_from_an_earlier_checkpoint_is_bit_exact(full_runs, tmp_path, corpus_dir, folders):
    """Full training of Qwen2: a run stopped at step 4 and resumed ends where the 8-step run did."""
    out, _ = full_runs
    import shutil

    reference = summary(out, "full-qwen2")
    # the reference run's own step_000004, as the only checkpoint of the same run elsewhere
    dst = tmp_path / "volumes" / "checkpoints" / "full-qwen2"
    shutil.copytree(out / "volumes" / "checkpoints" / "full-qwen2" / "step_000004", dst / "step_000004")
    (dst / ckpt.LATEST).write_text("step_000004\n")
    resumed = run_cli(["resume", "--run", "full-qwen2", "--run.out_dir", str(tmp_path / "volumes")], cwd=tmp_path)
    assert "resumed full-qwen2" in resumed.stdout + resumed.stderr
    assert summary(tmp_path, "full-qwen2")["weights_sha256"] == reference["weights_sha256"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_exports_an_adapter_and_merges(tmp_path, corpus_dir, folders, arch):
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    args = hf_args(corpus_dir, tmp_path, "lora", folders[arch], **{
        "model.lora": True, "model.lora_r": 4, "model.lora_alpha": 8, "train.lr": 2e-2, "train.max_steps": 6,
        "checkpoint.interval": 0})
    proc = run_cli(["train", *args], cwd=tmp_path)
    assert "LoRA adapts the model's linear layers" in proc.stdout + proc.stderr
    run_dir = tmp_path / "volumes" / "checkpoints" / "lora"
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is False
    assert {"q_proj", "v_proj"} <= set(adapter["target_modules"]) or "query_key_value" in adapter["target_modules"]
    ids = Tokenizer.from_file(str(folders[arch] / "tokenizer.json")).encode("def fib_2(n):").ids
    base = AutoModelForCausalLM.from_pretrained(folders[arch], local_files_only=True).eval()
    plain = logits(base, ids)
    adapted = logits(PeftModel.from_pretrained(base, run_dir / "final").eval(), ids)
    restored = restore(ckpt.find_valid(run_dir))
    assert torch.equal(adapted, logits(restored, ids))
    assert not torch.allclose(adapted, plain)  # the adapter learned something
    if arch == "llama":  # one merge is enough: the merge is peft's, the same for every family
        merged_dir = tmp_path / "merged"
        run_cli(["export", "--run", "lora", "--merge", "--out", str(merged_dir), "--out_dir",
                 str(tmp_path / "volumes")], cwd=tmp_path)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
        assert not any(".lora_" in k for k in merged.state_dict())
        assert torch.allclose(logits(merged, ids), adapted, atol=1e-4)
        serve_export(merged_dir, ids)


def serve_export(folder: Path, ids: list[int]) -> None:
    """`trainer serve`'s app on the export: a text prompt gets the tokenizer's BOS (as vLLM does),
    and a seeded completion is the one its token-id form gives."""
    from tests.grpo.conftest import RunningServer
    from trainer.serve import create_app

    import urllib.request

    server = RunningServer(create_app(str(folder), name="tiny"))
    try:
        def complete(prompt):
            body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, "seed": 7, "temperature": 1.0,
                               "return_token_ids": True}).encode()
            req = urllib.request.Request(server.url + "/completions", body, {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]

        text = complete("def fib_2(n):")
        assert text["prompt_token_ids"] == ids and ids[0] == 1  # <s> first
        assert complete(ids)["token_ids"] == text["token_ids"]
    finally:
        server.stop()


def test_sigterm_resume_is_bit_exact_with_lora_and_dropout(tmp_path, corpus_dir, folders):
    """Llama LoRA with model.dropout (its attention_dropout) and LoRA dropout: SIGTERM at a step,
    `trainer resume`, and the weights equal the uninterrupted run's, every step's loss too."""
    steps = 30
    extra = {"model.lora": True, "model.lora_r": 4, "model.lora_alpha": 8, "model.dropout": 0.1,
             "model.lora_dropout": 0.1, "train.max_steps": steps, "checkpoint.interval": 10,
             "train.eval_interval": 10, "train.log_interval": 1}
    ref = tmp_path / "ref"
    proc = run_cli(["train", *hf_args(corpus_dir, ref, "ref", folders["llama"], **extra)], cwd=tmp_path)
    assert "set attention_dropout of the llama config" in proc.stdout + proc.stderr
    cut = tmp_path / "cut"
    metrics_csv = cut / "volumes" / "metrics" / "cut" / "metrics.csv"
    started = start_cli(["train", *hf_args(corpus_dir, cut, "cut", folders["llama"], **extra)], cwd=tmp_path)
    try:
        wait_for(lambda: len(read_rows(metrics_csv)) >= 12, proc=started)
        started.send_signal(signal.SIGTERM)
        output = started.communicate(timeout=120)[0]
    finally:
        if started.poll() is None:
            started.kill()
    assert started.returncode == 0, output
    stopped_at = int(ckpt.latest_name(cut / "volumes" / "checkpoints" / "cut").split("_")[1])
    assert 12 <= stopped_at < steps, output
    run_cli(["resume", "--run", "cut", "--run.out_dir", str(cut / "volumes")], cwd=tmp_path)
    assert summary(cut, "cut")["weights_sha256"] == summary(ref, "ref")["weights_sha256"]
    assert losses(cut, "cut") == losses(ref, "ref")


def test_block_size_is_capped_at_the_models_positions(tmp_path, corpus_dir, folders):
    proc = run_cli(["train", *hf_args(corpus_dir, tmp_path, "cap", folders["llama"], **{
        "model.block_size": 100, "train.max_steps": 1, "train.sample_at_end": False, "train.export_at_end": False})],
        cwd=tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "max_position_embeddings" in line]
    assert len(lines) == 1 and "model.block_size=100" in lines[0] and "using 64" in lines[0], lines


def test_refusals_are_one_line(tmp_path, corpus_dir):
    """model.dropout > 0 where the architecture has no dropout setting, and a folder transformers
    cannot read, are one line each that names the key or the problem (exit 2)."""
    from transformers import MambaConfig, MambaForCausalLM

    mamba = tmp_path / "tiny-mamba"
    MambaForCausalLM(MambaConfig(vocab_size=384, hidden_size=16, state_size=4, num_hidden_layers=1)) \
        .save_pretrained(mamba, safe_serialization=True)
    small_bpe(["<|endoftext|>"]).save(str(mamba / "tokenizer.json"))
    proc = run_cli(["train", *hf_args(corpus_dir, tmp_path, "drop", mamba, **{"model.dropout": 0.1})],
                   cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "model.dropout=0.1" in err[0] and "no dropout setting" in err[0] and "model.dropout=0" in err[0]

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (unknown / "model.safetensors").write_bytes(b"")
    (unknown / "tokenizer.json").write_text((mamba / "tokenizer.json").read_text())
    proc = run_cli(["train", *hf_args(corpus_dir, tmp_path, "unknown", unknown)], cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "no-such-arch" in err[0] and "cannot be read by transformers" in err[0]
