"""`trainer grpo` end to end on CPU, small: a run writes iter checkpoints, per-iteration
JSON and metrics rows (the sampler-vs-trainer logprob_mismatch among them); stopping after
2 iterations and resuming gives bit-identical weights and rows to an uninterrupted run;
bad settings and a dead server stop with one line (the dead server after keeping the last
checkpoint)."""

import json

import pytest

from trainer import checkpoint as ckpt
from trainer import config as configs
from trainer.errors import UserError
from trainer.commands import grpo_command, resume_command
from trainer.grpo.loop import CLOCKS, FIELDS, grpo
from trainer.grpo.rollout import RolloutError
from tests.grpo.conftest import RunningServer, free_port, save_hf_folder, tiny_model

SMALL = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
         "model.dropout": 0.0, "grpo.iterations": 4, "grpo.prompts_per_iter": 4, "grpo.group_size": 4,
         "grpo.max_tokens": 8, "grpo.lr": 0.003, "grpo.beta": 0.05, "grpo.ppo_epochs": 2,
         "grpo.minibatch_size": 8, "eval.interval": 2, "eval.num_problems": 4, "eval.replicates": 2,
         "checkpoint.keep_last": 0, "run.device": "cpu"}


def cfg_for(tmp_path, name, **extra):
    return configs.load(None, **{**SMALL, "run.out_dir": str(tmp_path), "run.name": name, **extra})


def rows(tmp_path, name):
    return (tmp_path / "metrics" / name / "metrics.csv").read_text().splitlines()


def strip_times(lines):
    """Drop the wall-clock columns, keep every number that training produces."""
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in CLOCKS]
    return [[line.split(",")[i] for i in keep] for line in lines]


def test_run_outputs_and_bit_exact_resume(tmp_path):
    full = grpo(cfg_for(tmp_path, "full"))
    run = tmp_path / "checkpoints" / "full"
    assert ckpt.latest_name(run) == "iter_000004"
    assert (run / "best.json").is_file()
    m = tmp_path / "metrics" / "full"
    for i in range(1, 5):
        train = json.loads((m / f"train_iter_{i:03d}.json").read_text())
        assert 0.0 <= train["reward_mean"] <= 1.0 and train["tokens"] > 0 and len(train["groups"]) == 4
    assert sorted(p.name for p in m.glob("eval_iter_*.json")) == ["eval_iter_000.json", "eval_iter_002.json",
                                                                  "eval_iter_004.json"]
    assert len(rows(tmp_path, "full")) == 5  # header + 4 iterations
    check_columns(m)
    assert all(v == v for _, v in full["evals"])  # no NaN

    grpo(cfg_for(tmp_path, "split", **{"grpo.iterations": 2}))
    resumed = grpo_command(resume="split", **{"run.out_dir": str(tmp_path), "grpo.iterations": 4})
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert strip_times(rows(tmp_path, "split")) == strip_times(rows(tmp_path, "full"))
    assert resumed["evals"] == full["evals"]

    # --resume auto (compose's command): a finished run is a no-op, an unknown name starts
    again = grpo_command(resume="auto", **{**SMALL, "run.name": "split", "run.out_dir": str(tmp_path)})
    assert again["iteration"] == 4 and again["weights_sha256"] == full["weights_sha256"]
    assert strip_times(rows(tmp_path, "split")) == strip_times(rows(tmp_path, "full"))
    new = grpo_command(resume="auto", **{**SMALL, "run.name": "new", "run.out_dir": str(tmp_path),
                                         "grpo.iterations": 1})
    assert new["iteration"] == 1 and ckpt.latest_name(tmp_path / "checkpoints" / "new") == "iter_000001"


def test_a_linear_schedule_falls_each_iteration_and_resumes_bit_exactly(tmp_path):
    """grpo.schedule=linear (TRL's default): iteration i of n trains at lr * (n - i + 1) / n. It
    depends on the iteration alone, so a run cut after iteration 2 (its checkpoints and rows
    copied, the later ones dropped) resumes to the uninterrupted run's weights."""
    import shutil

    full = grpo(cfg_for(tmp_path, "lin", **{"grpo.schedule": "linear"}))
    m = tmp_path / "metrics" / "lin"
    lrs = [json.loads((m / f"train_iter_{i:03d}.json").read_text())["lr"] for i in range(1, 5)]
    assert lrs == [pytest.approx(SMALL["grpo.lr"] * k / 4) for k in (4, 3, 2, 1)]
    cut = tmp_path / "cut"
    for kind in ("checkpoints", "metrics"):
        shutil.copytree(tmp_path / kind / "lin", cut / kind / "lin")
    for name in ("iter_000003", "iter_000004", "best"):
        shutil.rmtree(cut / "checkpoints" / "lin" / name)
    (cut / "checkpoints" / "lin" / "latest").write_text("iter_000002\n")
    resumed = grpo_command(resume="lin", **{"run.out_dir": str(cut)})
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert strip_times(rows(cut, "lin")) == strip_times(rows(tmp_path, "lin"))
    constant = grpo(cfg_for(tmp_path, "constant"))
    assert constant["weights_sha256"] != full["weights_sha256"]

    # best/ is named by no step: its trainer_state.json says which loop continues it
    best = tmp_path / "checkpoints" / "lin" / "best"
    for extra in ({}, {"extra_steps": 5}, {"nproc": 2, "extra_steps": 5}):
        with pytest.raises(UserError, match="is a GRPO iteration; continue that run with `trainer grpo --resume lin`"):
            resume_command(checkpoint=str(best), **extra)


def test_single_update_per_iteration(tmp_path):
    """ppo_epochs 1 and one minibatch: pi_old is the update's own forward (no extra pass); with
    truncated completions masked out and the KL on, every statistic is still finite."""
    grpo(cfg_for(tmp_path, "single", **{"grpo.ppo_epochs": 1, "grpo.minibatch_size": 64, "grpo.iterations": 2,
                                        "grpo.mask_truncated": True, "grpo.max_tokens": 3}))
    m = tmp_path / "metrics" / "single"
    check_columns(m)
    first = json.loads((m / "train_iter_001.json").read_text())
    assert first["truncated_ratio"] > 0 and first["clip_ratio"] == 0.0  # ratio exactly 1: nothing to clip


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="grpo.group_size=1"):
        cfg_for(tmp_path, "x", **{"grpo.group_size": 1})
    with pytest.raises(UserError, match="grpo.env='chess'"):
        cfg_for(tmp_path, "x", **{"grpo.env": "chess"})
    with pytest.raises(UserError, match="grpo.sync=lora .* needs model.lora=true"):
        cfg_for(tmp_path, "x", **{"grpo.backend": "openai", "grpo.sync": "lora"})


def test_server_rollouts_measure_the_mismatch_and_are_importance_weighted(tmp_path, model_dir, tok):
    """Against a server whose base weights are not the trainer's (a stand-in for an engine
    whose numerics differ: adapters over another base, with the sync check's tolerance opened),
    the logged mismatch is large and the truncated importance weights are on (spread around 1,
    none above the cap); against the trainer's own weights the mismatch is float rounding and
    the weights 1; grpo.is_cap=0 turns the weights off."""
    from trainer.serve import create_app

    other = tmp_path / "other-base"
    save_hf_folder(other, tiny_model(tok.get_vocab_size(), seed=7), tok)
    lora = {"model.type": "gpt2", "model.path": str(model_dir), "data.tokenizer": "gpt2", "model.lora": True,
            "model.lora_dropout": 0.0, "grpo.backend": "openai", "grpo.iterations": 1, "grpo.beta": 0.0,
            "eval.interval": 0, "server.retries": 1, "grpo.sync": "lora", "grpo.sync_tolerance": 100}
    seen = {}
    for name, base, extra in (("same", model_dir, {}), ("other", other, {}), ("off", other, {"grpo.is_cap": 0})):
        server = RunningServer(create_app(str(base), name="tiny"))
        try:
            grpo(cfg_for(tmp_path, name, **{**lora, "server.url": server.url, **extra}))
        finally:
            server.stop()
        seen[name] = json.loads((tmp_path / "metrics" / name / "train_iter_001.json").read_text())
    same, other, off = seen["same"], seen["other"], seen["off"]
    assert same["logprob_mismatch"] < 1e-4
    assert 1 - 1e-4 < same["is_weight_min"] <= same["is_weight_max"] < 1 + 1e-4
    assert other["logprob_mismatch"] > 0.1
    assert 0 < other["is_weight_min"] < 0.9 and 1.1 < other["is_weight_max"] <= 3.0  # none above the cap
    # the same rollouts; the server's shared forward batches may group the requests otherwise in
    # the two runs, which moves its logprobs by float rounding (~1e-8)
    assert "is_weight_mean" not in off and abs(off["logprob_mismatch"] - other["logprob_mismatch"]) < 1e-6
    assert off["loss"] != other["loss"]


def test_dead_server_stops_with_a_clear_line(tmp_path, model_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = cfg_for(tmp_path, "dead", **{"grpo.backend": "openai", "model.type": "gpt2", "model.path": str(model_dir),
                                       "model.lora": True, "data.tokenizer": "gpt2", "server.url": url,
                                       "server.retries": 1, "server.timeout": 2})
    with pytest.raises(RolloutError) as e:
        grpo(cfg)
    assert url in str(e.value) and "\n" not in str(e.value)


REQUIRED = ("reward_mean", "reward_std", "zero_std_frac", "kl", "clip_ratio", "entropy", "logprob_mismatch",
            "len_mean", "len_min", "len_max", "truncated_ratio", "tokens", "rollout_s", "train_s", "sync_s", "iter_s",
            "loss")


def check_columns(metrics_dir):
    """Every iteration row holds every required statistic as a finite number (beta > 0, so
    KL is measured), the eval columns on eval iterations, and the JSON agrees with the CSV."""
    import csv
    import math

    with open(metrics_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS[:2] + ("reward_repeat",) + FIELDS[2:]  # the env's own reward
        table = list(reader)
    for row in table:
        it = int(row["iteration"])
        assert row["reward_repeat"] == row["reward_mean"]  # one reward, weight 1: the total is that reward
        for key in REQUIRED:
            assert math.isfinite(float(row[key])), (it, key, row[key])
        assert 0 <= float(row["zero_std_frac"]) <= 1 and 0 <= float(row["truncated_ratio"]) <= 1
        assert 0 <= float(row["clip_ratio"]) <= 1 and float(row["kl"]) >= 0 and float(row["entropy"]) > 0
        assert float(row["len_min"]) <= float(row["len_mean"]) <= float(row["len_max"])
        assert float(row["iter_s"]) >= float(row["rollout_s"]) + float(row["train_s"])
        if it % SMALL["eval.interval"] == 0:
            assert 0 <= float(row["eval_reward"]) <= 1 and 0 <= float(row["eval_pass_rate"]) <= 1
        else:
            assert row["eval_reward"] == ""
        saved = json.loads((metrics_dir / f"train_iter_{it:03d}.json").read_text())
        assert saved["tokens"] == int(row["tokens"]) and saved["reward_mean"] == float(row["reward_mean"])
        # the local sampler and the trainer score the same weights: they differ by float rounding only
        assert saved["logprob_mismatch"] == float(row["logprob_mismatch"]) < 1e-4
