"""What the training loop and the evaluator share: the language-model loss, the fixed-batch
validation estimate, the sample prompt, and the check that a checkpoint's data is at hand."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer import data, distributed, runtime
from trainer import tokenizer as tk
from trainer.errors import UserError

log = logging.getLogger("trainer")


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, masked: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy; x, y (B, T) ids.

    masked (data.format=sft, `Batches.masked`): y holds data.IGNORE_INDEX (-100, the label
    convention of HF and TRL) for the targets the loss skips, the prompt tokens. The loss is
    the mean over the counted targets of the micro-batch, so every completion token weighs the
    same however many prompt tokens surround it; a skipped target adds nothing to the loss or
    the gradient. A micro-batch with no counted target (a window inside a prompt) has loss 0
    and no gradient, where a plain mean would be 0/0 = NaN. Labels rather than a float weight:
    the sampler keeps returning (x, y), so nothing else that reads batches changes."""
    logits = model(input_ids=x).logits  # (B, T, V)
    flat = logits.reshape(-1, logits.size(-1)).float()
    if not masked:  # the text path, exactly as before (its losses are compared bit for bit)
        return F.cross_entropy(flat, y.reshape(-1))
    total = F.cross_entropy(flat, y.reshape(-1), ignore_index=data.IGNORE_INDEX, reduction="sum")
    return total / (y != data.IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def estimate_loss(model, batches: data.Batches, iters: int, device, dtype: str = "auto") -> float:
    """Mean val loss over the same `iters` batches every time, so evaluations compare. Under
    torchrun the ranks share the batches (rank r takes i = r, r + world, ...) and the mean is
    all-reduced, so every rank returns the same number."""
    was_training = model.training
    model.eval()
    r = distributed.ranks()
    losses = []
    for i in range(r.rank, iters, r.world):
        x, y = batches.get_batch("val", i)
        with runtime.autocast(device, dtype):
            losses.append(lm_loss(model, x.to(device), y.to(device), masked=batches.masked).item())
    model.train(was_training)
    if r.world == 1:
        return sum(losses) / len(losses)
    total, count = distributed.all_sum([sum(losses), float(len(losses))], device)
    return total / count


def sample_prompt(cfg, tok, prepared: Path | None = None) -> list[int]:
    """The seeds' end-of-run sample prompt as ids: sample.prompt, which must encode to at least
    one token; for data.format=sft the first whole prompt of the held-out split (`prepared`'s
    val.bin: data.heldout_prompt); else `QUESTION: ` for gpt2, the start token otherwise."""
    s = cfg.sample
    if s.prompt:
        ids = tok.encode(s.prompt).ids
        if not ids:
            raise UserError(f"sample.prompt={s.prompt!r} encodes to no tokens with this tokenizer "
                            f"({cfg.data.tokenizer}); use text the corpus contains")
        return ids
    if cfg.data.format == "sft" and prepared is not None:
        ids = data.heldout_prompt(prepared)
        if ids:
            return ids
        log.warning(f"{prepared}/val.bin holds no whole prompt (its held-out examples are cut by the split): the "
                    "end-of-run sample starts without one; set sample.prompt to choose one")
    if cfg.model.type == "gpt2":
        return tok.encode("QUESTION: ").ids
    return [tk.eot_id(tok)]


def expected_data(step_dir: Path, metrics_dir: Path) -> dict:
    """{file: sha256} of the prepared data a checkpoint was trained on: its own record, or for
    checkpoints older than that record, the run's provenance and the checkpoint's tokenizer copy."""
    saved = ckpt.read_trainer_state(step_dir).get(ckpt.DATA)
    if saved is None:
        try:
            saved = json.loads((Path(metrics_dir) / "manifest.json").read_text()).get("data_sha256") or {}
        except (OSError, ValueError, AttributeError):
            saved = {}
        tokenizer = ckpt.recorded_sha256(step_dir, ckpt.TOKENIZER)
        saved = {**saved, **({tk.TOKENIZER_FILE: tokenizer} if tokenizer else {})} if isinstance(saved, dict) else saved
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in saved.items()):
        raise UserError(f"checkpoint {step_dir} is corrupt: {ckpt.TRAINER_STATE} {ckpt.DATA!r} is not a mapping of "
                        "file names to sha256; resume from an older step with --checkpoint")
    return saved


def check_same_data(expect: dict, prepared: Path, step_dir: Path, run: str) -> None:
    """A resume must read the tokens and tokenizer the checkpoint was trained on: the files as
    they are now are hashed, not what meta.json says of them."""
    if not expect:
        log.warning(f"{step_dir} records no data fingerprint: cannot check that {prepared} is its data")
        return
    now = data.fingerprint(prepared, names=tuple(expect))
    differ = [name for name in expect if now.get(name) != expect[name]]
    if differ:
        raise UserError(f"prepared data {prepared} is not what run {run} was trained on ({', '.join(differ)} "
                        "differ from the checkpoint's sha256); re-prepare it from the run's original source and "
                        "settings, or start a new run with `trainer train`")
