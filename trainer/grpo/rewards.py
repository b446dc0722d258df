"""Rewards: plain functions with TRL's signature, picked by name or loaded from a user's file.

    reward(prompts: list[str], completions: list[str], **columns) -> list[float]

one float per completion; `columns` holds every other field of each problem's row, as lists
in the same order (a dataset's `answer` column, or a built-in env's `clauses`, `value` ...).
This is `trl.GRPOTrainer`'s reward_funcs signature, so a reward file written for TRL works here.

`grpo.reward` names one or more, comma-separated: a built-in below (`exact_match`,
`numeric_match`, `regex`, `contains`, `length_penalty`, or an env's own: `sat`, `sat_partial`,
`arithmetic`, `repeat`), or `path/to/file.py:function`. `grpo.reward_weights` weighs them
(default 1 each); the total is their weighted sum, and each one's mean is logged on its own.
Rewards are called as TRL calls them, by keyword (`def f(completions, answer, **kwargs)` works).
`Scorer.check` tries every reward on a probe batch before the first rollout, so a file that
does not import, a wrong signature, a raise, or the wrong number of values is one line naming
the file and the function, not a crash an hour in.

Built-ins compare with the `answer` column (grpo.answer_field):
- exact_match: 1 when the completion, stripped, equals the answer (as text).
- numeric_match: 1 when the completion's first number is within `tolerance` (a column, else
  1e-6, relative or absolute) of the answer.
- regex: 1 when the answer, read as a regular expression, matches the stripped completion in full.
- contains: 1 when the answer occurs in the completion.
- length_penalty: -(characters / 1000), at most -1: to weigh against the others.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError, one_line

Reward = Callable[..., list]
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _answers(columns: dict, n: int) -> list:
    if "answer" not in columns:
        raise UserError("this reward compares with the `answer` column, which the problems do not have; set "
                        "grpo.answer_field to the field that holds the answer")
    return columns["answer"]


def exact_match(prompts, completions, **columns) -> list[float]:
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, _answers(columns, len(completions)))]


def numeric_match(prompts, completions, **columns) -> list[float]:
    tolerances = columns.get("tolerance") or [1e-6] * len(completions)
    out = []
    for c, a, tol in zip(completions, _answers(columns, len(completions)), tolerances):
        found = NUMBER.search(c)
        try:
            want = float(a)
        except (TypeError, ValueError):
            out.append(0.0)
            continue
        out.append(float(found is not None and math.isclose(float(found.group()), want, rel_tol=float(tol),
                                                             abs_tol=float(tol))))
    return out


def regex(prompts, completions, **columns) -> list[float]:
    return [float(re.fullmatch(str(a), c.strip(), re.DOTALL) is not None)
            for c, a in zip(completions, _answers(columns, len(completions)))]


def contains(prompts, completions, **columns) -> list[float]:
    return [float(str(a) in c) for c, a in zip(completions, _answers(columns, len(completions)))]


def length_penalty(prompts, completions, **columns) -> list[float]:
    return [-min(len(c), 1000) / 1000 for c in completions]


BUILTIN = {"exact_match": exact_match, "numeric_match": numeric_match, "regex": regex, "contains": contains,
           "length_penalty": length_penalty}


def per_item(score: Callable) -> Reward:
    """A built-in env's `score(problem, completion) -> float` with the batch signature: each row's
    columns are its problem's answer fields (what envs.py's scorers read)."""
    from trainer.grpo.envs import Problem

    def reward(prompts, completions, **columns):
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())] or [{}] * len(completions)
        return [score(Problem("", "train", 0, p, row), c) for p, c, row in zip(prompts, completions, rows)]

    reward.__name__ = getattr(score, "__name__", "reward")
    return reward


def _from_file(spec: str) -> Reward:
    """`path/to/file.py:function`, imported from the local file (never from the network)."""
    path, _, name = spec.rpartition(":")
    where = f"grpo.reward={spec!r}"
    if not Path(path).is_file():
        raise UserError(f"{where}: {path} does not exist; give a local .py file and a function, e.g. "
                        "rewards.py:my_reward")
    module_spec = importlib.util.spec_from_file_location(f"airlock_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001  (a SyntaxError, an ImportError, a SystemExit: the user's file)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserError(f"{where}: {path} does not import ({type(e).__name__}: {one_line(e, 200)}); fix the file"
                        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise UserError(f"{where}: {path} has no function {name!r}" + (f" (it has: {', '.join(found)})" if found
                                                                        else ""))
    return fn


def resolve(name: str) -> Reward:
    """One reward by name: a built-in, an env's own (envs.REWARDS), or `file.py:function`."""
    from trainer.grpo import envs

    if ":" in name:
        return _from_file(name)
    if name in BUILTIN:
        return BUILTIN[name]
    if name in envs.REWARDS:
        return per_item(envs.REWARDS[name])
    raise UserError(f"grpo.reward={name!r} is unknown; use one of {', '.join([*BUILTIN, *envs.REWARDS])} or "
                    "path/to/file.py:function")


@dataclass(frozen=True)
class Scorer:
    """The run's rewards: as named in grpo.reward, their functions and weights."""

    specs: tuple[str, ...]
    fns: tuple[Reward, ...]
    weights: tuple[float, ...]

    @classmethod
    def load(cls, spec: str, weights=(), default: str = "") -> Scorer:
        """`spec`: grpo.reward ("" = `default`, the env's own); `weights`: grpo.reward_weights."""
        specs = [n.strip() for n in (spec or default).split(",") if n.strip()]
        if not specs:
            raise UserError("grpo.reward is empty and the env has no reward of its own; name one, e.g. "
                            "grpo.reward=exact_match or grpo.reward=rewards.py:my_reward")
        weights = list(weights) or [1.0] * len(specs)
        if len(weights) != len(specs):
            raise UserError(f"grpo.reward_weights has {len(weights)} value(s) for {len(specs)} reward(s) "
                            f"({', '.join(specs)}); give one weight per reward")
        if len({column(n) for n in specs}) != len(specs):
            raise UserError(f"grpo.reward names one reward twice ({', '.join(specs)}); name each once")
        return cls(tuple(specs), tuple(resolve(n) for n in specs), tuple(float(w) for w in weights))

    @property
    def columns(self) -> tuple[str, ...]:
        """The metrics columns, one per reward (`column`)."""
        return tuple(column(n) for n in self.specs)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict) -> tuple[list[float], dict]:
        """-> (weighted total per completion, {metrics column: that reward's values}). Called as
        TRL calls reward functions: by keyword, every column passed on."""
        parts = {}
        for spec, fn in zip(self.specs, self.fns):
            try:
                values = fn(prompts=list(prompts), completions=list(completions), **columns)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"reward {spec} raised {type(e).__name__}: {one_line(e, 200)}; fix the function "
                                "(the checkpoints so far are intact)") from None
            parts[column(spec)] = _floats(spec, values, len(completions))
        totals = [sum(w * values[i] for values, w in zip(parts.values(), self.weights))
                  for i in range(len(completions))]
        return totals, parts

    def check(self, prompts: list[str], columns: dict) -> None:
        """Before anything is sampled: every reward takes these columns (signature), and called
        once on a probe batch (these prompts, completed by "" and by their answer where there is
        one) it returns a finite number per completion."""
        for spec, fn in zip(self.specs, self.fns):
            try:
                inspect.signature(fn).bind(prompts=[], completions=[], **columns)
            except TypeError:
                raise UserError(f"reward {spec}: {getattr(fn, '__name__', spec)}{inspect.signature(fn)} cannot take "
                                f"prompts=, completions= and the columns {', '.join(columns) or '(none)'}; write it as "
                                "def f(prompts, completions, **kwargs) -> list[float] (TRL's signature)") from None
        answers = [str(a) for a in columns.get("answer", [""] * len(prompts))]
        self(list(prompts) * 2, [""] * len(prompts) + answers, {k: list(v) * 2 for k, v in columns.items()})


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Problems' answer fields, row-wise, as the columns rewards take: {field: [value per row]},
    every field any row has (None where a row lacks it), in the order they first appear."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in names}


def column(name: str) -> str:
    """A reward's metrics column: `reward_<function>` (a file's function by its own name)."""
    return "reward_" + re.sub(r"\W+", "_", name.rpartition(":")[2] or name).strip("_")


def _floats(name: str, values, n: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"reward {name} returned {one_line(repr(values), 120)}, not a list of numbers; return one "
                        "float per completion") from None
    if len(out) != n:
        raise UserError(f"reward {name} returned {len(out)} value(s) for {n} completions; return one float per "
                        "completion")
    if not all(math.isfinite(v) for v in out):
        raise UserError(f"reward {name} returned a value that is not finite ({[v for v in out if not math.isfinite(v)][0]}); "
                        "return finite floats")
    return out
