"""`trainer serve` speaks vLLM's OpenAI completions API to real clients, and stays correct
under concurrency: seeded sampling is deterministic per choice and matches the local
sampler; prompts come as text or token ids, one or a batch, with `n` choices each in
prompt-major order and token-id logprobs as vLLM writes them; stop strings end a
completion at the token that completes them; bad requests are OpenAI-shaped 4xx errors
with no traceback in the log; a failed LoRA load leaves every served model bit-identical;
a request for an adapter unloaded while it waited is a 404, never another model's output;
and concurrent requests with the same model and sampling parameters share forward batches
without changing any completion.

The fixture is a tiny random GPT-2 with the real GPT-2 tokenizer, in float64: in float32 a
different batch moves logits in the last bits and can flip a sampled token (see
trainer.generate.sample), which would blur the equalities these tests check.
"""

import copy
import json
import logging
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.grpo.conftest import RunningServer
from trainer import generate
from trainer.generate import sample
from trainer.serve import create_app
from trainer.tokenizer import load_gpt2, to_hf

EOS = 50256


def gpt2(n_embd: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=n_embd, n_layer=2, n_head=2,
                     bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-f64")
    gpt2().save_pretrained(path)
    to_hf(load_gpt2(path)).save_pretrained(path)  # the vendored GPT-2 tokenizer files
    return path


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    return load_gpt2(gpt2_dir)


@pytest.fixture
def server(gpt2_dir):
    s = RunningServer(create_app(str(gpt2_dir), name="tiny"))
    yield s
    s.stop()


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def post(server, path, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def complete(server, **body):
    status, text = post(server, "/completions", body)
    assert status == 200, text
    return json.loads(text)


def ids_and_logprobs(answer) -> list[tuple[list[int], list[float]]]:
    return [([int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]], c["logprobs"]["token_logprobs"])
            for c in answer["choices"]]


def tokens_and_logprobs(answer) -> list[tuple[list[str], list[float]]]:
    return [(c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"]) for c in answer["choices"]]


def save_adapter(base, path, seed: int, **overrides) -> None:
    """A LoRA adapter with random A and B (so it changes the outputs), saved as peft does."""
    cfg = dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    torch.manual_seed(seed)
    get_peft_model(copy.deepcopy(base), LoraConfig(**{**cfg, **overrides})).save_pretrained(path)


# ---------------------------------------------------------------- completions


def test_health_models_and_seeded_completions(server, gpt2_dir, tok):
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
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True).eval()
    local = sample(model, [tok.encode("a*6=").ids] * 4, [11, 12, 13, 14], 8, 1.0, 0.9, (EOS,), EOS)
    assert [tok.decode([t for t in s.tokens if t != EOS]) for s in local] == texts
    assert a.usage.completion_tokens == sum(len(s.tokens) for s in local)
    assert {ch.finish_reason for ch in a.choices} <= {"stop", "length"}


def test_prompt_forms_batches_and_token_id_logprobs(server, gpt2_dir, tok):
    """Text and token-id prompts are the same prompt; a batch is prompt-major with choice j of
    every prompt on seed + j (vLLM seeds each prompt of a list alike); token-id logprobs are
    vLLM's "token_id:<id>" strings with the sampler's own log-probs."""
    p0, p1 = tok.encode("def f(x):").ids, tok.encode("Hello").ids
    kw = dict(model="tiny", n=2, seed=7, max_tokens=6, logprobs=2, return_tokens_as_token_ids=True,
              return_token_ids=True)
    batch = complete(server, prompt=[p0, p1], **kw)
    assert [ch["index"] for ch in batch["choices"]] == [0, 1, 2, 3]
    assert batch["usage"]["prompt_tokens"] == len(p0) + len(p1)
    for form in ("def f(x):", p0, ["def f(x):"]):
        assert ids_and_logprobs(complete(server, prompt=form, **kw)) == ids_and_logprobs(batch)[:2]
    assert ids_and_logprobs(complete(server, prompt=["def f(x):", "Hello"], **kw)) == ids_and_logprobs(batch)
    assert ids_and_logprobs(complete(server, prompt=p1, **kw)) == ids_and_logprobs(batch)[2:]

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True).eval()
    local = sample(model, [p0, p0, p1, p1], [7, 8, 7, 8], 6, 1.0, 1.0, (EOS,), EOS, 2)
    for ch, s, prompt in zip(batch["choices"], local, [p0, p0, p1, p1]):
        lp = ch["logprobs"]
        assert ch["token_ids"] == s.tokens and ch["prompt_token_ids"] == prompt
        assert lp["tokens"] == [f"token_id:{t}" for t in s.tokens]
        assert lp["token_logprobs"] == s.logprobs
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
        for tok_, top, step in zip(lp["tokens"], lp["top_logprobs"], s.top):
            assert tok_ in top and set(top) >= {f"token_id:{t}" for t in step}
    text = complete(server, prompt=[p0, p1], **{**kw, "return_tokens_as_token_ids": False})
    assert text["choices"][0]["logprobs"]["tokens"] == [tok.decode([t]) for t in local[0].tokens]


def test_stop_strings_end_at_the_completing_token(server, tok):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=["a*6=", "b*6="], n=3, seed=5, max_tokens=20, logprobs=2)
    assert len(r.choices) == 6 and [ch.index for ch in r.choices] == list(range(6))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    g = c.completions.create(model="tiny", prompt="a*6=", temperature=0, max_tokens=5, n=2, seed=1)
    assert g.choices[0].text == g.choices[1].text  # greedy ignores the seed

    base = complete(server, model="tiny", prompt="a*6=", seed=5, max_tokens=40, return_token_ids=True,
                    logprobs=0, return_tokens_as_token_ids=True)["choices"][0]
    ids, full = base["token_ids"], base["text"]
    stop = next(ch for ch in full[len(tok.decode(ids[:1])):] if ch.isascii() and ch.isalnum())  # a later token's
    cut = complete(server, model="tiny", prompt="a*6=", seed=5, max_tokens=40, stop=[stop], return_token_ids=True,
                   logprobs=0, return_tokens_as_token_ids=True)
    ch = cut["choices"][0]
    k = len(ch["token_ids"])
    assert ch["text"] == full[: full.index(stop)]
    assert ch["finish_reason"] == "stop" and ch["stop_reason"] == stop
    assert ch["token_ids"] == ids[:k] and stop in tok.decode(ids[:k]) and stop not in tok.decode(ids[:k - 1])
    assert ch["logprobs"]["token_logprobs"] == base["logprobs"]["token_logprobs"][:k]
    assert cut["usage"]["completion_tokens"] == k
    # a stop token id ends the completion on that token, which the text leaves out (vLLM's stop_token_ids)
    k = ids.index(ids[2]) + 1
    by_id = complete(server, model="tiny", prompt="a*6=", seed=5, max_tokens=40, stop_token_ids=[ids[2]],
                     return_token_ids=True)["choices"][0]
    assert (by_id["token_ids"], by_id["finish_reason"], by_id["stop_reason"]) == (ids[:k], "stop", ids[2])
    assert by_id["text"] == tok.decode(ids[:k - 1])


BAD = [  # (body, status, param, words in the message)
    ({"n": 0}, 400, "n", "n"),
    ({"n": 10_000}, 400, "n", "max_num_seqs"),
    ({"prompt": ["a"] * 100, "n": 3}, 400, "n", "300 completions"),
    ({"temperature": -1}, 400, "temperature", "temperature"),
    ({"temperature": 2.5}, 400, "temperature", "temperature"),
    ({"top_p": 0}, 400, "top_p", "top_p"),
    ({"top_k": -2}, 400, "top_k", "top_k"),
    ({"logprobs": 21}, 400, "logprobs", "logprobs"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "context length"),
    ({"max_tokens": 2**70}, 400, "max_tokens", "context length"),
    ({"prompt": "a " * 126, "max_tokens": 4}, 400, "max_tokens", "context length"),
    ({"seed": 2**64 - 1}, 400, "seed", "seed"),
    ({"seed": 2**64 - 1, "n": 2}, 400, "seed", "seed"),
    ({"seed": 2**63}, 400, "seed", "seed"),
    ({"seed": -2**63 - 1}, 400, "seed", "seed"),
    ({"seed": 2**200}, 400, "seed", "seed"),
    ({"stream": True}, 400, "stream", "stream"),
    ({"bogus": 1}, 400, "bogus", "bogus"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt", "no tokens"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "prompt 1"),
    ({"prompt": [50257]}, 400, "prompt", "out of vocabulary"),
    ({"prompt": [[1], [-1]]}, 400, "prompt", "out of vocabulary"),
    ({"prompt": [[1], "a"]}, 400, "prompt", "token ids"),
    ({"prompt": [1.5]}, 400, "prompt", "token ids"),
    ({"prompt": {"a": 1}}, 400, "prompt", "token ids"),
    ({"stop": [""]}, 400, "stop", "stop"),
    ({"stop_token_ids": [50257]}, 400, "stop_token_ids", "stop_token_ids"),
    ({"model": None}, 400, "model", "model"),
    ({"model": "nope"}, 404, "model", "does not exist"),
]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_bad_requests_are_openai_errors_without_tracebacks(server):
    """Every out-of-range value is a 4xx in OpenAI's error shape, never a 500, and leaves no
    traceback in the server's log; the extremes of the valid seed range work."""
    log = Records()
    for name in ("uvicorn.error", "uvicorn", "fastapi", "trainer"):
        logging.getLogger(name).addHandler(log)
    try:
        wrong = []
        for body, status, param, words in BAD:
            full = {k: v for k, v in {"model": "tiny", "prompt": "a", **body}.items() if v is not None}
            got, text = post(server, "/completions", full)
            try:
                error = json.loads(text)["error"]
                ok = (got == status == error["code"] and error["param"] == param and words in error["message"]
                      and error["type"] in ("BadRequestError", "NotFoundError"))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                wrong.append((body, got, text[:200]))
        for raw in (b"{not json", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', b"[1, 2]"):
            got, text = post(server, "/completions", None, raw=raw)
            if got != 400 or not json.loads(text)["error"]["message"]:
                wrong.append((raw, got, text[:200]))
        assert not wrong, "\n".join(map(str, wrong))

        # the valid extremes: choice j is seed + j, taken modulo 2**64 like torch does
        for seed in (2**63 - 1, -2**63):
            ok = complete(server, model="tiny", prompt="a", n=3, seed=seed, max_tokens=3, return_token_ids=True)
            for j, ch in enumerate(ok["choices"]):
                one = complete(server, model="tiny", prompt="a", seed=(seed + j + 2**63) % 2**64 - 2**63,
                               max_tokens=3, return_token_ids=True)
                assert one["choices"][0]["token_ids"] == ch["token_ids"]
        assert not log.records, [r.getMessage() for r in log.records]
    finally:
        for name in ("uvicorn.error", "uvicorn", "fastapi", "trainer"):
            logging.getLogger(name).removeHandler(log)


# ---------------------------------------------------------------- LoRA adapters


def test_lora_load_use_unload(server, gpt2_dir, tmp_path, tok):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    save_adapter(base, tmp_path / "v1", seed=0)
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
    # the served adapter is the saved one: the same completions as peft's model in this process
    from peft import PeftModel

    local = sample(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), tmp_path / "v1").eval(),
                   [tok.encode("a*6=").ids] * 4, [3, 4, 5, 6], 8, 1.0, 1.0, (EOS,), EOS)
    assert [ch.text for ch in with_adapter.choices] == [tok.decode([t for t in s.tokens if t != EOS]) for s in local]

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


def broken_adapters(base, root) -> dict[str, str]:
    """Adapter folders that must not load, each broken in one way."""
    save_adapter(base, root / "good", seed=1)
    save_adapter(gpt2(n_embd=32), root / "shapes", seed=2)  # a narrower model's adapter
    save_adapter(base, root / "modules", seed=3)
    cfg = json.loads((root / "modules" / "adapter_config.json").read_text())
    (root / "modules" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["no_such_layer"]}))
    save_adapter(base, root / "json", seed=4)
    (root / "json" / "adapter_config.json").write_text("{not json")
    save_adapter(base, root / "noweights", seed=5)
    (root / "noweights" / "adapter_model.safetensors").unlink()
    save_adapter(base, root / "partial", seed=6)
    weights = load_file(root / "partial" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".h.1." not in k}, root / "partial" / "adapter_model.safetensors")
    save_adapter(base, root / "nan", seed=7)
    weights = load_file(root / "nan" / "adapter_model.safetensors")
    save_file({k: v.fill_(float("nan")) for k, v in weights.items()}, root / "nan" / "adapter_model.safetensors")
    return {name: str(root / name) for name in ("shapes", "modules", "json", "noweights", "partial", "nan")}


def test_failed_lora_loads_leave_the_served_models_bit_identical(server, gpt2_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    bad = broken_adapters(base, tmp_path)
    probe = dict(prompt=["a*6=", "Hello"], n=3, seed=9, max_tokens=12, logprobs=1)
    reference = tokens_and_logprobs(complete(server, model="tiny", **probe))

    def refused(name: str, path: str, inplace: bool = False):
        status, text = post(server, "/load_lora_adapter", {"lora_name": name, "lora_path": path,
                                                          "load_inplace": inplace})
        assert status == 400, (path, status, text)
        assert json.loads(text)["error"]["param"] == "lora_path"

    for name, path in bad.items():  # with no adapter loaded: the base is the only model
        refused(name, path)
        assert tokens_and_logprobs(complete(server, model="tiny", **probe)) == reference, name
    assert post(server, "/load_lora_adapter", {"lora_name": "good", "lora_path": str(tmp_path / "good")})[0] == 200
    good = tokens_and_logprobs(complete(server, model="good", **probe))
    assert good != reference
    for name, path in bad.items():  # next to a loaded adapter, and as its in-place replacement
        refused(name, path)
        refused("good", path, inplace=True)
    assert tokens_and_logprobs(complete(server, model="tiny", **probe)) == reference
    assert tokens_and_logprobs(complete(server, model="good", **probe)) == good
    assert [m["id"] for m in json.loads(urllib.request.urlopen(server.url + "/models").read())["data"]] == \
        ["tiny", "good"]
    # a name whose load failed is free: a good adapter loads under it
    assert post(server, "/load_lora_adapter", {"lora_name": "shapes", "lora_path": str(tmp_path / "good")})[0] == 200
    assert tokens_and_logprobs(complete(server, model="shapes", **probe)) == good


# ---------------------------------------------------------------- concurrency


class HeldSampler:
    """Wraps trainer.generate.sample: the first call waits for release(), every call is recorded
    as (model, rows). Holding the first batch lets a test queue real requests behind it."""

    def __init__(self, monkeypatch):
        self.real, self.calls = generate.sample, []
        self.entered, self.gate = threading.Event(), threading.Event()
        monkeypatch.setattr(generate, "sample", self)

    def __call__(self, model, rows, *args, **kwargs):
        self.calls.append((model, len(rows)))
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(60), "the test never released the held batch"
        return self.real(model, rows, *args, **kwargs)

    def release(self):
        self.gate.set()


def in_thread(fn, *args, **kwargs) -> dict:
    out = {}

    def run():
        out["result"] = fn(*args, **kwargs)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def result(pending: dict, timeout: float = 60):
    pending["thread"].join(timeout)
    assert "result" in pending, "request did not finish"
    return pending["result"]


def wait_queued(server, k: int) -> None:
    """Until k requests wait behind the held batch (servers without a queue: half a second)."""
    queue = getattr(server.app.state.engine, "queue", None)
    if queue is None:
        time.sleep(0.5)
        return
    deadline = time.time() + 30
    while len(queue) < k:
        assert time.time() < deadline, f"{len(queue)} of {k} requests queued"
        time.sleep(0.01)


BLOCKER = dict(model="tiny", prompt="x", n=2, seed=0, max_tokens=4, temperature=0.5)


def test_request_for_an_adapter_unloaded_while_it_waited_is_404(server, gpt2_dir, tmp_path, monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    save_adapter(base, tmp_path / "L1", seed=0)
    probe = dict(prompt="a*6=", n=2, seed=3, max_tokens=8, logprobs=1)
    base_answer = tokens_and_logprobs(complete(server, model="tiny", **probe))
    for trial in range(3):
        assert post(server, "/load_lora_adapter", {"lora_name": "L1", "lora_path": str(tmp_path / "L1")})[0] == 200
        if trial == 0:
            assert tokens_and_logprobs(complete(server, model="L1", **probe)) != base_answer
        held = HeldSampler(monkeypatch)
        blocker = in_thread(post, server, "/completions", BLOCKER)
        assert held.entered.wait(30)
        queued = in_thread(post, server, "/completions", {"model": "L1", **probe})  # accepted: L1 is loaded
        wait_queued(server, 1)  # it waits behind the held batch
        unload = in_thread(post, server, "/unload_lora_adapter", {"lora_name": "L1"})
        unload["thread"].join(10)  # (a server that unloads under its request lock waits for the release)
        held.release()
        assert result(unload)[0] == 200 and result(blocker)[0] == 200
        status, text = result(queued)
        if status == 200:
            same = tokens_and_logprobs(json.loads(text)) == base_answer
            pytest.fail(f"trial {trial}: the request for the unloaded L1 was answered 200, with "
                        f"{'the base model' if same else 'L1'}'s logprobs, instead of 404")
        assert status == 404, text
        assert json.loads(text)["error"] == {"message": "The model `L1` does not exist.", "type": "NotFoundError",
                                             "param": "model", "code": 404}
        monkeypatch.undo()


def test_concurrent_requests_share_batches_and_keep_their_completions(server, gpt2_dir, tmp_path, tok,
                                                                      monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    save_adapter(base, tmp_path / "L1", seed=0)
    assert post(server, "/load_lora_adapter", {"lora_name": "L1", "lora_path": str(tmp_path / "L1")})[0] == 200
    common = dict(max_tokens=10, logprobs=1)
    bodies = [  # four that can share a batch, then a different temperature, then another model
        {"model": "tiny", "prompt": "a*6=", "n": 3, "seed": 1, **common},
        {"model": "tiny", "prompt": ["Hello", "def f("], "n": 2, "seed": 2, **common},
        {"model": "tiny", "prompt": "x = 1", "n": 1, "seed": 3, **common},
        {"model": "tiny", "prompt": "a*6=", "n": 3, "seed": 1, **common},
        {"model": "tiny", "prompt": "a*6=", "n": 2, "seed": 1, "temperature": 0.7, **common},
        {"model": "L1", "prompt": "a*6=", "n": 3, "seed": 1, **common},
    ]
    alone = [tokens_and_logprobs(complete(server, **b)) for b in bodies]  # one request per batch

    held = HeldSampler(monkeypatch)
    blocker = in_thread(post, server, "/completions", BLOCKER)
    assert held.entered.wait(30)
    pending = []
    for k, b in enumerate(bodies):
        pending.append(in_thread(post, server, "/completions", b))
        wait_queued(server, k + 1)  # arrival order = list order
    held.release()
    assert result(blocker)[0] == 200
    for b, p, expected in zip(bodies, pending, alone):
        status, text = result(p)
        assert status == 200, text
        answer = json.loads(text)
        assert answer["model"] == b["model"]
        assert tokens_and_logprobs(answer) == expected, b
    # the held batch, then one batch for the four alike (3 + 4 + 1 + 3 rows), one each for the others
    assert [rows for _, rows in held.calls] == [2, 11, 2, 3]
    assert held.calls[1][0] is held.calls[2][0] is server.app.state.engine.model
    assert held.calls[3][0] is not held.calls[1][0]
