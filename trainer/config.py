"""Typed configuration: one dataclass per section, defaults < YAML < env < CLI.

Every field has a default and a one-line comment with its unit. `load()` merges the
layers, rejects unknown keys (suggesting the closest one) and wrong types, and returns a
frozen `Config`. Environment overrides are `TRAINER_<SECTION>_<KEY>`, e.g.
`TRAINER_TRAIN_MAX_STEPS=50`; CLI overrides are `--train.max_steps=50`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # run name; "" derives <config>-<model>-<data source>-<UTC time>
    out_dir: str = "volumes"  # root of checkpoints/<run>/ and metrics/<run>/
    seed: int = 1337  # seeds init, dropout and the batch sampler
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    offline: bool = True  # install the socket guard: any non-loopback connection is an error
    compile: bool = False  # torch.compile the model (CUDA mostly; off keeps CPU start-up fast)
    deterministic: bool = False  # CUDA: deterministic kernels, so resume is bit-exact there too (slower); CPU always is
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass(frozen=True)
class ModelConfig:
    type: str = "from_scratch"  # from_scratch | gpt2
    path: str = "vendor/models/gpt2"  # local HF folder for type=gpt2 (loaded with local_files_only)
    n_layer: int = 4  # transformer blocks (from_scratch)
    n_head: int = 4  # attention heads (from_scratch)
    n_embd: int = 128  # width (from_scratch)
    block_size: int = 128  # context length in tokens; capped at the model's positions
    dropout: float = 0.0  # dropout probability in attention, residual and embeddings
    lora: bool = False  # train a LoRA adapter instead of all weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_targets: list = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # module names


@dataclass(frozen=True)
class DataConfig:
    source: str = "python-stdlib"  # python-stdlib | a .txt/.md file or folder | .jsonl | .bin/.npy/.pt tokens
    name: str = ""  # prepared folder name under prepared_dir; "" derives it from source and tokenizer
    prepared_dir: str = "data/prepared"  # where prepared folders live
    tokenizer: str = "bpe"  # gpt2 | bpe | char
    tokenizer_path: str = "vendor/tokenizers/gpt2"  # gpt2 files (vocab.json + merges.txt or tokenizer.json)
    vocab_size: int = 4096  # bpe only: target vocabulary size
    text_field: str = "text"  # jsonl: the field holding the text
    val_fraction: float = 0.05  # share of documents (or token chunks) held out for validation
    split_seed: int = 1337  # seeds the train/val split
    max_bytes: int = 0  # read at most this many bytes of text (0 = all), in sorted file order


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 20  # linear warmup steps (0 = no warmup)
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1  # AdamW decay on matrices; biases and norms get none
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = -1.0  # max grad norm; -1 = 1.0 for full training, 2.0 for LoRA; 0 = off
    eval_interval: int = 50  # steps between validation runs (0 = only at the end)
    eval_iters: int = 10  # validation batches per evaluation
    log_interval: int = 25  # steps between console lines
    sample_at_end: bool = True  # write samples.txt at the end
    export_at_end: bool = True  # write the HF export to checkpoints/<run>/final/


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints (0 = only at the end and on signals)
    keep_last: int = 3  # step directories kept (0 = all)
    best: bool = True  # keep best/ by validation loss
    mirror_dir: str = ""  # second location each completed checkpoint is copied to ("" = none)
    enabled: bool = True  # write checkpoints at all


@dataclass(frozen=True)
class SampleConfig:
    prompt: str = ""  # "" = "QUESTION: " for gpt2, the start token for from-scratch
    max_new_tokens: int = 300  # tokens generated
    temperature: float = 0.7  # softmax temperature (0 = greedy)
    top_k: int = 50  # keep the k most likely tokens (0 = all)
    seed: int = 1234  # seeds the sampling


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 1  # GRPO: iterations between held-out evaluations
    replicates: int = 4  # GRPO: completions per held-out problem
    num_problems: int = 32  # GRPO: held-out problems per evaluation
    watch_interval: float = 10.0  # evaluator --watch: seconds between scans


@dataclass(frozen=True)
class ServerConfig:
    url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible server for GRPO rollouts
    host: str = "127.0.0.1"  # trainer serve: bind address (loopback unless told otherwise)
    port: int = 8000  # trainer serve: port
    timeout: float = 60.0  # GRPO: seconds one try of a request may take, connect to last byte (not per read)
    retries: int = 5  # GRPO: tries after the first before a request is given up (backoff 0.5 s, doubling)


@dataclass(frozen=True)
class GRPOConfig:
    """`trainer grpo`: environment, rollouts and the objective (see trainer/grpo/algorithm.py)."""
    env: str = "repeat"  # sat | arithmetic | repeat (trainer/grpo/envs.py)
    reward: str = ""  # reward function name; "" = the env's own (sat_partial gives SAT partial credit)
    sat_vars: int = 6  # sat: variables
    sat_clauses: int = 8  # sat: clauses
    sat_k: int = 3  # sat: literals per clause
    arith_max: int = 20  # arithmetic: largest operand
    arith_ops: str = "+"  # arithmetic: operators drawn from (+, -, *)
    repeat_chars: str = "abcd"  # repeat: characters to ask for
    repeat_length: int = 6  # repeat: how many times to write it
    backend: str = "local"  # local (sample with the policy) | openai (a vLLM-compatible server at server.url)
    iterations: int = 20  # rollout -> train -> eval -> checkpoint cycles
    prompts_per_iter: int = 16  # problems per iteration (B)
    group_size: int = 8  # completions per problem (G >= 2)
    max_tokens: int = 16  # new tokens per completion
    temperature: float = 1.0  # rollout softmax temperature
    top_p: float = 1.0  # rollout nucleus mass
    stop: list = field(default_factory=lambda: ["\n"])  # stop strings
    lr: float = 1e-4  # AdamW learning rate (constant)
    beta: float = 0.0  # k3 KL weight; 0 = no reference model at all
    epsilon: float = 0.2  # clip range below (and above unless epsilon_high)
    epsilon_high: float = 0.0  # clip range above; 0 = epsilon
    entropy_coef: float = 0.0  # entropy bonus weight
    scale_rewards: str = "group"  # group | batch | none
    loss_agg: str = "token_mean"  # token_mean | sequence_mean
    mask_truncated: bool = False  # completions cut by max_tokens get no loss
    ppo_epochs: int = 1  # passes over each iteration's rollouts
    minibatch_size: int = 64  # completions per optimizer step
    grad_clip: float = 1.0  # max grad norm (0 = off)
    rollout_batch: int = 128  # local backend: rows sampled together
    sync: str = "reload"  # openai backend: reload (the server reloads a full HF folder: vLLM) | lora (an adapter)
    sync_dir: str = ""  # openai backend: shared dir for the policy versions; "" = <out_dir>/sync/<run>
    server_sync_dir: str = ""  # the same dir as the server sees it ("" = same path)
    sync_tolerance: float = 0.001  # openai backend: largest mean |server - trainer| probe log-prob after a sync
    concurrency: int = 4  # openai backend: requests in flight
    is_cap: float = 3.0  # openai backend: truncated importance-sampling cap (TRL's default); 0 = off
    request_prompts: int = 1  # prompts per server request (n each; local seeds alike); >1 correlates their groups
    rollout_timeout: float = 300.0  # openai: most seconds for a batch of rollouts or any call, with retries; 0 = no limit


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# keys that may not change when resuming: they define the weights' shapes, the token ids or
# the batches (run.seed keys the sampler)
FROZEN_ON_RESUME = ("model.", "data.", "run.seed")
# keys that may change on resume, but then the run is no longer bit-exact with an uninterrupted one
INEXACT_ON_RESUME = ("run.threads", "run.device", "run.compile", "train.batch_size", "train.grad_accum", "train.lr",
                     "train.min_lr", "train.warmup_steps", "train.schedule", "train.weight_decay", "train.beta1",
                     "train.beta2", "train.grad_clip", "train.max_steps")
NOT_CONFIG_ENV = {"TRAINER_DEBUG"}  # TRAINER_* variables that are not config keys
# short flags from the setups Airlock replaces (`--steps 10 --seed 42`)
ALIASES = {"steps": "train.max_steps", "seed": "run.seed", "lr": "train.lr",
           "batch_size": "train.batch_size", "block_size": "model.block_size", "name": "run.name"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(sorted(options))}"


def _coerce(value, typ, where: str, from_text: bool):
    """Check (and, for env strings, parse) one value against a field's type."""
    if from_text and isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    elif typ is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
    raise UserError(f"{where}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _apply(tree: dict, layer: dict, origin: str, from_text: bool = False) -> None:
    """Merge one layer of {section: {key: value}} into tree, validating names and types."""
    classes = _section_classes()
    for section, values in layer.items():
        if section not in classes:
            raise UserError(f"{origin}: unknown section {section!r}{_closest(section, classes)}")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping of key: value")
        hints = typing.get_type_hints(classes[section])
        for key, value in values.items():
            label = f"{section}.{key}"
            if key not in hints:
                raise UserError(f"{origin}: unknown key {label}{_closest(key, hints)}")
            tree[section][key] = _coerce(value, hints[key], f"{origin}: {label}", from_text)


def _dotted(overrides: dict, origin: str) -> dict:
    """{'train.max_steps': 5} -> {'train': {'max_steps': 5}}; resolves aliases."""
    layer: dict = {}
    for raw, value in overrides.items():
        key = ALIASES.get(raw, raw).replace("-", "_")
        if "." not in key:
            options = [f"{s}.{k}" for s, c in _section_classes().items() for k in typing.get_type_hints(c)]
            raise UserError(f"{origin}: unknown option --{raw}{_closest(raw, list(options) + list(ALIASES))}")
        section, name = key.split(".", 1)
        layer.setdefault(section, {})[name] = value
    return layer


def _env_layers(environ) -> list[tuple[str, dict]]:
    """TRAINER_TRAIN_MAX_STEPS=50 -> [('TRAINER_TRAIN_MAX_STEPS', {'train': {'max_steps': '50'}})].
    One layer per variable, so an error names the variable the user set."""
    layers = []
    for var, value in sorted(environ.items()):
        if not var.startswith("TRAINER_") or var in NOT_CONFIG_ENV:
            continue
        rest = var[len("TRAINER_"):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise UserError(f"environment: unknown variable {var}{_closest(rest, SECTIONS)} "
                            f"(form: TRAINER_<SECTION>_<KEY>)")
        layers.append((var, {section: {rest[len(section) + 1:]: value}}))
    return layers


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing file, e.g. --config configs/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path}{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of sections (run:, model:, train: ...)")
    return data


def build(base: dict | None = None, yaml_path: str | None = None, overrides: dict | None = None,
          environ=None) -> Config:
    """Merge layers onto `base` (a to_dict() tree; defaults when None) and validate."""
    tree = base if base is not None else Config().to_dict()
    tree = json.loads(json.dumps(tree))  # deep copy
    if yaml_path:
        _apply(tree, read_yaml(yaml_path), str(yaml_path))
    for var, layer in _env_layers(os.environ if environ is None else environ):
        _apply(tree, layer, f"environment variable {var}", from_text=True)
    _apply(tree, _dotted(overrides or {}, "command line"), "command line", from_text=True)
    classes = _section_classes()
    cfg = Config(**{s: classes[s](**v) for s, v in tree.items()})
    validate(cfg)
    return cfg


def load(config: str | None = None, **overrides) -> Config:
    """defaults < YAML < env < CLI. The config name (for run names) is the YAML's stem."""
    cfg = build(yaml_path=config, overrides=overrides)
    if not cfg.run.name:
        import time

        # the run (and so every checkpoint path) names the config, model, data source and time
        stem = Path(config).stem if config else "run"
        model = "gpt2" if cfg.model.type == "gpt2" else "scratch"
        model += "-lora" if cfg.model.lora else ""
        source = Path(cfg.data.source.rstrip("/")).stem or "data"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        if int(os.environ.get("WORLD_SIZE") or 1) > 1:  # torchrun: every rank (and restart) must name one run
            launch = os.environ.get("TORCHELASTIC_RUN_ID", "none")
            if launch in ("", "none"):
                raise UserError("under torchrun without a --rdzv-id, set --run.name=NAME so that every process "
                                "(and a restarted or resubmitted job) writes the same run")
            stamp = launch
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, name=f"{stem}-{model}-{source}-{stamp}"))
    return cfg


def from_dict(tree, origin: str = "saved config") -> Config:
    """A config saved in a run or checkpoint. Read back like any input: keys this version does
    not know are dropped (an older or newer Airlock wrote them) and types are checked. Values are
    checked only for the keys a resume cannot change (the weights' shapes, the data, the seed):
    the others may be fixed by an override, and `build` checks the result."""
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: not a mapping of sections")
    known = {s: {k: v for k, v in values.items() if k in typing.get_type_hints(_section_classes()[s])}
             for s, values in tree.items() if s in SECTIONS and isinstance(values, dict)}
    tree = Config().to_dict()
    _apply(tree, known, origin)
    classes = _section_classes()
    cfg = Config(**{s: classes[s](**v) for s, v in tree.items()})
    try:
        validate(cfg, only=FROZEN_ON_RESUME)
    except UserError as e:
        raise UserError(f"{origin}: {e}") from None
    return cfg


def changed_keys(old: Config, new: Config, prefixes: tuple[str, ...]) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for the keys under `prefixes` that differ."""
    a, b = old.to_dict(), new.to_dict()
    return {f"{section}.{key}": (a[section][key], b[section][key]) for section in a for key in a[section]
            if f"{section}.{key}".startswith(prefixes) and a[section][key] != b[section][key]}


def changed_frozen_keys(old: Config, new: Config) -> list[str]:
    """Keys that define weights, token ids or batches and differ between two configs."""
    return list(changed_keys(old, new, FROZEN_ON_RESUME))


def for_resume(saved: Config, cfg: Config) -> tuple[Config, dict[str, tuple]]:
    """`cfg` as a resume of the run `saved` runs it. A changed frozen key is a UserError; a
    thread count of 0 (not chosen) takes the recorded one. -> (cfg, {key: (old, new)} for the
    keys whose change costs bit-exactness)."""
    changed = changed_frozen_keys(saved, cfg)
    if changed:
        raise UserError(f"cannot change {', '.join(changed)} on resume: the checkpoint's weights, token ids and "
                        "batches depend on them; start a new run (trainer train --run.name NEW) instead")
    if not cfg.run.threads and saved.run.threads:
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, threads=saved.run.threads))
    inexact = changed_keys(saved, cfg, INEXACT_ON_RESUME)
    if cfg.train.schedule == "constant":
        inexact.pop("train.max_steps", None)  # only the cosine schedule depends on the length
    return cfg, inexact


def inexact_warning(inexact: dict[str, tuple]) -> str:
    return ("resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in inexact.items())
            + ": the run goes on, but no longer bit-exactly as an uninterrupted run would")


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: lo <= v <= hi, with open ends where lo_open/hi_open."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        def show(v) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {show(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"


def _min(lo, open_: bool = False) -> Range:
    return Range(lo, None, lo_open=open_)


PROB = Range(0, 1, hi_open=True)  # a dropout probability, a beta
SEED = Range(0, 2**63 - 1)  # what torch, numpy's SeedSequence and Python's random all accept
# every number a config may hold, and the values that make sense; `validate` checks them all
# before any work starts, and tests/unit/test_config.py feeds each one a bad value
RANGES = {
    "run.seed": SEED, "run.threads": _min(0),
    "model.n_layer": _min(1), "model.n_head": _min(1), "model.n_embd": _min(1), "model.block_size": _min(1),
    "model.dropout": PROB, "model.lora_r": _min(1), "model.lora_alpha": _min(0, open_=True),
    "model.lora_dropout": PROB,
    "data.vocab_size": _min(1), "data.val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "data.split_seed": SEED, "data.max_bytes": _min(0),
    "train.max_steps": _min(1), "train.batch_size": _min(1), "train.grad_accum": _min(1),
    "train.lr": _min(0, open_=True), "train.min_lr": _min(0), "train.warmup_steps": _min(0),
    "train.weight_decay": _min(0), "train.beta1": PROB, "train.beta2": PROB, "train.grad_clip": _min(-1),
    "train.eval_interval": _min(0), "train.eval_iters": _min(1), "train.log_interval": _min(1),
    "checkpoint.interval": _min(0), "checkpoint.keep_last": _min(0),
    "sample.max_new_tokens": _min(1), "sample.temperature": _min(0), "sample.top_k": _min(0), "sample.seed": SEED,
    "eval.interval": _min(0), "eval.replicates": _min(1), "eval.num_problems": _min(1),
    "eval.watch_interval": _min(0, open_=True),
    "server.port": Range(1, 65535), "server.timeout": _min(0, open_=True), "server.retries": _min(0),
    "grpo.sat_vars": _min(1), "grpo.sat_clauses": _min(1), "grpo.sat_k": _min(1), "grpo.arith_max": _min(0),
    "grpo.repeat_length": _min(1), "grpo.iterations": _min(1), "grpo.prompts_per_iter": _min(1),
    "grpo.group_size": _min(2), "grpo.max_tokens": _min(1), "grpo.temperature": _min(0),
    "grpo.top_p": Range(0, 1, lo_open=True), "grpo.lr": _min(0, open_=True), "grpo.beta": _min(0),
    "grpo.epsilon": _min(0, open_=True), "grpo.epsilon_high": _min(0), "grpo.entropy_coef": _min(0),
    "grpo.ppo_epochs": _min(1), "grpo.minibatch_size": _min(1), "grpo.grad_clip": _min(0),
    "grpo.rollout_batch": _min(1), "grpo.concurrency": _min(1), "grpo.is_cap": _min(0),
    "grpo.request_prompts": _min(1), "grpo.sync_tolerance": _min(0), "grpo.rollout_timeout": _min(0),
}
CHOICES = {
    "model.type": ("from_scratch", "gpt2"), "data.tokenizer": ("gpt2", "bpe", "char"),
    "train.schedule": ("cosine", "constant"), "grpo.env": ("sat", "arithmetic", "repeat"),
    "grpo.backend": ("local", "openai"), "grpo.sync": ("reload", "lora"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.loss_agg": ("token_mean", "sequence_mean"),
}
HINTS = {  # why a range is what it is, where the bare range would puzzle
    "train.grad_clip": " (-1 = automatic, 0 = off)", "grpo.group_size": " (GRPO compares completions of one prompt)",
}


def validate(cfg: Config, only: tuple[str, ...] = ()) -> None:
    """Collect every problem, raise once. `only`: just the problems of keys with these
    prefixes (each problem text starts with the key it is about)."""
    tree = cfg.to_dict()
    problems = []
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = tree[section][name]
        if not allowed.holds(value):
            problems.append(f"{key}={value} must be {allowed}{HINTS.get(key, '')}")
    for key, options in CHOICES.items():
        section, name = key.split(".")
        if tree[section][name] not in options:
            problems.append(f"{key}={tree[section][name]!r} must be one of {', '.join(options)}")
    m, d, t, g = cfg.model, cfg.data, cfg.train, cfg.grpo
    if m.type == "gpt2" and d.tokenizer != "gpt2":
        problems.append(f"model.type=gpt2 needs data.tokenizer=gpt2 (got {d.tokenizer!r})")
    if m.lora and m.type != "gpt2":
        problems.append("model.lora=true needs model.type=gpt2 (LoRA adapts pretrained weights)")
    if g.backend == "openai" and g.sync == "lora" and not m.lora:
        problems.append("grpo.sync=lora sends the policy as a LoRA adapter and needs model.lora=true; use "
                        "grpo.sync=reload (full weights, any model) or set model.lora=true")
    if m.lora and not m.lora_targets:
        problems.append("model.lora_targets is empty; name the layers LoRA adapts, e.g. c_attn,c_proj,c_fc")
    if m.n_head >= 1 and m.n_embd % m.n_head:
        problems.append(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        problems.append(f"data.vocab_size={d.vocab_size} must be at least 257 for bpe (256 bytes + <|endoftext|>)")
    if not d.text_field:
        problems.append("data.text_field is empty; name the JSONL field that holds the text")
    if t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr} must not be above train.lr={t.lr}")
    if t.grad_clip < 0 and t.grad_clip != -1:
        problems.append(f"train.grad_clip={t.grad_clip} must be -1 (automatic), 0 (off) or positive")
    if g.sat_k > g.sat_vars:
        problems.append(f"grpo.sat_k={g.sat_k} must not exceed grpo.sat_vars={g.sat_vars} (distinct variables per clause)")
    if not g.arith_ops or set(g.arith_ops) - set("+-*"):
        problems.append(f"grpo.arith_ops={g.arith_ops!r} must be made of +, - and *")
    if not g.repeat_chars:
        problems.append("grpo.repeat_chars is empty; give the characters to ask for, e.g. abcd")
    if cfg.run.device != "auto" and not (cfg.run.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cfg.run.device)):
        problems.append(f"run.device={cfg.run.device!r} must be auto, cpu or cuda[:N]")
    if cfg.run.name and ("/" in cfg.run.name or cfg.run.name.startswith(".")):
        problems.append(f"run.name={cfg.run.name!r} must be a plain folder name (no '/', not starting with '.')")
    if d.name and ("/" in d.name or d.name.startswith(".")):
        problems.append(f"data.name={d.name!r} must be a plain folder name (no '/', not starting with '.')")
    if not cfg.run.out_dir:
        problems.append("run.out_dir is empty; give the folder for checkpoints/ and metrics/, e.g. volumes")
    problems = [p for p in problems if p.startswith(only)] if only else problems
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def grad_clip(cfg: Config) -> float:
    """The seeds' convention: 1.0 for full training, 2.0 for LoRA, unless set."""
    if cfg.train.grad_clip >= 0:
        return cfg.train.grad_clip
    return 2.0 if cfg.model.lora else 1.0


def reference_text() -> str:
    """Every config key with its default and meaning, for `trainer <command> --help`."""
    lines = []
    for row in reference_markdown().splitlines():
        if row.startswith("**"):
            section = row.split("`")[1]
        elif row.startswith("| `"):
            key, default, meaning = [c.strip() for c in row.strip("|").split(" | ", 2)]
            lines.append(f"  --{section}.{key.strip('`')}={default.strip('`')}".ljust(44) + " " + meaning.replace("\\|", "|"))
    return "\n".join(lines)


def reference_markdown() -> str:
    """The config reference for the README, read from the field comments above."""
    import inspect
    import re

    out = []
    for section, cls in _section_classes().items():
        out.append(f"\n**`{section}`**: {(cls.__doc__ or '').strip() if cls.__doc__ and 'Config(' not in cls.__doc__ else ''}"
                   .rstrip(": ") + "\n\n| key | default | meaning |\n| --- | --- | --- |")
        source = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            comment = re.search(rf"^\s+{f.name}: [^=]+= .*?  # (.*)$", source, re.M)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = comment.group(1).replace("|", "\\|") if comment else ""
            out.append(f"| `{f.name}` | `{default!r}` | {meaning} |")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")


__all__ = ["Config", "load", "build", "from_dict", "read_yaml", "changed_frozen_keys", "changed_keys", "grad_clip",
           "UserError", "SECTIONS"]
