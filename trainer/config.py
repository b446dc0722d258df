"""Typed configuration: one dataclass per section, defaults < YAML < env < CLI.

Each key is declared once, with everything about it beside it:
`field(default, help, range=..., choices=..., resume=...)`. `validate`, the resume rules,
`--help` and the config reference (docs/config.md) all read that metadata. `load()` merges the layers,
rejects unknown keys (suggesting the closest one) and wrong types, and returns a frozen
`Config`. Environment overrides are `TRAINER_<SECTION>_<KEY>`, e.g.
`TRAINER_TRAIN_MAX_STEPS=50`; CLI overrides are `--train.max_steps=50`.
"""

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.errors import UserError


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: lo <= v <= hi, with open ends where lo_open/hi_open; `why`
    explains a range that would puzzle on its own."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def holds(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        def show(v) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        why = f" ({self.why})" if self.why else ""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {show(self.lo)}{why}"
        return f"in {'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}{why}"


def atleast(lo, why: str = "") -> Range:
    return Range(lo, why=why)


def above(lo) -> Range:
    return Range(lo, lo_open=True)


PROB = Range(0, 1, hi_open=True)  # a dropout probability, a beta
STEPS = Range(1, 10**12 - 1, why="a checkpoint's step has at most 12 digits")  # checkpoint.STEP_LIMIT
SEED = Range(0, 2**63 - 1)  # what torch, numpy's SeedSequence and Python's random all accept
# what a resume may do with a key: change it freely (lengths, intervals, logging), change it at the
# cost of bit-exactness ("inexact": the numbers differ from an uninterrupted run), or not at all
# ("frozen": the checkpoint's weight shapes, token ids or batches depend on it)
RESUME_RULES = ("free", "inexact", "frozen")


def field(default, help: str = "", *, range: Range | None = None, choices: tuple = (), resume: str = "free",
          before=None):
    """One config key: its default, one line of help with the unit ("" = its choices, a | b),
    the numbers (`range`) or words (`choices`) it allows, and what a resume may do with it. Every
    number has a range: `validate` checks them all before any work starts, and
    tests/unit/test_config.py feeds each one a bad value. `before`: the value a config saved
    before the key existed meant, where that is not the default (`from_dict` reads it so)."""
    assert resume in RESUME_RULES, resume
    meta = {"help": help or " | ".join(choices), "range": range, "choices": choices, "resume": resume,
            "before": before}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    name: str = field("", 'run name; "" derives <config>-<model>-<data source>-<UTC time>')
    out_dir: str = field("volumes", "root of checkpoints/<run>/ and metrics/<run>/")
    # the sampler's batches depend on the seed
    seed: int = field(1337, "seeds init, dropout and the batch sampler", range=SEED, resume="frozen")
    device: str = field("auto", "auto | cpu | cuda | cuda:N", resume="inexact")
    offline: bool = field(True, "install the socket guard: any non-loopback connection is an error")
    compile: bool = field(False, "torch.compile the model (CUDA mostly; off keeps CPU start-up fast)",
                          resume="inexact")
    deterministic: bool = field(False, "CUDA: deterministic kernels, so resume is bit-exact there too (slower); "
                                       "CPU always is")
    threads: int = field(0, "torch intra-op threads; 0 keeps torch's default", range=Range(0, 4096), resume="inexact")
    dtype: str = field("auto", "matmul dtype (autocast; weights stay float32): auto = bf16 on CUDA, fp32 on CPU | "
                               "fp32 | bf16 (on a CPU fast only with native bf16: AVX512-BF16 or AMX)",
                       choices=("auto", "fp32", "bf16"), resume="inexact")


# every model.* and data.* key is frozen on resume: they define the weights' shapes and the token ids
@dataclass(frozen=True)
class ModelConfig:
    type: str = field("from_scratch", "from_scratch | gpt2 | hf (any local AutoModelForCausalLM folder)",
                      choices=("from_scratch", "gpt2", "hf"), resume="frozen")
    path: str = field("vendor/models/gpt2", "local HF folder for type=gpt2 or hf (loaded with local_files_only)",
                      resume="frozen")
    n_layer: int = field(4, "transformer blocks (from_scratch)", range=atleast(1), resume="frozen")
    n_head: int = field(4, "attention heads (from_scratch)", range=atleast(1), resume="frozen")
    n_embd: int = field(128, "width (from_scratch)", range=atleast(1), resume="frozen")
    block_size: int = field(128, "context length in tokens; capped at the model's positions", range=atleast(1),
                            resume="frozen")
    dropout: float = field(0.0, "dropout probability in attention, residual and embeddings", range=PROB,
                           resume="frozen")
    # HF's activation_function: the tanh GELU GPT-2 was trained with, in one fused kernel; 1.13x the
    # default config's tok/s on a CPU over gelu_new (the same function in six kernels), which older runs keep
    activation: str = field("gelu_pytorch_tanh", "MLP activation (from_scratch): gelu_pytorch_tanh | gelu_new "
                            "(GPT-2's own formula, the same function, slower) | gelu (exact erf)",
                            choices=("gelu_pytorch_tanh", "gelu_new", "gelu"), resume="frozen", before="gelu_new")
    lora: bool = field(False, "train a LoRA adapter instead of all weights", resume="frozen")
    lora_r: int = field(8, "LoRA rank", range=atleast(1), resume="frozen")
    lora_alpha: int = field(16, "LoRA scaling numerator (scale = alpha / r)", range=above(0), resume="frozen")
    lora_dropout: float = field(0.05, "dropout on the LoRA branch", range=PROB, resume="frozen")
    lora_targets: list = field(["c_attn", "c_proj", "c_fc"], "module names; a model without these default "
                               "(GPT-2's) ones: its linear layers", resume="frozen")


@dataclass(frozen=True)
class DataConfig:
    source: str = field("python-stdlib", "python-stdlib | a .txt/.md file or folder | .jsonl | .parquet file or folder "
                        "| a datasets save_to_disk folder | .bin/.npy/.pt tokens", resume="frozen")
    name: str = field("", 'prepared folder name under prepared_dir; "" derives it from source and tokenizer',
                      resume="frozen")
    prepared_dir: str = field("data/prepared", "where prepared folders live", resume="frozen")
    tokenizer: str = field("bpe", "gpt2 | bpe | char | model (the model folder's own tokenizer)",
                           choices=("gpt2", "bpe", "char", "model"), resume="frozen")
    tokenizer_path: str = field("vendor/tokenizers/gpt2", "gpt2 files (vocab.json + merges.txt or tokenizer.json); "
                                "tokenizer=model: the folder, model.path when left at this default", resume="frozen")
    vocab_size: int = field(4096, "bpe only: target vocabulary size", range=atleast(1), resume="frozen")
    text_field: str = field("text", "jsonl/parquet/datasets: the field holding the text (format=text)",
                            resume="frozen")
    format: str = field("text", "text (pretraining: the loss on every token) | sft (prompt/completion or chat rows: "
                        "the loss on the completion only)", choices=("text", "sft"), resume="frozen")
    prompt_field: str = field("prompt", "sft: the field holding the prompt (a string or a list of chat messages)",
                              resume="frozen")
    completion_field: str = field("completion", "sft: the field holding the completion (trained on)",
                                  resume="frozen")
    messages_field: str = field("messages", "sft: the field holding a chat ([{role, content}], the assistant "
                                "messages trained), rendered with the tokenizer's chat template or a plain one",
                                resume="frozen")
    val_fraction: float = field(0.05, "share of documents (or token chunks) held out for validation",
                                range=Range(0, 1, lo_open=True, hi_open=True), resume="frozen")
    split_seed: int = field(1337, "seeds the train/val split", range=SEED, resume="frozen")
    max_bytes: int = field(0, "read at most this many bytes of text (0 = all), in sorted file order",
                           range=atleast(0), resume="frozen")


@dataclass(frozen=True)
class TrainConfig:
    # max_steps is inexact: the cosine schedule depends on the length (for_resume lets a constant one go)
    max_steps: int = field(200, "optimizer steps", range=STEPS, resume="inexact")
    batch_size: int = field(16, "sequences per micro-batch", range=atleast(1), resume="inexact")
    grad_accum: int = field(1, "micro-batches per optimizer step", range=atleast(1), resume="inexact")
    lr: float = field(1e-3, "peak learning rate", range=above(0), resume="inexact")
    min_lr: float = field(1e-4, "floor of the cosine decay", range=atleast(0), resume="inexact")
    warmup_steps: int = field(20, "linear warmup steps (0 = no warmup)", range=atleast(0), resume="inexact")
    schedule: str = field("cosine", choices=("cosine", "constant"), resume="inexact")
    weight_decay: float = field(0.1, "AdamW decay on matrices; biases and norms get none", range=atleast(0),
                                resume="inexact")
    beta1: float = field(0.9, "AdamW beta1", range=PROB, resume="inexact")
    beta2: float = field(0.95, "AdamW beta2", range=PROB, resume="inexact")
    grad_clip: float = field(-1.0, "max grad norm; -1 = 1.0 for full training, 2.0 for LoRA; 0 = off",
                             range=atleast(-1, why="-1 = automatic, 0 = off"), resume="inexact")
    eval_interval: int = field(50, "steps between validation runs (0 = only at the end)", range=atleast(0))
    eval_iters: int = field(10, "validation batches per evaluation", range=atleast(1))
    log_interval: int = field(25, "steps between console lines", range=atleast(1))
    sample_at_end: bool = field(True, "write samples.txt at the end")
    export_at_end: bool = field(True, "write the HF export to checkpoints/<run>/final/")


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = field(100, "steps between checkpoints (0 = only at the end and on signals)", range=atleast(0))
    keep_last: int = field(3, "step directories kept (0 = all)", range=atleast(0))
    best: bool = field(True, "keep best/ by validation loss")
    mirror_dir: str = field("", 'second location each completed checkpoint is copied to ("" = none)')
    enabled: bool = field(True, "write checkpoints at all")


@dataclass(frozen=True)
class ProfileConfig:
    """`trainer train` traces a window of steps with torch.profiler ([gpu.md](gpu.md#where-the-time-goes))"""
    steps: int = field(0, "train: steps traced with torch.profiler into metrics/<run>/profile/ (0 = off)",
                       range=Range(0, 100, why="a trace of more steps is too large to open"))
    start: int = field(5, "train: steps this process runs before the traced ones (compilation and the allocator "
                          "settle)", range=atleast(0))
    memory: bool = field(False, "train: also record each op's shapes and memory (a larger trace)")


@dataclass(frozen=True)
class SampleConfig:
    prompt: str = field("", '"" = "QUESTION: " for gpt2, the start token for from-scratch')
    max_new_tokens: int = field(300, "tokens generated", range=atleast(1))
    temperature: float = field(0.7, "softmax temperature (0 = greedy)", range=atleast(0))
    top_k: int = field(50, "keep the k most likely tokens (0 = all)", range=atleast(0))
    seed: int = field(1234, "seeds the sampling", range=SEED)


@dataclass(frozen=True)
class EvalConfig:
    interval: int = field(1, "GRPO: iterations between held-out evaluations", range=atleast(0))
    replicates: int = field(4, "GRPO: completions per held-out problem", range=atleast(1))
    num_problems: int = field(32, "GRPO: held-out problems per evaluation", range=atleast(1))
    watch_interval: float = field(10.0, "evaluator --watch: seconds between scans", range=above(0))


@dataclass(frozen=True)
class ServerConfig:
    url: str = field("http://127.0.0.1:8000/v1", "OpenAI-compatible server for GRPO rollouts")
    host: str = field("127.0.0.1", "trainer serve: bind address (loopback unless told otherwise)")
    port: int = field(8000, "trainer serve: port", range=Range(1, 65535))
    timeout: float = field(60.0, "GRPO: seconds one try of a request may take, connect to last byte (not per read)",
                           range=above(0))
    retries: int = field(5, "GRPO: tries after the first before a request is given up (backoff 0.5 s, doubling)",
                         range=atleast(0))


@dataclass(frozen=True)
class GRPOConfig:
    """`trainer grpo`: environment, rollouts and the objective (see trainer/grpo/algorithm.py)."""
    # the task: which environment, its problems and its reward (trainer/grpo/envs.py)
    env: str = field("repeat", "sat | arithmetic | repeat | dataset (your prompts: grpo.dataset) "
                               "(trainer/grpo/envs.py)", choices=("sat", "arithmetic", "repeat", "dataset"))
    reward: str = field("", "rewards, comma-separated: a built-in (exact_match, numeric_match, regex, contains, "
                            "length_penalty, sat, sat_partial, arithmetic, repeat) or file.py:function (TRL's "
                            'signature); "" = the env\'s own (trainer/grpo/rewards.py)')
    reward_weights: list = field([], "one weight per grpo.reward; [] = 1 each")
    dataset: str = field("", "dataset: a JSONL or parquet file of prompts; every field but the prompt goes to the "
                             "rewards")
    eval_dataset: str = field("", 'dataset: held-out prompts; "" = 10% of grpo.dataset\'s rows, the same every run')
    prompt_field: str = field("prompt", "dataset: the field that holds the prompt")
    answer_field: str = field("answer", "dataset: the field the built-in rewards compare with (their `answer`)")
    sat_vars: int = field(6, "sat: variables", range=atleast(1))
    sat_clauses: int = field(8, "sat: clauses", range=atleast(1))
    sat_k: int = field(3, "sat: literals per clause", range=atleast(1))
    arith_max: int = field(20, "arithmetic: largest operand", range=atleast(0))
    arith_ops: str = field("+", "arithmetic: operators drawn from (+, -, *)")
    repeat_chars: str = field("abcd", "repeat: characters to ask for")
    repeat_length: int = field(6, "repeat: how many times to write it", range=atleast(1))
    # rollouts: who samples, how many, and how
    backend: str = field("local", "local (sample with the policy) | openai (a vLLM-compatible server at server.url)",
                         choices=("local", "openai"))
    # inexact with schedule=linear: the rate of every iteration depends on it (for_resume)
    iterations: int = field(20, "rollout -> train -> eval -> checkpoint cycles", range=STEPS, resume="inexact")
    prompts_per_iter: int = field(16, "problems per iteration (B)", range=atleast(1))
    group_size: int = field(8, "completions per problem (G >= 2)",
                            range=atleast(2, why="GRPO compares completions of one prompt"))
    max_tokens: int = field(16, "new tokens per completion", range=atleast(1))
    temperature: float = field(1.0, "rollout softmax temperature", range=atleast(0))
    top_p: float = field(1.0, "rollout nucleus mass", range=Range(0, 1, lo_open=True))
    stop: list = field(["\n"], "stop strings")
    # the objective and its optimizer (trainer/grpo/algorithm.py)
    lr: float = field(1e-4, "AdamW learning rate (schedule=linear: at iteration 1)", range=above(0))
    schedule: str = field("constant", "constant | linear (the rate falls by lr/iterations each iteration: TRL's "
                          "default, per iteration)", choices=("constant", "linear"), resume="inexact")
    # GRPO's own AdamW betas (not train.beta1/beta2: a pretraining recipe must not move them)
    adam_beta1: float = field(0.9, "AdamW beta1 (grpo.beta is the KL weight)", range=PROB)
    adam_beta2: float = field(0.95, "AdamW beta2 (grpo.beta is the KL weight)", range=PROB)
    beta: float = field(0.0, "k3 KL weight; 0 = no reference model at all", range=atleast(0))
    epsilon: float = field(0.2, "clip range below (and above unless epsilon_high)", range=above(0))
    epsilon_high: float = field(0.0, "clip range above; 0 = epsilon", range=atleast(0))
    entropy_coef: float = field(0.0, "entropy bonus weight", range=atleast(0))
    scale_rewards: str = field("group", choices=("group", "batch", "none"))
    loss_agg: str = field("token_mean", choices=("token_mean", "sequence_mean"))
    mask_truncated: bool = field(False, "completions cut by max_tokens get no loss")
    ppo_epochs: int = field(1, "passes over each iteration's rollouts", range=atleast(1))
    minibatch_size: int = field(64, "completions per optimizer step", range=atleast(1))
    grad_clip: float = field(1.0, "max grad norm (0 = off)", range=atleast(0))
    # generation in bulk: local batching, and the openai backend's weight sync, requests and limits
    rollout_batch: int = field(128, "local backend: rows sampled together", range=atleast(1))
    sync: str = field("reload", "openai backend: reload (the server reloads a full HF folder: vLLM) | "
                                "lora (an adapter)", choices=("reload", "lora"))
    sync_dir: str = field("", 'openai backend: shared dir for the policy versions; "" = <out_dir>/sync/<run>')
    server_sync_dir: str = field("", 'the same dir as the server sees it ("" = same path)')
    sync_tolerance: float = field(0.001, "openai backend: largest mean |server - trainer| probe log-prob after a sync",
                                  range=atleast(0))
    concurrency: int = field(4, "openai backend: requests in flight", range=atleast(1))
    is_cap: float = field(3.0, "openai backend: truncated importance-sampling cap (TRL's default); 0 = off",
                          range=atleast(0))
    request_prompts: int = field(1, "prompts per server request (n each; local seeds alike); "
                                    ">1 correlates their groups", range=atleast(1))
    rollout_timeout: float = field(300.0, "openai: most seconds for a batch of rollouts or any call, with retries; "
                                          "0 = no limit", range=atleast(0))


@dataclass(frozen=True)
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}  # section name -> its dataclass


def keys() -> dict[str, dataclasses.Field]:
    """Every config key, {'train.max_steps': its field}; field.type is the key's type and
    field.metadata holds its help, range, choices and resume rule."""
    return {f"{section}.{f.name}": f for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def resume_keys(rule: str) -> tuple[str, ...]:
    """The keys a resume treats as `rule` ("frozen" or "inexact"; see RESUME_RULES)."""
    assert rule in RESUME_RULES, rule
    return tuple(key for key, f in keys().items() if f.metadata["resume"] == rule)


def default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


NOT_CONFIG_ENV = {"TRAINER_DEBUG"}  # TRAINER_* variables that are not config keys
# short flags from the setups Airlock replaces (`--steps 10 --seed 42`)
ALIASES = {"steps": "train.max_steps", "seed": "run.seed", "lr": "train.lr",
           "batch_size": "train.batch_size", "block_size": "model.block_size", "name": "run.name"}


def _types(section: str) -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(sorted(options))}"


def coerce(value, typ, where: str, from_text: bool):
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
    for section, values in layer.items():
        if section not in SECTIONS:
            raise UserError(f"{origin}: unknown section {section!r}{_closest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping of key: value")
        hints = _types(section)
        for key, value in values.items():
            label = f"{section}.{key}"
            if key not in hints:
                raise UserError(f"{origin}: unknown key {label}{_closest(key, hints)}")
            tree[section][key] = coerce(value, hints[key], f"{origin}: {label}", from_text)


def _dotted(overrides: dict, origin: str) -> dict:
    """{'train.max_steps': 5} -> {'train': {'max_steps': 5}}; resolves aliases."""
    layer: dict = {}
    for raw, value in overrides.items():
        key = ALIASES.get(raw, raw).replace("-", "_")
        if "." not in key:
            raise UserError(f"{origin}: unknown option --{raw}{_closest(raw, list(keys()) + list(ALIASES))}")
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
    data, default_path = tree["data"], default(DataConfig.__dataclass_fields__["tokenizer_path"])
    if data["tokenizer"] == "model" and data["tokenizer_path"] == default_path:  # the model's own folder
        data["tokenizer_path"] = tree["model"]["path"]
    cfg = Config(**{s: SECTIONS[s](**v) for s, v in tree.items()})
    validate(cfg)
    return cfg


def load(config: str | None = None, **overrides) -> Config:
    """defaults < YAML < env < CLI, with a run name derived when none is given."""
    return named(build(yaml_path=config, overrides=overrides), config)


def named(cfg: Config, config: str | None = None) -> Config:
    """`cfg` with run.name set: the given one, or one derived from the config's stem (`config`,
    the YAML), the model, the data source and the time."""
    if not cfg.run.name:
        import time

        # the run (and so every checkpoint path) names the config, model, data source and time
        stem = Path(config).stem if config else "run"
        model = {"gpt2": "gpt2", "hf": Path(os.path.normpath(cfg.model.path)).name or "hf"}.get(cfg.model.type,
                                                                                             "scratch")
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
    known = {s: {k: v for k, v in values.items() if k in _types(s)}
             for s, values in tree.items() if s in SECTIONS and isinstance(values, dict)}
    for key, f in keys().items():  # keys newer than the config: what an older Airlock did
        section, name = key.split(".")
        if f.metadata["before"] is not None and name not in known.get(section, {}):
            known.setdefault(section, {})[name] = f.metadata["before"]
    tree = Config().to_dict()
    _apply(tree, known, origin)
    cfg = Config(**{s: SECTIONS[s](**v) for s, v in tree.items()})
    try:
        validate(cfg, only=resume_keys("frozen"))
    except UserError as e:
        raise UserError(f"{origin}: {e}") from None
    return cfg


def changed_keys(old: Config, new: Config, among: tuple[str, ...]) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for the keys in `among` that differ."""
    a, b = old.to_dict(), new.to_dict()
    return {f"{section}.{key}": (a[section][key], b[section][key]) for section in a for key in a[section]
            if f"{section}.{key}" in among and a[section][key] != b[section][key]}


def changed_frozen_keys(old: Config, new: Config) -> list[str]:
    """Keys that define weights, token ids or batches and differ between two configs."""
    return list(changed_keys(old, new, resume_keys("frozen")))


def for_resume(saved: Config, cfg: Config) -> tuple[Config, dict[str, tuple]]:
    """`cfg` as a resume of the run `saved` runs it. A changed frozen key is a UserError; a
    thread count of 0 (not chosen) takes the recorded one. -> (cfg, {key: (old, new)} for the
    keys whose change costs bit-exactness)."""
    changed = changed_frozen_keys(saved, cfg)
    if changed:
        raise UserError(f"cannot change {', '.join(changed)} on resume: the checkpoint's weights, token ids and "
                        "batches depend on them; start a new run (another run.name) instead")
    if not cfg.run.threads and saved.run.threads:
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, threads=saved.run.threads))
    inexact = changed_keys(saved, cfg, resume_keys("inexact"))
    if cfg.train.schedule == "constant":
        inexact.pop("train.max_steps", None)  # only the cosine schedule depends on the length
    if cfg.grpo.schedule == saved.grpo.schedule == "constant":
        inexact.pop("grpo.iterations", None)  # only the linear one does
    return cfg, inexact


def inexact_warning(inexact: dict[str, tuple]) -> str:
    return ("resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in inexact.items())
            + ": the run goes on, but no longer bit-exactly as an uninterrupted run would")



def _number(value) -> bool:
    """A float or what reads as one ("0.5" from a comma list on the command line)."""
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def validate(cfg: Config, only: tuple[str, ...] = ()) -> None:
    """Collect every problem, raise once. `only`: just the problems of these keys (each problem
    text starts with the key it is about)."""
    tree = cfg.to_dict()
    fields = keys()
    value = {key: tree[key.split(".")[0]][key.split(".")[1]] for key in fields}
    # each key's own limits from its field (every range first, then every choice), then the rules across keys
    problems = [f"{key}={value[key]} must be {f.metadata['range']}" for key, f in fields.items()
                if f.metadata["range"] and not f.metadata["range"].holds(value[key])]
    problems += [f"{key}={value[key]!r} must be one of {', '.join(f.metadata['choices'])}" for key, f in fields.items()
                 if f.metadata["choices"] and value[key] not in f.metadata["choices"]]
    m, d, t, g = cfg.model, cfg.data, cfg.train, cfg.grpo
    if m.type == "gpt2" and d.tokenizer != "gpt2":
        problems.append(f"model.type=gpt2 needs data.tokenizer=gpt2 (got {d.tokenizer!r})")
    if m.type == "hf" and d.tokenizer not in ("model", "gpt2"):
        problems.append(f"model.type=hf needs data.tokenizer=model, the model's own tokenizer (got {d.tokenizer!r})")
    if m.lora and m.type == "from_scratch":
        problems.append("model.lora=true needs model.type=gpt2 or hf (LoRA adapts pretrained weights)")
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
    if d.format == "sft":
        for key in ("prompt_field", "completion_field", "messages_field"):
            if not getattr(d, key):
                problems.append(f"data.{key} is empty; name the field of the SFT rows that holds it")
    if t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr} must not be above train.lr={t.lr}")
    if t.grad_clip < 0 and t.grad_clip != -1:
        problems.append(f"train.grad_clip={t.grad_clip} must be -1 (automatic), 0 (off) or positive")
    if g.sat_k > g.sat_vars:
        problems.append(f"grpo.sat_k={g.sat_k} must not exceed grpo.sat_vars={g.sat_vars} (distinct variables per clause)")
    if not g.arith_ops or set(g.arith_ops) - set("+-*"):
        problems.append(f"grpo.arith_ops={g.arith_ops!r} must be made of +, - and *")
    if g.env == "dataset" and not g.dataset:
        problems.append("grpo.env=dataset needs grpo.dataset=PATH, a JSONL or parquet file with a "
                        f"{g.prompt_field!r} field")
    if not g.prompt_field:
        problems.append("grpo.prompt_field is empty; name the dataset field that holds the prompt")
    if not all(_number(w) for w in g.reward_weights):
        problems.append(f"grpo.reward_weights={g.reward_weights!r} must be a list of numbers, one per grpo.reward")
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
    return "\n".join(f"  --{key}={default(f)!r}".ljust(44) + " " + f.metadata["help"] for key, f in keys().items())


def reference_markdown() -> str:
    """The config reference in docs/config.md: a table per section, from the fields' metadata."""
    out = []
    for section, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip() if cls.__doc__ and "Config(" not in cls.__doc__ else ""
        out.append(f"\n**`{section}`**: {doc}".rstrip(": ") + "\n\n| key | default | meaning |\n| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            meaning = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{f.name}` | `{default(f)!r}` | {meaning} |")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")


__all__ = ["Config", "load", "build", "from_dict", "read_yaml", "changed_frozen_keys", "changed_keys", "grad_clip",
           "UserError", "SECTIONS", "keys", "resume_keys", "field", "Range"]
