"""Batched, seeded sampling with a KV cache: the one sampler behind `trainer serve` and
the local GRPO rollouts.

Each row i draws its random numbers from its own torch.Generator seeded with seeds[i]
(one uniform per step, used for inverse-CDF sampling), so a row's tokens depend on its
seed and the model only: not on the batch it shares, its position in it, or the other
rows' lengths. That makes `trainer serve` (seed+i per choice) and the local backend
produce the same completions for the same weights and seeds.

Prompts are left-padded; position ids count real tokens only, so padding does not
shift a row. Finished rows keep feeding `pad_id` until every row is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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


def _pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (B, V), u (B,) uniforms in [0, 1) -> (B,) token ids by inverse CDF."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return choice.squeeze(-1) if order is None else order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int], max_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           top_logprobs: int = 0) -> list[Sample]:
    """Sample one completion per prompt row; prompts[i] is sampled with seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B = len(prompts)
    uniforms = torch.stack([torch.rand(max(max_tokens, 1), generator=torch.Generator().manual_seed(int(s)))
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
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        nxt = _pick(logits, uniforms[:, t], temperature, top_p)
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
