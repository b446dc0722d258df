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

The loop is `setup` (everything before iteration 1), then per iteration `iteration` (`push` of
version k-1 when a server samples, rollouts, the train epoch), `evaluate` when due and `save`,
with the loop's own numbers in a `GRPOState`. The evaluation before iteration 1 has no metrics
row; its reward and pass rate are the first points of TensorBoard's eval/ curves.

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
from trainer.grpo import envs, rewards
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
            "repeat": dict(chars=g.repeat_chars, length=g.repeat_length),
            envs.DATASET: dict(path=g.dataset, eval_path=g.eval_dataset, prompt_field=g.prompt_field,
                               answer_field=g.answer_field)}[g.env]


def load_tokenizer(cfg):
    """gpt2-type models bring tokenizer.json in their folder (or data.tokenizer_path); hf models
    use data.tokenizer (model: the folder's own); a from-scratch policy gets a character
    tokenizer over the env's prompts and answers."""
    if cfg.model.type == "gpt2":
        own = Path(cfg.model.path) / tk.TOKENIZER_FILE
        return tk.load(own) if own.is_file() else tk.load_gpt2(cfg.data.tokenizer_path)
    if cfg.model.type == "hf":
        return tk.build(cfg.data.tokenizer, None, cfg.data.vocab_size, cfg.data.tokenizer_path)
    g = cfg.grpo
    problems = envs.train_problems(g.env, 0, 64, **env_options(g)) + envs.eval_problems(g.env, 64, **env_options(g))
    texts = [p.prompt + str(p.answer.get("answer", "")) for p in problems]
    return tk.train_char(texts + ["0123456789-\n " + g.repeat_chars])


def load_scorer(cfg) -> rewards.Scorer:
    """grpo.reward with its weights (the env's own reward by default), each tried on a few held-out
    problems before anything is sampled, so a broken reward file is one line now, not an hour in."""
    g = cfg.grpo
    scorer = rewards.Scorer.load(g.reward, g.reward_weights, envs.DEFAULT_REWARD.get(g.env, ""))
    probe = envs.eval_problems(g.env, 4, **env_options(g))
    scorer.check([p.prompt for p in probe], rewards.columns_of([p.answer for p in probe]))
    return scorer


def fields(scorer: rewards.Scorer) -> tuple[str, ...]:
    """metrics.csv's columns: FIELDS with each reward's mean after reward_mean."""
    at = FIELDS.index("reward_mean") + 1
    return FIELDS[:at] + scorer.columns + FIELDS[at:]


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


def lr_at(it: int, g) -> float:
    """The learning rate of iteration `it` (from 1): grpo.lr, or with schedule=linear falling to
    lr/iterations at the last one. A function of the iteration alone, so a resume sets the same."""
    return g.lr if g.schedule == "constant" else g.lr * (g.iterations - it + 1) / g.iterations


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


def score_groups(scorer: rewards.Scorer, problems, groups) -> tuple[list[list[float]], dict]:
    """Every completion of every group scored in one call of the rewards (the prompt's text, the
    completion's, and the problem's answer fields as columns). -> each group's weighted totals,
    and each reward's mean over all of them, under its metrics column."""
    rows = [(p, c) for p, grp in zip(problems, groups) for c in grp]
    totals, parts = scorer([p.prompt for p, _ in rows], [c.text for _, c in rows],
                           rewards.columns_of([p.answer for p, _ in rows]))
    out, at = [], 0
    for grp in groups:
        out.append(totals[at: at + len(grp)])
        at += len(grp)
    return out, {k: sum(v) / len(v) for k, v in parts.items()}


def score_held_out(backend, cfg, params, scorer: rewards.Scorer, tok) -> dict:
    """Rewards and pass rate of `eval.replicates` samples of each held-out problem."""
    g, e = cfg.grpo, cfg.eval
    problems = envs.eval_problems(g.env, e.num_problems, **env_options(g))
    prompts = [tok.encode(p.prompt).ids for p in problems]
    groups = backend.generate(prompts, e.replicates, _seed(cfg.run.seed, 0, EVAL_SEED), params)
    kept = [(p, grp) for p, grp in zip(problems, groups) if grp is not None]  # not none: the backend raises then
    totals, parts = score_groups(scorer, [p for p, _ in kept], [grp for _, grp in kept])
    scores = [r for rs in totals for r in rs]
    per_problem = [{"id": p.id, "rewards": rs, "sample": grp[0].text} for (p, grp), rs in zip(kept, totals)]
    return {"mean_reward": sum(scores) / len(scores), "pass_rate": sum(map(envs.passed, scores)) / len(scores),
            "rewards": parts, "num_problems": len(per_problem), "replicates": e.replicates, "problems": per_problem}


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


def rollout_batch(backend, cfg, problems, params, scorer: rewards.Scorer, pad_id: int, tok, iteration: int):
    g = cfg.grpo
    prompt_ids = [tok.encode(p.prompt).ids for p in problems]  # once: the server gets these ids, training too
    groups = backend.generate(prompt_ids, g.group_size, _seed(cfg.run.seed, iteration), params)
    # not all None: the backend raises then, naming the server and the reason
    kept = [(p, ids, grp) for p, ids, grp in zip(problems, prompt_ids, groups) if grp is not None]
    skipped = len(problems) - len(kept)
    totals, parts = score_groups(scorer, [p for p, _, _ in kept], [grp for _, _, grp in kept])
    rewards = torch.tensor(totals)
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
             "skipped_groups": skipped, **parts}
    samples = [{"id": p.id, "prompt": p.prompt, "rewards": rewards[i].tolist(), "completions": [c.text for c in grp]}
               for i, (p, _, grp) in enumerate(kept)]
    batch = {"ids": ids, "attn": attn, "sampled": sampled, "mask": mask, "adv": adv.reshape(-1), "sampler": sampler}
    return batch, stats, samples


def check_lengths(cfg, tok, positions: int) -> None:
    """Prompt + max_tokens must fit the model's positions; checked on the held-out problems and
    a sample of training problems, so a too-small model.block_size fails before any work."""
    g = cfg.grpo
    opts = env_options(g)
    every = g.env == envs.DATASET  # a dataset's every prompt; a generator's held-out ones and a sample
    problems = envs.eval_problems(g.env, len(envs.splits(**opts)["eval"]) if every else cfg.eval.num_problems, **opts)
    problems += envs.train_problems(g.env, 0, len(envs.splits(**opts)["train"]) if every else 256, **opts)
    lengths = [len(ids) for ids in (e.ids for e in tok.encode_batch([p.prompt for p in problems]))]
    longest = max(lengths)
    where = problems[lengths.index(longest)]
    if longest + g.max_tokens > positions:
        need = longest + g.max_tokens + (0 if every else 16)  # some room: other ids give somewhat longer prompts
        source = f"grpo.env={g.env}" + (f" ({where.split} row {where.id} of {g.dataset})" if every else "")
        raise UserError(f"model.block_size={positions} is too small for {source}: prompts take up to "
                        f"{longest} tokens plus grpo.max_tokens={g.max_tokens}; set model.block_size >= {need}"
                        + (" (within the model's max_position_embeddings), or shorten that prompt" if every else ""))


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


@dataclasses.dataclass
class GRPOState:
    """The loop's own numbers besides weights, optimizer and RNG. `iteration` is the last one
    saved (checkpoint.STEP of its state.pt); best_eval and evals are saved under
    checkpoint.TRACKER by name, as every GRPO checkpoint has them, and read back by `resume`.
    The version last pushed to the server is not saved: a resumed run pushes its policy again."""

    iteration: int = 0
    best_eval: float | None = None
    evals: list = dataclasses.field(default_factory=list)  # [iteration, mean reward] of every evaluation
    pushed: int | None = None  # the version on the server, and what sync.push reported for it
    adapter: str | None = None
    sha256: str | None = None
    probe: float | None = None

    def saved(self) -> dict:
        return {"best_eval": self.best_eval, "evals": self.evals}

    @classmethod
    def resume(cls, iter_dir: Path, policy, optimizer, device, run_dir: Path) -> GRPOState:
        tracker = cls().saved()
        it = ckpt.resume_training(iter_dir, policy, optimizer, tracker, map_location=device, run_dir=run_dir)
        return cls(iteration=it, best_eval=tracker["best_eval"], evals=list(tracker["evals"]))


@dataclasses.dataclass(frozen=True)
class GRPORun:
    """What `setup` prepares once: the config as run, the policy and its reference, the optimizer,
    the sampler (with the openai backend, `sync` puts the policy on its server) and the writers."""

    cfg: configs.Config
    paths: RunPaths
    device: torch.device
    tok: object
    tok_json: bytes
    eos: int
    scorer: rewards.Scorer  # grpo.reward: (prompts, completions, columns) -> totals, each reward's values
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None: beta 0, or LoRA (the base with the adapter off is the reference)
    optimizer: torch.optim.Optimizer
    backend: LocalBackend | OpenAIBackend
    sync: ReloadSync | AdapterSync | None  # None: the local backend samples the policy itself
    params: SamplingParams
    rows: metrics.Metrics
    saver: ckpt.AsyncSaver


def setup(cfg, resume_dir: Path | None) -> tuple[GRPORun, GRPOState]:
    """Everything before iteration 1: the policy, the reference and the optimizer (resumed from
    `resume_dir`), the sampler (a server waited for) and the run's config and metrics on disk."""
    g = cfg.grpo
    paths = RunPaths.of(cfg)
    if resume_dir is None and ckpt.has_checkpoints(paths.checkpoints):
        raise UserError(f"run {cfg.run.name!r} already has checkpoints in {paths.checkpoints}; continue it with "
                        f"`{resume_hint(cfg)}` or pick a new run.name")
    metrics.setup_logging(paths.metrics / "train.log")
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
    scorer = load_scorer(cfg)
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
    state = GRPOState()
    if resume_dir is not None:
        state = GRPOState.resume(resume_dir, policy, optimizer, device, paths.checkpoints)
        log.info(f"resumed {cfg.run.name} from {resume_dir} at iteration {state.iteration}")

    sync = None
    if g.backend == "openai":
        # an id the server sends must index the policy's embedding rows, or the forward crashes
        backend = OpenAIBackend(cfg.server.url, "", tok, eos, cfg.server.timeout, cfg.server.retries,
                                concurrency=g.concurrency, request_prompts=g.request_prompts,
                                vocab_size=policy.get_input_embeddings().weight.shape[0],
                                rollout_timeout=g.rollout_timeout)
        backend.wait_ready()
        way = ReloadSync if g.sync == "reload" else AdapterSync
        probe = tok.encode(PROBE_TEXT).ids[:positions - 1]  # with the one token asked for, within the model's positions
        sync = way(backend, Path(g.sync_dir or paths.sync), probe, prefix=cfg.run.name,
                   server_dir=g.server_sync_dir, tolerance=g.sync_tolerance)
    else:
        backend = LocalBackend(policy, tok, eos, g.rollout_batch, g.request_prompts)
    atomic.write_bytes(paths.metrics / ckpt.CONFIG, cfg.to_yaml().encode())
    rows = metrics.Metrics(paths.metrics, fields=fields(scorer), resume_step=state.iteration, key="iteration")
    saver = ckpt.AsyncSaver()  # the write of iteration k overlaps the rollouts of k + 1
    run = GRPORun(cfg, paths, device, tok, tok.to_str().encode(), eos, scorer, policy, ref, optimizer, backend, sync,
                  SamplingParams(g.max_tokens, g.temperature, g.top_p, tuple(g.stop)), rows, saver)
    return run, state


def push(run: GRPORun, state: GRPOState, version: int) -> float:
    """Put the policy, as `version`, on the server unless it holds that version already.
    -> the seconds it took (0 with the local backend, which samples the policy itself)."""
    if run.sync is None or state.pushed == version:
        return 0.0
    with runtime.full_precision(run.device):  # the probe compares with the server's float32
        info = run.sync.push(run.policy, version)
    state.pushed, state.adapter, state.sha256, state.probe = (version, info["adapter"], info["adapter_sha256"],
                                                              info["sync_probe_diff"])
    log.info(f"synced version {version} to {run.cfg.server.url} in {info['sync_s']:.2f}s (probe mean |d logprob| "
             f"{info['sync_probe_diff']:.2e})")
    return info["sync_s"]


def iteration(run: GRPORun, state: GRPOState, it: int) -> tuple[dict, list]:
    """Iteration `it` up to its update: version it - 1 on the server, rollouts of the training
    problems, a train epoch. -> its stats (the row's columns but the eval's) and the groups sampled."""
    cfg, g = run.cfg, run.cfg.grpo
    sync_s = push(run, state, it - 1)
    t1 = time.perf_counter()
    problems = envs.train_problems(g.env, it - 1, g.prompts_per_iter, **env_options(g))
    batch, stats, samples = rollout_batch(run.backend, cfg, problems, run.params, run.scorer, run.eos, run.tok, it)
    t2 = time.perf_counter()
    lr = lr_at(it, g)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    stats.update(train_epoch(run.policy, run.ref, run.optimizer, batch, cfg, it, server=run.sync is not None))
    stats.update(iteration=it, lr=lr, rollout_s=t2 - t1, train_s=time.perf_counter() - t2, sync_s=sync_s,
                 adapter=state.adapter, adapter_sha256=state.sha256, sync_probe_diff=state.probe)
    return stats, samples


def eval_due(cfg, it: int) -> bool:
    return bool(cfg.eval.interval and it % cfg.eval.interval == 0) or it == cfg.grpo.iterations


def evaluate(run: GRPORun, state: GRPOState, it: int) -> dict:
    """The held-out evaluation of version `it` (pushed first): eval_iter_NNN.json, an entry
    in state.evals and a log line. -> its result, with its seconds (eval_s, sync_s among them)."""
    t0 = time.perf_counter()
    sync_s = push(run, state, it)
    result = score_held_out(run.backend, run.cfg, run.params, run.scorer, run.tok)
    result.update(iteration=it, adapter=state.adapter, eval_s=time.perf_counter() - t0, sync_s=sync_s)
    atomic.write_json(run.paths.metrics / f"eval_iter_{it:03d}.json", result)
    state.evals.append([it, result["mean_reward"]])
    log.info(f"eval iter {it}: mean reward {result['mean_reward']:.3f}, pass rate {result['pass_rate']:.3f}")
    if it == 0:  # no metrics row before an update, but the start of TensorBoard's eval curves
        run.rows.scalars(0, {"eval_reward": result["mean_reward"], "eval_pass_rate": result["pass_rate"]})
    return result


def save(run: GRPORun, state: GRPOState, stats: dict, samples: list, ev: dict | None) -> None:
    """Iteration stats["iteration"]'s records (train_iter_NNN.json, its metrics row) and its
    checkpoint: snapshot now, written in the background."""
    cfg, it = run.cfg, stats["iteration"]
    atomic.write_json(run.paths.metrics / f"train_iter_{it:03d}.json",
                      {**stats, "server_stats": dict(run.backend.stats), "groups": samples})
    run.rows.log({k: stats.get(k) for k in run.rows.fields})
    # best_eval is updated before it is saved, so a resumed run knows the best so far
    best = ev is not None and (state.best_eval is None or ev["mean_reward"] > state.best_eval)
    if best:
        state.best_eval = ev["mean_reward"]
    state.iteration = it
    files = run.saver.snapshot(run.policy, run.optimizer, ckpt.training_state(it, state.saved(), [runtime.rng_state()]),
                               {"iteration": it, "reward_mean": stats["reward_mean"],
                                "eval_reward": stats.get("eval_reward"), "adapter": state.adapter},
                               cfg.to_yaml(), extra_files={ckpt.TOKENIZER: run.tok_json})
    run.saver.save(run.paths.checkpoints, ckpt.step_name(it, "iter"), files, keep_last=cfg.checkpoint.keep_last,
                   mirror_dir=cfg.checkpoint.mirror_dir,
                   best={"iteration": it, "eval_reward": ev["mean_reward"]} if best else None)


def _grpo(cfg, resume_dir: Path | None) -> dict:
    run, state = setup(cfg, resume_dir)
    cfg, g = run.cfg, run.cfg.grpo
    # a stop abandons what waits on the server (rollouts, sync, eval: Abandoned) and finishes what does not
    what = ("abandoning the requests to the generation server, or finishing and saving an iteration in training"
            if run.sync is not None else "finishing this iteration and saving a checkpoint")
    it = state.iteration  # the iteration under way; 0: the evaluation before iteration 1
    with STOP.polling(what):
        try:
            if state.iteration == 0:
                evaluate(run, state, 0)
            for it in range(state.iteration + 1, g.iterations + 1):
                t0 = time.perf_counter()
                stats, samples = iteration(run, state, it)
                push_s, ev = stats["sync_s"], None
                if eval_due(cfg, it):
                    ev = evaluate(run, state, it)
                    stats.update(eval_reward=ev["mean_reward"], eval_pass_rate=ev["pass_rate"], eval_s=ev["eval_s"],
                                 sync_s=push_s + ev["sync_s"])
                stats["iter_s"] = time.perf_counter() - t0  # sync + rollout + train + eval
                save(run, state, stats, samples, ev)
                log.info(f"iter {it}/{g.iterations}: reward {stats['reward_mean']:.3f} (zero-std groups "
                         f"{stats['zero_std_frac']:.2f}), loss {stats['loss']:.4f}, len {stats['len_mean']:.1f}, "
                         f"rollout {stats['rollout_s']:.2f}s train {stats['train_s']:.2f}s sync {push_s:.2f}s")
                if STOP:
                    log.info(f"stopped by signal after iteration {it}; saved {run.saver.wait()}; continue with "
                             f"`{resume_hint(cfg)}`")
                    break
        except Abandoned as e:
            run.saver.wait()  # the iteration before is on disk before the line names it
            abandoned(run, e, f"iteration {it}" if it > state.iteration else "the evaluation before iteration 1")
        except RolloutError as e:
            run.saver.close()  # the iteration before is on disk before the message names it
            raise RolloutError(f"{e}; last checkpoint: {ckpt.latest_name(run.paths.checkpoints) or 'none'} "
                               f"(continue with `{resume_hint(cfg)}`)") from None
        finally:
            run.saver.close()
            run.rows.close()
    return finish(run, state)


def abandoned(run: GRPORun, stop: Abandoned, doing: str) -> None:
    """The line for a stop that abandoned the server's requests: nothing of `doing` was saved."""
    name = ckpt.latest_name(run.paths.checkpoints)
    log.info(f"stopped by {stop} while {doing} waited on {run.cfg.server.url}: its requests were abandoned and "
             "nothing of it was saved; " + (f"the last checkpoint is {name}; continue with "
                                            f"`{resume_hint(run.cfg)}`" if name else
                                            "no iteration was saved yet: run the same command again"))


def finish(run: GRPORun, state: GRPOState) -> dict:
    """-> what `grpo` returns: the last iteration saved, every evaluation, the weights' sha256."""
    return {"iteration": state.iteration, "evals": state.evals, "weights_sha256": models.weights_sha256(run.policy)}
