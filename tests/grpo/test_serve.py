"""`trainer serve` speaks the OpenAI completions API to the official client: seeded
sampling is deterministic per choice and matches the local sampler, stop strings and
logprobs have vLLM's shape, LoRA adapters load/unload with vLLM's semantics and change
the outputs, and bad requests are 4xx with a message, never a 500."""

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trainer.generate import sample


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)


def post(server, path, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_models_and_seeded_completions(server, model_dir, tok):
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=10) as r:
        assert r.status == 200
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    kw = dict(model="tiny", prompt="a*6=", n=4, seed=11, temperature=1.0, top_p=0.9, max_tokens=8)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    texts = [ch.text for ch in a.choices]
    assert texts == [ch.text for ch in b.choices]
    assert len(set(texts)) > 1  # per-choice seeds differ
    assert [ch.text for ch in c.completions.create(**{**kw, "seed": 12}).choices] != texts
    # choice i is seed + i: asking for one completion with seed 12 gives choice 1 of seed 11
    one = c.completions.create(**{**kw, "n": 1, "seed": 12})
    assert one.choices[0].text == texts[1]
    # the server and the local sampler agree on the same weights and seeds
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    local = sample(model, [tok.encode("a*6=").ids] * 4, [11, 12, 13, 14], 8, 1.0, 0.9, (0,), 0)
    assert [tok.decode([t for t in s.tokens if t != 0]) for s in local] == texts
    assert a.usage.completion_tokens == sum(len(s.tokens) for s in local)
    assert {ch.finish_reason for ch in a.choices} <= {"stop", "length"}


def test_stop_strings_and_logprobs(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=["a*6=", "b*6="], n=3, seed=5, max_tokens=20, logprobs=2)
    assert len(r.choices) == 6 and [ch.index for ch in r.choices] == list(range(6))
    ch = r.choices[0]
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    full = ch.text
    if len(full) >= 2:  # stop on a character that occurs: text ends before it
        stop = full[1]
        s = c.completions.create(model="tiny", prompt="a*6=", n=3, seed=5, max_tokens=20, stop=[stop])
        assert s.choices[0].text == full[: full.index(stop)]
        assert s.choices[0].finish_reason == "stop"
    g = c.completions.create(model="tiny", prompt="a*6=", temperature=0, max_tokens=5, n=2, seed=1)
    assert g.choices[0].text == g.choices[1].text  # greedy ignores the seed


@pytest.mark.parametrize("body, needle", [
    ({"model": "tiny", "prompt": "a", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10_000}, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "stream": True}, "stream"),
    ({"model": "tiny", "prompt": "a", "bogus": 1}, "bogus"),
    ({"model": "tiny", "prompt": "", "max_tokens": 2}, "prompt"),
    ({"model": "tiny", "prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a"}, "model"),
    ({"model": "nope", "prompt": "a"}, "does not exist"),
])
def test_bad_requests_are_4xx_with_a_message(server, body, needle):
    status, text = post(server, "/completions", body)
    assert 400 <= status < 500, (status, text)
    assert needle in json.loads(text)["error"]["message"]


def test_malformed_json_is_400(server):
    status, text = post(server, "/completions", None, raw=b"{not json")
    assert status == 400 and json.loads(text)["error"]["message"]


def test_lora_load_use_unload(server, model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False)  # random B so the adapter changes outputs
    torch.manual_seed(0)
    get_peft_model(base, cfg).save_pretrained(tmp_path / "v1")
    c = client(server)
    kw = dict(prompt="a*6=", n=4, seed=3, max_tokens=8)
    before = [ch.text for ch in c.completions.create(model="tiny", **kw).choices]

    assert post(server, "/load_lora_adapter", {"lora_name": "v1", "lora_path": str(tmp_path / "v1")}) == \
        (200, "Success: LoRA adapter 'v1' added successfully.")
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"tiny", "v1"} and models["v1"].model_extra["root"] == str(tmp_path / "v1")
    with_adapter = c.completions.create(model="v1", **kw)
    assert with_adapter.model == "v1"
    assert [ch.text for ch in with_adapter.choices] != before
    assert [ch.text for ch in c.completions.create(model="tiny", **kw).choices] == before  # base untouched

    status, text = post(server, "/load_lora_adapter", {"lora_name": "v1", "lora_path": str(tmp_path / "v1")})
    assert status == 400 and "already been loaded" in text
    status, text = post(server, "/load_lora_adapter", {"lora_name": "v2", "lora_path": str(tmp_path / "none")})
    assert status == 404 and "No adapter found" in text
    status, text = post(server, "/load_lora_adapter", {"lora_name": "v2"})
    assert status == 400 and "must be provided" in text

    assert post(server, "/unload_lora_adapter", {"lora_name": "v1"})[0] == 200
    assert [m.id for m in c.models.list().data] == ["tiny"]
    status, text = post(server, "/unload_lora_adapter", {"lora_name": "v1"})
    assert status == 404 and "cannot be found" in text
    assert [ch.text for ch in c.completions.create(model="tiny", **kw).choices] == before
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="v1", **kw)
