"""Weight sync by reload (sync.py) against a real `trainer serve`: what the trainer writes is
what the server samples from, the probe check refuses a server that did not take the
weights, and GRPO runs full fine-tuning through a server."""

from __future__ import annotations

import json
import re

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from starlette.responses import JSONResponse
from transformers import AutoModelForCausalLM

from trainer import model as models
from trainer.grpo.loop import grpo
from trainer.grpo.rollout import LocalBackend, OpenAIBackend, SamplingParams
from trainer.grpo.sync import ReloadSync
from tests.grpo.conftest import RunningServer
from tests.grpo.test_faults import grpo_exits, lora
from tests.grpo.test_loop import cfg_for

PARAMS = SamplingParams(max_tokens=8, temperature=1.0)


def prompts(tok) -> list[list[int]]:
    return [tok.encode(p).ids for p in ("a*3=", "b*2=", "cd")]


def ids_of(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in g] for g in groups]


def lora_policy(model_dir, seed: int = 0):
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn", "c_fc"],
                                           fan_in_fan_out=True, init_lora_weights=False)).eval()


def test_reload_push_is_what_the_server_samples(server, model_dir, tok, tmp_path):
    policy = lora_policy(model_dir)
    backend = OpenAIBackend(server.url, "tiny", tok, eos_id=0)
    sync = ReloadSync(backend, tmp_path / "sync", tok.encode("abc*2=").ids, prefix="run", keep=2)
    before = models.weights_sha256(policy)
    base_out = backend.generate(prompts(tok), 4, 7, PARAMS)
    for version in (0, 1, 2):
        info = sync.push(policy, version)
        assert info["adapter"] == f"run-v{version:04d}" and info["sync_probe_diff"] < 1e-5
        remote = backend.generate(prompts(tok), 4, 7, PARAMS)
        local = LocalBackend(policy, tok, eos_id=0).generate(prompts(tok), 4, 7, PARAMS)
        assert ids_of(remote) == ids_of(local) != ids_of(base_out)
        assert models.weights_sha256(policy) == before  # merging for the server leaves the live model alone
        with torch.no_grad():  # the next version differs
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        before = models.weights_sha256(policy)
    # the newest two versions stay; each is a plain HF folder with the output head as its own tensor
    folder = tmp_path / "sync"
    assert sorted(p.name for p in folder.iterdir()) == ["run-v0001", "run-v0002"]
    weights = load_file(folder / "run-v0002" / "model.safetensors")
    assert "lm_head.weight" in weights and not any("lora" in k for k in weights)
    assert json.loads((folder / "run-v0002" / "airlock.json").read_text())["version"] == 2


class IgnoresReload:
    """ASGI wrapper: answers the reload call as vLLM does, without reloading anything."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/collective_rpc":
            return await JSONResponse({"results": [None]})(scope, receive, send)
        return await self.app(scope, receive, send)


def test_a_server_that_does_not_take_the_weights_stops_the_run(model_dir, tmp_path, capsys):
    """The reload is answered 200 but the server keeps its base weights. Version 0 (LoRA B = 0)
    is the base, so it passes, and so may the next (one step from B = 0 moves the probe by less
    than the tolerance: rollouts that close to the policy are harmless); once the policy has
    moved, the probe check stops GRPO before that version's rollouts, in one line, with the
    iterations before it saved."""
    from trainer.serve import create_app

    server = RunningServer(IgnoresReload(create_app(str(model_dir), name="tiny")))
    options = lora(model_dir, server.url, **{"run.out_dir": str(tmp_path), "run.name": "stale"})
    code, err = grpo_exits(server, options, capsys)
    assert code == 2 and "\n" not in err, err
    version = int(re.search(r"does not serve the policy of version (\d+)", err).group(1))
    assert 1 <= version < 3 and "the reload did not take" in err and "grpo.sync_tolerance" in err
    assert f"last checkpoint: iter_{version:06d}" in err


def test_full_finetuning_runs_through_the_server(model_dir, tmp_path):
    """model.lora=false with the openai backend: every version is reloaded in full, and the
    server's log-probs of what it sampled equal the trainer's (mismatch ~ float rounding)."""
    from trainer.serve import create_app

    server = RunningServer(create_app(str(model_dir), name="tiny"))
    options = {**lora(model_dir, server.url), "model.lora": False, "grpo.iterations": 2}
    try:
        grpo(cfg_for(tmp_path, "full", **options))
    finally:
        server.stop()
    for it in (1, 2):
        row = json.loads((tmp_path / "metrics" / "full" / f"train_iter_{it:03d}.json").read_text())
        assert row["adapter"] == f"full-v{it - 1:04d}" and row["sync_probe_diff"] < 1e-5
        assert row["logprob_mismatch"] < 1e-4
