"""run.dtype on a CPU: auto is float32, bf16 autocasts the matmuls, and `train` says at start
what the CPU makes of it: a warning where bf16 would be emulated, a hint where it is native and
auto left it off (docs/config.md, Precision on a CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer import runtime

CPU = torch.device("cpu")


def test_auto_is_float32_on_a_cpu_and_bf16_autocasts_its_matmuls():
    assert runtime.compute_dtype(CPU, "auto") == torch.float32
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with runtime.autocast(CPU, "auto"):
        assert (a @ b).dtype == torch.float32
    with runtime.autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_the_start_says_what_this_cpu_makes_of_bf16(native, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "native_bf16", lambda: native)  # the CPU's feature, not a result
    said = {}
    for dtype in ("auto", "fp32", "bf16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer"):
            runtime.check_dtype(CPU, dtype)
        said[dtype] = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said["fp32"] == []
    if native:
        assert said["bf16"] == []
        assert [level for level, _ in said["auto"]] == [logging.INFO] and "run.dtype=bf16" in said["auto"][0][1]
    else:
        assert said["auto"] == []
        assert [level for level, _ in said["bf16"]] == [logging.WARNING] and "emulates" in said["bf16"][0][1]
