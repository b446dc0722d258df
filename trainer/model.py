"""Build or load GPT-2 / from-scratch GPT models, wrap them with LoRA, export HF folders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from trainer.errors import UserError

log = logging.getLogger("trainer")

def positions(model) -> int:
    """How many positions the model embeds: n_positions (GPT-2), or max_position_embeddings."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def build_model(model_cfg, vocab_size: int, eot_id: int, seed: int):
    """-> (model, block_size). from_scratch is initialised from `seed`; gpt2 is read from a
    local folder only. The block size is capped at the model's positions, with a warning."""
    from transformers import GPT2Config, GPT2LMHeadModel  # here: errors found before the model need not wait for it

    block_size = model_cfg.block_size
    if model_cfg.type == "from_scratch":
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=model_cfg.n_embd,
                            n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, resid_pdrop=model_cfg.dropout,
                            embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout,
                            bos_token_id=eot_id, eos_token_id=eot_id)
        model = GPT2LMHeadModel(config)
    else:
        model = load_pretrained(model_cfg.path, dropout=model_cfg.dropout)
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if vocab_size > model_vocab:
            raise UserError(f"vocab mismatch: the tokenizer has {vocab_size} tokens but the model at "
                            f"{model_cfg.path} has {model_vocab}; prepare the data with the model's tokenizer "
                            "(data.tokenizer=gpt2)")
        embedded = positions(model)
        if block_size > embedded:
            log.warning(f"model.block_size={block_size} is more than the model's {embedded} positions; using {embedded}")
            block_size = embedded
    if model_cfg.lora:
        model = add_lora(model, model_cfg)
    return model, block_size


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


def load_pretrained(path: str | Path, dropout: float | None = None):
    """A local HF folder, never the Hub. A folder that is not a loadable model is one line."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from trainer.offline import NetworkBlocked

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would bury a one-line error
    path = check_pretrained(path)
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


def add_lora(model, model_cfg):
    import warnings

    from peft import LoraConfig, get_peft_model

    targets = list(model_cfg.lora_targets)
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise UserError(f"model.lora_targets names {', '.join(unknown)}, which the model at {model_cfg.path} does "
                        f"not have; its layers are {', '.join(sorted(leaves))}")
    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM",
                        fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as (in, out)
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
    (a file, someone's folder, another run's export) is refused, never deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"export destination {out} is a file; pass a folder path with --out")
    if os.path.ismount(out):
        raise UserError(f"export destination {out} is a mount point, which cannot be replaced; pass a folder "
                        f"inside it, e.g. --out {out / 'export'}")
    if out.is_dir() and any(out.iterdir()):
        try:
            owner = json.loads((out / EXPORT_INFO).read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner is None or (owner != run and not any_run):
            what = f"an export of run {owner!r}" if owner else f"not an Airlock export (no {EXPORT_INFO})"
            raise UserError(f"export destination {out} is not empty and is {what}; Airlock replaces only an "
                            f"earlier export of run {run!r}: pass an empty or new folder with --out")
    return out


def export(model, tokenizer, out: str | Path, merge: bool = False, extra: dict | None = None,
           any_run: bool = False) -> Path:
    """Write an HF folder: AutoModelForCausalLM loads it (or PeftModel, for an unmerged
    adapter). Built beside `out` and swapped in, so a half-written export never replaces a
    good one; `out` may only be new, empty, or an earlier export of the same run."""
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
            to_hf(tokenizer).save_pretrained(str(tmp))
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
            atomic.replace_dir(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write the export to {out} ({e.strerror or e}); check that the folder above it "
                        "exists and is writable with space left, or pass another folder with --out") from None
    return out
