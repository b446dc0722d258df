"""GRPO on your task, the parts below the loop: a dataset of prompts (JSONL or parquet) splits
into the same held-out rows every time and visits every training row once per epoch; rewards
have TRL's signature, built-ins score as documented, several combine with weights, the built-in
envs' scorers are instances of the same interface, and every broken reward file is one line
naming the file and the function before anything is sampled."""

from __future__ import annotations

import json

import pytest

from trainer.errors import UserError
from trainer.grpo import envs
from trainer.grpo.rewards import Scorer, column


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path):
    rows = [{"question": f"{a}+{a}=", "answer": str(2 * a), "level": a % 3} for a in range(40)]
    return write_jsonl(tmp_path / "sums.jsonl", rows)


def options(path, **kw):
    return {"path": str(path), "prompt_field": "question", **kw}


def test_a_dataset_holds_out_the_same_rows_and_each_epoch_visits_every_training_row_once(dataset, tmp_path):
    split = envs.splits(**options(dataset))
    assert len(split["eval"]) == 4 and len(split["train"]) == 36
    assert not {r["prompt"] for r in split["eval"]} & {r["prompt"] for r in split["train"]}
    assert envs.splits(**options(dataset)) == split  # the same rows every time, whatever run.seed
    epoch = envs.train_problems("dataset", 0, 36, **options(dataset))
    assert sorted(p.prompt for p in epoch) == sorted(r["prompt"] for r in split["train"])
    again = envs.train_problems("dataset", 1, 36, **options(dataset))
    assert [p.prompt for p in again] != [p.prompt for p in epoch]  # reshuffled per epoch
    assert sorted(p.prompt for p in again) == sorted(p.prompt for p in epoch)
    p = epoch[0]
    assert set(p.answer) == {"answer", "level"} and p.answer["answer"] == str(2 * int(p.prompt.split("+")[0]))
    held = envs.eval_problems("dataset", 100, **options(dataset))  # fewer rows than asked: all of them
    assert [q.prompt for q in held] == [r["prompt"] for r in split["eval"]]
    own = write_jsonl(tmp_path / "eval.jsonl", [{"question": "9+9=", "answer": "18"}])
    both = envs.splits(**options(dataset, eval_path=str(own)))
    assert len(both["train"]) == 40 and [r["prompt"] for r in both["eval"]] == ["9+9="]


def test_parquet_gives_the_same_problems_as_jsonl(dataset, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sums.parquet")
    a = envs.train_problems("dataset", 3, 8, **options(dataset))
    b = envs.train_problems("dataset", 3, 8, **options(tmp_path / "sums.parquet"))
    assert [(p.prompt, p.answer) for p in a] == [(p.prompt, p.answer) for p in b]


def test_builtin_rewards_score_as_documented():
    prompts = ["q"] * 5
    got = Scorer.load("exact_match,numeric_match,regex,contains,length_penalty")(
        prompts, [" 12 ", "12.0000001", "x12", "twelve", "1" * 2000],
        {"answer": ["12", "12", r"x\d+", "elv", "1"]})
    totals, parts = got
    assert parts["reward_exact_match"] == [1, 0, 0, 0, 0]
    assert parts["reward_numeric_match"] == [1, 1, 0, 0, 0]  # "x12": its first number is 12, not x12
    assert parts["reward_regex"] == [1, 0, 1, 0, 0]  # "12" read as a pattern matches "12" in full
    assert parts["reward_contains"] == [1, 1, 0, 1, 1]
    assert parts["reward_length_penalty"] == [-0.004, -0.01, -0.003, -0.006, -1.0]
    assert totals == [sum(parts[c][i] for c in parts) for i in range(5)]


def test_several_rewards_weigh_and_envs_share_the_interface(tmp_path):
    p = envs.make_problem("arithmetic", "eval", 3)
    value = p.answer["value"]
    scorer = Scorer.load("arithmetic,length_penalty", [2.0, 0.5])
    totals, parts = scorer([p.prompt] * 2, [str(value), "nope"], {"value": [value, value]})
    assert parts["reward_arithmetic"] == [1.0, 0.0]
    assert totals == [2.0 - 0.5 * len(str(value)) / 1000, -0.5 * 4 / 1000]
    assert scorer.columns == ("reward_arithmetic", "reward_length_penalty")
    with pytest.raises(UserError, match="2 value.*1 reward"):
        Scorer.load("exact_match", [1, 2])
    with pytest.raises(UserError, match="unknown; use one of"):
        Scorer.load("nope")
    assert column("path/to/my-rewards.py:format_ok") == "reward_format_ok"


GOOD = "def match(prompts, completions, answer, **kw):\n    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n"
BROKEN = {
    "syntax": ("def match(prompts, completions, **kw)\n    return []\n", "does not import (SyntaxError"),
    "import": ("import no_such_module_here\n", "does not import (ModuleNotFoundError"),
    "missing": ("def other(prompts, completions, **kw):\n    return [0.0] * len(completions)\n",
                "has no function 'match' (it has: other)"),
    "signature": ("def match(completion):\n    return [0.0]\n", "cannot take prompts=, completions="),
    "raises": ("def match(prompts, completions, **kw):\n    raise KeyError('gold')\n", "raised KeyError"),
    "count": ("def match(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 value(s) for 4 completions"),
    "type": ("def match(prompts, completions, **kw):\n    return 'good'\n", "not a list of numbers"),
    "nan": ("def match(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
            "not finite"),
}


def test_a_reward_file_with_trls_signature_works(tmp_path):
    (tmp_path / "rewards.py").write_text(GOOD)
    scorer = Scorer.load(f"{tmp_path / 'rewards.py'}:match")
    columns = {"answer": ["4", "6"], "level": [1, 2]}
    scorer.check(["2+2=", "3+3="], columns)
    assert scorer(["2+2=", "3+3="], ["4", "7"], columns)[0] == [1.0, 0.0]


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_every_broken_reward_file_is_one_line_naming_file_and_function(tmp_path, broken):
    source, expected = BROKEN[broken]
    path = tmp_path / "rewards.py"
    path.write_text(source)
    with pytest.raises(UserError) as e:
        Scorer.load(f"{path}:match").check(["2+2=", "3+3="], {"answer": ["4", "6"]})
    message = str(e.value)
    assert expected in message and "\n" not in message, message
    assert "rewards.py" in message and ("match" in message or broken == "import"), message
