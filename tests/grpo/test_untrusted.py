"""GRPO treats the generation server as an untrusted peer: whatever it sends, the run ends in a
retry, a counted skip, one line naming the URL and the problem (exit 2, the last checkpoint
intact), or, on a stop signal, exit 0 within seconds; never a traceback or a wait without end.

Against real HTTP servers on loopback (a raw socket server for faults no framework sends, a
FastAPI app, the real `trainer serve` behind an ASGI wrapper) driving the real rollout code,
the real CLI in-process, and the real CLI in a subprocess for the signal:

- a token id outside the policy's vocabulary, or not a token id at all ("token_id:²"), is
  retried, and when it persists ends the run in one line naming the URL and the id; the run
  keeps iter_000001 and resumes against a healthy server;
- a connection closed mid-body is retried like a reset, and named when it persists;
- a server that trickles its answer byte by byte meets server.timeout as a wall-clock
  deadline per try (not per read), and the tries it left end with it (their sockets hung up);
- a server that never answers meets grpo.rollout_timeout for the whole batch;
- a batch whose every group is skipped (not JSON, fewer choices than n) ends in one line that
  names the URL and the reason;
- SIGTERM while rollouts wait on a hung server: exit 0 within seconds, the stopped line with
  the resume command, iter_000001 intact and nothing of iteration 2 on disk.
"""

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from trainer import checkpoint as ckpt
from trainer.commands import grpo_command
from trainer.grpo.rollout import OpenAIBackend, RolloutError, SamplingParams
from tests.conftest import ROOT, start_cli, wait_for
from tests.grpo.conftest import RunningServer
from tests.grpo.test_faults import grpo_exits, lora, metric_rows
from tests.grpo.test_rollout import answer, backend_for, ids

PARAMS = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, stop=("\n",))


class RawServer:
    """An HTTP/1.1 server on a bare socket: each request goes, parsed, to `handle(body, conn)`,
    which writes whatever bytes it likes, well-formed or not."""

    def __init__(self, handle):
        self.handle, self.requests, self.open = handle, 0, True
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.open:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536) or b"\r\n\r\n"
            head, body = data.split(b"\r\n\r\n", 1)
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            while length and len(body) < int(length.group(1)):
                body += conn.recv(65536)
            self.requests += 1
            try:
                self.handle(json.loads(body or b"null"), conn)
            except OSError:  # the client hung up
                pass

    def stop(self):
        self.open = False
        self.sock.close()


def head(length: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % length)


def fails(backend, n: int = 2) -> str:
    with pytest.raises(RolloutError) as e:
        backend.generate(ids(backend.tokenizer), n, 0, PARAMS)
    message = str(e.value)
    assert backend.url in message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- token ids


@pytest.mark.parametrize("bad, words", [("vocab", "token id {V}, outside the policy's vocabulary of {V}"),
                                        ("token_id:²", "'token_id:²', which is not a token id"),
                                        ("token_id:-1", "'token_id:-1', which is not a token id")])
def test_a_token_id_outside_the_vocabulary_is_retried_then_one_line(tok, bad, words):
    V = tok.get_vocab_size()
    token = f"token_id:{V}" if bad == "vocab" else bad
    app, seen = FastAPI(), []

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(1)
        out = answer(tok, body)
        if len(seen) != 2:  # the second answer is good: one bad answer costs one retry
            for c in out["choices"]:
                c["logprobs"]["tokens"][0] = token
        return out

    with backend_for(app, tok, retries=2, backoff=0.01, request_prompts=3) as backend:
        groups = backend.generate(ids(tok), 2, 0, PARAMS)  # tries 1 (bad) and 2 (good)
        assert all(len(g) == 2 for g in groups) and backend.stats["retries"] == 1
        message = fails(backend)  # tries 3, 4, 5: all bad
    assert words.format(V=V) in message and "on every one of 3 tries" in message, message
    assert backend.stats["malformed"] == 4


# ---------------------------------------------------------------- transport


def test_a_connection_closed_mid_body_is_retried_then_named(tok):
    def handle(body, conn):
        whole = json.dumps(answer(tok, body)).encode()
        if server.requests == 2:
            conn.sendall(head(len(whole)) + whole)
        else:
            conn.sendall(head(len(whole)) + whole[:20])  # then the socket closes: IncompleteRead for urllib

    server = RawServer(handle)
    try:
        backend = OpenAIBackend(server.url, "m", tok, eos_id=0, retries=2, backoff=0.01, request_prompts=3)
        groups = backend.generate(ids(tok), 2, 0, PARAMS)
        assert all(len(g) == 2 for g in groups) and backend.stats["retries"] == 1
        message = fails(backend)
    finally:
        server.stop()
    assert "failed after 3 attempts (RemoteProtocolError: peer closed connection without sending complete message " \
           "body (received 20 bytes" in message, message


def test_a_trickling_server_meets_the_per_request_deadline(tok):
    """One byte every 0.25 s (the whole answer would take minutes): each try ends after
    server.timeout of wall clock, and the client hangs up: the server's writes fail at once."""
    hung_up = []

    def handle(body, conn):
        whole = json.dumps(answer(tok, body)).encode()
        conn.sendall(head(len(whole)))
        try:
            for byte in whole[:40]:  # 10 s, then the rest: urllib's per-read timeout took all of it
                conn.sendall(bytes([byte]))
                time.sleep(0.25)
            conn.sendall(whole[40:])
        except OSError:
            hung_up.append(time.monotonic())
            raise

    server = RawServer(handle)
    try:
        backend = OpenAIBackend(server.url, "m", tok, eos_id=0, timeout=1.0, retries=1, backoff=0.01,
                                request_prompts=3)
        t0 = time.monotonic()
        message = fails(backend)
        took = time.monotonic() - t0
        wait_for(lambda: len(hung_up) == 2, timeout=5)  # both tries were hung up, not left reading
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "rollout-request"], timeout=5)
    finally:
        server.stop()
    assert "failed after 2 attempts (no complete answer within server.timeout=1s)" in message, message
    assert took < 4, took  # two tries of 1 s, not 10 s each


def test_a_silent_server_meets_the_rollout_deadline(tok):
    """Every request waits forever: a batch ends at grpo.rollout_timeout however many tries
    server.timeout and server.retries would allow, and so does a call of its own (/models, a sync)."""
    server = RawServer(lambda body, conn: time.sleep(30))
    try:
        backend = OpenAIBackend(server.url, "m", tok, eos_id=0, timeout=60, retries=5, concurrency=2,
                                rollout_timeout=1.5)
        t0 = time.monotonic()
        message = fails(backend)
        took = time.monotonic() - t0
        with pytest.raises(RolloutError, match="did not answer within grpo.rollout_timeout=1.5s, retries included"):
            backend.served_models()
        assert time.monotonic() - t0 < 6
    finally:
        server.stop()
    assert "within grpo.rollout_timeout=1.5s (0 answered" in message, message
    assert took < 3, took


# ---------------------------------------------------------------- skips that end a batch


@pytest.mark.parametrize("fault, words", [("json", "answered something that is not JSON: '{\"choices\": [' on "
                                                    "every one of 2 tries"),
                                          ("short", "/completions answered 1 choices for n=3")])
def test_a_batch_of_only_skips_names_the_server_and_the_reason(tok, fault, words):
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        return PlainTextResponse('{"choices": [') if fault == "json" else answer(tok, body, n=1)

    with backend_for(app, tok, retries=1, backoff=0.01) as backend:
        message = fails(backend, n=3)
    assert words in message and "every group of the batch was skipped" in message, message
    assert backend.stats["skipped_groups"] == 3


# ---------------------------------------------------------------- the CLI


class Faulty:
    """ASGI wrapper of a real `trainer serve` app: from its second weight reload on (iteration 2,
    after iteration 1 was saved), each rollout request (a completions request with n) gets the real
    answer passed through `fault(answer, n)`, or, with fault="hang", no answer at all."""

    def __init__(self, app, fault):
        self.app, self.fault, self.pushes = app, fault, 0
        self.hanging, self.released = threading.Event(), False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/collective_rpc":
            self.pushes += 1
        if scope["type"] != "http" or scope["path"] != "/v1/completions" or self.pushes < 2:
            return await self.app(scope, receive, send)
        raw, more = b"", True
        while more:
            message = await receive()
            raw, more = raw + message.get("body", b""), message.get("more_body", False)

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        n = json.loads(raw).get("n")
        if n is None:  # the sync's probe
            return await self.app(scope, replay, send)
        if self.fault == "hang":
            self.hanging.set()
            while not self.released:
                await asyncio.sleep(0.05)
            return
        parts = []

        async def keep(message):
            parts.append(message.get("body", b""))

        await self.app(scope, replay, keep)
        payload = json.dumps(self.fault(json.loads(b"".join(parts)), n)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})


def out_of_vocab(vocab: int):
    def fault(answer_, n):
        for c in answer_["choices"]:
            c["logprobs"]["tokens"][0] = f"token_id:{vocab}"
        return answer_
    return fault


def one_choice(answer_, n):
    answer_["choices"] = [c for c in answer_["choices"] if c["index"] % n == 0]
    return answer_


def faulty_server(model_dir, fault=None):
    from trainer.serve import create_app

    app = create_app(str(model_dir), name="tiny")
    return RunningServer(Faulty(app, fault) if fault else app)


def test_an_id_outside_the_vocabulary_ends_the_run_in_one_line_then_resume(model_dir, tok, tmp_path, capsys):
    VOCAB = tok.get_vocab_size()  # the tiny model's embedding rows
    server = faulty_server(model_dir, out_of_vocab(VOCAB))
    options = lora(model_dir, server.url, **{"run.out_dir": str(tmp_path), "run.name": "ids"})
    code, err = grpo_exits(server, options, capsys)
    assert code == 2 and "\n" not in err and err.startswith("error: "), err
    assert f"generation server {server.url}/completions answered token id {VOCAB}, outside" in err, err
    assert "on every one of 3 tries" in err and "last checkpoint: iter_000001" in err, err
    assert "trainer grpo --resume ids" in err
    run = tmp_path / "checkpoints" / "ids"
    assert ckpt.latest_name(run) == "iter_000001" and ckpt.verify(run / "iter_000001") is None
    assert not (run / "iter_000002").exists()

    healthy = faulty_server(model_dir)
    try:
        result = grpo_command(resume="ids", **{"run.out_dir": str(tmp_path), "server.url": healthy.url})
    finally:
        healthy.stop()
    assert result["iteration"] == 3
    assert [r["iteration"] for r in metric_rows(tmp_path / "metrics" / "ids" / "metrics.csv")] == ["1", "2", "3"]


def test_fewer_choices_than_n_for_every_prompt_ends_the_run_naming_both(model_dir, tmp_path, capsys):
    server = faulty_server(model_dir, one_choice)
    options = lora(model_dir, server.url, **{"run.out_dir": str(tmp_path), "run.name": "short"})
    code, err = grpo_exits(server, options, capsys)
    assert code == 2 and "\n" not in err, err
    assert f"generation server {server.url}/completions answered 1 choices for n=2" in err, err
    assert "last checkpoint: iter_000001" in err


def test_sigterm_while_rollouts_wait_on_a_hung_server_exits_0_in_seconds(model_dir, tmp_path):
    """The real CLI in a subprocess; the server (in this process) stops answering rollouts at
    iteration 2. Before, the stop flag was read only between iterations: the run sat out every
    try of every request and then failed with exit 2."""
    server = faulty_server(model_dir, "hang")
    out = tmp_path / "vol"
    options = lora(model_dir, server.url, **{"run.out_dir": str(out), "run.name": "sig", "server.timeout": 20,
                                             "run.threads": 1})
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = start_cli(["grpo", *[f"--{k}={v}" for k, v in options.items()]], tmp_path, env)
    try:
        wait_for(server.app.hanging.is_set, timeout=120, proc=proc)
        time.sleep(0.5)  # the requests are out and waiting
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.app.released = True
        server.stop()
    assert proc.returncode == 0, output
    assert took < 5, took
    assert f"stopped by SIGTERM while iteration 2 waited on {server.url}: its requests were abandoned" in output
    assert f"the last checkpoint is iter_000001; continue with `trainer grpo --resume sig --run.out_dir={out}`" \
        in output
    assert "Traceback" not in output
    run = out / "checkpoints" / "sig"
    assert ckpt.latest_name(run) == "iter_000001" and ckpt.verify(run / "iter_000001") is None
    assert not (run / "iter_000002").exists() and not list(run.glob("*.tmp"))
    assert [r["iteration"] for r in metric_rows(out / "metrics" / "sig" / "metrics.csv")] == ["1"]
