"""Rollouts: G completions per prompt from the current policy, by one of two backends.

Both backends implement `Backend.generate(prompts, n, seed, params)`, where each prompt is
a list of token ids: the trainer tokenizes a prompt once, sends those ids (vLLM takes a
list of ints as a prompt, a list of lists for a batch) and trains on the same ids, so the
prompt is identical on both sides.

Seeds. Prompts go out `request_prompts` at a time, one list (with `n`) per request
(`request_blocks`). The request starting at prompt j0 carries seed seed + j0*n, and
completion i of each of its prompts is sampled with that seed + i: the rule vLLM and
`trainer serve` apply to a request's choices (every prompt of a list gets the same
per-choice seeds). The local backend applies the same rule, so on the same weights `local`
and `openai` against `trainer serve` give the same completions. With request_prompts = 1
(the default) that is seed + j*n + i: every completion of a batch has its own seed. With
more, the prompts of one request draw the same random numbers and their groups are
correlated: each completion is still a sample of its prompt's distribution, but similar
prompts get near-identical groups, and GRPO learns from fewer independent ones (measured
on test_learning's repeat task: held-out reward 0.60 after 12 iterations with independent
groups, 0.25 with all 16 prompts in one request). Servers batch concurrent requests
themselves (vLLM, `trainer serve`): `concurrency` requests in flight fill their batches.

- `LocalBackend`: batched KV-cache sampling with the policy in this process
  (trainer.generate.sample).
- `OpenAIBackend`: any OpenAI-compatible /v1/completions server that returns token ids
  the way vLLM does (vLLM, `trainer serve`). Each request carries a list of prompts (token
  ids) with `n`; `concurrency` requests are in flight at once and the groups come back in
  prompt order. Timeout per request, retries with exponential backoff, one clear line
  naming the URL when the server stays down. A malformed answer is retried and, if it
  persists, its request's groups are skipped; a group with fewer choices than n is skipped.
  Both are counted in `stats` and logged, never turned into rewards.
Every completion response must name the model that was asked for; sync.py puts each
policy version on the server and checks that the server computes what the trainer does.

What is trained: the sampled ids, as sampled, never decoded and re-encoded (for GPT-2 BPE
that is not the identity: sampled "a", "b" re-encodes to "ab"). The server is asked for
them with `"logprobs": 1, "return_tokens_as_token_ids": true`, which makes vLLM write each
sampled token as "token_id:<id>" in choices[i].logprobs.tokens next to its log-prob; the
local sampler keeps its ids. A completion's ids run up to and including the token that
ended it: eos, or the token in which a stop string completes (the shortest prefix of the
ids whose text contains one, which is where vLLM stops), or the max_tokens-th token
(finish_reason "length", a truncated completion). When a stop string ends inside a token
(stop "\n", sampled token "\n\n"), that whole token is trained on: the policy
chose it, and choosing it ended the answer. The text the reward sees is the text before
the stop string; what the completing token holds after it is seen by no reward. With each
id comes the sampler's log-prob of it (temperature 1, before top_p: vLLM's default
raw_logprobs), which the trainer compares with its own (algorithm.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from trainer import tokenizer as tk
from trainer.errors import UserError

log = logging.getLogger(__name__)


class RolloutError(UserError):
    """The generation server failed in a way retries did not fix; the message names the URL."""


class MalformedAnswer(RolloutError):
    """The server answered, but not with JSON, every time it was asked."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens per completion
    temperature: float = 1.0  # softmax temperature
    top_p: float = 1.0  # nucleus mass
    stop: tuple[str, ...] = ()  # stop strings (not part of the text)


@dataclass
class Completion:
    text: str  # the answer: the text before the stop string
    token_ids: list[int]  # the sampled ids, trained on as they are (see the module docstring)
    logprobs: list[float]  # the sampler's log-prob of each id (temperature 1, before top_p)
    finish_reason: str  # "stop" | "length" (truncated)


class Backend(Protocol):
    stats: dict

    def generate(self, prompts: list[list[int]], n: int, seed: int,
                 params: SamplingParams) -> list[list[Completion] | None]:
        """n completions per prompt (token ids), or None for a prompt whose group was skipped."""


def request_blocks(num_prompts: int, per_request: int) -> list[tuple[int, int]]:
    """[start, end) prompt ranges of `per_request` prompts (the last may be shorter): one request each."""
    per = max(1, per_request)
    return [(j, min(j + per, num_prompts)) for j in range(0, num_prompts, per)]


def cut_at_stop(text: str, stops) -> tuple[str, str | None]:
    """Text before the earliest stop string, and that string (None when none occurs)."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


def finish(tokenizer, ids: list[int], logprobs: list[float], finish_reason: str, stops,
           text: str | None = None) -> Completion:
    """A completion from sampled ids: cut after the token that completes a stop string (a no-op
    when the sampler already stopped there) and the text before the stop string. `text`: the
    server's text, when it sent one; otherwise the ids are decoded."""
    k = tk.stop_prefix(tokenizer.decode, ids, stops)
    if k is not None:
        ids, logprobs, finish_reason = ids[:k], logprobs[:k], "stop"
    if text is None:
        text = tokenizer.decode(ids)  # eos is a special token: not in the text
    return Completion(cut_at_stop(text, stops)[0], list(ids), list(logprobs), finish_reason)


class LocalBackend:
    """Sampling with the policy itself; `model` is read at call time so updates are seen."""

    def __init__(self, model, tokenizer, eos_id: int, batch_size: int = 64, request_prompts: int = 1):
        self.model, self.tokenizer, self.eos_id, self.batch_size = model, tokenizer, eos_id, batch_size
        self.request_prompts = request_prompts  # only for the seed rule: the local backend sends no requests
        self.stats = {"tokens": 0}

    def generate(self, prompts, n, seed, params):
        from trainer.generate import sample

        # one-token stop strings stop the sampler early; longer ones are cut afterwards (finish)
        single = {s: ids[0] for s in params.stop if len(ids := self.tokenizer.encode(s).ids) == 1}
        stop_ids = (self.eos_id, *single.values())
        rows, seeds = [], []
        for j0, j1 in request_blocks(len(prompts), self.request_prompts):
            for j in range(j0, j1):
                rows += [list(prompts[j])] * n
                seeds += [seed + j0 * n + i for i in range(n)]
        was_training = self.model.training
        self.model.eval()
        samples = []
        for at in range(0, len(rows), self.batch_size):
            samples += sample(self.model, rows[at:at + self.batch_size], seeds[at:at + self.batch_size],
                              params.max_tokens, params.temperature, params.top_p, stop_ids, self.eos_id)
        self.model.train(was_training)
        out = []
        for s in samples:
            out.append(finish(self.tokenizer, s.tokens, s.logprobs, s.finish_reason, params.stop))
            self.stats["tokens"] += len(out[-1].token_ids)
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]


class OpenAIBackend:
    def __init__(self, url: str, model: str, tokenizer, eos_id: int, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, concurrency: int = 4, request_prompts: int = 1):
        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url  # vLLM's /health, /collective_rpc
        self.model = model  # base model name or the current adapter's lora_name
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.request_prompts = request_prompts  # prompts per request, each with n completions
        self.stats = {"tokens": 0, "requests": 0, "retries": 0, "malformed": 0, "short_groups": 0,
                      "skipped_groups": 0}
        self._lock = threading.Lock()  # requests in flight update stats from several threads

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    # ------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: dict | None = None, parse: bool = True, root: bool = False):
        """One call with retries on connection errors, timeouts and 5xx; 4xx raise at once.
        `path` is under the API's /v1, or under the server's root with `root`."""
        url = (self.root if root else self.url) + path
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries", 1)
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    text = r.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if 400 <= e.code < 500:
                    raise RolloutError(f"{method} {url} was refused ({e.code}): {_message(detail)}") from None
                last = f"HTTP {e.code}: {_message(detail)}"
                continue
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                last = str(getattr(e, "reason", e))
                continue
            self._count("requests", 1)
            if not parse:
                return text
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                self._count("malformed", 1)
                last = f"malformed JSON: {text[:80]!r}"
                log.warning("%s %s returned malformed JSON (attempt %d)", method, url, attempt + 1)
        error = MalformedAnswer if last.startswith("malformed") else RolloutError
        raise error(f"generation server {url} failed after {self.retries + 1} attempts ({last}); "
                           "check that it is running (trainer serve / vLLM) and server.url is right")

    # ------------------------------------------------------------ rollouts

    def _block(self, j0: int, prompts: list[list[int]], n: int, seed: int,
               params: SamplingParams) -> list[list[Completion] | None]:
        """One request for prompts j0.. of the batch; -> their groups, None where skipped."""
        body = {"model": self.model, "prompt": [list(p) for p in prompts], "n": n, "seed": seed,
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                "logprobs": 1, "return_tokens_as_token_ids": True}
        if params.stop:
            body["stop"] = list(params.stop)
        where = f"prompts {j0}..{j0 + len(prompts) - 1}"
        try:
            answer = self.request("POST", "/completions", body)
        except MalformedAnswer as e:
            self._count("skipped_groups", len(prompts))
            log.warning("%s skipped: %s", where, e)
            return [None] * len(prompts)
        if not isinstance(answer, dict):
            answer = {}
        if answer.get("model") not in (None, self.model):
            raise RolloutError(f"{self.url} answered with model {answer.get('model')!r} but {self.model!r} was "
                               "asked for: the server does not hold the current weights")
        choices = answer.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                    and isinstance(c.get("index", 0), int) for c in choices):
            self._count("malformed", 1)
            self._count("skipped_groups", len(prompts))
            log.warning("%s skipped: answer without a valid choices list", where)
            return [None] * len(prompts)
        # choice index = prompt position in the list * n + choice number (vLLM, OpenAI)
        by_prompt: list[list[dict]] = [[] for _ in prompts]
        for c in choices:
            at = c.get("index", 0) // n
            if 0 <= at < len(prompts):
                by_prompt[at].append(c)
        groups = []
        for k, cs in enumerate(by_prompt):
            if len(cs) < n:
                self._count("short_groups", 1)
                self._count("skipped_groups", 1)
                log.warning("prompt %d skipped: %d choices for n=%d", j0 + k, len(cs), n)
                groups.append(None)
                continue
            groups.append([self._completion(c, params) for c in sorted(cs, key=lambda c: c.get("index", 0))[:n]])
        return groups

    def _completion(self, c: dict, params: SamplingParams) -> Completion:
        lp = c.get("logprobs") if isinstance(c.get("logprobs"), dict) else {}
        tokens, logprobs = lp.get("tokens"), lp.get("token_logprobs")
        ids = [_token_id(t) for t in tokens] if isinstance(tokens, list) else None
        if ids is None or None in ids or not isinstance(logprobs, list) or len(logprobs) != len(ids) \
                or not all(isinstance(x, (int, float)) for x in logprobs):
            raise RolloutError(f"{self.url} did not return the sampled token ids with their logprobs (asked with "
                               "\"logprobs\": 1, \"return_tokens_as_token_ids\": true); the trainer trains on "
                               "exactly the sampled ids, so use a server that returns them (vLLM, trainer serve)")
        reason = "length" if c.get("finish_reason") == "length" else "stop"
        done = finish(self.tokenizer, ids, [float(x) for x in logprobs], reason, params.stop, c["text"])
        self._count("tokens", len(done.token_ids))
        return done

    def generate(self, prompts, n, seed, params):
        blocks = request_blocks(len(prompts), self.request_prompts)
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            answers = pool.map(lambda b: self._block(b[0], prompts[b[0]:b[1]], n, seed + b[0] * n, params), blocks)
            return [group for groups in answers for group in groups]  # map keeps the prompt order

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """The served model's log-prob of each prompt token after the first (vLLM's prompt_logprobs)."""
        answer = self.request("POST", "/completions", {"model": self.model, "prompt": list(ids), "max_tokens": 1,
                                                       "temperature": 0.0, "prompt_logprobs": 0})
        try:
            rows = answer["choices"][0]["prompt_logprobs"][1:]
            return [float(row[str(t)]["logprob"]) for row, t in zip(rows, ids[1:], strict=True)]
        except (KeyError, IndexError, TypeError, ValueError):
            raise RolloutError(f"{self.url}/completions did not return the prompt's log-probs (asked with "
                               "\"prompt_logprobs\": 0), which the weight-sync check needs; use vLLM or trainer "
                               "serve") from None

    def served_models(self) -> dict[str, dict]:
        answer = self.request("GET", "/models")
        return {card.get("id"): card for card in answer.get("data", []) if isinstance(card, dict)}

    def wait_ready(self) -> None:
        """One GET /v1/models with the backend's retries; raises the one-line error when down."""
        self.served_models()


def _token_id(token) -> int | None:
    """vLLM's "token_id:<id>" (return_tokens_as_token_ids) -> id; anything else -> None."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    return None


def _message(detail: str) -> str:
    try:
        return json.loads(detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return detail
