"""Sampling shared by `trainer sample`, the end-of-run sample, the evaluator and GRPO rollouts.

A plain KV-cache loop over the HF model's forward, seeded through an explicit
torch.Generator so that sampling never touches the global RNG (which would shift the
dropout masks of a run that samples mid-training, and break bit-exact resume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positions(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with everything outside top-k / nucleus top-p set to -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, eos_id: int | None = None) -> torch.Tensor:
    """prompt (B, T) ids, all rows the same length -> (B, max_new_tokens) new ids.

    Rows that emit `eos_id` keep emitting it. Past the model's positions the context is
    cropped to the last `positions` tokens and recomputed (nanoGPT's rule) instead of cached.
    """
    was_training = model.training
    model.eval()
    positions = _positions(model)
    idx = prompt
    out = []
    past = None
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if past is not None and idx.size(1) <= positions:
            result = model(idx[:, -1:], past_key_values=past, use_cache=True)
        else:
            result = model(idx[:, -positions:], use_cache=idx.size(1) < positions)
        past = result.past_key_values if idx.size(1) < positions else None
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
