"""`trainer grpo`: per iteration, rollouts -> a train epoch -> eval -> checkpoint iter_NNN.

Iteration k (1-based) samples G completions for each of B training problems (ids of
iteration k-1 in the "train" namespace) with the weights after k-1 updates ("version"
k-1), scores them with the env's reward function, and runs `ppo_epochs` passes of
minibatch AdamW steps on the objective in algorithm.py. A prompt is tokenized once: those
ids go to the sampler and into the training batch, followed by the completion's ids as
sampled (rollout.py), so training sees exactly what was sampled. Old log-probs are computed
once, before the first update (with a single update, by that update's own forward); the
reference is the base model with the LoRA adapter disabled (or a frozen copy of the initial
weights), and is skipped when beta == 0. Dropout is off throughout (eval mode), so old and
new log-probs come from the same function.

Each iteration logs `logprob_mismatch`, the mean |sampler log-prob - trainer log-prob| of
the sampled tokens (the local sampler or the server against pi_old), in metrics.csv and
train_iter_NNN.json; server rollouts are importance-weighted (grpo.is_cap, algorithm.py)
and the JSON adds the weights' `is_weight_mean`, `is_weight_min` and `is_weight_max`.

With backend=openai each version is put on the server before it is sampled from (sync.py:
a full HF folder the server reloads, or a LoRA adapter) and checked there with a fixed
probe; train_iter_NNN.json names the version and its sha256 that produced the iteration's
rollouts, and `sync_s` is its cost. A resumed run re-pushes the checkpoint's policy before
its first rollout, so the server never holds other weights. The server is untrusted
(rollout.py): what it gets wrong ends the run in one line naming it, exit 2, with the
checkpoints before intact; a stop signal while the trainer waits on it abandons that
iteration, keeps the last checkpoint and exits 0 with the resume command.

Sampling seeds, problem ids and minibatch orders are functions of (run.seed, iteration),
and each iteration ends with a checkpoint (weights, AdamW state, RNG), so a resume
continues bit-exactly on CPU with the local backend.

On a GPU (run.device cuda, or auto on a GPU host) the policy, the reference, the sampler and
every batch live on it: rollouts are built on the CPU and train_epoch moves them. As in
pretraining, runtime.configure turns on TF32 (and run.deterministic's kernels) and AdamW is
fused. Only the update runs under bf16 autocast: the policy's forward and backward, and the
two things compared with it, pi_old for the ratio and the reference for the KL, so that the
ratio is 1 and the KL 0 where the weights have not moved (bf16 moves a GPT-2 log-prob by
~1e-2, enough to clip and to bias the KL if only one side had it); lm_head's log-softmax stays
float32 inside (algorithm.LinearLogProbs). Full IEEE float32 (no autocast, no TF32:
runtime.full_precision) where a log-prob is compared with another engine's float32: the
weight-sync probe (tolerance 1e-3, while TF32 alone moves it by about that), pi_old^1 behind
the importance weights and logprob_mismatch (one more no-grad pass), and the local sampler,
whose log-probs those compare against. On CPU nothing changes: all of it is float32 and one
pass serves both, so CPU runs stay bit-exact.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from trainer import atomic
from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer import metrics, offline, runlock, runtime
from trainer import model as models
from trainer import tokenizer as tk
from trainer.errors import UserError
from trainer.runs import RunPaths
from trainer.signals import STOP, Stopped
from trainer.grpo import envs
from trainer.grpo.algorithm import (Scores, group_advantages, grpo_loss, importance_weights, logprob_mismatch,
                                    mask_truncated_completions, scoring_temperature, token_logprobs)
from trainer.grpo.rollout import Abandoned, LocalBackend, OpenAIBackend, RolloutError, SamplingParams
from trainer.grpo.sync import PROBE_TEXT, AdapterSync, ReloadSync

log = logging.getLogger("trainer")

FIELDS = ("iteration", "reward_mean", "reward_std", "zero_std_frac", "loss", "kl", "clip_ratio", "entropy",
          "logprob_mismatch", "len_mean", "len_min", "len_max", "truncated_ratio", "tokens", "skipped_groups",
          "rollout_s", "train_s", "sync_s", "eval_s", "iter_s", "eval_reward", "eval_pass_rate", "adapter")
CLOCKS = ("rollout_s", "train_s", "sync_s", "eval_s", "iter_s")  # wall-clock seconds: differ between equal runs
EVAL_SEED = 999_983  # eval sampling seed offset: the same held-out samples every evaluation


def server_host(url: str) -> str:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if not host or urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"server.url={url!r} is not an http(s) URL; use e.g. http://server:8000/v1")
    return host


def env_options(g) -> dict:
    return {"sat": dict(n_vars=g.sat_vars, n_clauses=g.sat_clauses, k=g.sat_k),
            "arithmetic": dict(max_operand=g.arith_max, ops=g.arith_ops),
            "repeat": dict(chars=g.repeat_chars, length=g.repeat_length)}[g.env]


def load_tokenizer(cfg):
    """gpt2-type models bring tokenizer.json in their folder (or data.tokenizer_path); a
    from-scratch policy gets a character tokenizer over the env's prompts and answers."""
    if cfg.model.type == "gpt2":
        own = Path(cfg.model.path) / tk.TOKENIZER_FILE
        return tk.load(own) if own.is_file() else tk.load_gpt2(cfg.data.tokenizer_path)
    g = cfg.grpo
    texts = [p.prompt for p in envs.train_problems(g.env, 0, 64, **env_options(g))]
    return tk.train_char(texts + ["0123456789-\n " + g.repeat_chars])


def _seed(run_seed: int, iteration: int, salt: int = 0) -> int:
    return (run_seed * 1_000_003 + iteration * 7919 + salt) % (2**31 - 1)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         logprobs: list[list[float]] | None = None):
    """-> ids (N, T), attention (N, T), completion mask (N, T-1) aligned with token_logprobs, and
    the sampler's log-probs (N, T-1) at the same positions (0 elsewhere; zeros without `logprobs`)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros((len(prompts), width - 1))
    sampler = torch.zeros((len(prompts), width - 1))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) - 1: len(p) + len(c) - 1] = 1  # logprob of token j is at j-1
        if logprobs is not None:
            sampler[i, len(p) - 1: len(p) + len(c) - 1] = torch.tensor(logprobs[i], dtype=torch.float32)
    return ids, attn, comp, sampler


def make_optimizer(policy, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable weights, no weight decay; fused on CUDA, as pretraining's."""
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.grpo.lr,
                             betas=(cfg.grpo.adam_beta1, cfg.grpo.adam_beta2), weight_decay=0.0,
                             fused=device.type == "cuda")


def _reference_logps(policy, ref, ids, attn, mask, temperature):
    if ref is not None:
        return token_logprobs(ref, ids, attn, mask, temperature).logps
    with policy.disable_adapter():  # LoRA: the base model is the reference
        return token_logprobs(policy, ids, attn, mask, temperature).logps


def evaluate(backend, cfg, params, reward, tok) -> dict:
    g, e = cfg.grpo, cfg.eval
    problems = envs.eval_problems(g.env, e.num_problems, **env_options(g))
    prompts = [tok.encode(p.prompt).ids for p in problems]
    groups = backend.generate(prompts, e.replicates, _seed(cfg.run.seed, 0, EVAL_SEED), params)
    per_problem, scores = [], []
    for p, grp in zip(problems, groups):  # not all None: the backend raises then
        if grp is None:
            continue
        rs = [reward(p, c.text) for c in grp]
        scores += rs
        per_problem.append({"id": p.id, "rewards": rs, "sample": grp[0].text})
    return {"mean_reward": sum(scores) / len(scores), "pass_rate": sum(map(envs.passed, scores)) / len(scores),
            "num_problems": len(per_problem), "replicates": e.replicates, "problems": per_problem}


def train_epoch(policy, ref, optimizer, batch, cfg, iteration: int, server: bool = False) -> dict:
    """ppo_epochs passes of minibatch updates on one iteration's rollouts (a batch built on the CPU,
    moved to the policy's device here). `server`: they came from a server, so the truncated
    importance weights (grpo.is_cap) apply.

    pi_old's log-probs (and, at temperature 1, the ones compared with the sampler's) come from
    one no-grad pass before the first update. With a single update (ppo_epochs 1, one
    minibatch) that pass would score the very weights the update scores, so the update's own
    forward, detached, is pi_old (TRL does the same) and the extra pass is skipped. Under bf16
    autocast (CUDA) pi_old for the ratio and the reference are scored under it like the update,
    and the sampler's basis (pi_old^1: importance weights, logprob_mismatch, the entropy logged)
    by one more pass in full float32 (module docstring)."""
    g = cfg.grpo
    device = next(policy.parameters()).device
    mixed = device.type == "cuda"  # runtime.autocast is bf16 there; elsewhere float32, and one pass serves both
    tau = scoring_temperature(g.temperature)
    batch = runtime.to_device(batch, device)
    ids, attn, adv, sampler = batch["ids"], batch["attn"], batch["adv"], batch["sampler"]
    sampled, mask = batch["sampled"], batch["mask"]  # (N, T-1): every sampled token / the loss's tokens
    single = g.ppo_epochs == 1 and g.minibatch_size >= len(ids)
    scored = sampled if single else mask  # the positions the update steps score
    base = old = None  # pi_old^1 in float32 (raw, entropy) / pi_old for the ratio
    with torch.no_grad():
        if mixed or not single:
            with runtime.full_precision(device):
                base = token_logprobs(policy, ids, attn, sampled, tau, with_entropy=True, with_raw=True)
        with runtime.autocast(device):
            if not single:
                old = token_logprobs(policy, ids, attn, sampled, tau) if mixed else base
            ref_logps = _reference_logps(policy, ref, ids, attn, scored, tau) if g.beta else None
    stats: dict[str, list] = {"loss": [], "kl": [], "clip_ratio": []}
    params = [p for p in policy.parameters() if p.requires_grad]
    weights = None
    for epoch in range(g.ppo_epochs):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(_seed(cfg.run.seed, iteration, epoch)))
        order = order.to(device)
        for at in range(0, len(ids), g.minibatch_size):
            mb = order[at: at + g.minibatch_size]
            with runtime.autocast(device):
                new = token_logprobs(policy, ids[mb], attn[mb], scored[mb], tau,
                                     with_entropy=(single and not mixed) or g.entropy_coef > 0,
                                     with_raw=single and not mixed)
            if single:
                old = _in_batch_order(new, mb)
                base = old if base is None else base
            if server and g.is_cap and weights is None:
                weights = importance_weights(base.raw, sampler, mask, g.is_cap)
            loss, s = grpo_loss(new.logps, (old.logps * mask)[mb], adv[mb], mask[mb], g.epsilon,
                                g.epsilon_high or None, g.beta, None if ref_logps is None else ref_logps[mb],
                                new.entropy, g.entropy_coef, g.loss_agg, None if weights is None else weights[mb])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if g.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, g.grad_clip)
            optimizer.step()
            stats["loss"].append(float(loss.detach()))
            for k in ("kl", "clip_ratio"):
                if k in s:
                    stats[k].append(s[k])
    out = {k: (sum(v) / len(v) if v else None) for k, v in stats.items()}
    n = sampled.sum().clamp(min=1)
    # entropy of the policy that sampled (pi_old at the scoring temperature) over the sampled
    # tokens, from the pass that records pi_old: the update steps need not compute it
    out["entropy"] = float((base.entropy * sampled).sum() / n)
    out["logprob_mismatch"] = logprob_mismatch(base.raw, sampler, sampled)
    if weights is not None:  # over the loss's tokens, as TRL logs its importance_sampling_ratio
        on = weights[mask.bool()]
        out["is_weight_mean"] = float(on.mean()) if len(on) else None
        out["is_weight_min"], out["is_weight_max"] = (float(on.min()), float(on.max())) if len(on) else (None, None)
    return out


def _in_batch_order(scores: Scores, rows: torch.Tensor) -> Scores:
    """A minibatch's Scores (rows = batch indices, a permutation of all of them), detached and put
    back in batch order."""
    def back(x):
        if x is None:
            return None
        out = torch.empty_like(x, requires_grad=False)
        out[rows] = x.detach()
        return out
    return Scores(back(scores.logps), back(scores.entropy), back(scores.raw))


def rollout_batch(backend, cfg, problems, params, reward, pad_id: int, tok, iteration: int):
    g = cfg.grpo
    prompt_ids = [tok.encode(p.prompt).ids for p in problems]  # once: the server gets these ids, training too
    groups = backend.generate(prompt_ids, g.group_size, _seed(cfg.run.seed, iteration), params)
    # not all None: the backend raises then, naming the server and the reason
    kept = [(p, ids, grp) for p, ids, grp in zip(problems, prompt_ids, groups) if grp is not None]
    skipped = len(problems) - len(kept)
    rewards = torch.tensor([[reward(p, c.text) for c in grp] for p, _, grp in kept])
    adv, zero = group_advantages(rewards, g.scale_rewards)
    done = [c for _, _, grp in kept for c in grp]
    prompts = [ids for _, ids, grp in kept for _ in grp]
    ids, attn, sampled, sampler = pack(prompts, [c.token_ids for c in done], pad_id, [c.logprobs for c in done])
    truncated = torch.tensor([c.finish_reason == "length" for c in done])
    mask = mask_truncated_completions(sampled, truncated) if g.mask_truncated else sampled
    lengths = [len(c.token_ids) for c in done]
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
             "zero_std_frac": zero / len(kept), "len_mean": sum(lengths) / len(lengths), "len_min": min(lengths),
             "len_max": max(lengths), "truncated_ratio": float(truncated.float().mean()), "tokens": sum(lengths),
             "skipped_groups": skipped}
    samples = [{"id": p.id, "prompt": p.prompt, "rewards": rewards[i].tolist(), "completions": [c.text for c in grp]}
               for i, (p, _, grp) in enumerate(kept)]
    batch = {"ids": ids, "attn": attn, "sampled": sampled, "mask": mask, "adv": adv.reshape(-1), "sampler": sampler}
    return batch, stats, samples


def check_lengths(cfg, tok, positions: int) -> None:
    """Prompt + max_tokens must fit the model's positions; checked on the held-out problems and
    a sample of training problems, so a too-small model.block_size fails before any work."""
    g = cfg.grpo
    problems = envs.eval_problems(g.env, cfg.eval.num_problems, **env_options(g))
    problems += envs.train_problems(g.env, 0, 256, **env_options(g))
    longest = max(len(tok.encode(p.prompt).ids) for p in problems)
    if longest + g.max_tokens > positions:
        need = longest + g.max_tokens + 16  # some room: other ids give somewhat longer prompts
        raise UserError(f"model.block_size={positions} is too small for grpo.env={g.env}: prompts take up to "
                        f"{longest} tokens plus grpo.max_tokens={g.max_tokens}; set model.block_size >= {need}")


def resume_hint(cfg) -> str:
    """The command that continues this run (out_dir named when it is not the default)."""
    cmd = f"trainer grpo --resume {cfg.run.name}"
    if cfg.run.out_dir != configs.RunConfig().out_dir:
        cmd += f" --run.out_dir={cfg.run.out_dir}"
    return cmd


def grpo(cfg, resume_dir: Path | None = None) -> dict:
    """Run (or continue) GRPO. -> summary with the last iteration and eval rewards. The run is
    locked for the whole call: a second writer of the same run is refused."""
    ckpt_dir = RunPaths.of(cfg).checkpoints
    try:
        with runlock.lock_run(ckpt_dir):
            return _grpo(cfg, resume_dir)
    except Stopped as e:  # start-up is not a safe point to save at, and nothing needs saving yet
        log.info(f"stopped by {e} during start-up, before any iteration ran: nothing was saved; run the same "
                 "command again to start")
        return {"iteration": -1, "evals": [], "stopped": True, "weights_sha256": None}


def _grpo(cfg, resume_dir: Path | None) -> dict:
    g = cfg.grpo
    paths = RunPaths.of(cfg)
    ckpt_dir, metrics_dir = paths.checkpoints, paths.metrics
    if resume_dir is None and ckpt.has_checkpoints(ckpt_dir):
        raise UserError(f"run {cfg.run.name!r} already has checkpoints in {ckpt_dir}; continue it with "
                        f"`{resume_hint(cfg)}` or pick a new run.name")
    metrics.setup_logging(metrics_dir / "train.log")
    if cfg.run.offline:
        # loopback stays allowed; the openai backend may also reach exactly the host of server.url
        # (e.g. the compose service `server`) and the addresses that name resolves to
        offline.go_offline(allow_hosts=[server_host(cfg.server.url)] if g.backend == "openai" else [])
    # recorded in the config, so a resume runs with the same count (bit-exact)
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, threads=runtime.pin_threads(cfg.run.threads)))
    device = runtime.pick_device(cfg.run.device)
    runtime.configure(device, cfg.run.deterministic)  # CUDA: TF32, and deterministic kernels when asked
    tok = load_tokenizer(cfg)
    eos = tk.eot_id(tok)
    reward = envs.get_reward(g.env, g.reward)
    runtime.seed_everything(cfg.run.seed)
    policy, positions = models.build_model(cfg.model, tok.get_vocab_size(), eos, cfg.run.seed)
    check_lengths(cfg, tok, positions)
    policy.to(device).eval()  # no dropout: old and new log-probs must come from the same function
    ref = None
    if g.beta and not cfg.model.lora:
        ref = copy.deepcopy(policy).requires_grad_(False)  # the initial weights, also after a resume
    optimizer = make_optimizer(policy, cfg, device)
    log.info(f"run {cfg.run.name}: GRPO on {device}" + (" (update in bf16 autocast, log-probs compared with the "
                                                        "sampler's in float32)" if device.type == "cuda" else ""))
    start, tracker = 0, {"best_eval": None, "evals": []}
    if resume_dir is not None:
        start = ckpt.resume_training(resume_dir, policy, optimizer, tracker, map_location=device,
                                     run_dir=ckpt_dir)
        log.info(f"resumed {cfg.run.name} from {resume_dir} at iteration {start}")

    if g.backend == "openai":
        # an id the server sends must index the policy's embedding rows, or the forward crashes
        backend = OpenAIBackend(cfg.server.url, "", tok, eos, cfg.server.timeout, cfg.server.retries,
                                concurrency=g.concurrency, request_prompts=g.request_prompts,
                                vocab_size=policy.get_input_embeddings().weight.shape[0],
                                rollout_timeout=g.rollout_timeout)
        backend.wait_ready()
        way = ReloadSync if g.sync == "reload" else AdapterSync
        sync = way(backend, Path(g.sync_dir or paths.sync),
                   tok.encode(PROBE_TEXT).ids, prefix=cfg.run.name, server_dir=g.server_sync_dir,
                   tolerance=g.sync_tolerance)
    else:
        backend, sync = LocalBackend(policy, tok, eos, g.rollout_batch, g.request_prompts), None
    params = SamplingParams(g.max_tokens, g.temperature, g.top_p, tuple(g.stop))
    tok_json = tok.to_str().encode()
    atomic.write_bytes(metrics_dir / ckpt.CONFIG, cfg.to_yaml().encode())
    rows = metrics.Metrics(metrics_dir, fields=FIELDS, resume_step=start, key="iteration")
    pushed = {"adapter": None, "version": None}

    def ensure_pushed(version: int) -> dict:
        if sync is None or pushed["version"] == version:
            return {"sync_s": 0.0}
        with runtime.full_precision(device):  # the probe compares with the server's float32
            info = sync.push(policy, version)
        pushed.update(adapter=info["adapter"], version=version, sha256=info["adapter_sha256"],
                      probe=info["sync_probe_diff"])
        log.info(f"synced version {version} to {cfg.server.url} in {info['sync_s']:.2f}s (probe mean |d logprob| "
                 f"{info['sync_probe_diff']:.2e})")
        return info

    def run_eval(iteration: int) -> dict:
        t0 = time.perf_counter()
        sync_s = ensure_pushed(iteration)["sync_s"]
        result = evaluate(backend, cfg, params, reward, tok)
        result.update(iteration=iteration, adapter=pushed["adapter"], eval_s=time.perf_counter() - t0, sync_s=sync_s)
        atomic.write_json(metrics_dir / f"eval_iter_{iteration:03d}.json", result)
        tracker["evals"].append([iteration, result["mean_reward"]])
        log.info(f"eval iter {iteration}: mean reward {result['mean_reward']:.3f}, pass rate {result['pass_rate']:.3f}")
        return result

    saver = ckpt.AsyncSaver()  # the write of iteration k overlaps the rollouts of k + 1
    # a stop abandons what waits on the server (rollouts, sync, eval: Abandoned) and finishes what does not
    what = ("abandoning the requests to the generation server, or finishing and saving an iteration in training"
            if sync is not None else "finishing this iteration and saving a checkpoint")
    it = start
    with STOP.polling(what):
        try:
            if start == 0:
                run_eval(0)
            for it in range(start + 1, g.iterations + 1):
                t0 = time.perf_counter()
                sync_s = ensure_pushed(it - 1)["sync_s"]
                t1 = time.perf_counter()
                problems = envs.train_problems(g.env, it - 1, g.prompts_per_iter, **env_options(g))
                batch, stats, samples = rollout_batch(backend, cfg, problems, params, reward, eos, tok, it)
                t2 = time.perf_counter()
                stats.update(train_epoch(policy, ref, optimizer, batch, cfg, it, server=sync is not None))
                t3 = time.perf_counter()
                stats.update(iteration=it, rollout_s=t2 - t1, train_s=t3 - t2, sync_s=sync_s,
                             adapter=pushed["adapter"], adapter_sha256=pushed.get("sha256"),
                             sync_probe_diff=pushed.get("probe"))
                ev = None
                if (cfg.eval.interval and it % cfg.eval.interval == 0) or it == g.iterations:
                    ev = run_eval(it)
                    stats.update(eval_reward=ev["mean_reward"], eval_pass_rate=ev["pass_rate"], eval_s=ev["eval_s"],
                                 sync_s=sync_s + ev["sync_s"])
                stats["iter_s"] = time.perf_counter() - t0  # sync + rollout + train + eval
                atomic.write_json(metrics_dir / f"train_iter_{it:03d}.json", {**stats, "server_stats": dict(backend.stats),
                                                                        "groups": samples})
                rows.log({k: stats.get(k) for k in FIELDS})
                # the tracker (best eval) is updated before it is saved, so a resumed run knows the best so far
                best = ev is not None and (tracker["best_eval"] is None or ev["mean_reward"] > tracker["best_eval"])
                if best:
                    tracker["best_eval"] = ev["mean_reward"]
                state = {ckpt.STEP: it, ckpt.RNG: runtime.rng_state(), ckpt.TRACKER: tracker}
                files = ckpt.serialize(policy, optimizer, state,
                                       {"iteration": it, "reward_mean": stats["reward_mean"],
                                        "eval_reward": stats.get("eval_reward"), "adapter": pushed["adapter"]},
                                       cfg.to_yaml(), extra_files={ckpt.TOKENIZER: tok_json})
                saver.save(ckpt_dir, ckpt.step_name(it, "iter"), files, keep_last=cfg.checkpoint.keep_last,
                           mirror_dir=cfg.checkpoint.mirror_dir,
                           best={"iteration": it, "eval_reward": ev["mean_reward"]} if best else None)
                log.info(f"iter {it}/{g.iterations}: reward {stats['reward_mean']:.3f} (zero-std groups "
                         f"{stats['zero_std_frac']:.2f}), loss {stats['loss']:.4f}, len {stats['len_mean']:.1f}, "
                         f"rollout {stats['rollout_s']:.2f}s train {stats['train_s']:.2f}s sync {sync_s:.2f}s")
                if STOP:
                    log.info(f"stopped by signal after iteration {it}; saved {saver.wait()}; continue with "
                             f"`{resume_hint(cfg)}`")
                    break
        except Abandoned as e:
            saver.wait()  # the iteration before is on disk before the line names it
            name = ckpt.latest_name(ckpt_dir)
            doing = f"iteration {it}" if it > start else "the evaluation before iteration 1"
            it -= it > start  # the last iteration done
            log.info(f"stopped by {e} while {doing} waited on {cfg.server.url}: its requests were abandoned and "
                     "nothing of it was saved; " + (f"the last checkpoint is {name}; continue with "
                                                    f"`{resume_hint(cfg)}`" if name else
                                                    "no iteration was saved yet: run the same command again"))
        except RolloutError as e:
            saver.close()  # the iteration before is on disk before the message names it
            name = ckpt.latest_name(ckpt_dir)
            raise RolloutError(f"{e}; last checkpoint: {name or 'none'} (continue with "
                               f"`{resume_hint(cfg)}`)") from None
        finally:
            saver.close()
            rows.close()
    return {"iteration": it, "evals": tracker["evals"], "weights_sha256": models.weights_sha256(policy)}
