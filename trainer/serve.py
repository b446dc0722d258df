"""`trainer serve`: an OpenAI-compatible completions server for CPU hosts and tests.

It covers the part of vLLM's API that Airlock uses, with vLLM's request and response
shapes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/load_lora_adapter,
POST /v1/unload_lora_adapter. Completions addressed to model=<lora_name> run with that
peft adapter; the base model's name runs with adapters disabled.

Sampling is seeded per choice: choice i of a prompt uses seed + i (a random seed when the
request has none), through the same sampler as the local GRPO backend, so the two give
the same completions for the same weights. Requests run one at a time under a lock (the
model and its adapters are shared state). Bad input is a 4xx with an OpenAI-style error
body {"error": {"message", "type", "param", "code"}}, never a 500.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from trainer.errors import UserError

MAX_N = 128  # completions per prompt


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: Union[str, list[str]]
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    stream: Literal[False] = False  # streaming is not served
    echo: Literal[False] = False
    user: Optional[str] = None


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False  # replace the weights of an adapter already loaded under this name


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = ""
    lora_int_id: Optional[int] = None


class ServeError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class Engine:
    """The model, its tokenizer and the loaded adapters; every call holds the lock."""

    def __init__(self, model_path: str, name: str = "", device: str = "cpu"):
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model_path}: no config.json there; pass an HF model folder "
                            "(e.g. checkpoints/<run>/final)")
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--model {model_path}: no tokenizer.json there; export the model with its tokenizer")
        self.name = name or model_path
        self.root = str(path)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.peft = None  # peft.PeftModel wrapping self.model once an adapter is loaded
        self.adapters: dict[str, str] = {}  # lora_name -> lora_path
        self.eos_id = self.model.config.eos_token_id
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else self.eos_id
        self.max_len = getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        self.lock = threading.Lock()

    # ------------------------------------------------------------ adapters

    def load_adapter(self, req: LoadLoRARequest) -> str:
        if not req.lora_name or not req.lora_path:
            raise ServeError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if req.lora_name == self.name:
            raise ServeError(400, f"lora_name {req.lora_name!r} is the base model's name; pick another.",
                             "InvalidUserInput")
        if req.lora_name in self.adapters and not req.load_inplace:
            raise ServeError(400, f"The lora adapter '{req.lora_name}' has already been loaded.", "InvalidUserInput")
        if not (Path(req.lora_path) / "adapter_config.json").is_file():
            raise ServeError(404, f"No adapter found at {req.lora_path!r} (it needs adapter_config.json).",
                             "NotFoundError", "lora_path")
        from peft import PeftModel

        with self.lock:
            if req.lora_name in self.adapters:
                self._delete(req.lora_name)
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, req.lora_path, adapter_name=req.lora_name)
                else:
                    self.peft.load_adapter(req.lora_path, adapter_name=req.lora_name)
            except Exception as e:  # a broken or mismatched adapter folder is the caller's input
                raise ServeError(400, f"cannot load adapter {req.lora_path!r}: {e}", "BadRequestError", "lora_path")
            self.peft.eval()
            self.adapters[req.lora_name] = req.lora_path
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload_adapter(self, req: UnloadLoRARequest) -> str:
        if not req.lora_name and req.lora_int_id is None:
            raise ServeError(400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput")
        if req.lora_name not in self.adapters:
            raise ServeError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "NotFoundError")
        with self.lock:
            self._delete(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def _delete(self, name: str) -> None:
        del self.adapters[name]
        if not self.adapters:
            # peft cannot run with zero adapters: strip the LoRA layers, keep the base weights
            self.model = self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def models(self) -> dict:
        now = int(time.time())
        cards = [{"id": self.name, "object": "model", "created": now, "owned_by": "airlock",
                  "root": self.root, "parent": None, "max_model_len": self.max_len}]
        cards += [{"id": n, "object": "model", "created": now, "owned_by": "airlock", "root": p,
                   "parent": self.name, "max_model_len": self.max_len} for n, p in self.adapters.items()]
        return {"object": "list", "data": cards}

    # ------------------------------------------------------------ completions

    def complete(self, req: CompletionRequest) -> dict:
        from trainer.generate import sample

        if req.model != self.name and req.model not in self.adapters:
            raise ServeError(404, f"The model `{req.model}` does not exist.", "NotFoundError", "model")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ServeError(400, "prompt must not be an empty list", param="prompt")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(s == "" for s in stops) or len(stops) > 4:
            raise ServeError(400, "stop must be up to 4 non-empty strings", param="stop")
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        for p, ids in zip(prompts, encoded):
            if not ids:
                raise ServeError(400, f"prompt {p!r} encodes to no tokens", param="prompt")
            if len(ids) + req.max_tokens > self.max_len:
                raise ServeError(400, f"This model's maximum context length is {self.max_len} tokens; the prompt "
                                 f"has {len(ids)} and max_tokens is {req.max_tokens}. Lower max_tokens.",
                                 param="max_tokens")
        # stop strings of one token stop the sampler early; longer ones are cut afterwards
        stop_ids = {self.eos_id} | {ids[0] for s in stops
                                    if len(ids := self.tokenizer.encode(s, add_special_tokens=False)) == 1}
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        rows = [ids for ids in encoded for _ in range(req.n)]
        seeds = [seed + i for _ in encoded for i in range(req.n)]
        with self.lock:
            model = self.model
            if req.model in self.adapters:
                self.peft.set_adapter(req.model)
                model = self.peft
                samples = sample(model, rows, seeds, req.max_tokens, req.temperature, req.top_p,
                                 tuple(stop_ids), self.pad_id, req.logprobs or 0)
            elif self.peft is not None:
                with self.peft.disable_adapter():
                    samples = sample(self.peft, rows, seeds, req.max_tokens, req.temperature, req.top_p,
                                     tuple(stop_ids), self.pad_id, req.logprobs or 0)
            else:
                samples = sample(model, rows, seeds, req.max_tokens, req.temperature, req.top_p,
                                 tuple(stop_ids), self.pad_id, req.logprobs or 0)
        choices, n_completion = [], 0
        for index, s in enumerate(samples):
            choice, used = self._choice(index, s, stops, req.logprobs)
            choices.append(choice)
            n_completion += used
        n_prompt = sum(len(ids) for ids in encoded)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}}

    def _choice(self, index: int, s, stops: list[str], logprobs: int | None) -> tuple[dict, int]:
        tokens, finish, stop_reason = list(s.tokens), s.finish_reason, None
        if finish == "stop":
            last = tokens.pop()  # the stop token is not part of the text (OpenAI semantics)
            if last != self.eos_id:
                stop_reason = self.tokenizer.decode([last])
        text = self.tokenizer.decode(tokens)
        for stop in stops:  # multi-token stop strings: cut at the first occurrence
            at = text.find(stop)
            if at >= 0:
                text, finish, stop_reason = text[:at], "stop", stop
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                  "stop_reason": stop_reason}
        if logprobs is not None:
            pieces = [self.tokenizer.decode([t]) for t in s.tokens]
            offsets, at = [], 0
            for piece in pieces:
                offsets.append(at)
                at += len(piece)
            choice["logprobs"] = {
                "text_offset": offsets, "token_logprobs": s.logprobs, "tokens": pieces,
                "top_logprobs": [{self.tokenizer.decode([t]): lp for t, lp in ({tok: lp0, **top}).items()}
                                 for tok, lp0, top in zip(s.tokens, s.logprobs, s.top or [{}] * len(s.tokens))],
            }
        return choice, len(s.tokens)


def create_app(model: str, name: str = "", device: str = "cpu"):
    """The FastAPI app serving the HF folder `model` (weights + tokenizer.json)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    engine = Engine(model, name, device)
    app = FastAPI(title="airlock trainer serve")
    app.state.engine = engine

    def error(status: int, message: str, type_: str, param=None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                            status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, e: ServeError):
        return error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return error(400, "; ".join(problems), "BadRequestError", problems[0].split(":")[0] if problems else None)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):  # still a JSON body; the log has the traceback
        return error(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError")

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    def models():
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

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, name: str = "", device: str = "cpu",
          log_level: str = "warning") -> None:
    """Serve the HF model folder MODEL on http://HOST:PORT/v1 (OpenAI completions API, vLLM's LoRA endpoints).

    Binds to loopback unless --host says otherwise. --name is the model id clients send
    (default: the path as given). LoRA adapters are loaded at runtime with
    POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}.
    """
    import uvicorn

    if not 0 < int(port) < 65536:
        raise UserError(f"--port {port} must be between 1 and 65535")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(model, name, device)
    print(f"serving {app.state.engine.name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)
