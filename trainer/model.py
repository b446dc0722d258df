"""Build or load GPT-2 / from-scratch GPT models, wrap them with LoRA, export HF folders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trainer.errors import UserError

log = logging.getLogger("trainer")

GPT2_HUB_ID = "openai-community/gpt2"


def _positions(model) -> int:
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)


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
        positions = _positions(model)
        if block_size > positions:
            log.warning(f"model.block_size={block_size} is more than the model's {positions} positions; using {positions}")
            block_size = positions
    if model_cfg.lora:
        model = add_lora(model, model_cfg)
    return model, block_size


def load_pretrained(path: str | Path, dropout: float | None = None):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would bury a one-line error
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"model.path={str(path)!r} holds no HF model (config.json missing); run `just vendor` "
                        "(or `just vendor --fixture` for a tiny test model) or point model.path at a local folder")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would land in stderr next to real errors
    kwargs = {}
    if dropout is not None:
        kwargs = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)


def add_lora(model, model_cfg):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=list(model_cfg.lora_targets), task_type="CAUSAL_LM",
                        fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as (in, out)
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


def export(model, tokenizer, out: str | Path, merge: bool = False, extra: dict | None = None) -> Path:
    """Write an HF folder: AutoModelForCausalLM loads it (or PeftModel, for an unmerged
    adapter). Written to out.tmp and renamed, so a half-written export never replaces a good one."""
    from trainer.tokenizer import to_hf

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter train.log
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target = model
    if is_peft(model) and merge:
        import copy

        target = copy.deepcopy(model).merge_and_unload()
    target.save_pretrained(str(tmp), safe_serialization=True)
    to_hf(tokenizer).save_pretrained(str(tmp))
    info = {"format": "peft-adapter" if is_peft(target) else "transformers", **(extra or {})}
    (tmp / "airlock.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_command(run: str | None = None, checkpoint: str | None = None, out: str | None = None,
                   merge: bool = False, out_dir: str = "volumes") -> str:
    """Write a checkpoint as a Hugging Face folder (AutoModelForCausalLM / PeftModel load it).

    Args:
      run: run name (newest valid checkpoint); default: the most recent run.
      checkpoint: a step directory (also $CHECKPOINT_PATH).
      out: destination folder; default <run>/export_<step>.
      merge: for LoRA runs, merge the adapter into the base weights (a plain transformers model).
    """
    from trainer import checkpoint as ckpt
    from trainer.offline import go_offline

    go_offline()
    step_dir = ckpt.locate(run, checkpoint, out_dir)
    model, tok, cfg, state = ckpt.restore(step_dir)
    dest = Path(out) if out else step_dir.parent / f"export_{step_dir.name}{'_merged' if merge else ''}"
    export(model, tok, dest, merge=merge, extra={"run": cfg.run.name, "checkpoint": step_dir.name,
                                                  "weights_sha256": weights_sha256(model)})
    print(f"exported {step_dir} to {dest}" + (" (LoRA merged)" if merge and cfg.model.lora else ""))
    return str(dest)
