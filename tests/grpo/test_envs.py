"""Environments are pure functions of their seed, train and eval never overlap, and every
reward scores known-good, known-bad and garbage completions as documented."""

import random

import pytest

from trainer.errors import UserError
from trainer.grpo import envs


@pytest.mark.parametrize("env", list(envs.GENERATORS))
def test_same_id_same_problem_and_splits_disjoint(env):
    a = envs.train_problems(env, iteration=3, count=16)
    b = envs.train_problems(env, iteration=3, count=16)
    assert a == b
    assert envs.train_problems(env, iteration=4, count=16) != a
    evals = envs.eval_problems(env, 16)
    assert evals == envs.eval_problems(env, 16)
    # same numeric ids, different namespaces -> different instances
    train0 = [envs.make_problem(env, "train", i) for i in range(16)]
    assert [p.answer for p in train0] != [p.answer for p in evals]
    assert all(p.split == "eval" for p in evals) and all(p.split == "train" for p in a)


def test_sat_planted_solution_exists_and_rewards():
    for i in range(50):
        p = envs.make_problem("sat", "train", i, n_vars=5, n_clauses=10, k=3)
        n = p.answer["n_vars"]
        # brute force: at least one assignment satisfies every clause (the planted one)
        best = max(envs.sat_reward(p, format(x, f"0{n}b")) for x in range(2 ** n))
        assert best == 1.0
    p = envs.make_problem("sat", "eval", 0, n_vars=4, n_clauses=6, k=2)
    assert envs.sat_reward(p, "banana") == 0.0
    assert envs.sat_reward(p, "01") == 0.0  # too few digits
    assert envs.parse_assignment("0 1 1 0 trailing", 4) == [False, True, True, False]


def test_sat_partial_credit_is_fraction_satisfied():
    p = envs.make_problem("sat", "train", 7, n_vars=6, n_clauses=9, k=2)
    rng = random.Random(0)
    for _ in range(20):
        bits = "".join(rng.choice("01") for _ in range(6))
        a = [c == "1" for c in bits]
        want = sum(any(a[abs(l) - 1] == (l > 0) for l in c) for c in p.answer["clauses"]) / 9
        assert envs.sat_partial_reward(p, bits) == pytest.approx(want)
        assert envs.sat_reward(p, bits) == float(want == 1.0)


def test_arithmetic_reward():
    p = envs.make_problem("arithmetic", "train", 1, max_operand=9, ops="+*")
    a, op, b = p.prompt[0], p.prompt[1], p.prompt[2]
    value = int(a) + int(b) if op == "+" else int(a) * int(b)
    assert envs.arithmetic_reward(p, f"{value}\n") == 1.0
    assert envs.arithmetic_reward(p, f" {value} is it") == 1.0
    assert envs.arithmetic_reward(p, f"{value + 1}") == 0.0
    assert envs.arithmetic_reward(p, "x") == 0.0


def test_repeat_reward_dense_and_random_policy_low_but_nonzero():
    p = envs.make_problem("repeat", "train", 0, chars="ab", length=6)
    c = p.answer["char"]
    assert p.prompt == f"{c}*6="
    assert envs.repeat_reward(p, c * 6) == 1.0
    assert envs.repeat_reward(p, c * 3) == 0.5
    assert envs.repeat_reward(p, c * 12) == 0.5  # overlong answers lose credit
    assert envs.repeat_reward(p, "") == 0.0
    alphabet = "abcd0123456789*=\n xy"
    rng = random.Random(0)
    scores = [envs.repeat_reward(p, "".join(rng.choice(alphabet) for _ in range(6))) for _ in range(2000)]
    mean = sum(scores) / len(scores)
    assert 0.02 < mean < 0.1
    assert sum(s > 0 for s in scores) > 500  # dense: most groups of 8 see some signal


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="grpo.env='nope'"):
        envs.make_problem("nope", "train", 0)
    with pytest.raises(UserError, match="'n_varz' is not an option of env 'sat'"):
        envs.make_problem("sat", "train", 0, n_varz=3)
    with pytest.raises(UserError, match="grpo.env=dataset has no problem generator"):
        envs.corpus("dataset", 3)
