"""Rollouts: G completions per prompt from the current policy, by one of two backends.

Both backends implement `Backend.generate(prompts, n, seed, params)` and agree on seeds:
completion i of prompt j is sampled with seed + j*n + i, the rule `trainer serve` uses
for choices (seed + i per request), so on the same weights `local` and `openai` against
`trainer serve` give the same completions.

- `LocalBackend`: batched KV-cache sampling with the policy in this process
  (trainer.generate.sample).
- `OpenAIBackend`: any OpenAI-compatible /v1/completions server (vLLM, SGLang, `trainer
  serve`). Timeout per request, retries with exponential backoff, one clear line naming
  the URL when the server stays down. A malformed answer is retried and, if it persists,
  its group is skipped; a group with fewer choices than n is skipped. Both are counted
  in `stats` and logged, never turned into rewards.
- `AdapterSync`: writes the LoRA adapter of each iteration to a shared directory, loads
  it into the server (vLLM's POST /v1/load_lora_adapter), checks that /v1/models lists
  it, points the backend at it and unloads the previous one. Every completion response
  must name the adapter that was asked for, so rollouts cannot silently come from stale
  weights.

Completion token ids (what the trainer scores) are the text's tokens followed by the
token that stopped it: the stop string when one matched, eos when the model ended, none
when max_tokens cut it (finish_reason "length", a truncated completion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
    text: str  # the answer, stop string excluded
    token_ids: list[int]  # tokens trained on: text tokens + the stopping token, if any
    finish_reason: str  # "stop" | "length" (truncated)


class Backend(Protocol):
    stats: dict

    def generate(self, prompts: list[str], n: int, seed: int,
                 params: SamplingParams) -> list[list[Completion] | None]:
        """n completions per prompt, or None for a prompt whose group was skipped."""


def cut_at_stop(text: str, stops) -> tuple[str, str | None]:
    """Text before the earliest stop string, and that string (None when none occurs)."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


def completion_ids(tokenizer, text: str, finish_reason: str, stop: str | None, eos_id: int) -> list[int]:
    ids = tokenizer.encode(text).ids if text else []
    if finish_reason == "stop":
        ids += tokenizer.encode(stop).ids if stop else [eos_id]
    return ids


class LocalBackend:
    """Sampling with the policy itself; `model` is read at call time so updates are seen."""

    def __init__(self, model, tokenizer, eos_id: int, batch_size: int = 64):
        self.model, self.tokenizer, self.eos_id, self.batch_size = model, tokenizer, eos_id, batch_size
        self.stats = {"tokens": 0}

    def generate(self, prompts, n, seed, params):
        from trainer.generate import sample

        single = {s: ids[0] for s in params.stop if len(ids := self.tokenizer.encode(s).ids) == 1}
        stop_ids = (self.eos_id, *single.values())
        rows = [self.tokenizer.encode(p).ids for p in prompts for _ in range(n)]
        seeds = [seed + j * n + i for j in range(len(prompts)) for i in range(n)]
        was_training = self.model.training
        self.model.eval()
        samples = []
        for at in range(0, len(rows), self.batch_size):
            samples += sample(self.model, rows[at:at + self.batch_size], seeds[at:at + self.batch_size],
                              params.max_tokens, params.temperature, params.top_p, stop_ids, self.eos_id)
        self.model.train(was_training)
        out = []
        for s in samples:
            self.stats["tokens"] += len(s.tokens)
            body = s.tokens[:-1] if s.finish_reason == "stop" else s.tokens
            text, stop = cut_at_stop(self.tokenizer.decode(body), params.stop)
            if stop is None and s.finish_reason == "stop":
                # stopped on a one-token stop string or eos: train on exactly the sampled tokens
                out.append(Completion(text, list(s.tokens), "stop"))
            else:
                reason = "stop" if stop else s.finish_reason
                out.append(Completion(text, completion_ids(self.tokenizer, text, reason, stop, self.eos_id), reason))
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]


class OpenAIBackend:
    def __init__(self, url: str, model: str, tokenizer, eos_id: int, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, concurrency: int = 4):
        self.url = url.rstrip("/")
        self.model = model  # base model name or the current adapter's lora_name
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.stats = {"tokens": 0, "requests": 0, "retries": 0, "malformed": 0, "short_groups": 0,
                      "skipped_groups": 0}

    # ------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: dict | None = None, parse: bool = True):
        """One call with retries on connection errors, timeouts and 5xx; 4xx raise at once."""
        url = self.url + path
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
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
            self.stats["requests"] += 1
            if not parse:
                return text
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                self.stats["malformed"] += 1
                last = f"malformed JSON: {text[:80]!r}"
                log.warning("%s %s returned malformed JSON (attempt %d)", method, url, attempt + 1)
        error = MalformedAnswer if last.startswith("malformed") else RolloutError
        raise error(f"generation server {url} failed after {self.retries + 1} attempts ({last}); "
                           "check that it is running (trainer serve / vLLM) and server.url is right")

    # ------------------------------------------------------------ rollouts

    def _one(self, j: int, prompt: str, n: int, seed: int, params: SamplingParams) -> list[Completion] | None:
        body = {"model": self.model, "prompt": prompt, "n": n, "seed": seed + j * n,
                "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens}
        if params.stop:
            body["stop"] = list(params.stop)
        try:
            answer = self.request("POST", "/completions", body)
        except MalformedAnswer as e:
            self.stats["skipped_groups"] += 1
            log.warning("prompt %d skipped: %s", j, e)
            return None
        if answer.get("model") not in (None, self.model):
            raise RolloutError(f"{self.url} answered with model {answer.get('model')!r} but {self.model!r} was "
                               "asked for: the server does not hold the current weights")
        choices = answer.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                    for c in choices):
            self.stats["malformed"] += 1
            self.stats["skipped_groups"] += 1
            log.warning("prompt %d skipped: answer without a valid choices list", j)
            return None
        if len(choices) < n:
            self.stats["short_groups"] += 1
            self.stats["skipped_groups"] += 1
            log.warning("prompt %d skipped: %d choices for n=%d", j, len(choices), n)
            return None
        choices = sorted(choices, key=lambda c: c.get("index", 0))[:n]
        out = []
        for c in choices:
            reason = "length" if c.get("finish_reason") == "length" else "stop"
            stop = c.get("stop_reason") if isinstance(c.get("stop_reason"), str) else None
            ids = completion_ids(self.tokenizer, c["text"], reason, stop, self.eos_id)
            self.stats["tokens"] += len(ids)
            out.append(Completion(c["text"], ids, reason))
        return out

    def generate(self, prompts, n, seed, params):
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda jp: self._one(jp[0], jp[1], n, seed, params), enumerate(prompts)))

    def served_models(self) -> dict[str, dict]:
        answer = self.request("GET", "/models")
        return {card.get("id"): card for card in answer.get("data", []) if isinstance(card, dict)}

    def wait_ready(self) -> None:
        """One GET /v1/models with the backend's retries; raises the one-line error when down."""
        self.served_models()


def _message(detail: str) -> str:
    try:
        return json.loads(detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return detail


@dataclass
class AdapterSync:
    """Pushes each iteration's LoRA adapter to the server through a shared directory.

    `local_dir` is where this process writes; `server_dir` is the same directory as the
    server sees it (they differ only when the two mount the volume at different paths).
    """

    backend: OpenAIBackend
    local_dir: Path
    prefix: str = "policy"
    server_dir: str = ""
    keep: int = 2  # adapter folders kept on disk
    pushed: list[str] = field(default_factory=list)

    def push(self, model, version: int) -> dict:
        t0 = time.perf_counter()
        name = f"{self.prefix}-v{version:04d}"
        path = Path(self.local_dir) / name
        tmp = path.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)  # peft: the adapter only
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        lora_path = str(Path(self.server_dir) / name) if self.server_dir else str(path.resolve())
        served = self.backend.served_models()
        body = {"lora_name": name, "lora_path": lora_path}
        if name in served:
            body["load_inplace"] = True  # a resumed run re-pushes the version it stopped at
        self.backend.request("POST", "/load_lora_adapter", body, parse=False)
        self.verify(name, lora_path)
        for old in [p for p in self.pushed if p != name]:
            if old in self.backend.served_models():
                self.backend.request("POST", "/unload_lora_adapter", {"lora_name": old}, parse=False)
        self.pushed = [p for p in self.pushed if p != name] + [name]
        # prune by listing the folder, so versions a previous (resumed) process wrote go too
        mine = re.compile(re.escape(self.prefix) + r"-v(\d+)")
        versions = sorted((p for p in Path(self.local_dir).iterdir() if mine.fullmatch(p.name)),
                          key=lambda p: int(mine.fullmatch(p.name).group(1)))
        for old in versions[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.backend.model = name
        return {"adapter": name, "adapter_sha256": digest, "sync_s": time.perf_counter() - t0}

    def verify(self, name: str, lora_path: str | None = None) -> None:
        card = self.backend.served_models().get(name)
        if card is None:
            raise RolloutError(f"{self.backend.url}/models does not list adapter {name!r} after loading it")
        if lora_path and card.get("root") not in (None, lora_path):
            raise RolloutError(f"{self.backend.url} serves {name!r} from {card.get('root')!r}, not {lora_path!r}")
