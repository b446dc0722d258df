"""Throughput bench: `trainer`'s loop against a bare PyTorch loop and HF `Trainer`, and the
stall of one checkpoint save against a plain `torch.save`.

    python bench/throughput.py                      # about 2-3 minutes on 2 CPU cores
    python bench/throughput.py --steps 60 --rounds 5 --n-layer 6 --n-embd 192

Same work in every loop: one from-scratch GPT-2 (trainer.model.build_model, same seed, so
the same initial weights), the same prepared python-stdlib tokens, step s trains on
Batches.get_batch("train", s), and the same AdamW groups (make_optimizer), lr schedule
(lr_at), loss (lm_loss) and grad clip. The bench checks that the trainer and the bare loop
log identical losses, so a speed difference cannot come from different work.

What is timed: every step of every loop, from fetching its batch to fetching the next
one, by a stamp (wall clock and process CPU time) taken when Batches.get_batch is called for
a step's training batch. That one hook serves all three loops alike, so `trainer.train.train`
runs unchanged and pays the same two clock reads per step as the others. Steps
warmup+1 .. steps-1 count: the first ones pay allocator and cache warm-up, and the trainer's
last step also runs its final evaluation. A run's figure is its median step; rounds are
interleaved with the order rotated, and a ratio is the median of the per-round ratios, so
drift in the machine's speed between rounds cancels. The CPU-time ratio beside each
wall-clock one counts only this process's CPU seconds: on a busy shared machine it is the
steadier of the two.

On a GPU (issue 10, item 4), the GPT-2 124M shape in bf16, eager and compiled side by side:

    python bench/throughput.py --device cuda --gpt2-124m --compile          # H100/H200: peak 989 TFLOPS
    python bench/throughput.py --device cuda --gpt2-124m --compile --peak-tflops 312   # e.g. an A100

--device cuda runs all three loops on the GPU with bf16 autocast alike (--dtype, the trainer's
run.dtype: auto is bf16 on CUDA, trainer/runtime.py; the bare loop uses the same
runtime.autocast; HF Trainer gets bf16=True); --device cpu --dtype bf16 runs the three in bf16
autocast on a CPU (worth it only with native bf16: AVX512-BF16 or AMX), fused AdamW (make_optimizer on the device),
TF32 matmuls (runtime.configure, for the whole process) and pinned, non-blocking batch copies.
--compile adds a compiled run of each loop (run.compile=true / torch.compile(model) /
TrainingArguments(torch_compile=True)) beside the eager ones; torch._dynamo is reset before
each compiled run, so every loop pays its own compilation inside its warm-up steps.
--deterministic runs every loop with deterministic kernels (run.deterministic=true, for the whole
process; runtime.configure says what it sets): the cost of a bit-exact CUDA resume is this run's
tok/s against the same command without it.
--gpt2-124m is the real GPT-2 shape (12 layers, 12 heads, 768 wide, 1024 positions, the GPT-2
tokenizer's 50,257-token vocabulary from vendor/tokenizers/gpt2), random init, batch 16 x 1024.
On CUDA the kernels run asynchronously, so the per-step stamp would time the host, not the GPU:
there the clock synchronizes only at the first and last timed step and a run's figure is the
mean step over that window (every loop keeps its own host syncs, or lack of them, inside it).
The side-by-side table adds, per loop and mode: tokens/s; MFU = 6 * N * tokens/s / peak bf16
FLOPS (N = all parameters, the tied embedding once; no attention-score term, which would add
12 * n_layer * n_embd * block_size FLOPs per token, about 15 % more at the 124M shape); peak
GPU memory (torch.cuda.max_memory_allocated, reset before each run, less what was allocated
before it); and the checkpoint stall. At 124M a checkpoint is 1.5 GB and the saves keep up to
about 14 GB in the work folder at once. The peak comes from --peak-tflops, else from the GPU's
name (H100 SXM and H200: 989 dense bf16; H100 PCIe 756; H100/H200 NVL 835; A100 312); else MFU
is left out.

Which figures are measured where: every figure in bench/README.md and the README so far was
measured on CPU (2 shared cores, float32). The GPU figures (--device cuda: bf16 tokens/s, MFU,
peak memory, stall) are to be taken on a GPU host; until then they stay open.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import data, metrics, profiling, runtime
from trainer import model as models
from trainer import train as loop
from trainer.lm import lm_loss
from trainer.runs import RunPaths

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT / "vendor" / "tokenizers" / "gpt2"  # `just vendor` writes it
# the real GPT-2 small shape (issue 10, item 4): 124M parameters with GPT-2's vocabulary, random init.
# Flags given on the command line still win over these.
GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "tokenizer": "gpt2",
             "batch_size": 16, "saves": 3}
# dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOPS, by a piece of torch.cuda.get_device_name();
# the first piece found in the name wins, so the NVL/PCIe parts come before the SXM ones
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.0),
                    ("H100", 989.0), ("A100", 312.0))
MODES = ("eager", "compiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps per run left out of the timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (trainer, bare, HF); medians reported")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary trained on the corpus slice")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of python-stdlib to tokenize")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, fixed for all loops. 1 by default: on a small shared machine\n"
                        "more threads than idle cores makes OpenMP spin and every figure 10x noisier")
    p.add_argument("--saves", type=int, default=5, help="checkpoint saves (and torch.saves) timed; median reported")
    p.add_argument("--skip-hf", action="store_true", help="leave out the HF Trainer comparison")
    p.add_argument("--dir", default=None, help="work folder (data, runs, checkpoints); default: a temp folder, "
                                               "removed at the end. The saves are timed on this disk")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where all three loops run")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="run.dtype for every loop: auto = bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true",
                   help="also run every loop compiled (run.compile=true / torch.compile), beside the eager runs")
    p.add_argument("--gpt2-124m", action="store_true",
                   help="the GPT-2 124M shape: 12 layers x 768 wide, 12 heads, block 1024, the GPT-2 tokenizer\n"
                        "(vocab 50257, vendor/tokenizers/gpt2), batch 16, 3 saves; explicit flags still win")
    p.add_argument("--tokenizer", choices=("bpe", "gpt2"), default="bpe",
                   help="bpe: trained on the corpus slice (--vocab-size); gpt2: vendor/tokenizers/gpt2")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: every loop with deterministic kernels (run.deterministic=true); its cost is this "
                        "run's tok/s against one without it")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed rounds, one more trainer run (compiled with --compile) that traces N steps\n"
                        "after the warm-up with torch.profiler (profile.steps); prints its table of ops")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, for MFU; default from the GPU's name (H100 SXM, H200: 989)")
    known, _ = p.parse_known_args(argv)
    if known.gpt2_124m:
        p.set_defaults(**GPT2_124M)
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.steps - 1:
        p.error(f"--warmup={args.warmup} must be at least 1 and leave steps to time (--steps={args.steps})")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cpu" and args.dtype == "bf16" and not runtime.native_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, and the figures say "
              "nothing about a CPU that has it", file=sys.stderr)
    if args.device == "cuda":
        # one GPU, before CUDA starts: HF Trainer wraps the model in DataParallel when it sees several
        os.environ["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        if not torch.cuda.is_available():
            p.error(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    if args.tokenizer == "gpt2" and not GPT2_TOKENIZER.is_dir():
        p.error(f"--tokenizer gpt2 (and --gpt2-124m) read the GPT-2 tokenizer from {GPT2_TOKENIZER}; run "
                "`just vendor` or copy vendor/tokenizers/gpt2 from a host that has it")
    return args


def make_config(args, work: Path, run_name: str, compile: bool = False, profile: int = 0) -> configs.Config:
    """The one config every loop uses; eval, sample, export and checkpoints are off so the
    trainer's loop does only what the bare loop does, plus its own bookkeeping. `profile`: steps
    traced after the warm-up (trainer/profiling.py)."""
    return configs.build(overrides={
        "profile.steps": min(profile, args.steps - args.warmup), "profile.start": args.warmup,
        "run.name": run_name, "run.out_dir": str(work / "volumes"), "run.seed": args.seed, "run.device": args.device,
        "run.threads": args.threads, "run.compile": compile, "run.deterministic": args.deterministic,
        "run.dtype": args.dtype,
        "model.type": "from_scratch", "model.n_layer": args.n_layer, "model.n_head": args.n_head,
        "model.n_embd": args.n_embd, "model.block_size": args.block_size, "model.dropout": 0.0,
        "data.source": data.STDLIB, "data.tokenizer": args.tokenizer, "data.tokenizer_path": str(GPT2_TOKENIZER),
        "data.vocab_size": args.vocab_size,
        "data.max_bytes": args.max_bytes, "data.prepared_dir": str(work / "prepared"), "data.name": "bench",
        "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.grad_accum": 1,
        "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": args.steps,
        "train.sample_at_end": False, "train.export_at_end": False,
        "checkpoint.interval": 0, "checkpoint.enabled": False,
    })


class StepClock:
    """Stamps (wall seconds, process CPU seconds) when a loop fetches a step's training batch.
    Installed on data.Batches.get_batch, the one call all three loops make once per step, so
    the trainer is timed without touching its code and every loop pays the same for it.

    On CUDA, `window` = (first, last) timed step: the clock synchronizes the GPU there only,
    so the stamps bound the GPU's work and no loop gets a host sync it would not have had."""

    def __init__(self, window: tuple[int, int] | None = None) -> None:
        self.stamps: dict[int, tuple[float, float]] = {}
        self.window = window

    @contextlib.contextmanager
    def installed(self):
        original = data.Batches.get_batch

        def get_batch(batches, split, step, micro=0):
            if split == "train" and micro == 0:
                if self.window and step in self.window:
                    torch.cuda.synchronize()
                self.stamps[step] = (time.perf_counter(), time.process_time())
            return original(batches, split, step, micro)

        data.Batches.get_batch = get_batch
        try:
            yield self
        finally:
            data.Batches.get_batch = original

    def step_seconds(self, warmup: int, steps: int) -> tuple[float, float]:
        """Median (wall, CPU) seconds of steps warmup+1 .. steps-1; step s ends where s+1 starts.
        With a CUDA window: the mean over it (the stamps between are not synchronized)."""
        s = self.stamps
        if self.window:
            n = steps - warmup - 1
            return (s[steps][0] - s[warmup + 1][0]) / n, (s[steps][1] - s[warmup + 1][1]) / n
        wall = [s[i + 1][0] - s[i][0] for i in range(warmup + 1, steps)]
        cpu = [s[i + 1][1] - s[i][1] for i in range(warmup + 1, steps)]
        return statistics.median(wall), statistics.median(cpu)


# ---------------------------------------------------------------------------- the three loops

def run_trainer(cfg) -> list[float]:
    """The real thing: trainer.train.train(cfg). -> per-step losses from its metrics.csv."""
    with contextlib.redirect_stdout(io.StringIO()):  # its log lines would break up the table
        loop.train(cfg)
    metrics_dir = RunPaths.of(cfg).metrics
    return [float(r["loss"]) for r in metrics.read_rows(metrics_dir / "metrics.csv")]


def run_bare(cfg, prepared: Path, meta: dict, device: torch.device, compile: bool = False) -> list[float]:
    """nanoGPT's loop: lr, get batch, forward, cross-entropy, backward, clip, AdamW step. On
    CUDA as nanoGPT has it too: pinned non-blocking copies, bf16 autocast, fused AdamW."""
    t = cfg.train
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    model.to(device)
    if device.type == "cuda":  # nanoGPT pads its vocabulary to a multiple of 64 for the same reason
        models.pad_head(model)
    model.train()
    optimizer = loop.make_optimizer(model, cfg, device)
    forward = torch.compile(model) if compile else model
    batches = data.Batches.open(prepared, block_size, t.batch_size, cfg.run.seed)
    clip = configs.grad_clip(cfg)
    cuda = device.type == "cuda"
    losses = []
    for step in range(1, t.max_steps + 1):
        lr = loop.lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.get_batch("train", step)  # (B, T) ids
        if cuda:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with runtime.autocast(device, cfg.run.dtype):  # as the trainer
            loss = lm_loss(forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [round(v.item(), 6) for v in losses]


class Windows(torch.utils.data.Dataset):
    """The trainer's batches as rows for HF's DataLoader: with a sequential sampler and the
    same batch size, HF's step s is exactly get_batch("train", s)."""

    def __init__(self, batches: data.Batches, steps: int):
        self.batches, self.steps = batches, steps
        self._step, self._xy = None, None

    def __len__(self) -> int:
        return self.steps * self.batches.batch_size

    def __getitem__(self, i: int) -> dict:
        step, row = divmod(i, self.batches.batch_size)
        if step + 1 != self._step:  # one get_batch per step, as in the other loops
            self._step, self._xy = step + 1, self.batches.get_batch("train", step + 1)
        x, y = self._xy
        return {"input_ids": x[row], "labels": y[row]}


def run_hf(cfg, prepared: Path, meta: dict, work: Path, device: torch.device, compile: bool = False,
           bf16: bool = False) -> list[float]:
    """transformers.Trainer with our optimizer and schedule passed in, our loss as
    compute_loss_func, and no logging, saving or eval. On CUDA: its own bf16 autocast
    (bf16=True), torch_compile, pinned DataLoader memory."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    t = cfg.train
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    model.to(device)  # before the optimizer: fused AdamW wants its parameters on the GPU already
    optimizer = loop.make_optimizer(model, cfg, device)
    # LambdaLR multiplies the base lr: its step k (from 0) is our step k+1
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: loop.lr_at(k + 1, t) / t.lr)
    batches = data.Batches.open(prepared, block_size, t.batch_size, cfg.run.seed)
    losses = []

    # lm_loss on the outputs HF computed; the loss check below catches any drift between the two
    def lm_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))
        losses.append(loss.detach())
        return loss

    cuda = device.type == "cuda"
    hf_args = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1,
        adam_beta2=t.beta2, max_grad_norm=configs.grad_clip(cfg), logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, dataloader_pin_memory=cuda,
        train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True, use_cpu=not cuda,
        bf16=bf16, torch_compile=compile, seed=cfg.run.seed)
    hf_logging.set_verbosity_error()
    trainer = Trainer(model=model, args=hf_args, train_dataset=Windows(batches, t.max_steps),
                      optimizers=(optimizer, schedule), compute_loss_func=lm_loss)
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-train metrics dict
        trainer.train()
    return [round(v.item(), 6) for v in losses]


# ---------------------------------------------------------------------------- checkpoint stall

def run_saves(cfg, prepared: Path, meta: dict, args, work: Path, device: torch.device, compile: bool = False) -> dict:
    """Median seconds of the training loop's stall for one checkpoint (serialize, then hand the
    write to the AsyncSaver, as trainer.train does), of a whole durable save_checkpoint, and of
    torch.save of the same model and optimizer state dicts (with and without fsync), alternating,
    on the same disk. On CUDA the state lives on the GPU, so the stall includes its copy to the
    host; `compile`: the step before the saves ran through torch.compile (the saves, as the
    trainer's, serialize the module itself)."""
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    model.to(device)
    optimizer = loop.make_optimizer(model, cfg, device)
    batches = data.Batches.open(prepared, block_size, cfg.train.batch_size, cfg.run.seed)
    x, y = (v.to(device) for v in batches.get_batch("train", 1))
    with runtime.autocast(device, cfg.run.dtype):
        loss = lm_loss(torch.compile(model) if compile else model, x, y)
    loss.backward()
    optimizer.step()  # so AdamW's moments exist and are saved
    if device.type == "cuda":
        torch.cuda.synchronize()  # the step's kernels are not part of the first stall
    tok_json = (prepared / "tokenizer.json").read_bytes()
    saves = work / "saves" / ("compiled" if compile else "")
    run_dir, plain_dir = saves / "checkpoints", saves / "plain"
    plain_dir.mkdir(parents=True, exist_ok=True)
    times = {"stall": [], "save_checkpoint": [], "torch.save": [], "torch.save+fsync": []}
    sizes = {}
    saver = ckpt.AsyncSaver()
    for i in range(1, args.saves + 1):
        # what trainer.train.save puts in state.pt (the sampler is stateless, the lr a function of the step)
        state = {ckpt.STEP: i, ckpt.RNG: runtime.rng_state(), ckpt.TRACKER: loop.TrainState(step=i).saved()}
        trainer_state = {"step": i, "max_steps": args.saves, "reason": "bench", "saved_at": time.time()}
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, ckpt.step_name(i), model, optimizer, state, trainer_state,
                                    cfg.to_yaml(), keep_last=cfg.checkpoint.keep_last,
                                    extra_files={ckpt.TOKENIZER: tok_json})
        times["save_checkpoint"].append(time.perf_counter() - t0)
        sizes["save_checkpoint"] = sum(f.stat().st_size for f in path.iterdir())

        saver.wait()  # the previous background write is not part of this stall
        t0 = time.perf_counter()
        files = saver.snapshot(model, optimizer, state, trainer_state, cfg.to_yaml(),
                               extra_files={ckpt.TOKENIZER: tok_json})
        saver.save(saves / "async", ckpt.step_name(i), files, keep_last=cfg.checkpoint.keep_last)
        times["stall"].append(time.perf_counter() - t0)
        sizes["stall"] = sizes["save_checkpoint"]

        for kind in ("torch.save", "torch.save+fsync"):
            target = plain_dir / f"plain_{i}.pt"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, target)
            if kind == "torch.save+fsync":
                with open(target, "rb+") as f:
                    os.fsync(f.fileno())
            times[kind].append(time.perf_counter() - t0)
            sizes[kind] = target.stat().st_size
            target.unlink()
    saver.close()
    return {k: (statistics.median(v), sizes[k]) for k, v in times.items()}


# ---------------------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    """-> (dense bf16 peak TFLOPS or None, where it came from)."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "no MFU on CPU without --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece in name:
            return tflops, f"dense bf16 peak of {piece}"
    return None, f"no known bf16 peak for {name!r}: pass --peak-tflops for an MFU"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="airlock-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return bench(args, work)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # TF32 (and --deterministic's kernels) on CUDA for all three loops, as trainer.train's setup does; nothing on CPU
    runtime.configure(device, args.deterministic)
    base = make_config(args, work, "bench")
    tokenizer = f"bpe {args.vocab_size}" if args.tokenizer == "bpe" else "GPT-2 tokenizer"
    print(f"preparing {args.max_bytes / 1e6:.1f} MB of python-stdlib ({tokenizer}) in {work} ...", flush=True)
    prepared = data.prepare(base.data, log=lambda line: None)
    meta = data.read_meta(prepared)
    tokens_per_step = args.batch_size * args.block_size

    modes = MODES if args.compile else MODES[:1]
    kinds = ["trainer", "bare"] + ([] if args.skip_hf else ["hf"])
    runs = [(mode, kind) for mode in modes for kind in kinds]
    # per mode and loop, one figure per round: median (CUDA: mean) step seconds, wall and CPU; peak GPU bytes
    wall = {m: {k: [] for k in kinds} for m in modes}
    cpu = {m: {k: [] for k in kinds} for m in modes}
    mem = {m: {k: [] for k in kinds} for m in modes}
    losses: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # rotate, so no loop always goes first
        for mode, kind in order:
            compiled = mode == "compiled"
            if args.compile:  # each loop compiles its own model inside its warm-up; no cache keeps old models
                torch._dynamo.reset()
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with StepClock((args.warmup + 1, args.steps) if cuda else None).installed() as clock:
                if kind == "trainer":
                    name = f"bench-compiled-{r}" if compiled else f"bench-{r}"
                    curve = run_trainer(make_config(args, work, name, compiled))
                elif kind == "bare":
                    curve = run_bare(base, prepared, meta, device, compiled)
                else:
                    curve = run_hf(base, prepared, meta, work, device, compiled, args.dtype == "bf16")
            w, c = clock.step_seconds(args.warmup, args.steps)
            wall[mode][kind].append(w)
            cpu[mode][kind].append(c)
            if cuda:  # bytes this run allocated at its peak, above what was left before it
                mem[mode][kind].append(torch.cuda.max_memory_allocated() - before)
            losses[mode].setdefault(kind, []).append(curve)
        line = "  ".join(f"{k} {tokens_per_step / wall['eager'][k][-1]:,.0f}" for k in kinds)
        if args.compile:
            line += "  | compiled: " + "  ".join(f"{k} {tokens_per_step / wall['compiled'][k][-1]:,.0f}" for k in kinds)
        print(f"round {r + 1}/{args.rounds} tok/s: {line}", flush=True)
    all_saves = {}
    for mode in modes:
        all_saves[mode] = run_saves(base, prepared, meta, args, work, device, mode == "compiled")
        if mode != modes[-1]:  # at 124M a save is 1.5 GB and keep_last holds 3 of each kind: one mode's at a time
            shutil.rmtree(work / "saves", ignore_errors=True)

    # the eager figures, printed as they always were
    saves = all_saves["eager"]
    rates = {m: {k: tokens_per_step / statistics.median(v) for k, v in wall[m].items()} for m in modes}  # tokens/s
    rate = rates["eager"]

    def paired(kind: str, times: dict) -> float:
        """Median over rounds of trainer speed / `kind` speed. The loops of one round ran
        minutes apart at most, so pairing them cancels the machine's drift between rounds."""
        return statistics.median(b / a for a, b in zip(times["trainer"], times[kind]))

    # CPU s per wall s
    share = statistics.median(c / w for k in kinds for c, w in zip(cpu["eager"][k], wall["eager"][k]))
    total, _ = models.count_parameters(models.build_model(base.model, meta["vocab_size"], meta["eot_id"], 0)[0])

    print()
    print(f"machine: {machine()}")
    if cuda:
        props = torch.cuda.get_device_properties(device)
        print(f"device:  {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}; "
              f"bf16 autocast, TF32 matmuls, fused AdamW in every loop"
              f"{'; deterministic kernels' if args.deterministic else ''}")
    print(f"load:    this process got {share:.0%} of a core while timed; load average {os.getloadavg()[0]:.1f}")
    print(f"model:   GPT-2 from scratch, {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, "
          f"{total / 1e6:.2f}M params, vocab {meta['vocab_size']}; batch {args.batch_size} x block {args.block_size} "
          f"= {tokens_per_step} tokens/step")
    print(f"timed:   {'mean' if cuda else 'median'} step of steps {args.warmup + 1}..{args.steps - 1} of {args.steps} "
          f"per run, {args.rounds} interleaved rounds; ratios are medians of the per-round ratios")

    def gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b))

    def loss_check(mode: str) -> str:
        """CPU kernels are deterministic: the two loops must log the same losses. A GPU's are not
        (atomic adds in the embedding and attention backward, unless --deterministic), so two runs
        of the same loop drift apart by rounding: there the trainer-bare gap is judged against
        the gap between rounds of the bare loop itself, the run-to-run noise."""
        got = losses[mode]
        same = all(t == b for t, b in zip(got["trainer"], got["bare"]))
        check = "yes" if same else f"NO (max |diff| {max(gap(t, b) for t, b in zip(got['trainer'], got['bare'])):.1e})"
        if cuda and not same and len(got["bare"]) > 1:
            noise = max(gap(got["bare"][0], b) for b in got["bare"][1:])
            within = max(gap(t, b) for t, b in zip(got["trainer"], got["bare"])) <= 2 * noise
            check += (f"; bare loop against itself, round to round: {noise:.1e}, so the loops agree "
                      f"{'within' if within else 'NOT within'} twice the run-to-run noise")
        if not args.skip_hf:
            check += f"; HF max |loss diff| {gap(got['trainer'][0], got['hf'][0]):.1e}"
        return check

    print(f"check:   trainer and bare losses identical at every step, every round: {loss_check('eager')}")
    if args.compile:
        print(f"check:   the same, compiled: {loss_check('compiled')}")
    print()
    print(f"{'comparison':<36}{'trainer':>10}{'baseline':>10}{'ratio':>9}{'cpu ratio':>11}  goal")
    result = {"tok_per_s": rate, "cpu_share": share}
    for kind, label in (("bare", "bare PyTorch loop"), ("hf", "HF Trainer")):
        if kind not in rate:
            continue
        ratio, cpu_ratio = paired(kind, wall["eager"]), paired(kind, cpu["eager"])
        goal = f"  >= 0.97x: {'met' if ratio >= 0.97 else 'NOT met'}" if kind == "bare" else ""
        print(f"{'train tok/s vs ' + label:<36}{rate['trainer']:>10,.0f}{rate[kind]:>10,.0f}{ratio:>8.3f}x"
              f"{cpu_ratio:>10.3f}x{goal}")
        result[f"ratio_{kind}"], result[f"cpu_ratio_{kind}"] = ratio, cpu_ratio
    for what, label in (("stall", "save stall (loop)"), ("save_checkpoint", "durable save")):
        took, size = saves[what]
        for kind in ("torch.save", "torch.save+fsync"):
            base_s, base_size = saves[kind]
            print(f"{label + ' ms vs ' + kind:<36}{took * 1e3:>10.1f}{base_s * 1e3:>10.1f}{took / base_s:>8.2f}x"
                  f"{'':>11}  {size / 1e6:.1f} MB vs {base_size / 1e6:.1f} MB")
            result[f"{what}_ratio_{kind}"] = took / base_s
    trainer_w, bare_w = wall["eager"]["trainer"], wall["eager"]["bare"]
    trainer_c, bare_c = cpu["eager"]["trainer"], cpu["eager"]["bare"]
    print(f"per-round trainer/bare, wall: {' '.join(f'{b / a:.3f}' for a, b in zip(trainer_w, bare_w))}"
          f"; cpu: {' '.join(f'{b / a:.3f}' for a, b in zip(trainer_c, bare_c))}")
    if share < 0.9 and not cuda:
        print(f"note:    other processes took {1 - share:.0%} of this one's core, so wall-clock figures swing from "
              "round to round; the cpu ratio counts only this process's CPU seconds and is the steadier figure")

    peak, peak_from = peak_tflops(args, device)
    result["modes"] = {}
    for mode in modes:
        fig = {"tok_per_s": rates[mode], "save_stall_s": all_saves[mode]["stall"][0],
               "mfu": {k: 6 * total * v / (peak * 1e12) for k, v in rates[mode].items()} if peak else None,
               "peak_mem_bytes": {k: statistics.median(v) for k, v in mem[mode].items()} if cuda else None}
        for kind in kinds[1:]:
            fig[f"ratio_{kind}"] = paired(kind, wall[mode])
        result["modes"][mode] = fig
    if cuda or args.compile or args.peak_tflops:
        side_by_side(result["modes"], modes, kinds, all_saves, total, peak, peak_from, args)
    if args.profile:
        result["profile"] = str(profile_trainer(args, work, modes[-1] == "compiled"))
    return result


def profile_trainer(args, work: Path, compiled: bool) -> Path:
    """One more trainer run with profile.steps: prints the table it writes; returns its path."""
    if compiled:
        torch._dynamo.reset()
    cfg = make_config(args, work, "bench-profile", compiled, profile=args.profile)
    run_trainer(cfg)
    table = next(profiling.folder(RunPaths.of(cfg).metrics).glob("steps_*.txt"))
    print(f"\ntrainer{' compiled' if compiled else ''}, {table}:\n{table.read_text()}", flush=True)
    return table


def side_by_side(figs: dict, modes, kinds, all_saves: dict, total: int, peak, peak_from: str, args) -> None:
    """Issue 10's GPU table: tokens/s, MFU and peak memory per loop, the trainer's ratios and the
    checkpoint stall, one column group per mode (eager, compiled)."""
    labels = {"trainer": "trainer", "bare": "bare PyTorch loop", "hf": "HF Trainer"}
    mfu_text = (f"MFU = 6 x {total / 1e6:.1f}M params x tok/s / {peak:g} TFLOPS ({peak_from})" if peak
                else f"MFU: - ({peak_from})")
    print()
    print(f"{args.device}, {args.dtype}: {mfu_text}")
    print(f"{'':<28}" + "".join(f"{mode + ' tok/s':>16}{'MFU':>8}{'peak mem':>11}" for mode in modes))

    def cells(mode: str, kind: str) -> str:
        f = figs[mode]
        mfu = f"{f['mfu'][kind]:.1%}" if f["mfu"] else "-"
        mem = f"{f['peak_mem_bytes'][kind] / 2**30:.2f} GiB" if f["peak_mem_bytes"] else "-"
        return f"{f['tok_per_s'][kind]:>16,.0f}{mfu:>8}{mem:>11}"

    for kind in kinds:
        print(f"{labels[kind]:<28}" + "".join(cells(mode, kind) for mode in modes))
    for kind in kinds[1:]:
        print(f"{'trainer / ' + labels[kind]:<28}"
              + "".join(f"{figs[m]['ratio_' + kind]:>15.3f}x{'':>19}" for m in modes))
    print(f"{'save stall (loop) ms':<28}" + "".join(f"{all_saves[m]['stall'][0] * 1e3:>16.1f}{'':>19}" for m in modes))
    print(f"{'torch.save ms':<28}" + "".join(f"{all_saves[m]['torch.save'][0] * 1e3:>16.1f}{'':>19}" for m in modes))
    if args.compile:
        speedup = figs["compiled"]["tok_per_s"]["trainer"] / figs["eager"]["tok_per_s"]["trainer"]
        print(f"{'trainer compiled/eager':<28}{speedup:>15.3f}x")
    if args.device == "cuda":  # issue 18's goals, on the fastest mode run
        best = figs[modes[-1]]
        goals = []
        if best["mfu"]:
            goals.append(f"MFU >= 40 %: {'met' if best['mfu']['trainer'] >= 0.4 else 'NOT met'}")
        goals.append(f">= 1.0x bare: {'met' if best['ratio_bare'] >= 1.0 else 'NOT met'}")
        if "ratio_hf" in best:
            goals.append(f">= 1.3x HF Trainer: {'met' if best['ratio_hf'] >= 1.3 else 'NOT met'}")
        print(f"goal ({modes[-1]}): " + "; ".join(goals))


if __name__ == "__main__":
    main()
