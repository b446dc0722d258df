"""Sampling shared by `trainer sample`, the end-of-run sample, the evaluator and GRPO rollouts.

A plain KV-cache loop over the HF model's forward, seeded through an explicit
torch.Generator so that sampling never touches the global RNG (which would shift the
dropout masks of a run that samples mid-training, and break bit-exact resume).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer import model as models


def _cumsum(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1). CUDA has no deterministic cumsum of floats, so with deterministic algorithms
    on (run.deterministic) it runs on the CPU, which keeps the end-of-run sample reproducible."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return x.cpu().cumsum(-1).to(x.device)
    return x.cumsum(-1)


@functools.cache
def _cache_name(forward) -> str:
    """The name of the KV cache in a model's forward and its output: transformers 5.25 renamed
    `past_key_values` to `cache` (the old name warns on every call until 5.40 removes it)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def forward_cached(model, cache, **inputs):
    """model(**inputs) continuing `cache` (None at first); -> (output, its cache)."""
    name = _cache_name(type(getattr(model, "get_base_model", lambda: model)()).forward)
    out = model(**inputs, **({name: cache} if cache is not None else {}))
    return out, getattr(out, name, None)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with everything outside top-k / nucleus top-p set to -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = _cumsum(probs) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, eos_id: int | None = None) -> torch.Tensor:
    """prompt (B, T) ids, all rows the same length -> (B, max_new_tokens) new ids.

    Rows that emit `eos_id` keep emitting it. Past the model's positions the context is
    cropped to the last `positions` tokens and recomputed (nanoGPT's rule) instead of cached.
    For prompts of different lengths and one seed per row, use `sample`.
    """
    was_training = model.training
    model.eval()
    positions = models.positions(model)
    idx = prompt
    out = []
    past = None
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if past is not None and idx.size(1) <= positions:
            result, past = forward_cached(model, past, input_ids=idx[:, -1:], use_cache=True)
        else:
            result, past = forward_cached(model, None, input_ids=idx[:, -positions:],
                                          use_cache=idx.size(1) < positions, logits_to_keep=1)
        past = past if idx.size(1) < positions else None
        logits = result.logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        if eos_id is not None:
            nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
            done |= nxt[:, 0] == eos_id
        out.append(nxt)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return torch.cat(out, dim=1) if out else prompt[:, :0]


def sample_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
                seed: int, device: torch.device) -> str:
    """One sample as text: only the new tokens are decoded."""
    g = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new = generate(model, prompt, max_new_tokens, temperature, top_k, generator=g)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=False)


@dataclass
class Sample:
    tokens: list[int]  # generated ids, ending with the stop/eos id when finish_reason == "stop"
    logprobs: list[float]  # log p(token) under the unmodified model (temperature 1, no top_p)
    finish_reason: str  # "stop" (eos or a stop id) | "length" (max_tokens reached)
    top: list[dict[int, float]] = field(default_factory=list)  # per step: top-k id -> logprob


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V), u (B,) uniforms in [0, 1) -> (B,) token ids by inverse CDF."""
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = _cumsum(F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1))
    # right=True: the first id whose cumulative mass exceeds u, so zero-mass ids are never picked
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
    return choice.clamp(max=cdf.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           top_logprobs: int = 0, top_k: int = 0) -> list[Sample]:
    """Batched, seeded sampling with a KV cache: one completion per row of `prompts`.

    Each row i draws its random numbers from its own torch.Generator seeded with seeds[i]
    (one uniform per step, used for inverse-CDF sampling; any int, taken modulo 2**64 as
    torch does for negative seeds), so a row's tokens depend on its prompt, its seed and
    the model: not on the other rows' seeds or prompts. That makes `trainer serve` (seed+i
    per choice) and the local backend produce the same completions for the same weights
    and seeds. Up to float rounding: the batch's size and padding change the kernels' sums
    in the last bits (float32 logits by ~1e-6), and when a uniform falls that close to a
    boundary of the CDF the token differs. Measured on a random 50257-token GPT-2 in
    float32: 1 to 4 of 48 rows of 24 tokens; none in float64.

    Prompts are left-padded; position ids count real tokens only, so padding does not
    shift a row. Finished rows keep feeding `pad_id` until every row is done.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B = len(prompts)
    uniforms = torch.stack([torch.rand(max(max_tokens, 1), generator=torch.Generator().manual_seed(int(s) % 2**64))
                            for s in seeds]).to(device)  # (B, max_tokens)
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out_tokens = torch.full((B, max_tokens), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((B, max_tokens), device=device)
    lengths = torch.full((B,), max_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tops: list[tuple[torch.Tensor, torch.Tensor]] = []
    past = None
    step_ids = ids
    for t in range(max_tokens):
        # logits of the last position only: the prefill would otherwise project every prompt
        # position onto the whole vocabulary (128 x 70 x 50,257 floats for a GRPO batch)
        out, past = forward_cached(model, past, input_ids=step_ids, attention_mask=mask, position_ids=position_ids,
                                   use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (B, V)
        nxt = _pick(logits, uniforms[:, t], temperature, top_k, top_p)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        logp = F.log_softmax(logits, dim=-1)
        out_tokens[:, t] = nxt
        out_logps[:, t] = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        if top_logprobs:
            tops.append(logp.topk(top_logprobs, dim=-1))
        stopped = ~done & torch.isin(nxt, stops)
        lengths = torch.where(stopped, torch.full_like(lengths, t + 1), lengths)
        done = done | stopped
        if bool(done.all()):
            break
        step_ids = nxt.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    samples = []
    for i in range(B):
        n = int(lengths[i])
        top = []
        if top_logprobs:
            top = [dict(zip(tops[t][1][i].tolist(), tops[t][0][i].tolist())) for t in range(n)]
        samples.append(Sample(out_tokens[i, :n].tolist(), out_logps[i, :n].tolist(),
                              "stop" if bool(done[i]) else "length", top))
    return samples
