"""The GRPO objective does what its docstring says: advantages match a hand computation
and never go NaN, the k3 KL is a non-negative KL estimate, clipping stops the gradient
where it should, the two aggregations differ as defined, and one gradient step raises
the log-prob of positive-advantage completions and lowers the negative ones.

Scoring: log-probs are of the logits divided by the rollout temperature (1 for greedy);
the completion-only, chunked computation (lm_head on the completion states only, a custom
backward) gives the loss and gradients of the full-vocabulary step it replaced, on a
fixed batch of the real vocabulary, for full weights and LoRA, one chunk and many; its
backward passes gradcheck in float64. Truncated importance weights are min(pi_old/q, cap),
scale the surrogate only, and the mismatch statistic is the mean |log q - log pi_old|."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.grpo import algorithm as A
from tests.grpo.conftest import tiny_model


def test_group_advantages_match_hand_computation():
    rows = [[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.5], [0.3, 0.3, 0.3, 0.3]]
    adv, zero = A.group_advantages(torch.tensor(rows), "group", eps=1e-4)
    assert zero == 1
    for r, a in zip(rows[:2], adv[:2]):
        mu, sd = statistics.mean(r), statistics.stdev(r)
        assert a.tolist() == pytest.approx([(x - mu) / (sd + 1e-4) for x in r], rel=1e-5, abs=1e-6)
    assert adv[2].tolist() == [0.0] * 4 and not torch.isnan(adv).any()

    flat_all = statistics.stdev([x for r in rows for x in r])
    adv_b, _ = A.group_advantages(torch.tensor(rows), "batch", eps=0.0)
    mu = statistics.mean(rows[1])
    assert adv_b[1].tolist() == pytest.approx([(x - mu) / flat_all for x in rows[1]], rel=1e-5, abs=1e-6)
    adv_n, _ = A.group_advantages(torch.tensor(rows), "none")
    assert adv_n[1].tolist() == pytest.approx([x - mu for x in rows[1]], rel=1e-5, abs=1e-6)


def test_identical_rewards_and_bad_shapes():
    adv, zero = A.group_advantages(torch.full((3, 5), 0.1), "batch")  # batch std is 0 too
    assert zero == 3 and torch.equal(adv, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="G >= 2"):
        A.group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="scale_rewards"):
        A.group_advantages(torch.ones(2, 2), "mean")


def test_k3_is_nonnegative_and_estimates_kl():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(10), torch.randn(10)
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True)
    k3 = A.k3_kl(logp[samples], logq[samples])
    assert (k3 >= 0).all()
    assert float(k3.mean()) == pytest.approx(float(exact), rel=0.05)
    assert float(A.k3_kl(logp, logp).abs().max()) == 0.0


def test_clipping_stops_gradient_outside_the_trust_region():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 1.1, 0.5]])).requires_grad_()  # ratios 1.5, 1.1, 0.5
    mask = torch.ones(1, 3)
    loss, stats = A.grpo_loss(logps, old, torch.tensor([1.0]), mask, epsilon=0.2)
    loss.backward()
    g = logps.grad[0]
    assert g[0] == 0 and g[1] < 0 and g[2] < 0  # ratio 1.5 > 1.2 with A>0: clipped, no push further
    assert stats["clip_ratio"] == pytest.approx(1 / 3)
    logps.grad = None
    loss, _ = A.grpo_loss(logps, old, torch.tensor([1.0]), mask, epsilon=0.2, epsilon_high=0.6)
    loss.backward()
    assert logps.grad[0][0] < 0  # clip-higher lets it grow to 1.6
    logps.grad = None
    loss, stats = A.grpo_loss(logps, old, torch.tensor([-1.0]), mask, epsilon=0.2)
    loss.backward()
    assert logps.grad[0][2] == 0 and logps.grad[0][0] > 0  # A<0: ratio 0.5 < 0.8 is clipped


def test_aggregations_and_truncation_mask():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(A.aggregate(per_token, mask, "token_mean")) == pytest.approx(8 / 5)
    assert float(A.aggregate(per_token, mask, "sequence_mean")) == pytest.approx((1 + 4) / 2)
    masked = A.mask_truncated_completions(mask, torch.tensor([False, True]))
    assert masked.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert float(A.aggregate(per_token, masked, "sequence_mean")) == pytest.approx(1.0)
    zero = A.aggregate(per_token, torch.zeros_like(mask), "sequence_mean")
    assert float(zero) == 0.0 and not torch.isnan(zero)
    with pytest.raises(ValueError, match="loss_agg"):
        A.aggregate(per_token, mask, "sum")


def _completion_logp(model, ids, mask, n_prompt):
    logps = A.token_logprobs(model, ids, mask).logps
    return (logps[:, n_prompt - 1:] * mask[:, n_prompt:]).sum(-1)


@pytest.mark.parametrize("loss_agg", A.LOSS_AGGREGATIONS)
def test_sign_gradient_raises_positive_advantage_completions(loss_agg):
    model = tiny_model(30).train()
    torch.manual_seed(1)
    ids = torch.randint(1, 30, (4, 9))  # 3 prompt tokens + 6 completion tokens
    mask = torch.ones_like(ids)
    n_prompt = 3
    comp_mask = mask[:, 1:].float().clone()
    comp_mask[:, : n_prompt - 1] = 0
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        before = _completion_logp(model, ids, mask, n_prompt)
        old = A.token_logprobs(model, ids, mask).logps
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s = A.token_logprobs(model, ids, mask, with_entropy=True)
    logps, ent = s.logps, s.entropy
    loss, stats = A.grpo_loss(logps, old, adv, comp_mask, beta=0.1, ref_logps=old, entropy=ent,
                              loss_agg=loss_agg)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and stats["entropy"] > 0
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = _completion_logp(model, ids, mask, n_prompt)
    delta = after - before
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all(), delta


def test_entropy_bonus_raises_entropy():
    model = tiny_model(30, seed=3).train()
    ids = torch.randint(1, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    comp = torch.ones(2, 7)
    ent0 = A.token_logprobs(model, ids, mask, with_entropy=True).entropy
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        s = A.token_logprobs(model, ids, mask, with_entropy=True)
        logps, ent = s.logps, s.entropy
        loss, _ = A.grpo_loss(logps, logps.detach(), torch.zeros(2), comp, entropy=ent, entropy_coef=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ent1 = A.token_logprobs(model, ids, mask, with_entropy=True).entropy
    assert float(ent1.detach().mean()) > float(ent0.detach().mean())


def full_vocabulary_logprobs(model, input_ids, attention_mask, temperature=1.0):
    """The scoring that token_logprobs replaced (before issue 8): full-vocabulary logits at every
    position, prompt included; here with the logits divided by the temperature."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids).logits[:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logps, -(logp_all.exp() * logp_all).sum(-1)


def real_vocab_batch(kind: str):
    """A tiny GPT-2 with the real 50,257-token vocabulary and a packed batch of 8 rows: prompts
    of 3..6 tokens, completions of 1..9 (right padding), as loop.pack lays them out. kind:
    "full" weights, "lora", or "biased-head" (an lm_head with a bias: the autograd path)."""
    from trainer.grpo.loop import pack

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32)).eval()
    if kind == "biased-head":
        head = torch.nn.Linear(32, 50257, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.5)
        model.lm_head = head
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                 fan_in_fan_out=True, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (3 + i % 4,), generator=g).tolist() for i in range(8)]
    comps = [torch.randint(0, 50257, (1 + i,), generator=g).tolist() for i in range(8)]
    ids, attn, mask, _ = pack(prompts, comps, 50256)
    return model, ids, attn, mask


@pytest.mark.parametrize("kind", ["full", "lora", "biased-head"])
@pytest.mark.parametrize("temperature, rows", [(1.0, None), (0.7, None), (0.7, 5)])
def test_loss_and_gradients_equal_the_full_vocabulary_step(kind, temperature, rows):
    """The loss with every term on (clip, KL, entropy bonus) and every trainable gradient are the
    full-vocabulary step's to float32 rounding (log-probs near -10.8 carry ~1e-6 of it; measured:
    loss within 1.0e-6 relative, gradients within 3.7e-6 of their largest entry); rows=5
    forces many chunks."""
    model, ids, attn, mask = real_vocab_batch(kind)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(8, generator=g)
    with torch.no_grad():
        base, _ = full_vocabulary_logprobs(model, ids, attn, temperature)
    old = (base + 0.3 * torch.randn(base.shape, generator=g)) * mask  # ratios away from 1: some clip
    ref = (base - 0.2 * torch.randn(base.shape, generator=g)) * mask
    params = [p for p in model.parameters() if p.requires_grad]

    def step(logps, entropy):
        loss, stats = A.grpo_loss(logps, old, adv, mask, 0.2, 0.3, 0.1, ref, entropy, 0.01, "token_mean")
        grads = torch.autograd.grad(loss, params)
        return loss, stats, grads

    want = step(*full_vocabulary_logprobs(model, ids, attn, temperature))
    s = A.token_logprobs(model, ids, attn, mask, temperature, with_entropy=True, rows=rows)
    got = step(s.logps, s.entropy)
    assert float(got[0].detach()) == pytest.approx(float(want[0].detach()), rel=1e-5)
    assert got[1]["clip_ratio"] == want[1]["clip_ratio"] > 0
    assert got[1]["kl"] == pytest.approx(want[1]["kl"], rel=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert ((s.logps != 0) == mask.bool()).all()  # only completion positions are scored


def test_linear_logprobs_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(11, 5, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.randint(0, 11, (7,), generator=g)
    for tau in (1.0, 0.6):
        assert torch.autograd.gradcheck(lambda h, w: A.LinearLogProbs.apply(h, w, y, tau, 3, True, False)[:2], (h, w))
        assert torch.autograd.gradcheck(lambda h, w: A.LinearLogProbs.apply(h, w, y, tau, 2, False, False)[0], (h, w))


def test_scoring_divides_by_the_temperature_and_greedy_scores_at_one():
    model = tiny_model(30, seed=5)
    ids = torch.randint(1, 30, (2, 7), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    s = A.token_logprobs(model, ids, attn, temperature=0.5, with_raw=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    want = F.log_softmax(logits / 0.5, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    raw = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(s.logps, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.raw, raw, rtol=1e-5, atol=1e-6)  # the sampler's basis: temperature 1
    assert A.scoring_temperature(0.0) == 1.0 and A.scoring_temperature(0.7) == 0.7


def test_truncated_importance_weights_scale_the_surrogate_only():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 1.0]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.01, 1.0]]))  # pi_old / q = 2, 1, 50 (capped), padding
    w = A.importance_weights(old, q, mask, cap=3.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 3.0, 1.0])
    assert A.logprob_mismatch(old, q, mask) == pytest.approx((math.log(2) + 0 + math.log(50)) / 3, rel=1e-6)
    logps = old.clone().requires_grad_()
    plain, _ = A.grpo_loss(logps, old, torch.tensor([1.0]), mask)
    (g_plain,) = torch.autograd.grad(plain, logps)
    weighted, _ = A.grpo_loss(logps, old, torch.tensor([1.0]), mask, is_weights=w)
    (g_weighted,) = torch.autograd.grad(weighted, logps)
    assert g_weighted[0, :3].tolist() == pytest.approx((g_plain[0, :3] * w[0, :3]).tolist())
    # the KL term is not weighted (TRL): with A = 0 only beta * k3 remains, the same either way
    ref = old - 0.5
    a = A.grpo_loss(old, old, torch.tensor([0.0]), mask, beta=0.1, ref_logps=ref)[0]
    b = A.grpo_loss(old, old, torch.tensor([0.0]), mask, beta=0.1, ref_logps=ref, is_weights=w)[0]
    assert float(a) == float(b) > 0
