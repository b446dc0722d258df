"""GRPO off the CPU. Issue 18: on a GPU the first update crashed ("Expected all tensors to be
on the same device"): rollouts are built on the CPU and train_epoch handed them to a policy on
CUDA. No CPU test could see it, because on a CPU host everything is on the CPU.

Here a CPU host gets a second device: `elsewhere()` puts tensors on a device that is not the
CPU (they say `meta`, but hold CPU data and compute with CPU kernels, so every number is real)
and enforces CUDA's rule that an op's tensors share one device, save 0-dim CPU tensors and the
indices of advanced indexing. With the policy there:

- the real train_epoch on a batch from the real rollout_batch fails on the code before the fix
  with that error, and now gives the CPU's numbers (to float rounding);
- the whole `grpo()` loop (local rollouts, updates, evaluations, checkpoints) runs, and its first
  evaluation, sampled before any update, equals the CPU run's;
- AdamW is fused on CUDA and runtime.configure gets run.device and run.deterministic.

The tests marked `gpu` run the same on a real GPU (`pytest -m gpu`; they skip without CUDA):
bf16 autocast in the update, float32 where log-probs meet the sampler's and the probe's. The
last test runs scripts/gpu_check.py (`just gpu-check`) on the CPU, one row.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.grpo.conftest import tiny_model
from trainer import config as configs
from trainer import runtime
from trainer.grpo import loop
from trainer.grpo.algorithm import token_logprobs
from trainer.grpo.rollout import Completion

AWAY = torch.device("meta")  # the device that is not the CPU (its tensors here hold CPU data)
aten = torch.ops.aten
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}  # what moves data between devices


class Away(torch.Tensor):
    """A CPU tensor (`elem`) that reports AWAY as its device."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=AWAY, requires_grad=False)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an Away tensor outside elsewhere()")


def _is_away(device) -> bool:
    return device is not None and torch.device(device).type == AWAY.type


class _Ops(TorchDispatchMode):
    """Every aten op: CUDA's device rule, then the CPU kernel on the unwrapped data; results of ops
    on AWAY tensors (or made with device=AWAY) are wrapped again."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # an empty tensor made on AWAY below the dispatcher (e.g. a cache's torch.tensor([])): no data to lose
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: Away(torch.empty(t.shape, dtype=t.dtype))
            if type(t) is torch.Tensor and t.device == AWAY and t.numel() == 0 else t, (args, kwargs))
        leaves = pytree.tree_leaves((args, kwargs))
        away = any(isinstance(t, Away) for t in leaves)
        made_away = _is_away(kwargs.get("device"))
        if func is aten._local_scalar_dense.default:  # .item(): the device's data comes to the host
            return func(args[0].elem if isinstance(args[0], Away) else args[0])
        if away and func not in COPIES:
            checked = pytree.tree_leaves((args[:1] + args[2:], kwargs)) if func in INDEXING else leaves
            other = [t for t in checked if isinstance(t, torch.Tensor) and not isinstance(t, Away)
                     and (t.dim() > 0 or t.device != torch.device("cpu"))]
            if other:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{AWAY} and {other[0].device}! (when checking the arguments of {func})")
        if made_away:
            kwargs["device"] = torch.device("cpu")
        out = func(*pytree.tree_map_only(Away, lambda t: t.elem, args),
                   **pytree.tree_map_only(Away, lambda t: t.elem, kwargs))
        if not (made_away or (away and not (func in COPIES and "device" in kwargs))):
            return out  # a plain CPU op, or a copy from AWAY to the CPU
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and returns[0].alias_info.is_write:
            return args[0]  # in place: the same wrapper
        return pytree.tree_map_only(torch.Tensor, Away, out)


class _Host(TorchFunctionMode):
    """What the dispatcher does not see: torch.tensor(data, device=AWAY) copies its data below it,
    and .tolist() reads memory directly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_away(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(AWAY)
        if func is torch.Tensor.tolist and isinstance(args[0], Away):
            return args[0].elem.tolist()
        return func(*args, **kwargs)


@contextlib.contextmanager
def elsewhere():
    """AWAY works as a device of its own while inside; `module.to(AWAY)` keeps tied weights tied."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _Ops(), _Host():
            yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def test_elsewhere_enforces_cudas_device_rule():
    with elsewhere():
        weight = torch.randn(5, 3).to(AWAY)
        ids = torch.tensor([1, 2])
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            torch.nn.functional.embedding(ids, weight)  # what issue 18's policy met
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            weight * torch.ones(5, 3)
        got = torch.nn.functional.embedding(ids.to(AWAY), weight) * torch.tensor(2.0)  # a 0-dim CPU scalar is fine
        assert got.device == AWAY and weight[ids].device == AWAY  # CPU indices are fine, as on CUDA
        assert torch.equal(got.to("cpu"), torch.nn.functional.embedding(ids, weight.to("cpu")) * 2)


CFG = {"grpo.ppo_epochs": 2, "grpo.minibatch_size": 8, "grpo.beta": 0.05, "grpo.max_tokens": 4,
       "grpo.group_size": 4, "run.device": "cpu"}


class Answers:
    """A backend that answers every prompt with the same fixed completions (ids and log-probs as
    a server sends them): the batch rollout_batch builds from them is on the CPU."""

    stats: dict = {}

    def generate(self, prompts, n, seed, params):
        done = [Completion("ab", [5, 6], [-1.5, -0.5], "stop"), Completion("a", [5], [-2.0], "stop"),
                Completion("abc", [5, 6, 7, 8], [-1.0, -1.0, -1.0, -1.0], "length"),
                Completion("b", [6, 0], [-0.7, -0.1], "stop")]
        return [done[:n] for _ in prompts]


def cpu_batch(cfg, tok):
    from trainer.grpo import envs
    from trainer.grpo.rewards import Scorer

    problems = envs.train_problems("repeat", 0, 4, chars="abcd", length=3)
    scorer = Scorer.load("repeat")
    batch, _, _ = loop.rollout_batch(Answers(), cfg, problems, None, scorer, 0, tok, 1)
    assert all(t.device.type == "cpu" for t in batch.values())
    return batch


@pytest.mark.parametrize("how, lora", [({}, False), ({"grpo.ppo_epochs": 1, "grpo.minibatch_size": 64}, False),
                                       ({}, True)], ids=["two-epochs", "single-update", "lora"])
def test_update_runs_on_the_policys_device(tok, how, lora):
    """The batch from rollout_batch (CPU) meets a policy elsewhere: the same numbers as on the CPU.
    With LoRA the reference is the policy with its adapter disabled."""
    cfg = configs.load(None, **{**CFG, **how})
    batch = cpu_batch(cfg, tok)
    results = {}
    for where in ("cpu", "away"):
        policy = tiny_model(tok.get_vocab_size())
        if lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                                    fan_in_fan_out=True))
            for name, p in policy.named_parameters():  # B = 0 would leave the first update without a ratio != 1
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        with elsewhere() if where == "away" else contextlib.nullcontext():
            if where == "away":
                policy.to(AWAY)
            ref = None if lora else copy.deepcopy(policy).requires_grad_(False)
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.grpo.lr)
            stats = loop.train_epoch(policy, ref, optimizer, batch, cfg, 1, server=True)
            weights = [p.detach().to("cpu") for p in policy.parameters()]
        assert all(p.device == (AWAY if where == "away" else torch.device("cpu")) for p in policy.parameters())
        results[where] = stats, weights
    (cpu, cpu_weights), (away, away_weights) = results["cpu"], results["away"]
    assert cpu.keys() == away.keys() and cpu["is_weight_mean"] is not None
    for k in cpu:
        assert away[k] == pytest.approx(cpu[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(away_weights, cpu_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


SMALL = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "model.dropout": 0.0,
         "grpo.iterations": 2, "grpo.prompts_per_iter": 4, "grpo.group_size": 4, "grpo.max_tokens": 8,
         "grpo.lr": 0.003, "grpo.beta": 0.05, "grpo.ppo_epochs": 2, "grpo.minibatch_size": 8, "eval.interval": 2,
         "eval.num_problems": 4, "eval.replicates": 2, "checkpoint.keep_last": 0, "run.device": "cpu"}


def test_grpo_loop_runs_elsewhere(tmp_path, monkeypatch):
    """`trainer grpo` with its device elsewhere: rollouts, updates, evaluations and checkpoints, and
    the evaluation before any update equals the CPU run's; runtime.configure gets the device and
    run.deterministic."""
    configured = []
    real_configure = runtime.configure
    monkeypatch.setattr(runtime, "configure", lambda device, det=False: configured.append((device, det))
                        or real_configure(device, det))
    cpu = loop.grpo(configs.load(None, **{**SMALL, "run.out_dir": str(tmp_path), "run.name": "cpu"}))
    monkeypatch.setattr(runtime, "pick_device", lambda name: AWAY)
    with elsewhere():
        away = loop.grpo(configs.load(None, **{**SMALL, "run.out_dir": str(tmp_path), "run.name": "away",
                                               "run.deterministic": True}))
    assert configured == [(torch.device("cpu"), False), (AWAY, True)]
    assert away["iteration"] == 2 and away["evals"][0] == cpu["evals"][0]
    for i in (1, 2):
        row = json.loads((tmp_path / "metrics" / "away" / f"train_iter_{i:03d}.json").read_text())
        assert all(row[k] == row[k] for k in ("loss", "kl", "entropy", "logprob_mismatch"))  # finite, not NaN
        assert row["logprob_mismatch"] < 1e-5  # the sampler's log-probs are the trainer's
    assert (tmp_path / "checkpoints" / "away" / "iter_000002").is_dir()


def test_optimizer_is_fused_on_cuda_only():
    cfg = configs.load(None, **CFG)
    policy = tiny_model(20)
    assert loop.make_optimizer(policy, cfg, torch.device("cuda")).defaults["fused"] is True
    assert not loop.make_optimizer(policy, cfg, torch.device("cpu")).defaults["fused"]


# ------------------------------------------------------------------ on a real GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_cuda_update_keeps_the_sampler_basis_in_float32(tok):
    """On CUDA the update is bf16, yet pi_old^1 is IEEE float32: against the CPU's float32 log-probs
    as the sampler's, the importance weights are 1 and logprob_mismatch ~1e-6 (TF32 gives ~1e-3,
    bf16 ~1e-2); and with pi_old and the reference under the same autocast as the update, the first
    (single) update sees ratio 1 and KL ~0 (a float32 reference against a bf16 policy: ~1e-4)."""
    cfg = configs.load(None, **{**CFG, "grpo.ppo_epochs": 1, "grpo.minibatch_size": 64})
    batch = cpu_batch(cfg, tok)
    policy = tiny_model(tok.get_vocab_size(), n_embd=64)
    assert cfg.grpo.temperature == 1.0  # so the sampler's basis is the scored log-prob itself
    with torch.no_grad():  # the CPU's float32 log-probs, as a float32 sampler reports them
        batch["sampler"] = token_logprobs(policy, batch["ids"], batch["attn"], batch["sampled"]).logps
    device = torch.device("cuda")
    runtime.configure(device)
    policy.to(device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    stats = loop.train_epoch(policy, ref, loop.make_optimizer(policy, cfg, device), batch, cfg, 1, server=True)
    assert stats["logprob_mismatch"] < 1e-4
    assert abs(stats["is_weight_mean"] - 1) < 1e-4 and abs(stats["is_weight_max"] - 1) < 1e-3
    assert stats["clip_ratio"] == 0.0 and stats["kl"] < 1e-5


@pytest.mark.gpu
@cuda
def test_grpo_on_cuda(tmp_path):
    """The loop on a GPU with the local backend: runs, checkpoints, and the local sampler's
    log-probs match the trainer's float32 ones."""
    out = loop.grpo(configs.load(None, **{**SMALL, "run.out_dir": str(tmp_path), "run.name": "cuda",
                                          "run.device": "cuda"}))
    assert out["iteration"] == 2
    for i in (1, 2):
        row = json.loads((tmp_path / "metrics" / "cuda" / f"train_iter_{i:03d}.json").read_text())
        assert row["logprob_mismatch"] < 1e-4 and row["loss"] == row["loss"]


@pytest.mark.gpu
@cuda
def test_probe_in_full_precision_matches_the_cpu(tok):
    from trainer.grpo.sync import probe_logprobs

    policy = tiny_model(tok.get_vocab_size(), n_embd=64)
    ids = tok.encode("a*3=aaa\nb*2=bb\nc*4=cccc").ids
    cpu = probe_logprobs(policy, ids)
    device = torch.device("cuda")
    runtime.configure(device)  # TF32 on for the process, as in a run
    policy.to(device)
    with runtime.full_precision(device):
        gpu = probe_logprobs(policy, ids)
    assert float((gpu - cpu).abs().mean()) < 1e-5


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_check.py (`just gpu-check`) with --device cpu, one row: the real CLI in a
    subprocess, the markdown table with a verdict per row, the JSON and the log (the whole
    script on the CPU takes about 4 minutes: too long for a test)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), "--device", "cpu", "--only",
                           "grpo local", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=root, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu-check.md").read_text()
    assert "| grpo local | GRPO, local backend | pass |" in table and "mismatch <=" in table
    assert "| bench | bench/throughput.py, short | skip |" in table
    rows = {r["row"]: r for r in json.loads((out / "gpu-check.json").read_text())["rows"]}
    assert rows["grpo local"]["status"] == "pass" and len(rows) == 15
    assert "-m trainer grpo --config configs/grpo_repeat.yaml" in (out / "gpu-check.log").read_text()
