"""`trainer serve`: an OpenAI-compatible completions server for CPU hosts and tests.

vLLM is the appliance's generation server; this one is for fast tests and hosts that
cannot run vLLM-CPU. It covers the part of vLLM's API that Airlock uses, with vLLM's
request and response shapes: GET /health, GET /v1/models, POST /v1/completions, POST
/v1/load_lora_adapter, POST /v1/unload_lora_adapter, and the two calls GRPO's weight sync
makes (vLLM serves them with VLLM_SERVER_DEV_MODE=1): POST /collective_rpc {"method":
"reload_weights", "kwargs": {"weights_path": DIR}} copies DIR's *.safetensors into the
served weights in place (every parameter present, shapes equal, or nothing changes; not
while a batch runs), and POST /reset_prefix_cache (nothing is cached here).

Completions. `prompt` is a string, a list of strings, a list of token ids or a list of
lists of token ids; every prompt gets `n` choices, ordered prompt-major (choice index =
prompt_index * n + j, as vLLM). Choice j of every prompt is sampled with seed + j (a random
seed when the request has none) through trainer.generate.sample, the local GRPO backend's
sampler, so both give the same completions for the same weights, prompts and seeds.
`logprobs` are the model's log-probs at temperature 1 before top_p/top_k (vLLM's
raw_logprobs); `return_tokens_as_token_ids` writes each token as "token_id:<id>";
`return_token_ids` adds the ids themselves; `prompt_logprobs` gives every prompt token's
log-prob after the first, as vLLM's (a list starting with null, each entry keyed by token id). A stop string ends the completion at the token
in which it completes: that token is the last of logprobs.tokens, the text stops before
the string.

Batching. One worker thread owns the forward passes. Requests queue for it; each pass
takes the oldest request and every queued request for the same model with the same
sampling parameters, up to `max_num_seqs` rows, so requests that arrive while a batch runs
share the next one. A row's tokens depend on its prompt and seed, not on its batch
neighbours, up to float rounding: with float32 weights, a different batch changes logits in
the last bits, which flips a sampled token now and then (vLLM has the same property).

Adapters. Each LoRA adapter is its own peft model over a copy of the base module tree that
shares the base weights, so loading one never touches the base or another adapter: it is
built and checked (weights complete, finite logits) first and swapped in under the lock.
Which model serves a request is decided when its batch runs: a request for an adapter
unloaded while it waited is answered 404, never by another model.

Errors: OpenAI's shape {"error": {"message", "type", "param", "code"}} for every error,
FastAPI's own included (validation, a body that is not UTF-8 JSON, an unknown path): 400
for a bad request (out-of-range values, too many rows, a prompt longer than the context),
404 for an unknown model or path, 413 for a body over `max_body_bytes`; a 500 (with a
traceback in the log) is a bug.

Sizes are checked before work, so that one request cannot hold the server: the body's
length before it is parsed, the number of rows before any prompt is tokenized, and a text
prompt's length in characters before it is tokenized (more than the context times the
longest token cannot fit). Tokenizing a 20 MB prompt took 17 s and held the GIL, so that not
even /health answered meanwhile. Tokenization and generation run off the event loop (sync
endpoints run in worker threads, generation in the batching thread).
"""

from __future__ import annotations

import copy
import itertools
import random
import threading
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from trainer import model as models
from trainer import tokenizer as tk
from trainer.errors import UserError, one_line

MAX_NUM_SEQS = 256  # default cap on rows (prompts x n) per request and per forward batch
MAX_BODY_BYTES = 8 * 2**20  # default cap on a request body (256 prompts x 2048 ids as JSON: ~4 MB)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (vLLM's rule)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # seed range, as vLLM

TokenIds = list[StrictInt]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
    n: int = Field(1, ge=1)  # choices per prompt
    max_tokens: int = Field(16, ge=1)  # new tokens per choice
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # None: 1.0
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)  # None: 1.0
    top_k: Optional[int] = Field(None, ge=-1)  # None, 0 or -1: off (vLLM)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[TokenIds] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: Optional[bool] = None
    return_token_ids: Optional[bool] = None
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: Literal[False] = False  # streaming is not served
    echo: Literal[False] = False
    user: Optional[str] = None


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False  # replace the weights of an adapter already loaded under this name


class RPCRequest(BaseModel):
    method: str
    args: list = []
    kwargs: dict[str, str] = {}
    timeout: Optional[float] = None


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = ""
    lora_int_id: Optional[int] = None


class ServeError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def not_found(model: str) -> ServeError:
    return ServeError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


class Params(NamedTuple):
    """What `sample` takes besides rows and seeds; requests batch together only when equal."""
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: tuple[int, ...]
    top_logprobs: int


@dataclass
class Job:
    """One request's rows, waiting for the worker."""
    model: str  # the name asked for; resolved to a module when its batch runs
    params: Params
    rows: list[list[int]]  # token ids, prompt-major, n per prompt
    seeds: list[int]
    n: int = 1  # rows per prompt
    prompt_logprobs: Optional[int] = None  # also score the prompts, with this many top entries
    future: Future = field(default_factory=Future)


def share_weights(model):
    """A copy of `model`'s module tree whose parameters and buffers are `model`'s own tensors.

    peft injects LoRA layers by replacing modules; doing that in the copy leaves the served
    base model's modules as they were, and costs no second copy of the weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Engine:
    """The base model, its tokenizer, the loaded adapters and the batching worker."""

    def __init__(self, model_path: str, name: str = "", device: str = "cpu", max_num_seqs: int = MAX_NUM_SEQS):
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model_path}: no config.json there; pass an HF model folder "
                            "(e.g. checkpoints/<run>/final)")
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--model {model_path}: no tokenizer.json there; export the model with its tokenizer")
        if int(max_num_seqs) < 1:
            raise UserError(f"--max_num_seqs {max_num_seqs} must be at least 1")
        self.name = name or model_path
        self.root = str(path)
        # the Rust tokenizer itself: thread-safe, unlike the transformers wrapper's padding state
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        config = self.model.config
        # one id (GPT-2) or several (Llama 3 lists its end-of-text and end-of-turn tokens): any of them stops
        eos = config.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
        self.eos_id = (eos[0] if eos else None) if isinstance(eos, (list, tuple)) else eos
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (self.eos_id or 0)
        self.max_len = models.positions(self.model)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        # a token covers at most its vocabulary entry's characters (byte-level BPE: one per byte), so a text
        # longer than max_len times the longest entry cannot fit the context: refused before tokenizing it
        longest = max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = self.max_len * max(longest, 1)
        self.max_num_seqs = int(max_num_seqs)

        self.adapters: dict[str, tuple[str, object]] = {}  # lora_name -> (lora_path, peft model)
        self.lock = threading.Lock()  # guards self.adapters: which models are served
        self.weights_lock = threading.Lock()  # held by a forward batch and by a weight reload
        self.queue: deque[Job] = deque()
        self.wakeup = threading.Condition()  # guards self.queue and self.closed
        self.closed = False
        self.worker = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
        self.worker.start()

    def close(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify_all()
        self.worker.join(timeout=30)

    # ------------------------------------------------------------ adapters

    def load_adapter(self, req: LoadLoRARequest) -> str:
        if not req.lora_name or not req.lora_path:
            raise ServeError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if req.lora_name == self.name:
            raise ServeError(400, f"lora_name {req.lora_name!r} is the base model's name; pick another.",
                             "InvalidUserInput")
        if not (Path(req.lora_path) / "adapter_config.json").is_file():
            raise ServeError(404, f"No adapter found at {req.lora_path!r} (it needs adapter_config.json).",
                             "NotFoundError", "lora_path")
        if not (Path(req.lora_path) / "adapter_model.safetensors").is_file():  # weights that execute no code
            raise ServeError(400, f"cannot load adapter {req.lora_path!r}: no adapter_model.safetensors there "
                             "(peft's save_pretrained writes it)", "BadRequestError", "lora_path")
        self._check_new_name(req)
        adapter = self._build_adapter(req.lora_name, req.lora_path)
        with self.lock:
            self._check_new_name(req)  # another load may have taken the name while this one was built
            self.adapters[req.lora_name] = (req.lora_path, adapter)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def _check_new_name(self, req: LoadLoRARequest) -> None:
        if req.lora_name in self.adapters and not req.load_inplace:
            raise ServeError(400, f"The lora adapter '{req.lora_name}' has already been loaded. If you want to "
                             "load the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")

    def _build_adapter(self, name: str, path: str):
        """The adapter as a peft model over shared base weights, checked before anyone can use it.

        Any failure leaves nothing behind: the half-built copy is dropped, the base and the
        other adapters never saw it."""
        import torch
        from peft import PeftConfig, PeftModel, PeftType

        try:
            config = PeftConfig.from_pretrained(path)
            if config.peft_type != PeftType.LORA:
                raise ValueError(f"it is a {config.peft_type} adapter; only LoRA adapters are served")
            # every LoRA weight comes from the file; an init like PiSSA would rewrite the shared base weights
            config.init_lora_weights = True
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                adapter = PeftModel.from_pretrained(share_weights(self.model), path, adapter_name=name,
                                                    config=config)
            missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
            if missing:
                raise ValueError(missing[0])
            adapter.eval()
            probe = torch.tensor([[self.pad_id]], device=next(self.model.parameters()).device)
            with torch.no_grad():
                if not torch.isfinite(adapter(input_ids=probe).logits).all():
                    raise ValueError("its weights give non-finite logits")
        except Exception as e:  # a broken or mismatched adapter folder is the caller's input
            raise ServeError(400, f"cannot load adapter {path!r}: {one_line(e, 400)}", "BadRequestError",
                             "lora_path") from None
        return adapter

    def reload_weights(self, weights_path: str | None) -> None:
        """The base weights from `weights_path`'s *.safetensors (default: the folder served), in
        place, so adapters built over them see them too. All checked before anything is copied."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(weights_path or self.root)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise ServeError(400, f"no *.safetensors weights in {str(path)!r}", param="weights_path")
        state = {}
        try:
            for f in files:
                state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ServeError(400, f"cannot read the weights in {str(path)!r}: {one_line(e, 400)}",
                             param="weights_path") from None
        params = dict(self.model.named_parameters())  # a tied lm_head is wte's tensor: listed once
        served = self.model.state_dict()
        missing = [k for k in params if k not in state]
        unknown = [k for k in state if k not in served]
        wrong = [k for k in state if k in served and state[k].shape != served[k].shape]
        if missing or unknown or wrong:
            what = (f"missing {missing[:3]}" if missing else f"unknown {unknown[:3]}" if unknown
                    else f"shape of {wrong[0]} {tuple(state[wrong[0]].shape)} != {tuple(served[wrong[0]].shape)}")
            raise ServeError(400, f"the weights in {str(path)!r} do not fit the served model: {what}",
                             param="weights_path")
        with self.weights_lock:
            for key, tensor in state.items():
                served[key].copy_(tensor.to(served[key].dtype))

    def unload_adapter(self, req: UnloadLoRARequest) -> str:
        if not req.lora_name and req.lora_int_id is None:
            raise ServeError(400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput")
        with self.lock:
            if self.adapters.pop(req.lora_name, None) is None:
                raise ServeError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "NotFoundError")
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def resolve(self, name: str):
        """The module serving `name` now, or None."""
        if name == self.name:
            return self.model
        with self.lock:
            entry = self.adapters.get(name)
        return entry[1] if entry else None

    def models(self) -> dict:
        now = int(time.time())
        with self.lock:
            adapters = [(n, p) for n, (p, _) in self.adapters.items()]
        cards = [{"id": self.name, "object": "model", "created": now, "owned_by": "airlock",
                  "root": self.root, "parent": None, "max_model_len": self.max_len}]
        cards += [{"id": n, "object": "model", "created": now, "owned_by": "airlock", "root": p,
                   "parent": self.name, "max_model_len": self.max_len} for n, p in adapters]
        return {"object": "list", "data": cards}

    # ------------------------------------------------------------ completions

    def complete(self, req: CompletionRequest) -> dict:
        if self.resolve(req.model) is None:
            raise not_found(req.model)
        count = 1 if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else len(req.prompt)
        if count * req.n > self.max_num_seqs:  # before any prompt is tokenized
            raise ServeError(400, f"{count} prompts x n={req.n} is {count * req.n} completions; this "
                             f"server takes at most {self.max_num_seqs} per request (--max_num_seqs). Send fewer "
                             "prompts per request.", param="n")
        prompts = self._prompt_ids(req.prompt)
        for i, ids in enumerate(prompts):
            if len(ids) + req.max_tokens > self.max_len:
                raise ServeError(400, f"This model's maximum context length is {self.max_len} tokens; prompt {i} "
                                 f"has {len(ids)} and max_tokens is {req.max_tokens}. Lower max_tokens or shorten "
                                 "the prompt.", param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(s == "" for s in stops) or len(stops) > 4:
            raise ServeError(400, "stop must be up to 4 non-empty strings", param="stop")
        stop_token_ids = list(req.stop_token_ids or [])
        if any(not 0 <= t < self.vocab_size for t in stop_token_ids):
            raise ServeError(400, f"stop_token_ids must be token ids below {self.vocab_size}", param="stop_token_ids")
        # stop strings of one token stop the sampler early; longer ones are cut afterwards
        single = {ids[0] for s in stops if len(ids := self.tokenizer.encode(s, add_special_tokens=False).ids) == 1}
        eos = set(self.eos_ids)
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < SAMPLING_EPS:  # greedy: top_p and top_k change nothing, so let such requests batch
            temperature, top_p, top_k = 0.0, 1.0, 0
        else:
            top_p = 1.0 if req.top_p is None else req.top_p
            top_k = max(req.top_k or 0, 0)
        params = Params(req.max_tokens, temperature, top_p, top_k, tuple(sorted(eos | single | set(stop_token_ids))),
                        req.logprobs or 0)
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        rows = [ids for ids in prompts for _ in range(req.n)]
        seeds = [seed + j for _ in prompts for j in range(req.n)]  # choice j of every prompt: seed + j
        samples, scored = self._submit(Job(req.model, params, rows, seeds, req.n, req.prompt_logprobs)).result()

        choices, n_completion = [], 0
        for index, s in enumerate(samples):
            choice, used = self._choice(index, s, stops, set(stop_token_ids), req, prompts[index // req.n])
            if scored is not None:
                choice["prompt_logprobs"] = scored[index // req.n]
            choices.append(choice)
            n_completion += used
        n_prompt = sum(len(ids) for ids in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}}

    def _prompt_ids(self, prompt) -> list[list[int]]:
        """Every prompt form as token-id lists, each non-empty and inside the vocabulary."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ServeError(400, "prompt must not be an empty list", param="prompt")
        if isinstance(prompt[0], int):
            prompts = [prompt]  # one prompt of token ids
        elif isinstance(prompt[0], str):
            for i, text in enumerate(prompt):
                if len(text) > self.max_prompt_chars:
                    raise ServeError(400, f"prompt {i} has {len(text)} characters; this model's context of "
                                     f"{self.max_len} tokens holds at most {self.max_prompt_chars}. Shorten the "
                                     "prompt.", param="prompt")
            # as vLLM: with the tokenizer's own special tokens (a Llama tokenizer's BOS; GPT-2's adds none)
            prompts = [self.tokenizer.encode(p).ids for p in prompt]
        else:
            prompts = prompt
        for i, ids in enumerate(prompts):
            if not ids:
                raise ServeError(400, f"prompt {i} has no tokens (an empty prompt cannot be continued)",
                                 param="prompt")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ServeError(400, f"prompt {i}: token id {bad} is out of vocabulary (0..{self.vocab_size - 1})",
                                 param="prompt")
        return prompts

    def _choice(self, index: int, s, stops: list[str], stop_token_ids: set[int], req: CompletionRequest,
                prompt: list[int]) -> tuple[dict, int]:
        tokens, finish, stop_reason = list(s.tokens), s.finish_reason, None
        body = tokens[:-1] if finish == "stop" else tokens  # the stop token is not part of the text
        text = self.decode(body)
        if stops and any(stop in text for stop in stops):
            # a stop string ends the completion at the token in which it completes, as in vLLM
            k = tk.stop_prefix(self.decode, body, stops)
            tokens, body = tokens[:k], tokens[:k]
            text = self.decode(body)
            at, stop_reason = min((text.find(stop), stop) for stop in stops if stop in text)
            text, finish = text[:at], "stop"
        elif finish == "stop" and tokens[-1] not in self.eos_ids:
            last = tokens[-1]
            stop_reason = last if last in stop_token_ids else self.decode([last])
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                  "stop_reason": stop_reason, "token_ids": None, "prompt_token_ids": None}
        if req.return_token_ids:
            choice["token_ids"], choice["prompt_token_ids"] = tokens, list(prompt)
        if req.logprobs is not None:
            name = (lambda t: f"token_id:{t}") if req.return_tokens_as_token_ids else (lambda t: self.decode([t]))
            pieces = [name(t) for t in tokens]
            offsets = list(itertools.accumulate([0] + [len(p) for p in pieces[:-1]])) if pieces else []
            lps = [max(lp, -9999.0) for lp in s.logprobs[:len(tokens)]]  # JSON has no -inf
            tops = s.top[:len(tokens)] if s.top else [{}] * len(tokens)
            choice["logprobs"] = {
                "text_offset": offsets, "token_logprobs": lps, "tokens": pieces,
                "top_logprobs": [{name(t): max(v, -9999.0) for t, v in ({tok: lp, **top}).items()}
                                 for tok, lp, top in zip(tokens, lps, tops)],
            }
        return choice, len(tokens)

    def _score_prompts(self, model, prompts: list[list[int]], top: int) -> list[list]:
        """vLLM's prompt_logprobs: per prompt [None, {id: {logprob, rank, decoded_token}}, ...],
        the prompt's own token and the `top` most likely ones at each position (temperature 1)."""
        import torch

        device = next(model.parameters()).device
        out = []
        for ids in prompts:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1)
            rows = [None]
            for pos, token in enumerate(ids[1:]):
                row = logps[pos]
                entry = {token: float(row[token])}
                if top:
                    values, index = row.topk(top)
                    entry.update({int(t): float(v) for t, v in zip(index, values)})
                rows.append({str(t): {"logprob": max(v, -9999.0), "rank": int((row > v).sum()) + 1,
                                      "decoded_token": self.decode([t])} for t, v in entry.items()})
            out.append(rows)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------ the batching worker

    def _submit(self, job: Job) -> Future:
        with self.wakeup:
            if self.closed:
                raise ServeError(503, "the server is shutting down", "ServiceUnavailableError")
            self.queue.append(job)
            self.wakeup.notify()
        return job.future

    def _next_batch(self) -> list[Job]:
        """The oldest job and every queued job that can share its forward pass, in arrival order."""
        head = self.queue.popleft()
        batch, rows = [head], len(head.rows)
        for job in list(self.queue):
            if job.model == head.model and job.params == head.params and rows + len(job.rows) <= self.max_num_seqs:
                self.queue.remove(job)
                batch.append(job)
                rows += len(job.rows)
        return batch

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.queue and not self.closed:
                    self.wakeup.wait()
                if self.closed:
                    for job in self.queue:
                        job.future.set_exception(ServeError(503, "the server is shutting down",
                                                            "ServiceUnavailableError"))
                    self.queue.clear()
                    return
                batch = self._next_batch()
            try:
                self._run(batch)
            except Exception as e:  # a bug: its requests answer 500 with it, the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run(self, batch: list[Job]) -> None:
        from trainer.generate import sample

        head = batch[0]
        model = self.resolve(head.model)  # now, not when the request came in: it may have been unloaded since
        if model is None:
            for job in batch:
                job.future.set_exception(not_found(job.model))
            return
        p = head.params
        rows = [r for job in batch for r in job.rows]
        seeds = [s for job in batch for s in job.seeds]
        with self.weights_lock:
            samples = sample(model, rows, seeds, p.max_tokens, p.temperature, p.top_p, p.stop_ids, self.pad_id,
                             p.top_logprobs, p.top_k)
            scored = [None if job.prompt_logprobs is None else
                      self._score_prompts(model, job.rows[::job.n], job.prompt_logprobs) for job in batch]
        at = 0
        for job, score in zip(batch, scored):
            job.future.set_result((samples[at:at + len(job.rows)], score))
            at += len(job.rows)


def error_body(status: int, message: str, type_: str, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before any of it is
    parsed (a Content-Length over it before a byte is read); a body within it is read whole and
    handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(scope, receive, send, int(length))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send, size)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when the client goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send, size: int):
        from fastapi.responses import JSONResponse

        what = f"{size} bytes" if size > self.limit + 1 else f"more than {self.limit} bytes"
        message = f"the request body has {what}; this server takes at most {self.limit}"
        await JSONResponse(error_body(413, message, "BadRequestError"), status_code=413)(scope, receive, send)


def create_app(model: str, name: str = "", device: str = "cpu", max_num_seqs: int = MAX_NUM_SEQS,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving the HF folder `model` (weights + tokenizer.json)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException

    engine = Engine(model, name, device, max_num_seqs)

    @asynccontextmanager
    async def lifespan(_):
        yield
        engine.close()

    app = FastAPI(title="airlock trainer serve", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    def error(status: int, message: str, type_: str, param=None) -> JSONResponse:
        return JSONResponse(error_body(status, message, type_, param), status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, e: ServeError):
        return error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        problems: dict[str, str] = {}  # field -> its first problem
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            where = loc[0] if loc and err.get("type") != "json_invalid" else "body"
            if where == "prompt" and err.get("type") != "missing":
                problems.setdefault(where, "must be a string, a list of strings, a list of token ids or a list of "
                                           "lists of token ids")
            else:
                problems.setdefault(where, err.get("msg", "invalid"))
        message = "; ".join(f"{k}: {v}" for k, v in problems.items())
        return error(400, message, "BadRequestError", next(iter(problems), None))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException):  # FastAPI's own: unknown path, wrong method, unparseable body
        cause = e.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI says only "There was an error parsing the body"
            return error(400, f"body: not UTF-8 JSON ({cause.reason} at byte {cause.start})", "BadRequestError",
                         "body")
        type_ = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(e.status_code, "BadRequestError")
        return error(e.status_code, str(e.detail), type_ if e.status_code < 500 else "InternalServerError")

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):  # still a JSON body; the log has the traceback
        return error(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError")

    # async: answered on the event loop even while every worker thread waits for a batch
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return engine.models()

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return engine.complete(req)

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(req: LoadLoRARequest):
        return PlainTextResponse(engine.load_adapter(req))

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(req: UnloadLoRARequest):
        return PlainTextResponse(engine.unload_adapter(req))

    @app.post("/collective_rpc")
    def collective_rpc(req: RPCRequest):
        if req.method != "reload_weights":
            raise ServeError(400, f"method {req.method!r} is not served here; trainer serve runs reload_weights only",
                             param="method")
        engine.reload_weights(req.kwargs.get("weights_path"))
        return {"results": [None]}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        return {"success": True}  # nothing is cached between requests here

    return app
