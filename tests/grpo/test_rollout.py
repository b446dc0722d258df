"""Both rollout backends give the same completions, token ids and log-probs for the same
weights and seeds; the openai backend sends prompts as token ids in batched requests (a
list of prompts with n) with several in flight, keeps the groups in prompt order, survives
a down server (one line naming the URL), malformed JSON and short answers (counted
skips), refuses a server that does not return token ids, and a pushed LoRA adapter is what
the server samples with."""

import contextlib
import threading
import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trainer.grpo.algorithm import token_logprobs
from trainer.grpo.loop import pack
from trainer.grpo.rollout import LocalBackend, OpenAIBackend, RolloutError, SamplingParams
from trainer.grpo.sync import AdapterSync
from tests.grpo.conftest import RunningServer, free_port

PARAMS = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, stop=("\n",))
TEXTS = ["a*6=", "b*6=", "c*6="]


def ids(tok, texts=TEXTS):
    return [tok.encode(t).ids for t in texts]


def test_local_and_server_agree(server, model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    prompts = ids(tok)
    # two prompts per request, so the second request's seeds start at seed + 2*4; the local backend
    # seeds by the same rule
    local = LocalBackend(model, tok, eos_id=0, batch_size=8, request_prompts=2).generate(prompts, 4, 100, PARAMS)
    # one request at a time: the server's forward batches then hold the rows the local ones do
    backend = OpenAIBackend(server.url, "tiny", tok, eos_id=0, request_prompts=2, concurrency=1)
    remote = backend.generate(prompts, 4, 100, PARAMS)
    assert backend.stats["requests"] == 2
    assert [[c.text for c in g] for g in local] == [[c.text for c in g] for g in remote]
    assert [[c.token_ids for c in g] for g in local] == [[c.token_ids for c in g] for g in remote]
    assert [[c.finish_reason for c in g] for g in local] == [[c.finish_reason for c in g] for g in remote]
    for gl, gr in zip(local, remote):
        for cl, cr in zip(gl, gr):
            assert len(cr.logprobs) == len(cr.token_ids) and cr.logprobs == pytest.approx(cl.logprobs, abs=1e-5)
            assert "\n" not in cl.text
            if cl.finish_reason == "stop":
                assert cl.token_ids[-1] in (0, tok.token_to_id("\n"))
            else:
                assert len(cl.token_ids) == PARAMS.max_tokens
    # the sampler's log-probs are the model's at temperature 1: the trainer computes the same
    flat = [c for g in local for c in g]
    batch_ids, attn, sampled, sampler = pack([p for p in prompts for _ in range(4)], [c.token_ids for c in flat], 0,
                                             [c.logprobs for c in flat])
    with torch.no_grad():
        trainer = token_logprobs(model.eval(), batch_ids, attn, sampled).logps
    assert float(((trainer - sampler) * sampled).abs().max()) < 1e-4


@contextlib.contextmanager
def backend_for(app, tok, **options):
    """`app` served for real on loopback, and an OpenAIBackend pointed at it."""
    s = RunningServer(app)
    try:
        yield OpenAIBackend(s.url, "m", tok, eos_id=0, **options)
    finally:
        s.stop()


def test_requests_are_batched_concurrent_and_in_prompt_order(tok):
    """A server that answers each prompt with its own ids: 7 prompts, 2 per request, up to 3
    requests in flight; the later requests are answered first, the groups still come back
    in prompt order, and more than one request was in flight at once."""
    app = FastAPI()
    seen, live = [], {"now": 0, "most": 0}
    lock = threading.Lock()

    @app.post("/v1/completions")
    def completions(body: dict):
        with lock:
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
            seen.append((body["prompt"], body["seed"], body["n"]))
        time.sleep(0.4 if body["prompt"][0] == tok.encode("a").ids else 0.05)  # the first request answers last
        choices = [{"index": k * body["n"] + i, "text": tok.decode(p), "finish_reason": "length",
                    "logprobs": {"tokens": [f"token_id:{t}" for t in p], "token_logprobs": [-1.0] * len(p)}}
                   for k, p in enumerate(body["prompt"]) for i in range(body["n"])]
        with lock:
            live["now"] -= 1
        return {"model": body["model"], "choices": choices}

    texts = ["a", "b", "c", "d", "a*", "b*", "c*"]
    with backend_for(app, tok, concurrency=3, request_prompts=2) as backend:
        groups = backend.generate(ids(tok, texts), 2, 50, SamplingParams(max_tokens=2))
    assert [[c.text for c in g] for g in groups] == [[t, t] for t in texts]
    assert [c.token_ids for c in groups[4]] == [tok.encode("a*").ids] * 2
    assert sorted((p, seed) for p, seed, _ in seen) == sorted(
        [(ids(tok, texts[j:j + 2]), 50 + j * 2) for j in range(0, 7, 2)])
    assert live["most"] > 1 and backend.stats["requests"] == 4


def test_down_server_is_one_line_naming_the_url(tok):
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(url, "tiny", tok, eos_id=0, timeout=2, retries=2, backoff=0.01)
    t0 = time.time()
    with pytest.raises(RolloutError) as e:
        backend.generate(ids(tok), 2, 0, PARAMS)
    assert url in str(e.value) and "\n" not in str(e.value) and "3 attempts" in str(e.value)
    assert time.time() - t0 < 5 and backend.stats["retries"] == 2 * len(TEXTS)  # one request per prompt


def test_unknown_model_is_refused_at_once(server, tok):
    backend = OpenAIBackend(server.url, "nope", tok, eos_id=0, retries=3, backoff=0.01)
    with pytest.raises(RolloutError, match="refused \\(404\\).*does not exist"):
        backend.generate(ids(tok), 2, 0, PARAMS)
    assert backend.stats["retries"] == 0


def answer(tok, body, text="cc", n=None):
    """vLLM's shape: every prompt's choices, each with its ids as "token_id:<id>"."""
    n = body["n"] if n is None else n
    ids_ = tok.encode(text).ids
    return {"model": body["model"], "choices": [
        {"index": k * body["n"] + i, "text": text, "finish_reason": "length",
         "logprobs": {"tokens": [f"token_id:{t}" for t in ids_], "token_logprobs": [-0.5] * len(ids_)}}
        for k in range(len(body["prompt"])) for i in range(n)]}


def test_malformed_and_short_answers_are_counted_skips(tok):
    app = FastAPI()
    a, b = tok.encode("a*6=").ids, tok.encode("b*6=").ids

    @app.post("/v1/completions")
    async def completions(body: dict):
        if a in body["prompt"]:
            return PlainTextResponse("{not json")
        if b in body["prompt"]:
            return answer(tok, body, "bb", n=1)  # one choice where n were asked for
        return answer(tok, body)

    with backend_for(app, tok, retries=1, backoff=0.01) as backend:
        groups = backend.generate(ids(tok), 3, 0, PARAMS)
    assert groups[0] is None and groups[1] is None
    assert [c.text for c in groups[2]] == ["cc"] * 3 and groups[2][0].token_ids == tok.encode("cc").ids
    assert groups[2][0].logprobs == [-0.5] * 2
    assert backend.stats["skipped_groups"] == 2 and backend.stats["short_groups"] == 1
    assert backend.stats["malformed"] == 2  # first try and its retry


def test_a_short_group_in_a_batch_skips_that_group_only(tok):
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        full = answer(tok, body)
        full["choices"] = [c for c in full["choices"] if c["index"] != body["n"] + 1]  # prompt 1 loses a choice
        return full

    with backend_for(app, tok, retries=0, request_prompts=3) as backend:
        groups = backend.generate(ids(tok), 2, 0, PARAMS)
    assert groups[1] is None and len(groups[0]) == len(groups[2]) == 2
    assert backend.stats == {**backend.stats, "requests": 1, "short_groups": 1, "skipped_groups": 1}


def test_a_server_without_token_ids_is_refused(tok):
    """A server that ignores return_tokens_as_token_ids (text pieces in logprobs.tokens) would
    make the trainer guess the ids from text: a one-line error instead."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        return {"model": body["model"], "choices": [
            {"index": i, "text": "ab", "finish_reason": "length",
             "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0]}}
            for i in range(body["n"] * len(body["prompt"]))]}

    with backend_for(app, tok) as backend, pytest.raises(RolloutError) as e:
        backend.generate(ids(tok), 2, 0, PARAMS)
    assert backend.url in str(e.value) and "token ids" in str(e.value) and "\n" not in str(e.value)


def test_adapter_push_is_what_the_server_samples(server, model_dir, tok, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(0)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True, init_lora_weights=False))
    backend = OpenAIBackend(server.url, "tiny", tok, eos_id=0)
    sync = AdapterSync(backend, tmp_path / "adapters", tok.encode("abc*2=").ids, prefix="run", keep=1)
    prompts = ids(tok)
    base_out = backend.generate(prompts, 4, 7, PARAMS)
    info = sync.push(policy, 1)
    assert info["adapter"] == "run-v0001" and backend.model == "run-v0001" and len(info["adapter_sha256"]) == 64
    assert info["sync_probe_diff"] < 1e-5
    remote = backend.generate(prompts, 4, 7, PARAMS)
    local = LocalBackend(policy, tok, eos_id=0).generate(prompts, 4, 7, PARAMS)
    assert [[c.token_ids for c in g] for g in remote] == [[c.token_ids for c in g] for g in local]
    assert [[c.text for c in g] for g in remote] != [[c.text for c in g] for g in base_out]

    with torch.no_grad():  # the next version must replace the weights the server samples with
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    sync.push(policy, 2)
    assert set(backend.served_models()) == {"tiny", "run-v0002"}
    remote2 = backend.generate(prompts, 4, 7, PARAMS)
    local2 = LocalBackend(policy, tok, eos_id=0).generate(prompts, 4, 7, PARAMS)
    assert [[c.token_ids for c in g] for g in remote2] == [[c.token_ids for c in g] for g in local2] != \
        [[c.token_ids for c in g] for g in remote]
    sync.push(policy, 2)  # re-push of the same version (a resume) reloads in place
    assert set(backend.served_models()) == {"tiny", "run-v0002"}
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["run-v0002"]
