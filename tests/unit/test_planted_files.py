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
