"""A step's loss, stop flag and gradient norm reach the host through `distributed.reduce_step`:
the same numbers as reading them at once, and on a GPU without waiting for work queued after
them (the loop reads a step while the next one runs)."""

from __future__ import annotations

import pytest
import torch

from trainer import distributed


def _step_tensors(device: str):
    torch.manual_seed(0)
    w = torch.randn(64, 64, device=device, requires_grad=True)
    loss = (w @ w).square().mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
    return loss.detach().double(), norm


@pytest.mark.parametrize("stop", [False, True])
def test_numbers_are_those_read_at_once(stop):
    loss, norm = _step_tensors("cpu")
    got = distributed.reduce_step(loss, stop, norm).read()
    assert got == (loss.item(), stop, norm.double().item())
    assert distributed.reduce_step(loss, stop).read() == (loss.item(), stop, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_reading_a_step_does_not_wait_for_the_next():
    loss, norm = _step_tensors("cuda")
    numbers = distributed.reduce_step(loss, True, norm)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(400):  # the next step: tens of milliseconds of matmuls queued behind the copy
        a = torch.tanh(a @ a)
    next_step_done = torch.cuda.Event()
    next_step_done.record()
    got = numbers.read()
    assert not next_step_done.query(), "read() waited for the work queued after the step"
    torch.cuda.synchronize()
    assert got == (loss.item(), True, norm.double().item())
