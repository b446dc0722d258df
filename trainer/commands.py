"""The commands: the only code that turns a command line's arguments into library calls.

cli.py maps each command name to one function here; its signature and docstring are the
command's --help. Library modules (everything else under trainer/) never import this module.
Each command imports what it needs when it runs, so `trainer train` does not pay for FastAPI
(serve) or the GRPO stack at start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from trainer.errors import UserError

log = logging.getLogger("trainer")


def prepare_command(config: str | None = None, **overrides) -> str:
    """Tokenize a corpus into data/prepared/<name>/ (train.bin, val.bin, meta.json, tokenizer.json).

    Args:
      config: YAML file; its data section says what to prepare. Override with --data.source=PATH
        (.txt/.md file or folder, .jsonl, .parquet file or folder, a `datasets` save_to_disk
        folder, .bin/.npy/.pt tokens, or python-stdlib), --data.tokenizer=gpt2|bpe|char|model,
        --data.vocab_size=N, --data.text_field=NAME, --data.format=sft (prompt/completion or
        chat rows, the loss on the completion only: docs/data.md).
    """
    from trainer import config as configs
    from trainer import data
    from trainer.offline import go_offline

    cfg = configs.load(config, **overrides)
    if cfg.run.offline:
        go_offline()
    return str(data.prepare(cfg.data))


# ---------------------------------------------------------------- train, resume

def train_command(config: str | None = None, resume: str = "", nproc: int = 1, nnodes: int = 1,
                  rdzv_endpoint: str = "", rdzv_id: str = "", max_restarts: int = 3, **overrides) -> dict:
    """Train a model from scratch or fine-tune one.

    Args:
      config: YAML file (configs/*.yaml). Any key can be overridden as --section.key=value,
        e.g. --train.max_steps=50 --model.lora=true, or via TRAINER_SECTION_KEY variables.
        Short forms: --steps, --seed, --lr, --batch_size, --block_size, --name.
      resume: `auto` continues run.name from its newest valid checkpoint when it has one and
        starts it otherwise, so one command starts, restarts and finishes a run (torchrun's
        restarts, a resubmitted batch job). Under torchrun a restarted worker group always
        continues this way.
      nproc: train on this many processes of this host (data-parallel, through torchrun's
        launcher; a worker that dies restarts the group from `latest`).
      nnodes: hosts taking part; run the same command on each (SLURM: deploy/slurm/train.sbatch).
      rdzv_endpoint: HOST:PORT where the workers meet (the first host); attempt k of a restarted
        group uses PORT+k, so a restart never meets the last attempt's stale rendezvous.
      rdzv_id: the job's id, the same on every host (default: the run name).
      max_restarts: how often a group whose worker died starts again; bad input is never retried.
    """
    from trainer import checkpoint as ckpt
    from trainer import config as configs
    from trainer import distributed, runs, train

    if resume not in ("", "auto"):
        raise UserError(f"--resume={resume!r}: use --resume=auto, or `trainer resume --run NAME` for a named run")
    launch = distributed.Launch(nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts)
    cfg = configs.build(yaml_path=config, overrides=overrides)  # bad input is one line here, before any worker starts
    if resume == "auto" and not cfg.run.name:
        raise UserError("--resume=auto continues the run named by run.name; set it (--run.name=NAME), since a "
                        "derived name holds the start time and is new every time")
    cfg = configs.named(cfg, config)
    if launch.wanted:
        if resume != "auto" and ckpt.has_checkpoints(runs.RunPaths.of(cfg).checkpoints):
            raise UserError(f"run {cfg.run.name!r} already has checkpoints; continue it with `trainer train --nproc "
                            f"{nproc} --resume=auto ...` or `trainer resume`, or pick a new run.name")
        # every worker, and every restart, trains the run named now
        argv = ["train", *(["--config", config] if config else []), "--resume=auto", f"--run.name={cfg.run.name}",
                *(f"--{k}={_flag_value(v)}" for k, v in overrides.items() if k not in ("run.name", "name"))]
        sys.exit(distributed.launch(launch, argv, cfg.run.name))
    if (resume == "auto" or distributed.restarted()) and ckpt.has_checkpoints(runs.RunPaths.of(cfg).checkpoints):
        with runs.continuation(cfg.run.name, None, config, overrides) as (cfg, step_dir):
            return _train_on(cfg, step_dir)
    return train.train(cfg)


def _flag_value(value) -> str:
    """A parsed option value as the command line writes it (lists as YAML flow lists)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def resume_command(run: str | None = None, checkpoint: str | None = None, extra_steps: int = 0, nproc: int = 1,
                   nnodes: int = 1, rdzv_endpoint: str = "", rdzv_id: str = "", max_restarts: int = 3,
                   **overrides) -> dict:
    """Continue a run from its newest valid checkpoint, bit-exactly.

    Args:
      run: run name under volumes/checkpoints (or its path); default: the most recent run.
      checkpoint: a step directory to continue from (also $CHECKPOINT_PATH).
      extra_steps: train this many steps past the checkpoint (sets train.max_steps).
      overrides: --section.key=value for length, intervals and logging; model.*, data.* and
        run.seed are fixed by the checkpoint; keys that change the numbers (threads, batch,
        learning rate...) may change, with a warning that the run is no longer bit-exact.
      nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts: continue on many processes and hosts,
        as `trainer train` takes them; a run saved by N processes resumes bit-exactly on N.
    """
    from trainer import checkpoint as ckpt
    from trainer import config as configs
    from trainer import distributed, runs

    probe = configs.build(overrides={k: v for k, v in overrides.items() if k == "run.out_dir"})
    checkpoint = checkpoint or (None if run else os.environ.get("CHECKPOINT_PATH"))
    launch = distributed.Launch(nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts)
    if launch.wanted:
        # the workers (and a restarted group) continue this run from its newest checkpoint, to a fixed length
        step_dir = runs.locate(run, checkpoint, probe.run.out_dir)
        runs.refuse_other_loop(step_dir, "step")
        if extra_steps:
            overrides = {**overrides, "train.max_steps": ckpt.read_trainer_state(step_dir)["step"] + extra_steps}
        where = (["--checkpoint", checkpoint] if checkpoint
                 else ["--run", str(runs.run_folder(run, None, probe.run.out_dir))])
        argv = ["resume", *where, *(f"--{k}={_flag_value(v)}" for k, v in overrides.items())]
        sys.exit(distributed.launch(launch, argv, step_dir.parent.name))
    with runs.continuation(run, checkpoint, None, overrides, extra_steps=extra_steps) as (cfg, step_dir):
        return _train_on(cfg, step_dir)


def _train_on(cfg, step_dir: Path) -> dict:
    """Train the continued run `cfg` from `step_dir` (runs.continuation), unless it is done."""
    from trainer import checkpoint as ckpt
    from trainer import train

    step = ckpt.read_trainer_state(step_dir)["step"]
    if step >= cfg.train.max_steps and train.run_complete(cfg, step):
        raise UserError(f"run {cfg.run.name} already reached step {step} of train.max_steps={cfg.train.max_steps}; "
                        "pass --train.max_steps=N (larger) or --extra_steps=N to train further")
    if step >= cfg.train.max_steps:
        log.info(f"run {cfg.run.name} reached step {step} but its end-of-run work is missing: completing it")
    return train.train(cfg, resume_dir=step_dir)


# ---------------------------------------------------------------- checkpoints: sample, export, evaluate

def sample_command(run: str | None = None, checkpoint: str | None = None, prompt: str | None = None,
                   max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                   seed: int | None = None, num_samples: int = 1, out_dir: str = "volumes", device: str = "auto") -> str:
    """Generate text from a checkpoint (only the new tokens are printed).

    Args:
      run: run name (newest valid checkpoint); default: the most recent run.
      checkpoint: a step directory (also $CHECKPOINT_PATH).
      prompt: text to continue; default "QUESTION: " for gpt2, the start token for from-scratch.
      max_new_tokens, temperature, top_k, seed: default to the run's sample section.
      num_samples: how many samples, each with seed+i.
      device: auto (a GPU when there is one) | cpu | cuda[:N]; a seed gives the same text again
        on the same device (CPU and GPU kernels round differently).
    """
    from trainer import checkpoint as ckpt
    from trainer import config as configs
    from trainer import runs, runtime
    from trainer import tokenizer as tk
    from trainer.generate import sample_text
    from trainer.offline import go_offline

    given = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   seed=seed).items() if v is not None}
    # the limits of the sample.* config keys, checked before anything loads: --top_k=-5 is one line
    configs.validate(configs.Config().replace(sample=dataclasses.replace(configs.SampleConfig(), **given)))
    if num_samples < 1:
        raise UserError(f"--num_samples={num_samples} must be at least 1")
    go_offline()
    where = runtime.pick_device(device)
    step_dir, (model, tok, cfg, _) = runs.locate_and_restore(run, checkpoint, out_dir, device=where)
    s = dataclasses.replace(cfg.sample, **given)
    try:  # a value saved by an older Airlock may be out of today's range: say which, and how to override
        configs.validate(configs.Config().replace(sample=s))
    except UserError as e:
        raise UserError(f"{e} (from {step_dir / ckpt.CONFIG}; pass it as an option, e.g. --top_k=50)") from None
    if prompt is None:
        prompt = s.prompt or ("QUESTION: " if cfg.model.type == "gpt2" else "")
    ids = tok.encode(str(prompt)).ids if prompt else [tk.eot_id(tok)]  # the model's own end-of-text token
    if not ids:
        raise UserError(f"--prompt={prompt!r} encodes to no tokens with this run's tokenizer; use text it knows")
    texts = []
    for i in range(int(num_samples)):
        text = sample_text(model, tok, ids, s.max_new_tokens, s.temperature, s.top_k, s.seed + i, where)
        print(f"--- sample {i + 1} from {step_dir} ---\n{prompt}{text}", flush=True)
        texts.append(text)
    return "\n".join(texts)


def export_command(run: str | None = None, checkpoint: str | None = None, out: str | None = None,
                   merge: bool = False, out_dir: str = "volumes") -> str:
    """Write a checkpoint as a Hugging Face folder (AutoModelForCausalLM / PeftModel load it).

    Args:
      run: run name (newest valid checkpoint); default: the most recent run.
      checkpoint: a step directory (also $CHECKPOINT_PATH).
      out: destination folder; default <run>/export_<step>.
      merge: for LoRA runs, merge the adapter into the base weights (a plain transformers model).
    """
    from trainer import data
    from trainer import model as models
    from trainer import runs
    from trainer.offline import go_offline

    go_offline()
    step_dir, (model, tok, cfg, state) = runs.locate_and_restore(run, checkpoint, out_dir)
    dest = Path(out) if out else step_dir.parent / f"export_{step_dir.name}{'_merged' if merge else ''}"
    models.export(model, tok, dest, merge=merge, extra={"run": cfg.run.name, "checkpoint": step_dir.name,
                                                         "weights_sha256": models.weights_sha256(model)},
                  chat_template=data.chat_template(cfg.data))
    print(f"exported {step_dir} to {dest}" + (" (LoRA merged)" if merge and cfg.model.lora else ""))
    return str(dest)


def evaluate_command(checkpoint: str | None = None, watch: str | None = None, run: str | None = None,
                     out_dir: str = "volumes", interval: float = 10.0, once: bool = False, device: str = "auto",
                     force: bool = False, compare: str | list[str] | None = None, out: str = "") -> None:
    """Evaluate checkpoints: val loss, perplexity and a sample into metrics/<run>/eval.jsonl, and loss.png.

    --checkpoint PATH   a step directory (or a run directory: its newest valid checkpoint), once
    --run NAME          the newest valid checkpoint of run NAME under OUT_DIR/checkpoints, once
    --watch DIR         every completed checkpoint under DIR (a run folder or the checkpoints root),
                        then each new one as it appears, polling every INTERVAL seconds; --once
                        scans a single time. Already-evaluated checkpoints are skipped (restart-safe).
    With none of them: the newest checkpoint of the most recent run. --force re-evaluates.
    --compare RUN,RUN   no evaluation: the runs' val loss (pretraining) or eval reward (GRPO)
                        curves on one plot, OUT (default OUT_DIR/metrics/compare.png), and a
                        markdown table of their best and last values; a run may be a pattern
                        such as 'grpo_repeat-*' (a sweep's runs).
    """
    from trainer import evaluate, offline, runs, runtime

    if compare is not None:
        from trainer import board

        text, png = board.compare(out_dir, compare, Path(out) if out else None)
        print(text)
        print(f"\nplot: {png}", flush=True)
        return
    if interval <= 0:
        raise UserError(f"--interval={interval} must be more than 0 seconds")
    offline.go_offline()  # the evaluator never needs a network
    dev = runtime.pick_device(device)
    if watch:
        if not Path(watch).is_dir():
            raise UserError(f"--watch {watch}: no such folder; give a run folder or {out_dir}/checkpoints")
        evaluate.watch_loop(Path(watch), dev, float(interval), once)
        return
    step_dir = runs.locate(run=run, checkpoint=checkpoint, out_dir=out_dir)
    row = evaluate.evaluate_checkpoint(step_dir, dev, force=force, strict=True)
    if row is None and step_dir.exists():
        log.info(f"evaluate: {step_dir} is already in "
                 f"{runs.RunPaths.of_step(step_dir).metrics / evaluate.EVAL_FILE} (--force to redo)")


def runs_command(config: str | None = None, json: bool = False, **overrides) -> list[dict]:
    """List the runs under run.out_dir: kind, status, step, best and last val loss or eval reward, newest checkpoint, disk.

    Status: running (with the pid and host holding the run's lock), stopped (by a signal, or
    killed: `trainer resume` continues it), finished, failed (with the error train.log ends
    with), damaged (a `latest` that names no step dir, with what a resume falls back to), no
    checkpoints. Reads only: a damaged run is a row with the reason.

    Args:
      config: YAML file whose run.out_dir to list (or --run.out_dir=DIR; default volumes).
      json: print the rows as a JSON list, for scripts.
    """
    import dataclasses as dc
    import json as json_module

    from trainer import board
    from trainer import config as configs

    out_dir = configs.build(yaml_path=config, overrides=overrides).run.out_dir
    rows = board.list_runs(out_dir)
    if json:
        print(json_module.dumps([dc.asdict(r) for r in rows], indent=1), flush=True)
    else:
        print(f"runs under {out_dir}:\n{board.table(rows)}", flush=True)
    return [dc.asdict(r) for r in rows]


# ---------------------------------------------------------------- doctor

def doctor(cfg) -> int:
    """Report versions, device, offline mode and whether the config's tokenizer, weights and
    data are present and load under the socket guard. -> number of problems."""
    import platform

    import numpy
    import peft
    import tokenizers
    import torch
    import transformers

    from trainer import data, model as models, tokenizer as tk
    from trainer.offline import NetworkBlocked, guard_active, install_guard, set_offline_env

    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")

    print("versions:")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, tokenizers {tokenizers.__version__}, numpy {numpy.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} "
          f"(run.device={cfg.run.device}, {torch.get_num_threads()} CPU threads)")
    if cfg.run.device.startswith("cuda"):
        report(cuda, "run.device", "a CUDA device is visible" if cuda else
               f"run.device={cfg.run.device} but no CUDA device is visible: `trainer train` would refuse; use "
               "run.device=cpu or auto, or run on a GPU host (docker: --gpus all)")
    print("offline:")
    set_offline_env()
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        report(os.environ.get(key) == "1", key, os.environ.get(key, "unset"))
    install_guard()
    report(guard_active(), "socket guard", "installed: non-loopback connections raise")
    print("assets (loaded under the guard):")
    tok = None
    try:
        path = data.find_prepared(cfg.data)  # train's own matching: a folder with other settings fails here
        if (path / "meta.json").is_file():
            meta = data.read_meta(path)
            report(True, "data", f"{path}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
                                 f"{meta['tokenizer']} vocab {meta['vocab_size']}")
            tok = tk.load(path)
            report(True, "tokenizer", f"{path / tk.TOKENIZER_FILE}: {tok.get_vocab_size()} tokens")
        else:
            found = cfg.data.source == data.STDLIB or os.path.exists(cfg.data.source)
            report(found, "data", f"{path} not prepared yet: the first `trainer train` with this config prepares it "
                                  f"from data.source={cfg.data.source!r}" + ("" if found else ", which does not exist")
                                  + " (or run `trainer prepare` with this config now)")
    except UserError as e:
        report(False, "data", str(e))
    except (OSError, ValueError) as e:
        report(False, "data", f"{e} (run `trainer prepare` with this config)")
    if tok is None and cfg.data.tokenizer in ("gpt2", "model"):
        try:
            tok = tk.build(cfg.data.tokenizer, None, cfg.data.vocab_size, cfg.data.tokenizer_path)
            report(True, "tokenizer", f"{cfg.data.tokenizer} from local files ({cfg.data.tokenizer_path}): "
                                      f"{tok.get_vocab_size()} tokens, end of text {tok.id_to_token(tk.eot_id(tok))}")
        except (UserError, NetworkBlocked) as e2:
            report(False, "tokenizer", str(e2))
    if cfg.model.type in ("gpt2", "hf"):
        try:  # hf: with model.dropout, whose refusal (no dropout setting) shows here too
            m = models.load_pretrained(cfg.model.path, **({"dropout": cfg.model.dropout, "kind": "hf"}
                                                          if cfg.model.type == "hf" else {}))
            fixture = (os.path.exists(os.path.join(cfg.model.path, "FIXTURE.txt")))
            kind = f"{m.config.model_type}, " if cfg.model.type == "hf" else ""
            report(True, "weights", f"{cfg.model.path}: {kind}{sum(p.numel() for p in m.parameters()):,} parameters"
                                    + (" (FIXTURE: tiny random GPT-2 for tests, not the real weights)" if fixture else ""))
        except (UserError, NetworkBlocked, OSError, ValueError) as e:
            report(False, "weights", str(e))
    else:
        report(True, "weights", "from_scratch: initialised from run.seed, nothing to load")
    print("ok: this config needs no network" if problems == 0 else f"{problems} problem(s) found")
    sys.stdout.flush()
    return problems


def doctor_command(config: str | None = None, **overrides) -> None:
    """Check that a config can run here with no network: versions, device, offline mode,
    and the tokenizer, weights and data it needs, loaded under the socket guard.

    Args:
      config: YAML file to check (default: the built-in defaults).
    """
    from trainer import config as configs

    problems = doctor(configs.load(config, **overrides))
    if problems:
        sys.exit(1)


# ---------------------------------------------------------------- GRPO: grpo, sweep, serve

def grpo_command(config: str | None = None, resume: str = "", **overrides) -> dict:
    """Train a policy with GRPO on a reward environment (configs/grpo_*.yaml).

    Args:
      config: YAML file. Override any key as --grpo.lr=1e-5 --grpo.backend=openai ...
      resume: a run name (or run/iteration directory) to continue from its newest valid
        iteration. The run's saved config is the base; --config and overrides on top may
        change lengths and intervals (e.g. grpo.iterations), not model.* or data.*.
        `auto` continues run.name when it has checkpoints and starts it otherwise (for
        compose, where the same command must start, restart and finish a run).
    """
    from trainer import checkpoint as ckpt
    from trainer import config as configs
    from trainer import distributed, runs
    from trainer.grpo.loop import grpo

    if distributed.ranks().world > 1:
        raise UserError("`trainer grpo` runs on one process; start it without torchrun (its rollouts batch on "
                        "the generation server)")
    if resume == "auto":
        cfg = configs.load(config, **overrides)
        resume = cfg.run.name if ckpt.has_checkpoints(runs.RunPaths.of(cfg).checkpoints) else ""
        if not resume:
            return grpo(cfg)
    if not resume:
        return grpo(configs.load(config, **overrides))
    is_dir = Path(resume).is_dir()
    with runs.continuation(None if is_dir else resume, resume if is_dir else None, config, overrides,
                           kind="iter") as (cfg, step_dir):
        return grpo(cfg, resume_dir=step_dir)


def corpus_command(config: str | None = None, count: int = 4000, out: str = "", seed: int = 0,
                   **overrides) -> str:
    """Write a JSONL corpus of a GRPO env's problems with well-formed but random answers.

    For pretraining a base that knows the env's format but not its answers, before GRPO
    (configs/sat_base.yaml, then configs/grpo_sat_base.yaml). The env and its options come from
    the config's grpo section (grpo.env, grpo.sat_vars ...); problems are training ids far from
    those GRPO draws.

    Args:
      config: YAML file with the grpo section (e.g. configs/grpo_sat_base.yaml).
      count: problems to write.
      out: the .jsonl file (default data/<env>/corpus.jsonl); replaced atomically.
      seed: seeds the random answers.
    """
    import json

    from trainer import atomic
    from trainer import config as configs
    from trainer.grpo import envs
    from trainer.grpo.loop import env_options

    if count < 1:
        raise UserError(f"--count={count} must be at least 1")
    g = configs.load(config, **overrides).grpo
    path = Path(out or f"data/{g.env}/corpus.jsonl")
    lines = envs.corpus(g.env, count, seed, **env_options(g))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, "".join(json.dumps({"text": line}) + "\n" for line in lines).encode())
    print(f"wrote {count} {g.env} problems with random answers to {path}", flush=True)
    return str(path)


def sweep_command(config: str | None = None, grid: str = "", **overrides) -> list[dict]:
    """Run GRPO once per combination of a grid of config values; write a summary table.

    Args:
      config: YAML file every run starts from (configs/grpo_*.yaml).
      grid: 'grpo.lr=[5e-6,1e-5,2e-5] grpo.beta=[0.02,0.05,0.1]': key=[values] items,
        separated by spaces. Runs are named <run.name or config stem>-lr5e-06-beta0.02 ...;
        the summary is <out_dir>/metrics/<base>-sweep/summary.{csv,md}. Running the same
        command again skips finished runs and resumes a partial one.
      Other --section.key=value flags apply to every run.
    """
    from trainer.grpo import sweep

    rows, paths = sweep.run(config, grid, overrides)
    print(paths[1].read_text(), end="", flush=True)
    left = [r["run"] for r in rows if r["status"] != "done"]
    if left:
        cmd = f"trainer sweep {'--config ' + config + ' ' if config else ''}--grid '{grid}'"
        cmd += "".join(f" --{k}={v}" for k, v in overrides.items())
        print(f"sweep stopped with {len(left)} run(s) not finished; continue with `{cmd}`", flush=True)
    print(f"summary: {paths[0]} and {paths[1]}", flush=True)
    return rows


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, name: str = "", device: str = "cpu",
                  log_level: str = "warning", max_num_seqs: int = 256) -> None:
    """Serve the HF model folder MODEL on http://HOST:PORT/v1 (OpenAI completions API, vLLM's LoRA endpoints).

    Binds to loopback unless --host says otherwise. --name is the model id clients send
    (default: the path as given). LoRA adapters are loaded at runtime with
    POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}. --max_num_seqs caps
    the completions (prompts x n) of one request and of one forward batch, which bounds
    memory; concurrent requests with the same model and sampling parameters share batches.
    """
    import uvicorn

    from trainer.serve import create_app
    from trainer.signals import STOP

    if not 0 < int(port) < 65536:
        raise UserError(f"--port {port} must be between 1 and 65535")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(model, name, device, max_num_seqs)
    print(f"serving {app.state.engine.name!r} on http://{host}:{port}/v1", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then raises the signal again: here it
    # only marks the stop, so `docker stop` ends the server with exit 0 instead of an error line
    with STOP.polling("the server has shut down"):
        uvicorn.run(app, host=host, port=int(port), log_level=log_level)
