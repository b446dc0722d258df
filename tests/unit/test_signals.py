"""The stop flag with real signals in a real process: a signal inside `STOP.polling` sets the
flag and the code goes on to save; the same signal again within REPEAT_WINDOW (a scheduler and a
launcher delivering one stop twice) changes nothing; a second signal after the window, or a
different one, exits at once with 128 + signal, as a person asking twice expects."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = """
import os, signal, sys, time
from trainer.signals import STOP
first, second, gap = getattr(signal, sys.argv[1]), getattr(signal, sys.argv[2]), float(sys.argv[3])
with STOP.polling("finishing this step and saving"):
    os.kill(os.getpid(), first)
    time.sleep(0.05)
    print("flag", STOP.name, flush=True)
    time.sleep(gap)
    os.kill(os.getpid(), second)
    time.sleep(0.2)
    print("saved", flush=True)
"""


def run(first: str, second: str, gap: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, first, second, str(gap)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_the_same_signal_twice_at_once_is_one_stop(name):
    p = run(name, name, 0.0)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["flag", name, "saved"]
    assert p.stderr.count("received") == 1 and "second" not in p.stderr, p.stderr


def test_the_same_signal_after_the_window_exits_at_once():
    from trainer.signals import REPEAT_WINDOW

    p = run("SIGTERM", "SIGTERM", REPEAT_WINDOW + 0.2)
    assert p.returncode == 128 + signal.SIGTERM, (p.stdout, p.stderr)
    assert "saved" not in p.stdout and "second SIGTERM: exiting now without saving" in p.stderr


def test_another_signal_at_once_exits_at_once():
    p = run("SIGTERM", "SIGINT", 0.0)
    assert p.returncode == 128 + signal.SIGINT, (p.stdout, p.stderr)
    assert "saved" not in p.stdout and "second SIGINT" in p.stderr
