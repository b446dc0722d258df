"""End to end through the real CLI: a tiny model trains and its loss falls; the run writes
metrics.csv/jsonl, train.log, loss.png, samples.txt and manifest.json; final/ loads with
transformers (and a LoRA adapter with peft) and reproduces the trained model's logits;
`export --merge`, `sample`, `resume --extra_steps` and `doctor` work on the result."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, tiny_args
from trainer import checkpoint as ckpt
from trainer import runs
from trainer.metrics import read_rows


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("scratch")
    proc = run_cli(["train", *tiny_args(corpus_dir, out, "tiny", **{"train.max_steps": 60, "train.lr": 3e-3,
                                                                     "train.eval_interval": 20})], cwd=out)
    return out, proc


def test_loss_falls_and_outputs_exist(scratch_run):
    out, proc = scratch_run
    metrics_dir = out / "volumes" / "metrics" / "tiny"
    rows = read_rows(metrics_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 3 and vals[0] > vals[1] > vals[2], vals
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.8
    assert len((metrics_dir / "metrics.jsonl").read_text().splitlines()) == 60
    log = (metrics_dir / "train.log").read_text()
    assert "step 60/60 | loss" in log and "| tok/s" in log and "| ETA" in log
    assert "net loss change" in log and "since last checkpoint" in log
    assert (metrics_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (metrics_dir / "samples.txt").read_text().strip()
    manifest = json.loads((metrics_dir / "manifest.json").read_text())
    assert manifest["seed"] == 1337 and "torch" in manifest["versions"] and manifest["data_sha256"]
    summary = json.loads((metrics_dir / "summary.json").read_text())
    assert f"weights sha256: {summary['weights_sha256']}" in proc.stdout


def test_final_export_loads_with_transformers(scratch_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = scratch_run
    run_dir = out / "volumes" / "checkpoints" / "tiny"
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    model, _, _, _ = runs.restore(ckpt.find_valid(run_dir))
    ids = torch.tensor([tok.encode("def fib_1(n):")])
    with torch.no_grad():
        assert torch.equal(final(ids).logits, model(ids).logits)


def test_sample_command_and_resume_extra_steps(scratch_run):
    out, _ = scratch_run
    volumes = str(out / "volumes")
    sample = run_cli(["sample", "--run", "tiny", "--prompt", "def ", "--max_new_tokens", "15",
                      "--out_dir", volumes], cwd=out)
    assert "--- sample 1 from" in sample.stdout
    again = run_cli(["sample", "--run", "tiny", "--prompt", "def ", "--max_new_tokens", "15",
                     "--out_dir", volumes], cwd=out)
    assert again.stdout == sample.stdout  # seeded
    refused = run_cli(["train", *tiny_args(out, out, "tiny")], cwd=out, check=False)
    assert refused.returncode == 2 and "trainer resume --run tiny" in refused.stderr
    resumed = run_cli(["resume", "--run", "tiny", "--extra_steps", "5", "--run.out_dir", volumes], cwd=out)
    assert "step 65/65" in resumed.stdout
    rows = read_rows(out / "volumes" / "metrics" / "tiny" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 66))


def test_doctor_reports_offline_and_assets(scratch_run, corpus_dir):
    out, _ = scratch_run
    proc = run_cli(["doctor", *tiny_args(corpus_dir, out, "tiny")], cwd=out)
    assert "[ok] socket guard" in proc.stdout and "[ok] data" in proc.stdout
    assert "this config needs no network" in proc.stdout


def test_lora_run_exports_a_peft_adapter_and_merges(tmp_path, corpus_dir, gpt2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = tiny_args(corpus_dir, tmp_path, "lora", **{
        "model.type": "gpt2", "model.path": str(gpt2_dir), "data.tokenizer": "gpt2", "model.lora": True,
        "model.lora_r": 4, "model.lora_alpha": 8, "train.max_steps": 10, "train.lr": 1e-2,
        "model.block_size": 128})
    proc = run_cli(["train", *args], cwd=tmp_path)
    assert "more than the model's 64 positions; using 64" in proc.stdout  # block size capped
    assert proc.stderr.strip() == "", proc.stderr  # no library warnings (peft's FutureWarning) for the user
    run_dir = tmp_path / "volumes" / "checkpoints" / "lora"
    step_dir = ckpt.find_valid(run_dir)
    assert (step_dir / ckpt.ADAPTER).is_file() and not (step_dir / ckpt.MODEL).exists()
    assert (run_dir / "final" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    ids = torch.tensor([[15496, 995, 11, 314]])
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert not torch.allclose(adapted, plain)  # the adapter learned something
    merged_dir = tmp_path / "merged"
    exported = run_cli(["export", "--run", "lora", "--merge", "--out", str(merged_dir),
                        "--out_dir", str(tmp_path / "volumes")], cwd=tmp_path)
    assert exported.stderr.strip() == "", exported.stderr
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)


@pytest.mark.parametrize("interval", [1, 3])
def test_a_diverging_loss_ends_the_run_before_a_checkpoint_holds_it(tmp_path, corpus_dir, interval):
    """lr 1e30: step 1's update makes step 2's loss NaN. A step's loss is read one step late
    unless the step is saved (interval 1: step 2 is read at once; interval 3: step 2 is read
    while step 3 runs, before step 3 is saved): either way the run ends with one line naming
    step 2, and every checkpoint left is whole and finite, none past step 1."""
    proc = run_cli(["train", *tiny_args(corpus_dir, tmp_path, "diverge", **{
        "train.lr": 1e30, "train.warmup_steps": 0, "checkpoint.interval": interval})], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "loss is nan at step 2; lower train.lr" in proc.stderr
    run_dir = tmp_path / "volumes" / "checkpoints" / "diverge"
    assert [d.name for d in ckpt.step_dirs(run_dir)] == ([ckpt.step_name(1)] if interval == 1 else [])
    for step_dir in ckpt.step_dirs(run_dir):
        model, _, _, _ = runs.restore(step_dir)
        assert all(torch.isfinite(p).all() for p in model.parameters()), step_dir
    rows = read_rows(tmp_path / "volumes" / "metrics" / "diverge" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1]
