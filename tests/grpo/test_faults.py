"""Faults end in a clear error or a counted, logged skip, never a NaN:

- the server dies mid-run (a real `trainer serve` app that goes down when the second
  adapter is pushed): retries, then exit 2 with one line naming the URL and the kept
  checkpoint; that checkpoint verifies, and resuming against a new server finishes;
- a server that answers malformed JSON or fewer choices than n for some prompts: those
  groups are skipped and counted in metrics, the run trains on the rest;
- an unknown environment, a group size of 1, an unknown reward or prompts longer than the
  model's positions: one line, exit 2, before any work;
- all completions identical (greedy sampling): every group is counted as zero-std, the
  loss is exactly 0 and the weights do not move, with no NaN anywhere.
"""

import csv
import json
import math

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from trainer import checkpoint as ckpt
from trainer import cli
from trainer import config as configs
from trainer.grpo import envs
from trainer.commands import grpo_command
from trainer.grpo.loop import grpo
from tests.grpo.conftest import RunningServer

BASE = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "model.dropout": 0.0,
        "grpo.iterations": 3, "grpo.prompts_per_iter": 4, "grpo.group_size": 2, "grpo.max_tokens": 6,
        "grpo.lr": 0.003, "grpo.minibatch_size": 8, "eval.interval": 0, "eval.num_problems": 4,
        "eval.replicates": 2, "checkpoint.keep_last": 0, "run.device": "cpu"}


def lora(model_dir, url, **extra):
    return {**BASE, "model.type": "gpt2", "model.path": str(model_dir), "data.tokenizer": "gpt2",
            "model.lora": True, "model.lora_dropout": 0.0, "grpo.backend": "openai", "server.url": url,
            "server.retries": 2, "server.timeout": 5, **extra}


def grpo_exits(server, options: dict, capsys) -> tuple[int, str]:
    """`trainer grpo` with `options` against `server` (stopped afterwards), which must end the
    run with SystemExit: -> (exit code, stderr stripped)."""
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["grpo", *flags(options)])
    finally:
        server.stop()
    return e.value.code, capsys.readouterr().err.strip()


def flags(options: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in options.items()]


def metric_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class DiesOnSecondPush:
    """ASGI wrapper: the server goes down (stops listening) when asked to reload the weights
    the second time, i.e. right after the trainer saved iteration 1 and before iteration 2."""

    def __init__(self, app):
        self.app, self.server, self.pushes, self.dead = app, None, 0, False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/collective_rpc":
            self.pushes += 1
            if self.pushes == 2:
                self.dead = True
                self.server.should_exit = True
        if scope["type"] == "http" and self.dead:
            return await JSONResponse({"error": {"message": "shutting down"}}, 503)(scope, receive, send)
        return await self.app(scope, receive, send)


def test_server_dies_mid_run_then_resume(model_dir, tmp_path, capsys):
    from trainer.serve import create_app

    app = DiesOnSecondPush(create_app(str(model_dir), name="tiny"))
    server = RunningServer(app)
    app.server = server.server
    options = lora(model_dir, server.url, **{"run.out_dir": str(tmp_path), "run.name": "dies"})
    code, err = grpo_exits(server, options, capsys)
    assert code == 2 and "\n" not in err and err.startswith("error: "), err
    assert server.url.removesuffix("/v1") in err and "3 attempts" in err and "last checkpoint: iter_000001" in err
    assert "trainer grpo --resume dies" in err
    run = tmp_path / "checkpoints" / "dies"
    assert ckpt.latest_name(run) == "iter_000001" and ckpt.verify(run / "iter_000001") is None
    assert not (run / "iter_000002").exists()
    rows = metric_rows(tmp_path / "metrics" / "dies" / "metrics.csv")
    assert [r["iteration"] for r in rows] == ["1"]

    # a new server: the resumed run re-pushes iteration 1's policy and finishes
    fresh = RunningServer(create_app(str(model_dir), name="tiny"))
    try:
        result = grpo_command(resume="dies", **{"run.out_dir": str(tmp_path), "server.url": fresh.url})
    finally:
        fresh.stop()
    assert result["iteration"] == 3
    rows = metric_rows(tmp_path / "metrics" / "dies" / "metrics.csv")
    assert [r["iteration"] for r in rows] == ["1", "2", "3"]
    second = json.loads((tmp_path / "metrics" / "dies" / "train_iter_002.json").read_text())
    assert second["adapter"] == "dies-v0001"


def bad_server(model_dir):
    """The real engine, but prompts for 'a' get malformed JSON and prompts for 'b' one choice."""
    from trainer.serve import CompletionRequest, Engine, RPCRequest

    engine = Engine(str(model_dir), "tiny")
    app = FastAPI()
    app.get("/v1/models")(engine.models)

    @app.post("/collective_rpc")
    def reload(req: RPCRequest):
        engine.reload_weights(req.kwargs["weights_path"])
        return {"results": [None]}

    app.post("/reset_prefix_cache")(lambda: {"success": True})

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        # token ids: one prompt per request (request_prompts=1), or the sync check's probe
        first = engine.tokenizer.decode(req.prompt if isinstance(req.prompt[0], int) else req.prompt[0])
        if first.startswith("a"):
            return PlainTextResponse('{"choices": [')
        answer = engine.complete(req)
        if first.startswith("b"):
            answer["choices"] = answer["choices"][:1]
        return answer

    return app


def test_malformed_and_short_answers_are_counted_skips_in_a_run(model_dir, tmp_path):
    server = RunningServer(bad_server(model_dir))
    try:
        cfg = configs.load(None, **lora(model_dir, server.url, **{"run.out_dir": str(tmp_path), "run.name": "bad",
                                                                 "grpo.iterations": 2, "server.retries": 1}))
        grpo(cfg)
    finally:
        server.stop()
    m = tmp_path / "metrics" / "bad"
    rows = metric_rows(m / "metrics.csv")
    for it, row in zip((1, 2), rows):
        problems = envs.train_problems("repeat", it - 1, 4, chars="abcd", length=6)
        bad = sum(p.prompt[0] in "ab" for p in problems)
        assert int(row["skipped_groups"]) == bad
        assert all(math.isfinite(float(row[k])) for k in ("reward_mean", "reward_std", "loss", "zero_std_frac"))
    stats = json.loads((m / "train_iter_002.json").read_text())["server_stats"]
    # cumulative over the run: every malformed group was asked twice (server.retries=1)
    assert stats["malformed"] == 2 * (stats["skipped_groups"] - stats["short_groups"]) > 0
    assert stats["short_groups"] > 0
    final = json.loads((m / "eval_iter_002.json").read_text())
    held_out = envs.eval_problems("repeat", 4, chars="abcd", length=6)
    assert final["num_problems"] == sum(p.prompt[0] not in "ab" for p in held_out)
    assert "skipped" in (m / "train.log").read_text()  # logged, not silent


@pytest.mark.parametrize("option, needle", [({"grpo.env": "chess"}, "grpo.env='chess' must be one of"),
                                            ({"grpo.group_size": 1}, "grpo.group_size=1"),
                                            ({"grpo.reward": "nope"}, "grpo.reward='nope' is unknown"),
                                            ({"grpo.env": "sat"}, "model.block_size=32 is too small for grpo.env=sat")])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, option, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["grpo", *flags({**BASE, "run.out_dir": str(tmp_path), "run.name": "x", **option})])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "checkpoints" / "x").exists()


def test_identical_completions_count_as_zero_std_and_change_nothing(tmp_path):
    from trainer import model as models
    from trainer import tokenizer as tk
    from trainer.grpo.loop import load_tokenizer

    cfg = configs.load(None, **{**BASE, "grpo.temperature": 0.0, "grpo.beta": 0.05, "grpo.iterations": 2,
                                "run.out_dir": str(tmp_path), "run.name": "greedy"})
    result = grpo(cfg)
    rows = metric_rows(tmp_path / "metrics" / "greedy" / "metrics.csv")
    for row in rows:
        assert float(row["zero_std_frac"]) == 1.0  # every group, whatever its (shared) reward
        assert float(row["loss"]) == 0.0 and float(row["kl"]) == 0.0
        assert "nan" not in [v.lower() for v in row.values()]
    groups = json.loads((tmp_path / "metrics" / "greedy" / "train_iter_001.json").read_text())["groups"]
    assert all(len(set(g["completions"])) == 1 for g in groups)
    tok = load_tokenizer(cfg)
    initial, _ = models.build_model(cfg.model, tok.get_vocab_size(), tk.eot_id(tok), cfg.run.seed)
    assert result["weights_sha256"] == models.weights_sha256(initial)  # zero advantages: no update at all
