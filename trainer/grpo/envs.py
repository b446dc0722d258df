"""Reward environments: problems generated from an integer id, scored by plain functions.

A problem is a pure function of (env, split, id, options): `make_problem` seeds a private
`random.Random` with the string "<env>:<split>:<id>", so the training and held-out splits
live in separate seed namespaces and can never produce each other's instances, whatever
ids either side uses. Held-out evaluation uses `eval_ids(n)` = ids 0..n-1 of split "eval";
training draws ids from split "train".

Each env's scorer, `score(problem, completion) -> float` in [0, 1], is picked by name from
REWARDS; rewards.py turns it into the batch signature every reward has (TRL's), so training
and evaluation call the same function. A completion is the text the policy produced after
the prompt (stop string removed). `passed(reward)` is reward >= 1.

Environments
- `sat`: random k-SAT with a planted solution (so every instance is satisfiable). The
  prompt lists clauses as signed variable numbers; the answer is one 0/1 digit per
  variable, e.g. "0110". Reward 1 when every clause holds; with `partial_credit` the
  fraction of satisfied clauses; unparseable = 0.
- `arithmetic`: "a+b=" or "a*b=" with small operands; reward 1 for the exact integer
  (the first integer in the completion), else 0.
- `repeat`: "c*L=" asks for the character c written L times. Dense reward: the share of
  the first L characters equal to c, divided by max(L, len) so overlong answers lose
  credit. A uniform random policy over ~20 symbols scores about 0.05 and a copying one
  scores 1, which is what the learning test uses.
- `dataset`: your prompts, from a JSONL or parquet file (grpo.dataset; data.read_records):
  grpo.prompt_field is the prompt, grpo.answer_field becomes the `answer` column the
  built-in rewards compare with, and every other field is passed to the rewards as a
  column. grpo.eval_dataset is the held-out set, or else EVAL_FRACTION of the rows, the same
  rows for every run (`splits`). Training ids walk a per-epoch shuffle of the rest.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import re
from dataclasses import dataclass, field

from trainer.errors import UserError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    env: str
    split: str  # train | eval
    id: int
    prompt: str  # text given to the policy
    answer: dict = field(default_factory=dict)  # what the reward needs (clauses, target, ...)


# ---------------------------------------------------------------- problem generators

def _sat(rng: random.Random, n_vars: int = 6, n_clauses: int = 8, k: int = 3) -> tuple[str, dict]:
    if not 1 <= k <= n_vars:
        raise UserError(f"grpo.sat_k={k} must be between 1 and grpo.sat_vars={n_vars}")
    planted = [rng.random() < 0.5 for _ in range(n_vars)]
    clauses = []
    while len(clauses) < n_clauses:
        variables = rng.sample(range(1, n_vars + 1), k)
        clause = [v if rng.random() < 0.5 else -v for v in variables]
        if _clause_holds(clause, planted):  # keep only clauses the planted solution satisfies
            clauses.append(clause)
    text = " ".join("(" + " ".join(str(lit) for lit in c) + ")" for c in clauses)
    prompt = f"SAT n={n_vars}: {text}\nassignment (one 0/1 per variable): "
    return prompt, {"n_vars": n_vars, "clauses": clauses}


def _arithmetic(rng: random.Random, max_operand: int = 20, ops: str = "+") -> tuple[str, dict]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice(ops)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}=", {"value": value}


def _repeat(rng: random.Random, chars: str = "abcd", length: int = 6) -> tuple[str, dict]:
    c = rng.choice(chars)
    return f"{c}*{length}=", {"char": c, "length": length}


GENERATORS = {"sat": _sat, "arithmetic": _arithmetic, "repeat": _repeat}


# ---------------------------------------------------------------- a dataset of prompts

DATASET = "dataset"
EVAL_FRACTION = 0.1  # of a dataset's rows held out for evaluation when no eval file is given


def _read_rows(path: str, prompt_field: str, answer_field: str) -> list[dict]:
    """A dataset's rows as {"prompt": ..., "answer": ..., every other column}."""
    from trainer import data

    rows = []
    for where, row in data.read_records(path):
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{where}: no text field {prompt_field!r} (has: {', '.join(row) or 'nothing'}); set "
                            "grpo.prompt_field to the field that holds the prompt")
        extra = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
        rows.append({**extra, "prompt": prompt, **({"answer": row[answer_field]} if answer_field in row else {})})
    if not rows:
        raise UserError(f"grpo.dataset={path!r} holds no rows; give a JSONL or parquet file of prompts")
    return rows


def _stamp(path: str, key: str) -> tuple:
    """(path, mtime, size): a changed file is read again."""
    if not path:
        raise UserError("grpo.env=dataset needs grpo.dataset=PATH (a JSONL or parquet file with a prompt field)")
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"grpo.{key}={path!r}: {e.strerror}; give a JSONL or parquet file of prompts") from None
    return path, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _cached_splits(train: tuple, held: tuple | None, prompt_field: str, answer_field: str) -> dict:
    rows = _read_rows(train[0], prompt_field, answer_field)
    if held is not None:
        return {"train": rows, "eval": _read_rows(held[0], prompt_field, answer_field)}
    if len(rows) < 2:
        raise UserError(f"grpo.dataset={train[0]!r} has {len(rows)} row; holding rows out for evaluation needs at "
                        "least 2 (or give grpo.eval_dataset)")
    order = list(range(len(rows)))
    random.Random(f"dataset:eval:{len(rows)}").shuffle(order)
    held_out = sorted(order[:min(max(1, round(len(rows) * EVAL_FRACTION)), len(rows) - 1)])
    taken = set(held_out)
    return {"eval": [rows[i] for i in held_out], "train": [r for i, r in enumerate(rows) if i not in taken]}


def splits(path: str = "", eval_path: str = "", prompt_field: str = "prompt",
           answer_field: str = "answer") -> dict[str, list[dict]]:
    """{"train": rows, "eval": rows} of a dataset: the eval file's rows, or EVAL_FRACTION of the
    dataset's (at least one, leaving one to train on), picked by a permutation that depends only
    on the row count, so every run of a dataset holds out the same rows."""
    return _cached_splits(_stamp(path, "dataset"), _stamp(eval_path, "eval_dataset") if eval_path else None,
                          prompt_field, answer_field)


def _dataset_problem(split: str, id: int, **options) -> Problem:
    """Training id k is row k % n of epoch k // n's shuffle (seeded by the epoch), so each
    epoch visits every row once; eval id k is the eval split's row k."""
    rows = splits(**options)[split]
    if split == "eval":
        row = rows[id % len(rows)]
    else:
        epoch, k = divmod(id, len(rows))
        order = list(range(len(rows)))
        random.Random(f"dataset:train:{epoch}").shuffle(order)
        row = rows[order[k]]
    return Problem(DATASET, split, id, row["prompt"], {k: v for k, v in row.items() if k != "prompt"})


def make_problem(env: str, split: str, id: int, **options) -> Problem:
    """The problem `id` of `split`; the same arguments always give the same problem."""
    if env == DATASET:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return _dataset_problem(split, id, **options)
    if env not in GENERATORS:
        raise UserError(f"grpo.env={env!r} is unknown; use one of {', '.join([*GENERATORS, DATASET])}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    allowed = list(inspect.signature(GENERATORS[env]).parameters)[1:]
    for key in options:
        if key not in allowed:
            raise UserError(f"{key!r} is not an option of env {env!r}; its options: {', '.join(allowed)}")
    rng = random.Random(f"{env}:{split}:{id}")  # str seeds are stable across processes
    prompt, answer = GENERATORS[env](rng, **options)
    return Problem(env, split, id, prompt, answer)


CORPUS_IDS = 1_000_000  # corpus problems are "train" ids from here on: GRPO's own ids stay far below


def _random_answer(problem: Problem, rng: random.Random) -> str:
    """A well-formed answer that ignores the question: what a base should know before GRPO."""
    a = problem.answer
    if problem.env == "sat":
        return "".join(rng.choice("01") for _ in range(a["n_vars"]))
    if problem.env == "repeat":
        chars = sorted(set(problem.prompt[0] + "abcd"))
        return "".join(rng.choice(chars) * rng.randint(1, 3) for _ in range(a["length"]))[:rng.randint(1, 9)]
    return str(rng.randint(-abs(a["value"]) - 9, abs(a["value"]) + 9))


def corpus(env: str, count: int, seed: int = 0, **options) -> list[str]:
    """`count` lines of text: a training problem (ids from CORPUS_IDS) followed by a well-formed
    but random answer and a newline. A model pretrained on them knows the format, not the
    answer (for 3-SAT its assignments satisfy a clause about as often as chance, 7/8), which
    is what GRPO then improves on."""
    if env == DATASET:
        raise UserError("grpo.env=dataset has no problem generator: `trainer corpus` writes synthetic sat, arithmetic "
                        "or repeat problems; to teach a base your task's format, prepare your own text with "
                        "`trainer prepare --data.source=FILE`")
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        p = make_problem(env, "train", CORPUS_IDS + i, **options)
        lines.append(p.prompt + _random_answer(p, rng) + "\n")
    return lines


def eval_ids(n: int) -> list[int]:
    """The fixed held-out ids: 0..n-1 of the "eval" split."""
    return list(range(n))


def train_problems(env: str, iteration: int, count: int, **options) -> list[Problem]:
    """The `count` training problems of one iteration (ids iteration*count ... +count-1)."""
    return [make_problem(env, "train", iteration * count + j, **options) for j in range(count)]


def eval_problems(env: str, count: int, **options) -> list[Problem]:
    """The first `count` held-out problems (a dataset's eval rows, when it has fewer)."""
    if env == DATASET:
        count = min(count, len(splits(**options)["eval"]))
    return [make_problem(env, "eval", i, **options) for i in eval_ids(count)]


# ---------------------------------------------------------------- rewards

def _clause_holds(clause: list[int], assignment: list[bool]) -> bool:
    return any(assignment[abs(lit) - 1] == (lit > 0) for lit in clause)


def parse_assignment(completion: str, n_vars: int) -> list[bool] | None:
    """First n_vars 0/1 digits (spaces allowed between them); None when there are fewer."""
    m = re.match(r"\s*((?:[01]\s*){%d})" % n_vars, completion)
    if not m:
        return None
    return [ch == "1" for ch in m.group(1) if ch in "01"]


def sat_reward(problem: Problem, completion: str, partial_credit: bool = False) -> float:
    assignment = parse_assignment(completion, problem.answer["n_vars"])
    if assignment is None:
        return 0.0
    clauses = problem.answer["clauses"]
    held = sum(_clause_holds(c, assignment) for c in clauses)
    if partial_credit:
        return held / len(clauses)
    return float(held == len(clauses))


def sat_partial_reward(problem: Problem, completion: str) -> float:
    return sat_reward(problem, completion, partial_credit=True)


def arithmetic_reward(problem: Problem, completion: str) -> float:
    m = re.match(r"\s*(-?\d+)", completion)
    return float(m is not None and int(m.group(1)) == problem.answer["value"])


def repeat_reward(problem: Problem, completion: str) -> float:
    c, length = problem.answer["char"], problem.answer["length"]
    hits = sum(ch == c for ch in completion[:length])
    return hits / max(length, len(completion))


REWARDS = {
    "sat": sat_reward,
    "sat_partial": sat_partial_reward,
    "arithmetic": arithmetic_reward,
    "repeat": repeat_reward,
}
# the reward each environment uses unless grpo.reward names another
DEFAULT_REWARD = {"sat": "sat", "arithmetic": "arithmetic", "repeat": "repeat"}


def passed(reward: float) -> bool:
    return reward >= 1.0
