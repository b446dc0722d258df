"""A run's small files read by `trainer runs` and `resume` (summary.json, config.yaml, train.log)
may be anything but a regular file: a FIFO must not hang the reader, /dev/zero must not fill
memory. Each reader treats them as unreadable."""

from __future__ import annotations

import os
import signal

import pytest

from trainer import board, metrics
from trainer import config as configs
from trainer.runs import RunPaths
from trainer.train import run_complete


@pytest.fixture
def planted(tmp_path):
    cfg = configs.build(overrides={"run.name": "r", "run.out_dir": str(tmp_path)})
    paths = RunPaths.of(cfg)
    paths.metrics.mkdir(parents=True)
    paths.checkpoints.mkdir(parents=True)
    for name in ("summary.json", "train.log", "config.yaml"):
        os.mkfifo(paths.metrics / name)
    os.symlink("/dev/zero", paths.checkpoints / "config.yaml")
    signal.alarm(30)  # a reader that blocks fails the test instead of hanging the suite
    yield cfg, paths
    signal.alarm(0)


def test_fifos_and_devices_read_as_unreadable(planted):
    cfg, paths = planted
    assert run_complete(cfg, 1) is False
    assert board._summary_step(paths.metrics) is None
    assert board._config(paths) == {}
    assert metrics.failure(paths.metrics / "train.log") is None
    assert board._stopped_cleanly(paths.metrics / "train.log") is False


PLANTS = {"fifo": os.mkfifo, "directory": os.mkdir, "device": lambda p: os.symlink("/dev/zero", p),
          "dangling symlink": lambda p: os.symlink(p.parent / "gone" / "x", p)}


@pytest.mark.parametrize("kind", PLANTS)
@pytest.mark.parametrize("name", ["metrics.csv", "metrics.jsonl", "train.log", "eval.jsonl"])
def test_a_file_appended_to_that_is_not_a_file_is_one_line_naming_it(tmp_path, name, kind):
    """metrics.csv, metrics.jsonl, train.log and eval.jsonl are appended to: a FIFO there would
    hang the command, a folder or a device fail it halfway with a traceback. Each is refused
    before anything is written, naming the path, and what stands there is left as it was."""
    import torch

    from trainer import evaluate
    from trainer.errors import UserError

    folder = tmp_path / "metrics" / "r"
    folder.mkdir(parents=True)
    target = folder / name
    PLANTS[kind](target)
    signal.alarm(30)
    try:
        assert metrics.read_rows(target) == [] and evaluate.done(folder) == set()  # readers see no rows
        with pytest.raises(UserError, match=f"{target} is .*move it away"):
            if name == "train.log":
                metrics.setup_logging(target)
            elif name == "eval.jsonl":
                evaluate.evaluate_checkpoint(tmp_path / "checkpoints" / "r" / "step_000001", torch.device("cpu"),
                                             strict=True)
            else:
                metrics.Metrics(folder, resume_step=3)
    finally:
        signal.alarm(0)
        metrics.setup_logging()
    assert os.path.lexists(target) and not target.is_file() and [p.name for p in folder.iterdir()] == [name]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_export_whose_airlock_json_is_not_a_file_is_not_replaced(tmp_path, kind):
    """An export replaces only an earlier export of its run, told by its airlock.json: a FIFO
    there would hang the check, /dev/zero fill memory. Neither is an export."""
    from trainer.errors import UserError
    from trainer.model import EXPORT_INFO, check_export_target

    out = tmp_path / "final"
    out.mkdir()
    PLANTS[kind](out / EXPORT_INFO)
    signal.alarm(30)
    try:
        with pytest.raises(UserError, match="not an Airlock export"):
            check_export_target(out, "r", any_run=True)
    finally:
        signal.alarm(0)
