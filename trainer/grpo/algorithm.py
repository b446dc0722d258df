r"""The GRPO objective, written as the formulas below.

Rewards r (B problems x G completions each). Group-relative advantage of completion i in
group g, the same for every token of the completion:

    A_gi = (r_gi - mean_g(r)) / (std + eps)
    std  = std_g(r)   scale_rewards="group" (sample std over the G completions)
         = std(r)     scale_rewards="batch" (over all B*G rewards; Dr. GRPO-style robustness)
         = 1, eps=0   scale_rewards="none"  (A = r - mean_g, no scaling)

A group whose rewards are all equal (std_g == 0) carries no signal: its advantages are
exactly 0 and it is counted (`zero_std_groups`), never divided by zero.

The tokens y_t are exactly the ids the sampler drew (never text re-encoded), scored after
the prompt ids that were sent to it. Every log-prob below is of the policy's logits divided
by the rollout temperature tau, as TRL scores them: log pi(y_t) = log_softmax(z_t / tau)[y_t],
with tau = 1 for greedy rollouts (temperature 0: no distribution to match, no division by 0).
top_p is not applied in scoring (TRL neither). With pi the policy being trained, pi_old
the policy that generated the rollouts (its log-probs are recorded before the first update)
and pi_ref the reference (the base model with the LoRA adapter disabled, or a frozen copy):

    ratio_t = exp(log pi(y_t) - log pi_old(y_t))
    surr_t  = min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)
    w_t     = min(exp(log pi_old^1(y_t) - log q(y_t)), is_cap)    (server rollouts; else 1)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, >= 0)
    ent_t   = -sum_v pi(v) log pi(v)                                 (entropy of the policy)
    l_t     = -w_t * surr_t + beta * kl_t - entropy_coef * ent_t

w_t is truncated importance sampling for the mismatch between the server that sampled
(log-probs q, as it reports them) and the trainer's pi_old, as TRL's
`vllm_importance_sampling_correction` (token level, truncated at is_cap; is_cap = 0 turns
it off). Servers report log-probs at temperature 1 (vLLM's default `--logprobs-mode
raw_logprobs`, `trainer serve`), so pi_old^1 is pi_old at temperature 1 too; at tau = 1
it is pi_old itself. The same pair gives the logged `logprob_mismatch`, the mean
|log q(y_t) - log pi_old^1(y_t)| over sampled tokens, for local rollouts as well.

epsilon_high defaults to epsilon (symmetric PPO clip; DAPO's "clip-higher" sets it
larger). beta = 0 skips the reference model entirely. Loss aggregation over the
completion mask m (1 on generated tokens, 0 on prompt and padding):

    token_mean:    L = sum_{i,t} m_it l_it / sum_{i,t} m_it
    sequence_mean: L = mean_i ( sum_t m_it l_it / sum_t m_it )   (GRPO paper; i with sum m = 0 dropped)

mask_truncated_completions zeroes the mask of completions that hit max_tokens without
stopping, so unfinished answers neither reward nor punish (DAPO).

Left out on purpose: a value function (GRPO has none), reward models (rewards are plain
functions), the KL term in the reward (it is in the loss, as in DeepSeekMath), length
normalisation by a constant (Dr. GRPO's "max tokens" denominator), dynamic sampling
that refills zero-std groups (they are counted instead), and sequence-level or masking
importance sampling modes (TRL's other `vllm_importance_sampling_mode`s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean")


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, int]:
    """rewards (B, G) -> advantages (B, G) and the number of groups with zero std."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, G) with G >= 2 completions per group, got {tuple(rewards.shape)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} must be one of {SCALE_REWARDS}")
    rewards = rewards.double()  # identical float rewards subtract to an exact 0 in float64 too
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    group_std = rewards.std(dim=1, keepdim=True)  # (B, 1), unbiased like torch/TRL
    flat = (group_std == 0).squeeze(1)  # (B,) groups without signal
    if scale_rewards == "group":
        adv = centered / (group_std + eps)
    elif scale_rewards == "batch":
        adv = centered / (rewards.std() + eps)
    else:
        adv = centered
    adv[flat] = 0.0
    return adv.float(), int(flat.sum())


@dataclass
class Scores:
    """Per-token results of `token_logprobs`, each (B, T-1) aligned with input_ids[:, 1:] and 0
    where the mask is 0 (those positions are never computed)."""
    logps: torch.Tensor  # log pi(y_t) at the scoring temperature
    entropy: torch.Tensor | None = None  # entropy of that distribution (with_entropy)
    raw: torch.Tensor | None = None  # log-prob at temperature 1, the sampler's basis (with_raw; no gradient)


def scoring_temperature(temperature: float) -> float:
    """Rollout temperature -> the one the logits are divided by. Greedy (0) scores at 1: the
    argmax is the same at every temperature, there is no sampling distribution to match, and
    dividing by 0 is undefined."""
    return temperature if temperature > 0 else 1.0


def lm_parts(model):
    """(transformer body, lm_head) of a GPT-2 policy, a peft wrapper around one included; the
    LoRA layers stay in place, so adapters and `disable_adapter()` act as in model(...)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return core.base_model, core.get_output_embeddings()


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Scored tokens per chunk of (tokens x vocabulary) float32 logits. On CPU 16 MiB (83 rows of
    GPT-2's 50,257): a chunk stays in cache and reuses the allocator's memory instead of
    faulting in fresh pages (measured fastest between 16 and 128 rows); on a GPU 256 MiB, for
    fewer and larger kernels."""
    budget = 2**24 if device.type == "cpu" else 2**28
    return max(1, budget // (4 * vocab))


class LinearLogProbs(torch.autograd.Function):
    """lm_head, log-softmax and the target's log-prob, one chunk of tokens at a time:
    states (N, H), weight (V, H), targets (N,) -> log-probs (N,), entropies (N,) and raw
    (temperature 1) log-probs (N,), never holding more than one chunk of (rows x V) logits.
    Backward recomputes a chunk's logits from the saved states (one matmul per chunk) and
    forms the gradient in place:

        d log p_y / dz = (onehot_y - p) / tau        d H / dz = -p * (log p + H) / tau

    Under bf16 autocast (the GRPO update on CUDA) both run in float32 with autocast off: the
    log-softmax over the vocabulary is where bf16 would lose most, and backward must recompute
    the very logits that forward normalised.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, states, weight, targets, temperature: float, rows: int, with_entropy: bool,
                with_raw: bool):
        ctx.set_materialize_grads(False)
        n = len(targets)
        dtype = torch.promote_types(states.dtype, torch.float32)  # bf16/fp16 models score in float32
        logps = torch.empty(n, dtype=dtype, device=states.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if with_entropy else logps.new_empty(0)
        raw = torch.empty_like(logps) if with_raw else logps.new_empty(0)
        for at in range(0, n, rows):
            sl, y = slice(at, at + rows), targets[at:at + rows, None]
            logits = (states[sl] @ weight.T).to(dtype)  # (rows, V)
            if with_raw and temperature != 1.0:
                raw[sl] = logits.gather(-1, y).squeeze(-1) - logits.logsumexp(-1)
            if temperature != 1.0:
                logits.div_(temperature)
            lse[sl] = logits.logsumexp(-1)
            logps[sl] = logits.gather(-1, y).squeeze(-1) - lse[sl]
            if with_entropy:
                logp = logits.sub_(lse[sl, None])
                entropy[sl] = -(logp.exp() * logp).sum(-1)
        if with_raw and temperature == 1.0:
            raw.copy_(logps)
        ctx.mark_non_differentiable(raw)
        ctx.save_for_backward(states, weight, targets, lse, entropy)
        ctx.temperature, ctx.rows = temperature, rows
        return logps, entropy, raw

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_logps, g_entropy, _):
        states, weight, targets, lse, entropy = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.rows
        g_states = torch.zeros_like(states) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        if g_logps is None and g_entropy is None:
            return g_states, g_weight, None, None, None, None, None
        for at in range(0, len(targets), rows):
            sl = slice(at, at + rows)
            logits = (states[sl] @ weight.T).to(lse.dtype)
            if tau != 1.0:
                logits.div_(tau)
            logp = logits.sub_(lse[sl, None])  # (rows, V) log p, in place
            grad = logp.exp()  # p
            if g_entropy is not None:
                term = logp.add_(entropy[sl, None]).mul_(grad).mul_(g_entropy[sl, None])  # g_H * p * (log p + H)
            if g_logps is not None:
                grad.mul_(-g_logps[sl, None]).scatter_add_(1, targets[sl, None], g_logps[sl, None])
            else:
                grad.zero_()
            if g_entropy is not None:
                grad.sub_(term)
            if tau != 1.0:
                grad.div_(tau)
            grad = grad.to(weight.dtype)
            if g_states is not None:
                g_states[sl] = grad @ weight
            if g_weight is not None:
                g_weight.addmm_(grad.T, states[sl])
        return g_states, g_weight, None, None, None, None, None


def _head_scores(head, states, targets, temperature, rows, with_entropy, with_raw):
    """LinearLogProbs's results for an lm_head that is not a plain bias-free Linear (e.g. one with
    a LoRA adapter of its own): the same formulas through autograd, chunk by chunk."""
    parts = []
    for at in range(0, len(targets), rows):
        y = targets[at:at + rows, None]
        logits = head(states[at:at + rows]).float()
        raw = None
        if with_raw:
            with torch.no_grad():
                raw = logits.gather(-1, y).squeeze(-1) - logits.logsumexp(-1)
        logp = torch.log_softmax(logits / temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
        parts.append((logp.gather(-1, y).squeeze(-1), entropy, raw))
    empty = states.new_zeros(0, dtype=torch.float32)
    return tuple(torch.cat([p[i] for p in parts]) if parts and parts[0][i] is not None else empty for i in range(3))


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor | None = None,
                   temperature: float = 1.0, with_entropy: bool = False, with_raw: bool = False,
                   rows: int | None = None) -> Scores:
    """Log-prob of each token given the ones before it, with the logits divided by `temperature`.

    Only the positions where `mask` (B, T-1) is 1 are scored (all when it is None), as TRL's
    `logits_to_keep`: the transformer body runs once over every position (a completion
    attends to its prompt), then lm_head is applied to the needed hidden states only, `rows`
    tokens at a time (LinearLogProbs). Position ids count only real tokens, so left padding
    does not shift the model.
    """
    body, head = lm_parts(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state  # (B, T, H)
    keep = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if mask is None else mask.bool()
    states = hidden[:, :-1][keep]  # (N, H): the state before each scored token predicts it
    targets = input_ids[:, 1:][keep]  # (N,)
    rows = rows or chunk_rows(head.weight.shape[0], states.device)
    if type(head) is torch.nn.Linear and head.bias is None:  # GPT-2's lm_head (tied to wte)
        flat = LinearLogProbs.apply(states, head.weight, targets, float(temperature), rows, with_entropy, with_raw)
    else:
        flat = _head_scores(head, states, targets, float(temperature), rows, with_entropy, with_raw)

    def place(x):  # (N,) -> (B, T-1), 0 where not scored
        return torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_scatter(keep, x)

    return Scores(place(flat[0]), place(flat[1]) if with_entropy else None, place(flat[2]) if with_raw else None)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp; >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    if loss_agg == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_agg == "sequence_mean":
        lengths = mask.sum(-1)
        keep = lengths > 0
        if not keep.any():
            return (per_token * mask).sum()  # 0 with a graph, so backward() still works
        per_seq = (per_token * mask).sum(-1)[keep] / lengths[keep]
        return per_seq.mean()
    raise ValueError(f"loss_agg={loss_agg!r} must be one of {LOSS_AGGREGATIONS}")


def mask_truncated_completions(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """mask (B, T); truncated (B,) bool -> mask with truncated rows zeroed."""
    return mask * (~truncated).unsqueeze(-1).to(mask.dtype)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0, loss_agg: str = "token_mean",
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss above for a minibatch. logps/old_logps/ref_logps/entropy/is_weights/mask: (B, T);
    advantages: (B,). Returns the scalar loss and detached stats (kl, clip_ratio, entropy)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1)  # (B, 1): one advantage for every token of a completion
    # masked positions get ratio 1 and KL 0: a log-prob computed under another mask must not
    # overflow exp() there and turn inf * 0 into NaN
    ratio = torch.exp((logps - old_logps) * mask)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    surr = torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        surr = is_weights * surr
    per_token = -surr
    stats = {}
    n = mask.sum().clamp(min=1)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = k3_kl(logps * mask, ref_logps * mask)
        per_token = per_token + beta * kl
        stats["kl"] = float((kl.detach() * mask).sum() / n)
    if entropy is not None:
        if entropy_coef != 0.0:
            per_token = per_token - entropy_coef * entropy
        stats["entropy"] = float((entropy.detach() * mask).sum() / n)
    # a token is clipped when the clipped branch is the smaller one and differs
    is_clipped = ((clipped * adv) < (ratio * adv)) & (clipped != ratio)
    stats["clip_ratio"] = float((is_clipped.float() * mask).sum() / n)
    loss = aggregate(per_token, mask, loss_agg)
    return loss, stats


def importance_weights(old_raw: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(log pi_old^1 - log q), cap) on sampled tokens, 1 elsewhere; all (B, T)."""
    return torch.where(mask.bool(), torch.exp(old_raw - sampler).clamp(max=cap), torch.ones_like(sampler))


def logprob_mismatch(old_raw: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log q - log pi_old^1| over the sampled tokens (mask 1)."""
    return float(((old_raw - sampler).abs() * mask).sum() / mask.sum().clamp(min=1))
