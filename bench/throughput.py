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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import data, metrics, runtime
from trainer import model as models
from trainer import train as loop
from trainer.lm import lm_loss
from trainer.runs import RunPaths

CPU = torch.device("cpu")


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
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.steps - 1:
        p.error(f"--warmup={args.warmup} must be at least 1 and leave steps to time (--steps={args.steps})")
    return args


def make_config(args, work: Path, run_name: str) -> configs.Config:
    """The one config every loop uses; eval, sample, export and checkpoints are off so the
    trainer's loop does only what the bare loop does, plus its own bookkeeping."""
    return configs.build(overrides={
        "run.name": run_name, "run.out_dir": str(work / "volumes"), "run.seed": args.seed, "run.device": "cpu",
        "run.threads": args.threads,
        "model.type": "from_scratch", "model.n_layer": args.n_layer, "model.n_head": args.n_head,
        "model.n_embd": args.n_embd, "model.block_size": args.block_size, "model.dropout": 0.0,
        "data.source": data.STDLIB, "data.tokenizer": "bpe", "data.vocab_size": args.vocab_size,
        "data.max_bytes": args.max_bytes, "data.prepared_dir": str(work / "prepared"), "data.name": "bench",
        "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.grad_accum": 1,
        "train.eval_interval": 0, "train.eval_iters": 1, "train.log_interval": args.steps,
        "train.sample_at_end": False, "train.export_at_end": False,
        "checkpoint.interval": 0, "checkpoint.enabled": False,
    })


class StepClock:
    """Stamps (wall seconds, process CPU seconds) when a loop fetches a step's training batch.
    Installed on data.Batches.get_batch, the one call all three loops make once per step, so
    the trainer is timed without touching its code and every loop pays the same for it."""

    def __init__(self) -> None:
        self.stamps: dict[int, tuple[float, float]] = {}

    @contextlib.contextmanager
    def installed(self):
        original = data.Batches.get_batch

        def get_batch(batches, split, step, micro=0):
            if split == "train" and micro == 0:
                self.stamps[step] = (time.perf_counter(), time.process_time())
            return original(batches, split, step, micro)

        data.Batches.get_batch = get_batch
        try:
            yield self
        finally:
            data.Batches.get_batch = original

    def step_seconds(self, warmup: int, steps: int) -> tuple[float, float]:
        """Median (wall, CPU) seconds of steps warmup+1 .. steps-1; step s ends where s+1 starts."""
        s = self.stamps
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


def run_bare(cfg, prepared: Path, meta: dict) -> list[float]:
    """nanoGPT's loop: lr, get batch, forward, cross-entropy, backward, clip, AdamW step."""
    t = cfg.train
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    model.train()
    optimizer = loop.make_optimizer(model, cfg, CPU)
    batches = data.Batches.open(prepared, block_size, t.batch_size, cfg.run.seed)
    clip = configs.grad_clip(cfg)
    losses = []
    for step in range(1, t.max_steps + 1):
        lr = loop.lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.get_batch("train", step)  # (B, T) ids
        loss = lm_loss(model, x, y)
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


def run_hf(cfg, prepared: Path, meta: dict, work: Path) -> list[float]:
    """transformers.Trainer with our optimizer and schedule passed in, our loss as
    compute_loss_func, and no logging, saving or eval."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    t = cfg.train
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    optimizer = loop.make_optimizer(model, cfg, CPU)
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

    hf_args = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1,
        adam_beta2=t.beta2, max_grad_norm=configs.grad_clip(cfg), logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, dataloader_pin_memory=False,
        train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
        seed=cfg.run.seed)
    hf_logging.set_verbosity_error()
    trainer = Trainer(model=model, args=hf_args, train_dataset=Windows(batches, t.max_steps),
                      optimizers=(optimizer, schedule), compute_loss_func=lm_loss)
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-train metrics dict
        trainer.train()
    return [round(v.item(), 6) for v in losses]


# ---------------------------------------------------------------------------- checkpoint stall

def run_saves(cfg, prepared: Path, meta: dict, args, work: Path) -> dict:
    """Median seconds of the training loop's stall for one checkpoint (serialize, then hand the
    write to the AsyncSaver, as trainer.train does), of a whole durable save_checkpoint, and of
    torch.save of the same model and optimizer state dicts (with and without fsync), alternating,
    on the same disk."""
    runtime.seed_everything(cfg.run.seed)
    model, block_size = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], cfg.run.seed)
    optimizer = loop.make_optimizer(model, cfg, CPU)
    batches = data.Batches.open(prepared, block_size, cfg.train.batch_size, cfg.run.seed)
    x, y = batches.get_batch("train", 1)
    lm_loss(model, x, y).backward()
    optimizer.step()  # so AdamW's moments exist and are saved
    tok_json = (prepared / "tokenizer.json").read_bytes()
    run_dir, plain_dir = work / "saves" / "checkpoints", work / "saves" / "plain"
    plain_dir.mkdir(parents=True, exist_ok=True)
    times = {"stall": [], "save_checkpoint": [], "torch.save": [], "torch.save+fsync": []}
    sizes = {}
    saver = ckpt.AsyncSaver()
    for i in range(1, args.saves + 1):
        state = {ckpt.STEP: i, ckpt.RNG: runtime.rng_state(), ckpt.SAMPLER: {"seed": cfg.run.seed, "next_step": i + 1},
                 ckpt.SCHEDULER: {"step": i, "lr": cfg.train.lr}, ckpt.TRACKER: {"tokens": 0}}
        trainer_state = {"step": i, "max_steps": args.saves, "reason": "bench", "saved_at": time.time()}
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, ckpt.step_name(i), model, optimizer, state, trainer_state,
                                    cfg.to_yaml(), keep_last=cfg.checkpoint.keep_last,
                                    extra_files={ckpt.TOKENIZER: tok_json})
        times["save_checkpoint"].append(time.perf_counter() - t0)
        sizes["save_checkpoint"] = sum(f.stat().st_size for f in path.iterdir())

        saver.wait()  # the previous background write is not part of this stall
        t0 = time.perf_counter()
        files = ckpt.serialize(model, optimizer, state, trainer_state, cfg.to_yaml(),
                               extra_files={ckpt.TOKENIZER: tok_json})
        saver.save(work / "saves" / "async", ckpt.step_name(i), files, keep_last=cfg.checkpoint.keep_last)
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
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path) -> dict:
    base = make_config(args, work, "bench")
    print(f"preparing {args.max_bytes / 1e6:.1f} MB of python-stdlib (bpe {args.vocab_size}) in {work} ...", flush=True)
    prepared = data.prepare(base.data, log=lambda line: None)
    meta = data.read_meta(prepared)
    tokens_per_step = args.batch_size * args.block_size

    kinds = ["trainer", "bare"] + ([] if args.skip_hf else ["hf"])
    wall: dict[str, list[float]] = {k: [] for k in kinds}  # median step seconds, one per round
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # median step CPU seconds, one per round
    losses: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]  # rotate, so no loop always goes first
        for kind in order:
            with StepClock().installed() as clock:
                if kind == "trainer":
                    curve = run_trainer(make_config(args, work, f"bench-{r}"))
                elif kind == "bare":
                    curve = run_bare(base, prepared, meta)
                else:
                    curve = run_hf(base, prepared, meta, work)
            w, c = clock.step_seconds(args.warmup, args.steps)
            wall[kind].append(w)
            cpu[kind].append(c)
            losses.setdefault(kind, curve)
        line = "  ".join(f"{k} {tokens_per_step / wall[k][-1]:,.0f}" for k in kinds)
        print(f"round {r + 1}/{args.rounds} tok/s: {line}", flush=True)
    saves = run_saves(base, prepared, meta, args, work)

    rate = {k: tokens_per_step / statistics.median(v) for k, v in wall.items()}  # tokens/s, wall clock

    def paired(kind: str, times: dict) -> float:
        """Median over rounds of trainer speed / `kind` speed. The loops of one round ran
        minutes apart at most, so pairing them cancels the machine's drift between rounds."""
        return statistics.median(b / a for a, b in zip(times["trainer"], times[kind]))

    share = statistics.median(c / w for k in kinds for c, w in zip(cpu[k], wall[k]))  # CPU s per wall s
    total, _ = models.count_parameters(models.build_model(base.model, meta["vocab_size"], meta["eot_id"], 0)[0])

    print()
    print(f"machine: {machine()}")
    print(f"load:    this process got {share:.0%} of a core while timed; load average {os.getloadavg()[0]:.1f}")
    print(f"model:   GPT-2 from scratch, {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, "
          f"{total / 1e6:.2f}M params, vocab {meta['vocab_size']}; batch {args.batch_size} x block {args.block_size} "
          f"= {tokens_per_step} tokens/step")
    print(f"timed:   median step of steps {args.warmup + 1}..{args.steps - 1} of {args.steps} per run, "
          f"{args.rounds} interleaved rounds; ratios are medians of the per-round ratios")
    check = "yes" if losses["trainer"] == losses["bare"] else "NO"
    if not args.skip_hf:
        check += f"; HF max |loss diff| {max(abs(a - b) for a, b in zip(losses['trainer'], losses['hf'])):.1e}"
    print(f"check:   trainer and bare losses identical at every step: {check}")
    print()
    print(f"{'comparison':<36}{'trainer':>10}{'baseline':>10}{'ratio':>9}{'cpu ratio':>11}  goal")
    result = {"tok_per_s": rate, "cpu_share": share}
    for kind, label in (("bare", "bare PyTorch loop"), ("hf", "HF Trainer")):
        if kind not in rate:
            continue
        ratio, cpu_ratio = paired(kind, wall), paired(kind, cpu)
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
    print(f"per-round trainer/bare, wall: {' '.join(f'{b / a:.3f}' for a, b in zip(wall['trainer'], wall['bare']))}"
          f"; cpu: {' '.join(f'{b / a:.3f}' for a, b in zip(cpu['trainer'], cpu['bare']))}")
    if share < 0.9:
        print(f"note:    other processes took {1 - share:.0%} of this one's core, so wall-clock figures swing from "
              "round to round; the cpu ratio counts only this process's CPU seconds and is the steadier figure")
    return result


if __name__ == "__main__":
    main()
