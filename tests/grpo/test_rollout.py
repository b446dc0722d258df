"""Both rollout backends give the same completions for the same weights and seeds; the
openai backend survives a down server (one line naming the URL), malformed JSON and
short answers (counted skips), and a pushed LoRA adapter is what the server samples with."""

import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trainer.grpo.rollout import AdapterSync, LocalBackend, OpenAIBackend, RolloutError, SamplingParams
from tests.grpo.conftest import RunningServer, free_port

PARAMS = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, stop=("\n",))
PROMPTS = ["a*6=", "b*6=", "c*6="]


def test_local_and_server_agree(server, model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    local = LocalBackend(model, tok, eos_id=0, batch_size=5).generate(PROMPTS, 4, 100, PARAMS)
    remote = OpenAIBackend(server.url, "tiny", tok, eos_id=0).generate(PROMPTS, 4, 100, PARAMS)
    assert [[c.text for c in g] for g in local] == [[c.text for c in g] for g in remote]
    assert [[c.token_ids for c in g] for g in local] == [[c.token_ids for c in g] for g in remote]
    assert [[c.finish_reason for c in g] for g in local] == [[c.finish_reason for c in g] for g in remote]
    for g in local:
        for c in g:
            assert "\n" not in c.text
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in (0, tok.token_to_id("\n"))
            else:
                assert len(c.token_ids) == PARAMS.max_tokens


def test_down_server_is_one_line_naming_the_url(tok):
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(url, "tiny", tok, eos_id=0, timeout=2, retries=2, backoff=0.01)
    t0 = time.time()
    with pytest.raises(RolloutError) as e:
        backend.generate(PROMPTS, 2, 0, PARAMS)
    assert url in str(e.value) and "\n" not in str(e.value) and "3 attempts" in str(e.value)
    assert time.time() - t0 < 5 and backend.stats["retries"] == 2 * len(PROMPTS)


def test_unknown_model_is_refused_at_once(server, tok):
    backend = OpenAIBackend(server.url, "nope", tok, eos_id=0, retries=3, backoff=0.01)
    with pytest.raises(RolloutError, match="refused \\(404\\).*does not exist"):
        backend.generate(PROMPTS, 2, 0, PARAMS)
    assert backend.stats["retries"] == 0


def test_malformed_and_short_answers_are_counted_skips(tok):
    app = FastAPI()
    calls = {"n": 0}

    @app.post("/v1/completions")
    async def completions(body: dict):
        calls["n"] += 1
        if body["prompt"] == "a*6=":
            return PlainTextResponse("{not json")
        if body["prompt"] == "b*6=":
            return {"model": body["model"], "choices": [{"index": 0, "text": "bb", "finish_reason": "stop"}]}
        return {"model": body["model"], "choices": [{"index": i, "text": "cc", "finish_reason": "stop"}
                                                    for i in range(body["n"])]}

    s = RunningServer(app)
    try:
        backend = OpenAIBackend(s.url, "m", tok, eos_id=0, retries=1, backoff=0.01)
        groups = backend.generate(PROMPTS, 3, 0, PARAMS)
    finally:
        s.stop()
    assert groups[0] is None and groups[1] is None
    assert [c.text for c in groups[2]] == ["cc"] * 3 and groups[2][0].token_ids[-1] == 0
    assert backend.stats["skipped_groups"] == 2 and backend.stats["short_groups"] == 1
    assert backend.stats["malformed"] == 2  # first try and its retry


def test_adapter_push_is_what_the_server_samples(server, model_dir, tok, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(0)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True, init_lora_weights=False))
    backend = OpenAIBackend(server.url, "tiny", tok, eos_id=0)
    sync = AdapterSync(backend, tmp_path / "adapters", prefix="run", keep=1)
    base_out = backend.generate(PROMPTS, 4, 7, PARAMS)
    info = sync.push(policy, 1)
    assert info["adapter"] == "run-v0001" and backend.model == "run-v0001" and len(info["adapter_sha256"]) == 64
    remote = backend.generate(PROMPTS, 4, 7, PARAMS)
    local = LocalBackend(policy, tok, eos_id=0).generate(PROMPTS, 4, 7, PARAMS)
    assert [[c.text for c in g] for g in remote] == [[c.text for c in g] for g in local]
    assert [[c.text for c in g] for g in remote] != [[c.text for c in g] for g in base_out]

    with torch.no_grad():  # the next version must replace the weights the server samples with
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    sync.push(policy, 2)
    assert set(backend.served_models()) == {"tiny", "run-v0002"}
    remote2 = backend.generate(PROMPTS, 4, 7, PARAMS)
    local2 = LocalBackend(policy, tok, eos_id=0).generate(PROMPTS, 4, 7, PARAMS)
    assert [[c.text for c in g] for g in remote2] == [[c.text for c in g] for g in local2] != \
        [[c.text for c in g] for g in remote]
    sync.push(policy, 2)  # re-push of the same version (a resume) reloads in place
    assert set(backend.served_models()) == {"tiny", "run-v0002"}
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["run-v0002"]
