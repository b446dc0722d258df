"""The config loader: precedence defaults < YAML < env < CLI, strict names and types with
suggestions, resume's frozen keys, and every shipped file under configs/ loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import config as C
from trainer.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_precedence(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  max_steps: 7\n  lr: 3e-4\nmodel:\n  n_layer: 3\n")
    env = {"TRAINER_TRAIN_MAX_STEPS": "9", "TRAINER_CHECKPOINT_MIRROR_DIR": "/backup"}
    cfg = C.build(yaml_path=yml, environ=env, overrides={"model.n_layer": 5})
    assert cfg.train.max_steps == 9  # env beats YAML
    assert cfg.train.lr == 3e-4  # YAML 1.1's "3e-4" string is read as a float
    assert cfg.model.n_layer == 5  # CLI beats YAML
    assert cfg.checkpoint.mirror_dir == "/backup"
    assert C.build(yaml_path=yml, environ=env, overrides={"train.max_steps": 11}).train.max_steps == 11
    assert C.build(environ={}).train.max_steps == C.TrainConfig().max_steps


def test_aliases_from_the_replaced_setups():
    cfg = C.build(environ={}, overrides={"steps": 10, "seed": 42})
    assert (cfg.train.max_steps, cfg.run.seed) == (10, 42)


@pytest.mark.parametrize("overrides, expected", [
    ({"train.max_step": 3}, "did you mean 'max_steps'"),
    ({"trian.lr": 1.0}, "did you mean 'train'"),
    ({"train.max_steps": "abc"}, "train.max_steps: expected int"),
    ({"model.lora": "maybe"}, "model.lora: expected bool"),
    ({"model.n_embd": 30, "model.n_head": 4}, "divisible"),
])
def test_bad_keys_and_types_are_named(overrides, expected):
    with pytest.raises(UserError, match=expected):
        C.build(environ={}, overrides=overrides)


def test_problems_are_collected_and_raised_once():
    with pytest.raises(UserError) as err:
        C.build(environ={}, overrides={"train.max_steps": 0, "model.dropout": 1.5})
    assert "train.max_steps" in str(err.value) and "model.dropout" in str(err.value)


def test_unknown_env_variable_is_an_error():
    with pytest.raises(UserError, match="TRAINER_TRAIN_MAXSTEPS"):
        C.build(environ={"TRAINER_TRAIN_MAXSTEPS": "5"})


def test_frozen_keys_on_resume():
    old = C.build(environ={})
    new = C.build(base=old.to_dict(), environ={}, overrides={"model.n_layer": 9, "train.max_steps": 999})
    assert C.changed_frozen_keys(old, new) == ["model.n_layer"]


def test_round_trip_through_yaml():
    import yaml

    cfg = C.build(environ={}, overrides={"model.lora_targets": "c_attn,c_proj"})
    assert cfg.model.lora_targets == ["c_attn", "c_proj"]
    assert C.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_grad_clip_defaults_follow_the_seeds():
    assert C.grad_clip(C.build(environ={})) == 1.0
    lora = C.build(environ={}, overrides={"model.type": "gpt2", "data.tokenizer": "gpt2", "model.lora": True})
    assert C.grad_clip(lora) == 2.0
    assert C.grad_clip(C.build(environ={}, overrides={"train.grad_clip": 0.5})) == 0.5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_command(path):
    assert path.read_text().startswith("# "), f"{path.name} must open with the command that runs it"
    first = path.read_text().splitlines()[0]
    assert "trainer " in first or "just " in first or "docker " in first
    C.build(yaml_path=path, environ={})


def test_there_are_the_required_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "smoke.yaml", "char_scratch.yaml", "gpt2_lora.yaml", "gpt2_full.yaml"} <= names


def test_docs_config_reference_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.is_file(), f"{doc} is missing (an image running the suite must COPY docs/ too)"
    block = doc.read_text().split("<!-- config-reference -->\n", 1)[1].split("<!-- /config-reference -->", 1)[0]
    assert block == C.reference_markdown(), \
        "regenerate the block between the markers in docs/config.md with `python -m trainer.config`"
    readme = (doc.parents[1] / "README.md").read_text()
    assert "<!-- config-reference -->" not in readme, "the config reference lives in docs/config.md only"


def _bad_values(allowed: C.Range) -> list:
    """Values just outside a range: at an open end, the end itself; at a closed one, one past it."""
    out = []
    if allowed.lo is not None:
        out.append(allowed.lo if allowed.lo_open else allowed.lo - 1)
    if allowed.hi is not None:
        out.append(allowed.hi if allowed.hi_open else allowed.hi + 1)
    return out


RANGES = {key: f.metadata["range"] for key, f in C.keys().items() if f.metadata["range"]}
CHOICES = {key: f.metadata["choices"] for key, f in C.keys().items() if f.metadata["choices"]}


def test_every_number_in_the_config_has_a_range():
    numbers = {key for key, f in C.keys().items() if f.type in (int, float)}
    assert numbers - set(RANGES) == set(), "give every numeric key a range: field(..., range=...)"
    assert set(RANGES) - numbers == set()
    assert all(f.metadata["help"] for f in C.keys().values()), "give every key its help"
    assert set(CHOICES) == {key for key, f in C.keys().items() if f.type is str and f.metadata["choices"]}


@pytest.mark.parametrize("key", sorted(RANGES) + sorted(CHOICES))
def test_every_constrained_key_rejects_a_bad_value_when_loaded(key):
    """Loading is the first thing every command does, so a bad value stops it before step 1
    (tests/integration/test_bad_input.py shows it through the CLI for sample.top_k)."""
    bad = _bad_values(RANGES[key]) if key in RANGES else ["no-such-choice"]
    assert bad, key
    for value in bad:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            C.build(environ={}, overrides={key: value})
        default = C.build(environ={}).to_dict()
        section, name = key.split(".")
        C.build(environ={}, overrides={key: default[section][name]})  # the default itself is fine


@pytest.mark.parametrize("overrides, names", [
    ({"model.lora": True, "model.type": "gpt2", "data.tokenizer": "gpt2", "model.lora_targets": ""},
     ["model.lora_targets"]),
    ({"train.grad_clip": -0.5}, ["train.grad_clip"]),
    ({"grpo.sat_k": 7, "grpo.sat_vars": 3}, ["grpo.sat_k", "grpo.sat_vars"]),
    ({"grpo.arith_ops": "+/"}, ["grpo.arith_ops"]),
    ({"data.tokenizer": "bpe", "data.vocab_size": 100}, ["data.vocab_size"]),
    ({"train.min_lr": 0.1, "train.lr": 0.01}, ["train.min_lr"]),
    ({"run.device": "cuda:x"}, ["run.device"]),
])
def test_cross_key_rules(overrides, names):
    with pytest.raises(UserError) as err:
        C.build(environ={}, overrides=overrides)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_a_saved_config_is_checked_like_any_input():
    with pytest.raises(UserError, match="train.max_steps: expected int"):
        C.from_dict({"train": {"max_steps": [1]}}, "ckpt/config.yaml")
    with pytest.raises(UserError, match="not a mapping"):
        C.from_dict(["train"], "ckpt/config.yaml")
    assert C.from_dict({"train": {"max_steps": 3, "gone_key": 1}, "gone_section": {}}).train.max_steps == 3


def test_resume_rules():
    old = C.build(environ={})
    new = C.build(base=old.to_dict(), environ={}, overrides={"run.seed": 7, "run.threads": 3, "train.log_interval": 1})
    assert C.changed_frozen_keys(old, new) == ["run.seed"]
    assert C.changed_keys(old, new, C.resume_keys("inexact")) == {"run.threads": (0, 3)}


def test_which_keys_a_resume_may_change():
    """model.* and data.* define the weights' shapes and token ids, run.seed the batches: frozen.
    These change the numbers, so a resume with them is no longer bit-exact: inexact."""
    frozen = {key for key in C.keys() if key.startswith(("model.", "data."))} | {"run.seed"}
    assert set(C.resume_keys("frozen")) == frozen
    assert set(C.resume_keys("inexact")) == {
        "run.threads", "run.device", "run.compile", "run.dtype", "train.batch_size", "train.grad_accum", "train.lr",
        "train.min_lr", "train.warmup_steps", "train.schedule", "train.weight_decay", "train.beta1", "train.beta2",
        "train.grad_clip", "train.max_steps", "grpo.iterations", "grpo.schedule"}


def test_for_resume_keeps_the_recorded_threads_and_names_what_costs_exactness():
    saved = C.build(environ={}, overrides={"run.threads": 2})
    planned = C.build(environ={}, overrides={"train.max_steps": 400})  # a sweep plans threads=0
    cfg, inexact = C.for_resume(saved, planned)
    assert cfg.run.threads == 2 and inexact == {"train.max_steps": (200, 400)}
    cfg, inexact = C.for_resume(saved, C.build(environ={}, overrides={"run.threads": 1}))
    assert inexact == {"run.threads": (2, 1)}
    with pytest.raises(UserError, match="run.seed"):
        C.for_resume(saved, C.build(environ={}, overrides={"run.seed": 5}))
    # GRPO's length costs exactness only where the linear schedule's rates depend on it
    for schedule, expected in (("constant", {}), ("linear", {"grpo.iterations": (20, 40)})):
        saved = C.build(environ={}, overrides={"grpo.schedule": schedule})
        longer = C.build(base=saved.to_dict(), environ={}, overrides={"grpo.iterations": 40})
        assert C.for_resume(saved, longer)[1] == expected


def test_a_config_saved_before_model_activation_existed_keeps_gelu_new():
    """from_scratch models were built with GPT-2's gelu_new before the key existed: a checkpoint
    saved then resumes, samples and exports with it (bit-exact), and a resume cannot switch it."""
    import torch

    from trainer import model as M

    older = C.Config().to_dict()
    del older["model"]["activation"]
    saved = C.from_dict(older)
    assert saved.model.activation == "gelu_new" and C.Config().model.activation == "gelu_pytorch_tanh"
    assert C.from_dict(C.Config().to_dict()).model.activation == "gelu_pytorch_tanh"
    assert C.build(base=saved.to_dict(), environ={}).model.activation == "gelu_new"
    with pytest.raises(UserError, match="model.activation"):
        C.for_resume(saved, C.build(base=saved.to_dict(), environ={},
                                    overrides={"model.activation": "gelu_pytorch_tanh"}))
    # the two are one function, to rounding; the fused one is what is built now
    ids = torch.randint(0, 64, (2, 16))
    logits = {}
    for act in ("gelu_new", "gelu_pytorch_tanh"):
        cfg = C.build(environ={}, overrides={"model.activation": act, "model.n_layer": 2, "model.n_embd": 32,
                                             "model.n_head": 2, "model.block_size": 16})
        model, _ = M.build_model(cfg.model, vocab_size=64, eot_id=0, seed=1)
        assert model.config.activation_function == act
        logits[act] = model(ids).logits
    assert not torch.equal(*logits.values())
    torch.testing.assert_close(*logits.values(), rtol=1e-5, atol=1e-5)
