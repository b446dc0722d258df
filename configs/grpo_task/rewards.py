"""The reward of configs/grpo_dataset.yaml: a plain function with TRL's signature.

Every field of a dataset row but the prompt arrives as a keyword list, one value per completion
(here `answer` and `level`); return one float per completion.
"""


def same_char(prompts, completions, answer, **kwargs):
    """The share of the answer's characters written in their place, less for overlong completions."""
    return [sum(x == y for x, y in zip(c, a)) / max(len(a), len(c)) for c, a in zip(completions, answer)]
