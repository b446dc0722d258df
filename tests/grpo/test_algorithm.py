"""The GRPO objective does what its docstring says: advantages match a hand computation
and never go NaN, the k3 KL is a non-negative KL estimate, clipping stops the gradient
where it should, the two aggregations differ as defined, and one gradient step raises
the log-prob of positive-advantage completions and lowers the negative ones."""

import statistics

import pytest
import torch

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
    logps, _ = A.token_logprobs(model, ids, mask)
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
        old, _ = A.token_logprobs(model, ids, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logps, ent = A.token_logprobs(model, ids, mask, with_entropy=True)
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
    _, ent0 = A.token_logprobs(model, ids, mask, with_entropy=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        logps, ent = A.token_logprobs(model, ids, mask, with_entropy=True)
        loss, _ = A.grpo_loss(logps, logps.detach(), torch.zeros(2), comp, entropy=ent, entropy_coef=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, ent1 = A.token_logprobs(model, ids, mask, with_entropy=True)
    assert float(ent1.detach().mean()) > float(ent0.detach().mean())
