"""Device, dtype, seeding and RNG capture/restore (the stop-signal flag is trainer.signals)."""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    """`auto` is cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from trainer.errors import UserError

        raise UserError(f"run.device={name!r} but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


def configure(device: torch.device, deterministic: bool = False) -> None:
    """See _configure; on CUDA it then logs the GPU's memory as the run starts (memory_report)."""
    _configure(device, deterministic)
    if device.type == "cuda":
        import logging

        logging.getLogger("trainer").info(f"memory: {memory_report(device)}")


def _configure(device: torch.device, deterministic: bool = False) -> None:
    """CUDA: TF32 matmuls and convolutions (float32 work on tensor cores; bf16 autocast covers
    most of the model). CPU: nothing changes, so CPU runs stay bit-exact.

    `deterministic` (CUDA; run.deterministic) makes a step's result depend on its inputs only, so
    that a resume on the same GPU model, driver and software reproduces the uninterrupted run bit
    for bit: cuBLAS with a fixed workspace (split-K reductions in one order; set before cuBLAS
    starts), PyTorch's deterministic kernels where it has them (index/scatter reductions, the
    attention backward; an op that has none raises), cuDNN
    without benchmarking, and Inductor without on-device autotuning (which can pick other
    kernels, so other float sums, in a new process). Without it a CUDA resume continues with the
    same data, RNG and optimizer state, but some float sums may round differently, so the resumed
    run drifts from the uninterrupted one by rounding."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        import torch._inductor.config as inductor

        if hasattr(inductor, "deterministic"):  # recent torch also sets it with the line above
            inductor.deterministic = True


def memory_report(device: torch.device) -> str:
    """A CUDA device's memory: its size, what is free, and what other processes hold (a vLLM
    server sharing the GPU takes its --gpu-memory-utilization share)."""
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    return (f"{device} ({torch.cuda.get_device_name(device)}): {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
            f"{others / 2**30:.1f} GiB held outside this process's tensors (CUDA contexts, other processes such as a "
            "server on the same GPU)")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it torch
    emulates bf16 in float32 and autocast only adds casts."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """run.dtype as the matmuls' dtype: fp32, bf16, or auto = bf16 on CUDA and float32 on a CPU.
    Weights, optimizer state and the loss stay float32 either way (autocast)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def check_dtype(device: torch.device, dtype: str) -> None:
    """Warn where run.dtype=bf16 will crawl: a CPU without native bf16 emulates it (a
    512x768x3072 matmul ran at 0.9 GFLOP/s against 67 in float32 on an AVX2-only EPYC). Where
    a CPU has it and auto keeps float32, say once what bf16 would give (docs/config.md)."""
    if device.type != "cpu":
        return
    import logging

    log = logging.getLogger("trainer")
    if compute_dtype(device, dtype) == torch.bfloat16 and not native_bf16():
        log.warning("run.dtype=bf16, but this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, many "
                    "times slower than float32; use run.dtype=auto or fp32 here")
    elif dtype == "auto" and native_bf16():
        log.info("this CPU multiplies bf16 natively: run.dtype=bf16 can train faster here (1.1x on configs/default.yaml, "
                 "1.8x at 6 layers x 384), with the same val loss and bit-exact resume (docs/config.md)")


def autocast(device: torch.device, dtype: str = "auto"):
    """bf16 autocast where `compute_dtype` says bf16; plain float32 otherwise. CPU kernels are
    deterministic in either dtype, so a CPU resume stays bit-exact in bf16 too."""
    if compute_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision(device: torch.device):
    """IEEE float32 inside, on CUDA too: no autocast and no TF32 (which `configure` turns on for the
    whole process; TF32 keeps 10 mantissa bits, so a GPT-2 log-prob moves by ~1e-3, the size of
    grpo.sync_tolerance). For numbers compared with another engine's float32: GRPO's weight-sync
    probe, the sampler's log-probs and the importance weights. A no-op on CPU."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def to_device(tensors: dict, device: torch.device) -> dict:
    """{name: tensor} -> the same on `device` (a batch built on the CPU, for a model on `device`)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop touches, as plain data that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for stream `keys` of run seed `seed` (e.g. a rank's dropout), unrelated to seed + k."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU quota
    (`docker run --cpus=1` sets one; OpenMP sees only the mask, so it would oversubscribe)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def pin_threads(requested: int, local_processes: int = 1) -> int:
    """Set torch's intra-op threads -> the count in use. 0 = torch's default, but never more than
    this process's share of the CPUs it may use (`usable_cpus` divided among the processes of
    this host). The count changes float reductions, so a run records it and a resume restores
    it (bit-exactness)."""
    threads = requested or max(1, min(torch.get_num_threads(), usable_cpus() // max(1, local_processes)))
    torch.set_num_threads(threads)
    return threads
