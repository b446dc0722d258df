"""`trainer serve` stays answerable whatever a client sends: sizes are checked before any work
(a body over the cap is a 413 before it is parsed; a text prompt that cannot fit the context is
refused before it is tokenized, so /health keeps answering while it is refused, where a 20 MB
prompt used to hold the server for 17 s), and every error, FastAPI's own included (a body that
is not UTF-8, an unknown path, a wrong method), is in OpenAI's shape
{"error": {"message", "type", "param", "code"}}. A real uvicorn server, the tiny GPT-2 with the
real tokenizer (64 positions, so at most 64 x 128 characters per prompt)."""

import json
import threading
import time

import httpx
import pytest

from tests.grpo.conftest import RunningServer, gpt2_vllm_model, save_hf_folder
from trainer.serve import MAX_BODY_BYTES, create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_tok):
    path = tmp_path_factory.mktemp("gpt2-limits")
    save_hf_folder(path, gpt2_vllm_model(), gpt2_tok)
    s = RunningServer(create_app(str(path), name="tiny"))
    yield s
    s.stop()


def openai_error(r: httpx.Response) -> dict:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == r.status_code, r.text
    assert isinstance(error["message"], str) and error["message"], r.text
    return error


def test_every_error_is_openai_shaped(server):
    root = server.url.removesuffix("/v1")
    cases = [("POST", "/v1/completions", b'{"model": "tiny", "prompt": "a\xff\xfe"}', 400, "not UTF-8 JSON"),
             ("POST", "/v1/completions", b"\xff\xfe", 400, ""),
             ("POST", "/v1/completions", b'{"model": "tiny"}', 400, "prompt"),
             ("GET", "/v1/nothing-here", None, 404, "Not Found"),
             ("GET", "/v1/completions", None, 405, "Method Not Allowed")]
    for method, path, body, status, words in cases:
        r = httpx.request(method, root + path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (path, body, r.text)
        assert words in openai_error(r)["message"], (path, body, r.text)


def test_a_body_over_the_cap_is_refused_before_it_is_parsed(server):
    body = json.dumps({"model": "tiny", "prompt": [[1] * (MAX_BODY_BYTES // 3)]}).encode()
    t0 = time.monotonic()
    r = httpx.post(server.url + "/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and f"at most {MAX_BODY_BYTES}" in openai_error(r)["message"], r.text[:300]
    assert time.monotonic() - t0 < 5
    assert httpx.get(server.url + "/models").status_code == 200  # and the server goes on


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing_and_health_answers(server):
    """6 MB of text under the body cap: tokenizing it took ~6 s with the GIL held, during which
    /health did not answer. Now it is refused by its length in characters."""
    worst, done = [0.0], threading.Event()

    def poll():
        with httpx.Client() as client:
            while not done.is_set():
                t0 = time.monotonic()
                assert client.get(server.url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t0 = time.monotonic()
        r = httpx.post(server.url + "/completions", json={"model": "tiny", "prompt": "hello world " * 500_000,
                                                          "max_tokens": 4}, timeout=120)
        took = time.monotonic() - t0
        time.sleep(0.1)
    finally:
        done.set()
        poller.join(30)
    assert took < 3 and worst[0] < 1.0, (took, worst)  # seconds: the request's, /health's worst
    error = openai_error(r)
    assert r.status_code == 400 and error["param"] == "prompt", r.text
    assert "prompt 0 has 6000000 characters; this model's context of 64 tokens holds at most 8192" \
        in error["message"], r.text
    # a prompt within the bound is still tokenized and served
    ok = httpx.post(server.url + "/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
