"""Build or load models (from-scratch GPTs, GPT-2, any local HF causal LM), wrap them with LoRA,
export HF folders.

model.type=gpt2 loads a GPT-2 folder as it always has. model.type=hf loads any folder
`AutoModelForCausalLM` reads, from local files only: model.dropout goes to that architecture's
own dropout keys (its config names them; none and dropout > 0 is refused), the weights are
float32 for training (on the CPU that keeps a resume bit-exact), except the frozen base of a
LoRA run on a GPU, which keeps the folder's bf16/fp16 (`build_model(device=...)`). LoRA targets
the architecture's linear layers unless model.lora_targets names others, and uses
fan_in_fan_out only for GPT-2-style Conv1D layers, whose weights are stored (in, out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from trainer import atomic
from trainer.errors import UserError

log = logging.getLogger("trainer")

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # model.lora_targets' default: GPT-2's Conv1D layers
# config keys that hold a dropout probability, e.g. resid_pdrop (GPT-2), attention_dropout (Llama,
# Qwen2), hidden_dropout (GPT-NeoX), embed_dropout (GPT-Neo); not the heads' or LayerDrop's
DROPOUT_KEY = re.compile(r"(dropout|pdrop|dropout_prob|dropout_rate)$")
NOT_DROPOUT = ("classifier", "summary", "layerdrop", "lora", "rope")


def positions(model) -> int:
    """How many positions the model embeds: n_positions (GPT-2), or max_position_embeddings."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def build_model(model_cfg, vocab_size: int, eot_id: int, seed: int, device=None):
    """-> (model, block_size). from_scratch is initialised from `seed`; gpt2 and hf are read
    from a local folder only. The block size is capped at the model's positions, with a
    warning. `device`, where the model will run, only picks the dtype of a frozen LoRA base
    (the folder's own on CUDA; float32 otherwise)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # here: errors found before the model need not wait for it

    block_size = model_cfg.block_size
    if model_cfg.type == "from_scratch":
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=model_cfg.n_embd,
                            n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, resid_pdrop=model_cfg.dropout,
                            embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout,
                            activation_function=model_cfg.activation, bos_token_id=eot_id, eos_token_id=eot_id)
        model = GPT2LMHeadModel(config)
    else:
        keep_dtype = model_cfg.lora and device is not None and torch.device(device).type == "cuda"
        model = load_pretrained(model_cfg.path, dropout=model_cfg.dropout, kind=model_cfg.type,
                                dtype="auto" if keep_dtype else None)
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if vocab_size > model_vocab:
            own = "gpt2" if model_cfg.type == "gpt2" else "model"
            raise UserError(f"vocab mismatch: the tokenizer has {vocab_size} tokens but the model at "
                            f"{model_cfg.path} has {model_vocab}; prepare the data with the model's tokenizer "
                            f"(data.tokenizer={own})")
        embedded = positions(model)
        if block_size > embedded:
            key = "n_positions" if getattr(model.config, "n_positions", None) else "max_position_embeddings"
            log.warning(f"model.block_size={block_size} is more than the model's {embedded} positions; using "
                        f"{embedded} (its config.json's {key})")
            block_size = embedded
    if model_cfg.lora:
        model = add_lora(model, model_cfg)
    return model, block_size


# cuBLAS picks its tensor-core GEMM kernels by shape: a 50,257-row output head (GPT-2's vocabulary,
# not a multiple of 64) falls back to a Turing-era kernel at about a tenth of an H100's matrix rate
HEAD_MULTIPLE = 64


class PaddedHead(torch.nn.Module):
    """An output head whose matmul runs on its rows padded with zeros to a multiple of
    HEAD_MULTIPLE, the logits cut back to the real vocabulary (nanoGPT pads the vocabulary
    itself; here the model keeps its rows, so checkpoints, exports and a fine-tuned GPT-2 keep
    50,257). The same `weight` Parameter as the head it replaces, under the same state-dict
    names: a tied head stays tied, the optimizer and checkpoints see no change. The logits
    are a view with the padded row stride; reshape, not view, flattens them."""

    def __init__(self, head: torch.nn.Linear, multiple: int = HEAD_MULTIPLE) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.rows = head.weight.shape[0]
        self.extra = -self.rows % multiple

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = torch.nn.functional.pad(self.weight, (0, 0, 0, self.extra))
        bias = None if self.bias is None else torch.nn.functional.pad(self.bias, (0, self.extra))
        return torch.nn.functional.linear(hidden, weight, bias)[..., :self.rows]


def pad_head(model, multiple: int = HEAD_MULTIPLE) -> int:
    """Compute `model`'s output head as a PaddedHead when its rows are not a multiple of
    `multiple` and it is a plain nn.Linear (a LoRA model's frozen head too). -> the padded row
    count, 0 where nothing changed. For CUDA (train.setup): on the CPU the padding is pure cost."""
    base = model.get_base_model() if is_peft(model) else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.shape[0] % multiple == 0:
        return 0
    padded = PaddedHead(head, multiple)
    base.set_output_embeddings(padded)
    return padded.rows + padded.extra


def check_pretrained(path: str | Path) -> Path:
    """A cheap look at a model folder, so a wrong model.path is refused before data is prepared."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"model.path={str(path)!r} holds no HF model (config.json missing); run `just vendor` "
                        "(or `just vendor --fixture` for a tiny test model) or point model.path at a local folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise UserError(f"model.path={str(path)!r} has a config.json but no weights (*.safetensors); copy the "
                        "model's weight files there or run `just vendor` again")
    return path


def model_type(path: str | Path) -> str | None:
    """config.json's model_type ("gpt2", "llama" ...), None when it is unreadable or has none."""
    try:
        found = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def dropout_keys(config) -> list[str]:
    """The keys of an HF config that are its architecture's dropout probabilities."""
    return sorted(k for k, v in config.to_dict().items()
                  if DROPOUT_KEY.search(k) and not k.startswith(NOT_DROPOUT)
                  and isinstance(v, (int, float)) and not isinstance(v, bool))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _load_config(path: Path):
    """AutoConfig from the folder, or a UserError that says what is wrong with its config.json."""
    import transformers
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={str(path)!r}: config.json is not readable JSON ({_first_line(e)}); copy the "
                        "model's config.json again") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(kind, str) or not kind:
        raise UserError(f"model.path={str(path)!r}: config.json names no model_type; it is not a transformers "
                        "model config (copy the model's own config.json)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, OSError ... here
        if "auto_map" in raw or "trust_remote_code" in str(e):
            raise UserError(f"model.path={str(path)!r} holds a {kind!r} model that needs its own Python code "
                            "(auto_map, trust_remote_code), which Airlock does not run; use a model whose "
                            f"architecture transformers {transformers.__version__} has built in") from None
        raise UserError(f"model.path={str(path)!r}: its config.json (model_type {kind!r}) cannot be read by "
                        f"transformers {transformers.__version__} ({e.__class__.__name__}: {_first_line(e)}); the "
                        "architecture may be newer than this transformers, or the file is damaged") from None


def set_dropout(config, dropout: float, path: Path) -> list[str]:
    """model.dropout into the config's own dropout keys; -> the keys set. An architecture with
    none cannot apply a dropout above 0: that is refused rather than silently ignored."""
    found = dropout_keys(config)
    if not found and dropout > 0:
        raise UserError(f"model.dropout={dropout} but the {config.model_type} model at {path} has no dropout setting "
                        "in its config; set model.dropout=0 (LoRA has its own model.lora_dropout)")
    for key in found:
        setattr(config, key, dropout)
    return found


def load_pretrained(path: str | Path, dropout: float | None = None, kind: str = "gpt2", dtype=None):
    """A local HF folder, never the Hub. A folder that is not a loadable model is one line.
    kind="gpt2": a GPT-2 folder, with model.dropout in resid/embd/attn_pdrop (as Airlock always
    loaded it). kind="hf": any AutoModelForCausalLM folder, dropout through its own keys, in
    `dtype` (None: float32; "auto": the folder's)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from trainer.offline import NetworkBlocked

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would bury a one-line error
    path = check_pretrained(path)
    if kind == "gpt2":
        found = model_type(path)
        if found not in (None, "gpt2"):
            raise UserError(f"model.path={str(path)!r} holds a {found!r} model, not GPT-2; load it with "
                            "model.type=hf (and data.tokenizer=model for its own tokenizer)")
        kwargs = {}
        if dropout is not None:
            kwargs = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
        except NetworkBlocked:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a broken folder
            raise UserError(f"model.path={str(path)!r} cannot be loaded ({e.__class__.__name__}: {e}); check its "
                            "config.json and weight files, or run `just vendor` again") from None
    config = _load_config(path)
    if dropout is not None:
        keys = set_dropout(config, dropout, path)
        if dropout > 0:
            log.info(f"model.dropout={dropout} set {', '.join(keys)} of the {config.model_type} config")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True,
                                                           dtype=dtype or torch.float32, output_loading_info=True)
    except NetworkBlocked:
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(f"model.path={str(path)!r} holds a {config.model_type!r} model, which is not a causal "
                            "language model (AutoModelForCausalLM has no class for it); use a model that generates "
                            "text") from None
        raise UserError(f"model.path={str(path)!r}: the {config.model_type} weights cannot be loaded "
                        f"({e.__class__.__name__}: {_first_line(e)}); check its weight files") from None
    except Exception as e:  # noqa: BLE001 - a size mismatch, a damaged safetensors file, a missing shard...
        raise UserError(f"model.path={str(path)!r}: the {config.model_type} weights cannot be loaded "
                        f"({e.__class__.__name__}: {_first_line(e)}); check its weight files against its "
                        "config.json, or copy the model again") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"model.path={str(path)!r}: its weight files lack {len(missing)} tensor(s) the "
                        f"{config.model_type} config needs (e.g. {missing[0]}); copy every weight file "
                        "(model*.safetensors and its index) again")
    return model


def _linear_layers(model) -> dict[str, torch.nn.Module]:
    """{module path: module} of the linear layers (nn.Linear, transformers' Conv1D) LoRA may
    adapt: every one but the output head, as peft's "all-linear" picks them."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def lora_targets(model, model_cfg) -> list[str]:
    """The module names LoRA adapts: model.lora_targets, except that its default (GPT-2's
    layers) on a model without them means the architecture's linear layers."""
    targets = list(model_cfg.lora_targets)
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    if model_cfg.type != "gpt2" and targets == GPT2_TARGETS and not set(targets) <= leaves:
        found = sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})
        log.info(f"LoRA adapts the model's linear layers: {', '.join(found)} (model.lora_targets names others)")
        return found
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise UserError(f"model.lora_targets names {', '.join(unknown)}, which the model at {model_cfg.path} does "
                        f"not have; its layers are {', '.join(sorted(leaves))}")
    return targets


def add_lora(model, model_cfg):
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, model_cfg)
    # GPT-2's Conv1D stores weights as (in, out): peft must transpose its delta there, and only there
    conv1d = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; nothing for a user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices decay; biases, norms and 1-D LoRA-free params do not (nanoGPT's rule)."""
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def weights_sha256(model) -> str:
    """sha256 over every tensor of the state dict in key order: the run's fingerprint."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in trainable_parameters(model))


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights `model` computes with, under the plain transformers names: a LoRA model's
    adapter is added to its base weights (peft's delta, Conv1D layout included) without
    touching the model itself (merge + unmerge would round the base weights and break an
    exact resume). A tied output head is written out as its own tensor: a loader that reloads
    weights in place (vLLM's reload_weights) would otherwise keep the old head."""
    base = model.get_base_model() if is_peft(model) else model
    deltas = {}
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                with torch.no_grad():
                    deltas[name + ".weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters
                                                   if a in module.lora_A)
    out = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        tensor = tensor.detach()
        out[key] = tensor + deltas[key] if key in deltas else tensor
    embeddings = base.get_input_embeddings().weight.detach()
    head = base.get_output_embeddings()
    if head is not None and "lm_head.weight" not in out and head.weight is base.get_input_embeddings().weight:
        out["lm_head.weight"] = embeddings
    # safetensors stores no shared tensors, and contiguous ones only
    return {k: v.to("cpu", copy=True).contiguous() for k, v in out.items()}


def write_weights(model, folder: Path, extra: dict | None = None) -> str:
    """config.json + model.safetensors (merged_state_dict) + airlock.json in `folder`, which must
    exist. -> the sha256 of model.safetensors. A folder transformers and vLLM load as a model."""
    from safetensors.torch import save_file

    base = model.get_base_model() if is_peft(model) else model
    base.config.to_json_file(str(folder / "config.json"))
    save_file(merged_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / EXPORT_INFO).write_text(json.dumps({"format": "transformers", **(extra or {}),
                                                  "model_sha256": digest}, indent=2) + "\n")
    return digest


EXPORT_INFO = "airlock.json"  # marks a folder as an Airlock export and names its run


def check_export_target(out: str | Path, run: str, any_run: bool = False) -> Path:
    """An export may create `out` or replace an earlier export of the same run (of any run with
    `any_run`: a run's own final/, which a copied or renamed run inherits); anything else there
    (a file, someone's folder, another run's export) is refused, never deleted. A run checks its
    final/ before step 1 as well, so a whole run never ends on this refusal."""
    out = Path(out)
    fix = ("move it away, or set train.export_at_end=false" if any_run else
           "pass an empty or new folder with --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"export destination {out} is a file; {fix}")
    if os.path.ismount(out):
        raise UserError(f"export destination {out} is a mount point, which cannot be replaced; "
                        + ("set train.export_at_end=false" if any_run else f"pass a folder inside it, e.g. --out "
                                                                            f"{out / 'export'}"))
    if out.is_dir() and any(out.iterdir()):
        try:
            owner = atomic.parse_json(atomic.read_small(out / EXPORT_INFO)).get("run")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner is None or (owner != run and not any_run):
            what = f"an export of run {owner!r}" if owner else f"not an Airlock export (no readable {EXPORT_INFO})"
            raise UserError(f"export destination {out} is not empty and is {what}; Airlock replaces only an "
                            f"earlier export of run {run!r}: {fix}")
    return out


def export(model, tokenizer, out: str | Path, merge: bool = False, extra: dict | None = None,
           any_run: bool = False, chat_template: str | None = None) -> Path:
    """Write an HF folder: AutoModelForCausalLM loads it (or PeftModel, for an unmerged
    adapter), AutoTokenizer its tokenizer, with `chat_template` (the model folder's, which SFT
    trained with) for apply_chat_template and the servers' chat endpoints. Built beside `out`
    and swapped in, so a half-written export never replaces a good one; `out` may only be new,
    empty, or an earlier export of the same run."""
    from transformers.utils import logging as hf_logging

    from trainer import atomic
    from trainer.tokenizer import to_hf

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter train.log
    info = {"format": "peft-adapter" if is_peft(model) and not merge else "transformers", **(extra or {})}
    out = check_export_target(out, info.get("run", ""), any_run)
    target = model
    if is_peft(model) and merge:
        import copy

        target = copy.deepcopy(model).merge_and_unload()
    try:
        with atomic.staging_dir(out) as tmp:
            target.save_pretrained(str(tmp), safe_serialization=True)
            hf_tok = to_hf(tokenizer)
            if chat_template:
                hf_tok.chat_template = chat_template
            hf_tok.save_pretrained(str(tmp))
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
            atomic.replace_dir(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write the export to {out} ({e.strerror or e}); check that the folder above it "
                        "exists and is writable with space left, or pass another folder with --out") from None
    return out
