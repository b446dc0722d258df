r"""The GRPO objective, written as the formulas below.

Rewards r (B problems x G completions each). Group-relative advantage of completion i in
group g, the same for every token of the completion:

    A_gi = (r_gi - mean_g(r)) / (std + eps)
    std  = std_g(r)   scale_rewards="group" (sample std over the G completions)
         = std(r)     scale_rewards="batch" (over all B*G rewards; Dr. GRPO-style robustness)
         = 1, eps=0   scale_rewards="none"  (A = r - mean_g, no scaling)

A group whose rewards are all equal (std_g == 0) carries no signal: its advantages are
exactly 0 and it is counted (`zero_std_groups`), never divided by zero.

Per completion token t, with the policy pi (being trained), pi_old (the policy that
generated the rollouts; its log-probs are recorded before the first update) and pi_ref
(the reference: the base model with the LoRA adapter disabled, or a frozen copy):

    ratio_t = exp(log pi(y_t) - log pi_old(y_t))
    surr_t  = min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator, >= 0)
    ent_t   = -sum_v pi(v) log pi(v)                                 (entropy of the policy)
    l_t     = -surr_t + beta * kl_t - entropy_coef * ent_t

epsilon_high defaults to epsilon (symmetric PPO clip; DAPO's "clip-higher" sets it
larger). beta = 0 skips the reference model entirely. Loss aggregation over the
completion mask m (1 on generated tokens, 0 on prompt and padding):

    token_mean:    L = sum_{i,t} m_it l_it / sum_{i,t} m_it
    sequence_mean: L = mean_i ( sum_t m_it l_it / sum_t m_it )   (GRPO paper; i with sum m = 0 dropped)

mask_truncated_completions zeroes the mask of completions that hit max_tokens without
stopping, so unfinished answers neither reward nor punish (DAPO).

Left out on purpose: a value function (GRPO has none), reward models (rewards are plain
functions), the KL term in the reward (it is in the loss, as in DeepSeekMath), length
normalisation by a constant (Dr. GRPO's "max tokens" denominator), and dynamic sampling
that refills zero-std groups (they are counted instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each token given the ones before it: (B, T-1), aligned with input_ids[:, 1:].

    Position ids count only real tokens, so left padding does not shift the model.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids).logits[:, :-1].float()  # (B, T-1, V)
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logps, entropy


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
              entropy_coef: float = 0.0, loss_agg: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """The loss above for a minibatch. logps/old_logps/ref_logps/entropy/mask: (B, T);
    advantages: (B,). Returns the scalar loss and detached stats (kl, clip_ratio, entropy)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1)  # (B, 1): one advantage for every token of a completion
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    surr = torch.min(ratio * adv, clipped * adv)
    per_token = -surr
    stats = {}
    n = mask.sum().clamp(min=1)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
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
