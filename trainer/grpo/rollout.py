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
  (trainer.generate.sample), in IEEE float32 on a GPU too (runtime.full_precision).
- `OpenAIBackend`: any OpenAI-compatible /v1/completions server that returns token ids
  the way vLLM does (vLLM, `trainer serve`). Each request carries a list of prompts (token
  ids) with `n`; `concurrency` requests are in flight at once and the groups come back in
  prompt order.

The server is an untrusted peer. Every answer is checked before anything is trained on it:
JSON, the model that was asked for, a choices list, and per choice "token_id:<digits>"
tokens that index the policy's embedding (an id past it would crash the trainer's forward),
one finite log-prob per id, no more ids than max_tokens. A try ends within `timeout` seconds
of wall clock from connecting to the last byte, however slowly the server sends: it runs in
a thread of its own, which the waiting side leaves at the deadline, hanging up its socket.
Refused or reset connections, bodies cut short, tries past their deadline, 5xx answers and
answers that fail a check are retried with exponential backoff; a 4xx or a redirect is
refused at once. What persists ends in one line naming the URL and the problem, with two
exceptions that skip instead: a request whose answers are never JSON with a choices list
loses its groups, and a prompt answered with fewer than n choices loses its group; both
are counted in `stats` and logged, never turned into rewards, and a batch whose every
group is skipped fails with the last reason. All the requests of one `generate` call (one iteration's
rollouts, one evaluation) end within `rollout_timeout` seconds, and a stop signal
(trainer.signals.STOP) abandons them within POLL seconds: `generate` raises `Abandoned`
and nothing of that batch is used. sync.py puts each policy version on the server and
checks that the server computes what the trainer does.

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
import math
import re
import signal
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import httpx

from trainer import runtime
from trainer import tokenizer as tk
from trainer.errors import UserError
from trainer.signals import STOP, Stopped

log = logging.getLogger(__name__)

POLL = 0.1  # seconds between looks at the stop flag and the deadlines while a request is out
MAX_ANSWER_BYTES = 64 * 2**20  # a larger answer is a fault (256 rows x 16 tokens with logprobs: ~1 MiB)
TOKEN_ID = re.compile(r"token_id:[0-9]{1,18}")  # vLLM's return_tokens_as_token_ids form, ASCII digits


class RolloutError(UserError):
    """The generation server failed in a way retries did not fix; the message names the URL."""


class MalformedAnswer(RolloutError):
    """Every answer to a request failed a check. `fatal`: no skip can work around it (an id outside
    the vocabulary says the server serves another model); otherwise the request's groups are skipped."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class BadAnswer(Exception):
    """One answer that failed a check: the request is tried again. `fatal` as in MalformedAnswer."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class Abandoned(Stopped):
    """A stop signal arrived while requests were out: they were left unanswered and nothing of
    their batch is used. A Stopped, so code that does not expect it still ends as a stop."""


class _Failed(Exception):
    """One try got no complete answer: refused, reset, cut short, or past server.timeout."""


class _TimeUp(Exception):
    """The requests of one generate() call, or one call of its own, ran past rollout_timeout."""


class _Cancelled(Exception):
    """Another request of the same generate() call failed, so this one stopped."""


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
        """n completions per prompt (token ids), or None for a prompt whose group was skipped;
        never None for all of them (a RolloutError says why instead)."""


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
        # IEEE float32 on a GPU too: the log-probs it records are compared with the trainer's (loop.py)
        with runtime.full_precision(next(self.model.parameters()).device):
            for at in range(0, len(rows), self.batch_size):
                samples += sample(self.model, rows[at:at + self.batch_size], seeds[at:at + self.batch_size],
                                  params.max_tokens, params.temperature, params.top_p, stop_ids, self.eos_id)
        self.model.train(was_training)
        out = []
        for s in samples:
            out.append(finish(self.tokenizer, s.tokens, s.logprobs, s.finish_reason, params.stop))
            self.stats["tokens"] += len(out[-1].token_ids)
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]


class Deadline:
    """What the requests of one `generate` call share: the moment they must all have ended, and a
    flag that ends them early once one of them failed (the batch is lost, the others need not
    run on). `check` also raises `Abandoned` once a stop signal arrived."""

    def __init__(self, seconds: float = 0.0):
        self.at = time.monotonic() + seconds if seconds else math.inf  # time.monotonic(); inf = no limit
        self.cancelled = threading.Event()

    def check(self) -> None:
        if STOP:
            raise Abandoned(STOP.signal or signal.SIGTERM)
        if self.cancelled.is_set():
            raise _Cancelled()
        if time.monotonic() >= self.at:
            raise _TimeUp()


class OpenAIBackend:
    def __init__(self, url: str, model: str, tokenizer, eos_id: int, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, concurrency: int = 4, request_prompts: int = 1, vocab_size: int = 0,
                 rollout_timeout: float = 0.0):
        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url  # vLLM's /health, /collective_rpc
        self.model = model  # base model name or the current adapter's lora_name
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.request_prompts = request_prompts  # prompts per request, each with n completions
        # ids at or above this are malformed: the policy's embedding rows (default: the tokenizer's vocabulary)
        self.vocab_size = vocab_size or tokenizer.get_vocab_size()
        self.rollout_timeout = rollout_timeout  # seconds per generate() call, retries included; 0 = no limit
        self.stats = {"tokens": 0, "requests": 0, "retries": 0, "malformed": 0, "short_groups": 0,
                      "skipped_groups": 0}
        self.problem = ""  # the last failed try, for the line a deadline ends in
        self.skipped = ""  # why the last group was skipped, for the line a batch of only skips ends in
        self._lock = threading.Lock()  # requests in flight update stats from several threads
        # no keep-alive: every try has a connection of its own, so a try that is left can be hung up
        # (a half-read answer never leaves a connection behind for the next); no proxies from the environment
        self.client = httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    # ------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: dict | None = None, parse: bool = True, root: bool = False,
                check=None, deadline: Deadline | None = None):
        """One call, retried on transport failures (refused, reset, cut short, past server.timeout),
        5xx and answers that are not JSON or fail `check`; a 4xx or 3xx raises at once. -> the text
        (parse=False), the JSON answer, or what `check(answer)` returns; `check` raises BadAnswer for
        an answer to retry, RolloutError for one no retry can fix. `path` is under the API's /v1, or
        under the server's root with `root`."""
        url = (self.root if root else self.url) + path
        if deadline is not None:
            return self._call(method, url, body, parse, check, deadline)
        try:  # a call of its own (a sync, a probe, /models) has the same limit as a batch of rollouts
            return self._call(method, url, body, parse, check, Deadline(self.rollout_timeout))
        except _TimeUp:
            raise RolloutError(f"generation server {url} did not answer within grpo.rollout_timeout="
                               f"{self.rollout_timeout:g}s, retries included (last problem: "
                               f"{self.problem or 'none, it is just slow'})") from None

    def _call(self, method: str, url: str, body: dict | None, parse: bool, check, deadline: Deadline):
        tries = self.retries + 1
        problem, bad = "", None
        for attempt in range(tries):
            if attempt:
                self._count("retries", 1)
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning(f"{method} {url}: {problem} (try {attempt} of {tries}); trying again in {delay:g}s")
                _pause(delay, deadline)
            deadline.check()
            try:
                status, raw = self._send(method, url, body, deadline)
            except _Failed as e:
                problem, bad = str(e), None
                self.problem = f"{method} {url}: {problem}"
                continue
            text = raw.decode("utf-8", "replace")
            if not 200 <= status < 300:
                if status < 500:  # a 4xx, or a redirect (not followed: server.url must be the server itself)
                    raise RolloutError(f"{method} {url} was refused ({status}): {_message(text[:300])}")
                problem, bad = f"HTTP {status}: {_message(text[:300])}", None
                self.problem = f"{method} {url}: {problem}"
                continue
            self._count("requests", 1)
            if not parse:
                return text
            try:
                answer = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
                bad = BadAnswer(f"answered something that is not JSON: {text[:80]!r}")
            else:
                if check is None:
                    return answer
                try:
                    return check(answer)
                except BadAnswer as e:
                    bad = e
            problem = str(bad)
            self.problem = f"{method} {url}: {problem}"
            self._count("malformed", 1)
        if bad is not None:
            raise MalformedAnswer(f"generation server {url} {bad} on every one of {tries} tries", bad.fatal)
        raise RolloutError(f"generation server {url} failed after {tries} attempts ({problem}); "
                           "check that it is running (trainer serve / vLLM) and server.url is right")

    def _send(self, method: str, url: str, body: dict | None, deadline: Deadline) -> tuple[int, bytes]:
        """One try, in a thread of its own so that it can be left: -> (status, body). It ends within
        server.timeout of wall clock (and by the deadline), however slowly the server sends: the
        waiting side leaves it then and hangs up its socket, which ends the thread's read."""
        end = min(time.monotonic() + self.timeout, deadline.at)
        late = f"no complete answer within server.timeout={self.timeout:g}s"
        box: dict = {}
        done = threading.Event()
        sockets: list = []
        threading.Thread(target=self._fetch, args=(method, url, body, end, box, done, sockets), daemon=True,
                         name="rollout-request").start()
        try:
            while not done.wait(POLL):
                deadline.check()
                if time.monotonic() >= end:
                    raise _Failed(late)
        finally:
            if not done.is_set():
                _hang_up(sockets)
        if "error" in box:  # one cause, one message, whichever side saw the time run out first
            raise _Failed(late if time.monotonic() >= end else _describe(box["error"]))
        return box["answer"]

    def _fetch(self, method: str, url: str, body, end: float, box: dict, done: threading.Event,
               sockets: list) -> None:
        """The try itself (a daemon thread): box["answer"] = (status, body) or box["error"]."""
        def trace(event: str, info: dict) -> None:  # httpcore's hook: this try's socket, for _hang_up
            stream = info.get("return_value") if isinstance(info, dict) else None
            if event.endswith(".complete") and hasattr(stream, "get_extra_info"):
                sockets.append(stream.get_extra_info("socket"))

        try:
            timeout = httpx.Timeout(max(end - time.monotonic(), 1e-3))  # each phase; `end` bounds them all
            with self.client.stream(method, url, json=body, timeout=timeout, extensions={"trace": trace}) as r:
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER_BYTES:
                        raise ValueError(f"an answer of more than {MAX_ANSWER_BYTES >> 20} MiB")
                    if time.monotonic() > end:  # a trickle: the waiting side has left already
                        raise TimeoutError("the answer took longer than server.timeout")
                box["answer"] = (r.status_code, bytes(data))
        except Exception as e:  # every failure of the try, whatever raised it, goes to the waiting side
            box["error"] = e
        finally:
            done.set()

    # ------------------------------------------------------------ rollouts

    def _block(self, j0: int, prompts: list[list[int]], n: int, seed: int, params: SamplingParams,
               deadline: Deadline) -> list[list[Completion] | None]:
        """One request for prompts j0.. of the batch; -> their groups, None where skipped."""
        body = {"model": self.model, "prompt": [list(p) for p in prompts], "n": n, "seed": seed,
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                "logprobs": 1, "return_tokens_as_token_ids": True}
        if params.stop:
            body["stop"] = list(params.stop)
        try:
            choices = self.request("POST", "/completions", body, check=lambda a: self._choices(a, params),
                                   deadline=deadline)
        except MalformedAnswer as e:
            if e.fatal:
                raise
            return self._skip(j0, len(prompts), str(e))
        # choice index = prompt position in the list * n + choice number (vLLM, OpenAI)
        by_prompt: list[list[tuple]] = [[] for _ in prompts]
        for choice in choices:
            at = choice[0] // n
            if 0 <= at < len(prompts):
                by_prompt[at].append(choice)
        groups = []
        for k, cs in enumerate(by_prompt):
            if len(cs) < n:
                self._count("short_groups", 1)
                groups += self._skip(j0 + k, 1, f"generation server {self.url}/completions answered {len(cs)} "
                                                f"choices for n={n}")
                continue
            groups.append([self._completion(*c, params) for c in sorted(cs, key=lambda c: c[0])[:n]])
        return groups

    def _skip(self, j0: int, count: int, reason: str) -> list[None]:
        self._count("skipped_groups", count)
        self.skipped = reason
        log.warning(f"prompts {j0}..{j0 + count - 1} skipped: {reason}")
        return [None] * count

    def _choices(self, answer, params: SamplingParams) -> list[tuple[int, dict, list[int], list[float]]]:
        """A completions answer, checked: -> (index, choice, sampled ids, their log-probs) per choice."""
        if not isinstance(answer, dict):
            raise BadAnswer(f"answered JSON that is not an object: {json.dumps(answer)[:80]!r}")
        if answer.get("model") not in (None, self.model):
            raise RolloutError(f"{self.url} answered with model {answer.get('model')!r} but {self.model!r} was "
                               "asked for: the server does not hold the current weights")
        choices = answer.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                    and _is_int(c.get("index", 0)) for c in choices):
            raise BadAnswer("answered without a valid choices list")
        return [(c.get("index", 0), c, *self._sampled(c, params)) for c in choices]

    def _sampled(self, c: dict, params: SamplingParams) -> tuple[list[int], list[float]]:
        """A choice's sampled ids and log-probs; each id must index the policy's embedding."""
        lp = c.get("logprobs") if isinstance(c.get("logprobs"), dict) else {}
        tokens, logprobs = lp.get("tokens"), lp.get("token_logprobs")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            raise RolloutError(f"{self.url} did not return the sampled token ids with their logprobs (asked with "
                               "\"logprobs\": 1, \"return_tokens_as_token_ids\": true); the trainer trains on "
                               "exactly the sampled ids, so use a server that returns them (vLLM, trainer serve)")
        ids = [_token_id(t) for t in tokens]
        if None in ids:
            raise BadAnswer(f"answered {tokens[ids.index(None)][:40]!r}, which is not a token id", fatal=True)
        out = next((i for i in ids if i >= self.vocab_size), None)
        if out is not None:
            raise BadAnswer(f"answered token id {out}, outside the policy's vocabulary of {self.vocab_size} "
                            f"(0..{self.vocab_size - 1})", fatal=True)
        if len(ids) > params.max_tokens:
            raise BadAnswer(f"answered {len(ids)} tokens for max_tokens={params.max_tokens}", fatal=True)
        if not isinstance(logprobs, list) or len(logprobs) != len(ids) or \
                not all(_is_number(x) and math.isfinite(x) for x in logprobs):
            count = len(logprobs) if isinstance(logprobs, list) else "no"
            raise BadAnswer(f"answered {count} log-probs for {len(ids)} token ids, or one that is not a finite "
                            "number", fatal=True)
        return ids, [float(x) for x in logprobs]

    def _completion(self, index: int, c: dict, ids: list[int], logprobs: list[float],
                    params: SamplingParams) -> Completion:
        reason = "length" if c.get("finish_reason") == "length" else "stop"
        done = finish(self.tokenizer, ids, logprobs, reason, params.stop, c["text"])
        self._count("tokens", len(done.token_ids))
        return done

    def generate(self, prompts, n, seed, params):
        deadline = Deadline(self.rollout_timeout)
        blocks = request_blocks(len(prompts), self.request_prompts)
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            futures = [pool.submit(self._block, j0, prompts[j0:j1], n, seed + j0 * n, params, deadline)
                       for j0, j1 in blocks]
            wait(futures, return_when=FIRST_EXCEPTION)
            deadline.cancelled.set()  # a request failed (or all are done): the rest stop within POLL
            for f in futures:
                f.cancel()
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            # the cause, not a request that stopped because another failed; a stop signal before all
            first = next((e for e in errors if isinstance(e, Abandoned)), None) or \
                next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
            if isinstance(first, _TimeUp):
                answered = sum(not f.cancelled() and f.exception() is None for f in futures)
                raise RolloutError(f"generation server {self.url} did not answer the {len(blocks)} requests of "
                                   f"this batch within grpo.rollout_timeout={self.rollout_timeout:g}s ({answered} "
                                   f"answered; last problem: {self.problem or 'none, the server is just slow'}); "
                                   "raise grpo.rollout_timeout if it is only slow") from None
            raise first
        groups = [group for f in futures for group in f.result()]  # in prompt order
        if all(group is None for group in groups):
            raise RolloutError(f"every group of the batch was skipped; the last reason: {self.skipped}")
        return groups

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
        def cards(answer) -> dict[str, dict]:
            data = answer.get("data", []) if isinstance(answer, dict) else None
            if not isinstance(data, list):
                raise BadAnswer("answered /models without a list of models")
            return {card.get("id"): card for card in data if isinstance(card, dict)}

        return self.request("GET", "/models", check=cards)

    def wait_ready(self) -> None:
        """One GET /v1/models with the backend's retries; raises the one-line error when down."""
        self.served_models()


def _pause(seconds: float, deadline: Deadline) -> None:
    """Sleep, looking at the stop flag and the deadline every POLL seconds."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        deadline.check()
        time.sleep(min(POLL, left))


def _hang_up(sockets: list) -> None:
    """Shut a left try's sockets down: its blocked read returns at once and its thread ends."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):  # closed already, or detached by TLS (its wrapper is in the list too)
            pass


def _describe(e: BaseException) -> str:
    """httpx's errors (RemoteProtocolError: a body cut short, ReadError, ConnectError...) as one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _token_id(token) -> int | None:
    """vLLM's "token_id:<id>" (return_tokens_as_token_ids) -> id; anything else -> None (ASCII digits only:
    str.isdigit() takes "²", which int() refuses)."""
    if isinstance(token, str) and TOKEN_ID.fullmatch(token):
        return int(token[9:])
    return None


def _message(detail: str) -> str:
    try:
        return json.loads(detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return detail
