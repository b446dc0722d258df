"""One GRPO iteration, Airlock's `trainer grpo` against TRL's GRPOTrainer, side by side in one run.

    python bench/grpo_vs_trl.py --trl-python /tmp/trlv/bin/python                # repeat env, ~1-2 min on 2 cores
    python bench/grpo_vs_trl.py --trl-python /tmp/trlv/bin/python --env sat --iterations 4   # ~70-token prompts, ~3 min
    python bench/grpo_vs_trl.py --trl-python /tmp/trlv/bin/python --rounds 3 --threads 2

TRL is not a dependency of Airlock and must not enter its environment: it runs as a child
process under its own venv's Python (--trl-python), which this file re-executes with
--trl-child. A venv that works (TRL 1.16.0, transformers 5.23.0, accelerate 1.15.0,
datasets 5.2.0; always pin torch to the CPU wheel Airlock uses, a looser pin pulls GBs of CUDA):

    python3 -m venv /tmp/trlv && /tmp/trlv/bin/pip install torch==2.13.0 trl==1.16.0

What is compared (issue 8): the tiny random GPT-2 of bench/grpo_iteration.py (2 layers x 32,
the real 50,257-token vocabulary, written once to a temp folder that both sides load), the
same env's training problems in the same order (iteration k = ids (k-1)*16 .. +15 of
trainer/grpo/envs.py's `train` split; the prompt ids TRL's tokenizer gives are checked equal
to Airlock's), the same reward function (envs.get_reward, wrapped for TRL), and the same
config: 16 prompts x 8 completions x 10 new tokens, temperature 1, top_p 1 (TRL's top_k 0),
no stop string but eos, one optimizer step per batch (Airlock ppo_epochs 1 with the whole
batch as the minibatch; TRL per_device_train_batch_size 128, steps_per_generation 1,
num_iterations 1), beta 0, AdamW lr 1e-4 (constant), betas 0.9/0.95, no weight decay,
grad-norm clip 1, clip epsilon 0.2, token-mean loss (TRL "dapo"), group-scaled advantages,
float32, dropout off, no gradient checkpointing (TRL defaults to bf16 and checkpointing; both
off here, as Airlock trains; --trl-arg bf16=true etc. to see TRL's own defaults), no eval
(Airlock's loop evaluates before iteration 1 and after the last; neither is counted), the
same torch thread count on both sides (--threads).

What is timed, model load excluded on both sides, iteration 1 left out (allocator warm-up),
medians over the rest:
- Airlock: the real loop (trainer.grpo.loop.grpo) in this process; rollout_s and train_s of
  each train_iter_NNN.json (the issue's "iteration" = rollout + train). `loop` is the time
  between the writes of consecutive train_iter_NNN.json files, i.e. everything the loop does
  per iteration: rollout, train, metrics files and its share of the checkpoint save (the
  last iteration, which also evaluates, is left out).
- TRL: a TrainerCallback stamps on_step_begin/on_step_end; a step is generation + rewards +
  advantages (`rollout`, timed around _generate_and_score_completions) then forward,
  backward, clip, AdamW (`train` = step - rollout). `loop` is on_step_end to the next
  on_step_end (adds the trainer's logging and data loading; TRL saves no checkpoint here).
`ratio` is Airlock / TRL of the iteration (rollout + train vs the step) and of `loop`.
Losses and rewards are printed per iteration as a sanity check, not as an equality: the two
sample with different random streams.

Measured (2 CPU cores shared with other jobs, none of it at low load; --threads 1; TRL 1.16.0,
transformers 5.23.0, torch 2.13.0+cpu; the working tree of 2026-11-22). Seconds per iteration,
rollout + train = iteration, wall (CPU seconds of the side's process):
  repeat, load 3.3-3.5: Airlock 0.63 + 0.80 = 1.37   TRL 1.46 + 3.44 = 4.97   ratio 0.28x
  repeat, load 3.7-3.9: Airlock 0.99 + 1.22 = 2.21 (CPU 1.46)   TRL 2.32 + 5.70 = 8.02 (CPU 5.26)   0.27x (CPU 0.28x)
  repeat, 2 rounds, load 3.3-7.4: Airlock 3.44 (CPU 1.40)   TRL 8.67 (CPU 4.95)   0.40x (CPU 0.28x)
  sat, load 5.1 -> 3.0: Airlock 2.15 + 0.88 = 3.06 (CPU 2.97)   TRL 1.81 + 23.56 = 25.37 (CPU 21.6)   0.12x (CPU 0.14x)
TRL's train step is the slow part: on a CPU (no Triton device) TRL 1.16's fused LM head scores
every position, prompt included, in tiles of 4096 tokens x 32768 vocabulary (512 MiB), so it
grows with the prompt. Airlock's sat rollout was its own slow part until the sampler's prefill
kept only the last position's logits (logits_to_keep=1; it had projected every prompt position
onto the vocabulary, ~2 s). After that fix, load 4.9 -> 3.9: sat Airlock 1.26 + 1.90 = 3.46
(CPU 0.80 + 0.98 = 1.78), TRL 1.70 + 30.18 = 31.72 (CPU 23.2), ratio 0.11x (CPU 0.08x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "TRL_RESULT "


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def med(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------ shared spec


def problems_spec(env: str, iterations: int, prompts: int, tok) -> list[dict]:
    """Every problem of iterations 1..N in loop order, with the prompt ids Airlock sends."""
    from trainer import config as configs
    from trainer.grpo import envs
    from trainer.grpo.loop import env_options

    g = configs.GRPOConfig(env=env)
    out = []
    for it in range(1, iterations + 1):
        for p in envs.train_problems(env, it - 1, prompts, **env_options(g)):
            out.append({"iteration": it, "id": p.id, "prompt": p.prompt, "ids": tok.encode(p.prompt).ids})
    return out


# ------------------------------------------------------------------ Airlock side


def run_airlock(spec: dict, out: Path) -> dict:
    import torch

    from trainer import config as configs
    from trainer.grpo import loop

    rows = spec["prompts"] * spec["group"]
    opts = {
        "run.name": "bench", "run.out_dir": str(out), "run.device": "cpu", "run.threads": spec["threads"],
        "run.seed": spec["seed"], "model.type": "gpt2", "model.path": spec["model"], "model.block_size": 128,
        "model.lora": False, "model.dropout": 0.0, "data.tokenizer": "gpt2",
        "grpo.env": spec["env"], "grpo.iterations": spec["iterations"], "grpo.prompts_per_iter": spec["prompts"],
        "grpo.group_size": spec["group"], "grpo.max_tokens": spec["max_tokens"], "grpo.temperature": 1.0,
        "grpo.top_p": 1.0, "grpo.stop": [], "grpo.beta": 0.0, "grpo.epsilon": 0.2, "grpo.loss_agg": "token_mean",
        "grpo.scale_rewards": "group", "grpo.grad_clip": 1.0, "grpo.ppo_epochs": 1, "grpo.minibatch_size": rows,
        "grpo.rollout_batch": rows, "grpo.lr": spec["lr"], "train.beta1": 0.9, "train.beta2": 0.95,
        "eval.interval": 0, "eval.num_problems": 1, "eval.replicates": 2, "checkpoint.keep_last": 1}
    cfg = configs.load(None, **opts)
    # CPU seconds of this process per rollout and per train epoch (less sensitive than wall time to
    # other jobs on a shared machine): the loop's two module functions, wrapped for a stamp only
    cpu = {"rollout_batch": [], "train_epoch": []}
    real = {name: getattr(loop, name) for name in cpu if hasattr(loop, name)}

    def stamped(name):
        def call(*a, **k):
            c0 = time.process_time()
            try:
                return real[name](*a, **k)
            finally:
                cpu[name].append(time.process_time() - c0)
        return call

    for name in real:
        setattr(loop, name, stamped(name))
    load0 = load_avg()
    try:
        loop.grpo(cfg)
    finally:
        for name, fn in real.items():
            setattr(loop, name, fn)
    load1 = load_avg()
    files = [out / "metrics" / "bench" / f"train_iter_{i:03d}.json" for i in range(1, spec["iterations"] + 1)]
    # each train_iter_NNN.json is written once per iteration, after its train step and before its
    # checkpoint: the time between two of them is everything the loop does per iteration
    stamps = [f.stat().st_mtime_ns / 1e9 for f in files]
    loop = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:-1]  # iterations 2..N-1 (N also evaluates)
    iters = [json.loads(f.read_text()) for f in files]
    # the problems the loop trained on must be the spec's (the TRL side gets the same)
    trained = [g["id"] for r in iters for g in r["groups"]]
    assert trained == [p["id"] for p in spec["problems"]], "Airlock trained on other problems than the spec's"
    timed = iters[1:]
    return {"rollout": [r["rollout_s"] for r in iters], "train": [r["train_s"] for r in iters],
            "iteration": [r["rollout_s"] + r["train_s"] for r in iters], "loop": loop,
            "rollout_med": med([r["rollout_s"] for r in timed]), "train_med": med([r["train_s"] for r in timed]),
            "iteration_med": med([r["rollout_s"] + r["train_s"] for r in timed]), "loop_med": med(loop),
            "cpu_rollout_med": med(cpu["rollout_batch"][1:]), "cpu_train_med": med(cpu["train_epoch"][1:]),
            "loss": [r["loss"] for r in iters], "reward": [r["reward_mean"] for r in iters],
            "len_mean": med([r["len_mean"] for r in iters]), "threads": torch.get_num_threads(),
            "load": [load0, load1], "version": f"torch {torch.__version__}"}


# ------------------------------------------------------------------ TRL side (runs under --trl-python)


def trl_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))  # trainer.grpo.envs: pure Python, the same reward functions
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.grpo import envs

    model_dir = Path(spec["model"])
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    problems = [envs.make_problem(spec["env"], "train", p["id"], **spec["env_options"]) for p in spec["problems"]]
    for p, want in zip(problems, spec["problems"]):  # same prompt text, same prompt ids as Airlock's
        assert p.prompt == want["prompt"] and tok(p.prompt)["input_ids"] == want["ids"], p.id
    reward_fn = envs.get_reward(spec["env"])

    seen = []  # the problems of each reward call (one per step), checked against the spec's iterations

    def reward(prompts, completions, pid, **_):  # TRL passes the dataset's extra columns as lists
        seen.append(sorted(set(pid)))
        return [reward_fn(problems[i], c) for i, c in zip(pid, completions)]

    reward.__name__ = f"{spec['env']}_reward"
    dataset = Dataset.from_list([{"prompt": p.prompt, "pid": i} for i, p in enumerate(problems)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = spec["prompts"] * spec["group"]
    args = dict(
        output_dir=spec["out"], use_cpu=True, seed=spec["seed"], report_to="none", save_strategy="no",
        eval_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=spec["group"], max_completion_length=spec["max_tokens"], temperature=1.0, top_p=1.0,
        top_k=0, num_iterations=1, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, max_steps=spec["iterations"],
        shuffle_dataset=False, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
        dataloader_num_workers=0, log_completions=False, remove_unused_columns=False)
    for kv in spec["trl_args"]:
        k, v = kv.split("=", 1)
        args[k] = json.loads(v) if v[:1] in "[{0123456789-tfn\"" else v
    config = GRPOConfig(**args)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.cpu, self.logs = [], [], [], []

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())
            self.cpu0 = time.process_time()

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())
            self.cpu.append(time.process_time() - self.cpu0)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.logs.append(logs)

    rollout, cpu_rollout = [], []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0, c0 = time.perf_counter(), time.process_time()
            out = super()._generate_and_score_completions(inputs)
            rollout.append(time.perf_counter() - t0)
            cpu_rollout.append(time.process_time() - c0)
            return out

    clock = Clock()
    trainer = Timed(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tok,
                    callbacks=[clock])
    load0 = load_avg()
    trainer.train()
    load1 = load_avg()
    per_it = spec["prompts"]
    assert seen == [list(range(k * per_it, (k + 1) * per_it)) for k in range(spec["iterations"])], \
        "TRL trained on other problems than the spec's"
    step = [b - a for a, b in zip(clock.begin, clock.end)]
    loop = [b - a for a, b in zip(clock.end[:-1], clock.end[1:])]
    train = [s - r for s, r in zip(step, rollout)]
    result = {"rollout": rollout, "train": train, "iteration": step, "loop": loop,
              "rollout_med": med(rollout[1:]), "train_med": med(train[1:]), "iteration_med": med(step[1:]),
              "loop_med": med(loop), "cpu_rollout_med": med(cpu_rollout[1:]),
              "cpu_train_med": med([c - r for c, r in zip(clock.cpu, cpu_rollout)][1:]),
              "loss": [lg["loss"] for lg in clock.logs],
              "reward": [lg.get("reward") for lg in clock.logs],
              "len_mean": med([lg.get("completions/mean_length", float("nan")) for lg in clock.logs]),
              "threads": torch.get_num_threads(), "load": [load0, load1],
              "version": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"}
    print(MARK + json.dumps(result), flush=True)


def run_trl(python: str, spec: dict, tmp: Path, verbose: bool) -> dict:
    path = tmp / "trl_spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": "", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--trl-child", str(path)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"TRL side failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if verbose:
        print(proc.stderr[-3000:])
    return json.loads(lines[-1][len(MARK):])


# ------------------------------------------------------------------ main


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-child":
        return trl_child(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-python", required=True, help="python of a venv with trl (see the docstring)")
    p.add_argument("--env", default="repeat", choices=("sat", "arithmetic", "repeat"))
    p.add_argument("--iterations", type=int, default=6, help="per side per round; iteration 1 is warm-up")
    p.add_argument("--rounds", type=int, default=1, help="alternate the sides' order over rounds")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--trl-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra GRPOConfig field for TRL (JSON value), e.g. bf16=true gradient_checkpointing=true")
    p.add_argument("--verbose", action="store_true", help="print the TRL child's stderr tail")
    args = p.parse_args()
    if args.iterations < 3:
        p.error("--iterations must be >= 3 (1 warm-up, and the last Airlock iteration also evaluates)")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from grpo_iteration import write_fixture

    from trainer import config as configs
    from trainer import tokenizer as tk
    from trainer.grpo.loop import env_options

    torch.set_num_threads(args.threads)
    print(f"load before: {load_avg()} (1/5/15-min load average, {os.cpu_count()} CPUs)", flush=True)
    results = {"airlock": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        write_fixture(model, args.n_embd, args.n_layer, args.n_head)
        tok = tk.load(model)
        spec = {"model": str(model), "env": args.env, "env_options": env_options(configs.GRPOConfig(env=args.env)),
                "iterations": args.iterations, "prompts": args.prompts, "group": args.group,
                "max_tokens": args.max_tokens, "lr": args.lr, "threads": args.threads, "seed": 0,
                "trl_args": args.trl_arg,
                "problems": problems_spec(args.env, args.iterations, args.prompts, tok)}
        for r in range(args.rounds):
            for side in (("airlock", "trl") if r % 2 == 0 else ("trl", "airlock")):
                t0 = time.perf_counter()
                if side == "airlock":
                    res = run_airlock(spec, tmp / f"airlock{r}")
                else:
                    res = run_trl(args.trl_python, {**spec, "out": str(tmp / f"trl{r}")}, tmp, args.verbose)
                res["wall"] = time.perf_counter() - t0
                results[side].append(res)
                print(f"round {r + 1} {side:7s}: iteration {res['iteration_med']:.3f} s (rollout "
                      f"{res['rollout_med']:.3f} + train {res['train_med']:.3f}), loop {res['loop_med']:.3f} s; "
                      f"load {res['load'][0]} -> {res['load'][1]}; {res['wall']:.0f} s with start-up", flush=True)
    a, t = results["airlock"], results["trl"]

    def agg(side, key):
        return med([x[key] for x in side])

    print(f"\nconfig: env={args.env} {args.prompts}x{args.group}x{args.max_tokens} tokens, GPT-2 "
          f"{args.n_layer}x{args.n_embd} vocab 50257, full weights, beta 0, one update per batch, lr {args.lr}, "
          f"threads {a[0]['threads']} (Airlock) / {t[0]['threads']} (TRL); mean completion "
          f"{a[0]['len_mean']:.1f} / {t[0]['len_mean']:.1f} tokens; {t[0]['version']}"
          + (f"; TRL extra: {' '.join(args.trl_arg)}" if args.trl_arg else ""))
    print(f"medians of iterations 2..{args.iterations}, over {args.rounds} round(s):")
    print(f"{'':10s}{'rollout s':>11s}{'train s':>10s}{'iteration s':>13s}{'loop s':>9s}"
          f"   | CPU s: {'rollout':>8s}{'train':>8s}{'total':>8s}")
    for name, side in (("Airlock", a), ("TRL", t)):
        print(f"{name:10s}{agg(side, 'rollout_med'):11.3f}{agg(side, 'train_med'):10.3f}"
              f"{agg(side, 'iteration_med'):13.3f}{agg(side, 'loop_med'):9.3f}"
              f"   |        {agg(side, 'cpu_rollout_med'):8.3f}{agg(side, 'cpu_train_med'):8.3f}"
              f"{agg(side, 'cpu_rollout_med') + agg(side, 'cpu_train_med'):8.3f}")
    ratios = [x["iteration_med"] / y["iteration_med"] for x, y in zip(a, t)]
    loop_ratios = [x["loop_med"] / y["loop_med"] for x, y in zip(a, t)]
    goal = med(ratios)
    cpu_ratio = ((agg(a, "cpu_rollout_med") + agg(a, "cpu_train_med"))
                 / (agg(t, "cpu_rollout_med") + agg(t, "cpu_train_med")))
    print(f"ratio Airlock/TRL: iteration {goal:.2f}x, loop {med(loop_ratios):.2f}x, CPU {cpu_ratio:.2f}x  "
          f"(goal <= 0.50x: {'met' if goal <= 0.5 else 'NOT met'})")
    for name, side in (("Airlock", a), ("TRL", t)):
        print(f"{name} per-iteration s (round 1): rollout {[round(x, 3) for x in side[0]['rollout']]} "
              f"train {[round(x, 3) for x in side[0]['train']]}")
        print(f"{name} loss {[round(x, 4) for x in side[0]['loss']]}  reward "
              f"{[None if x is None else round(x, 3) for x in side[0]['reward']]}")
    print("load: before/after each side (1/5/15-min): "
          + "; ".join(f"{n} r{i + 1} {x['load'][0]} -> {x['load'][1]}" for n, s in (("Airlock", a), ("TRL", t))
                      for i, x in enumerate(s)) + f"; now {load_avg()}")


if __name__ == "__main__":
    main()
