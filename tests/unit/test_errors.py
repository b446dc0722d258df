"""errors.out_of_memory: a GPU's or the host's allocation failure as one line with the figures
and the fix for the command that ran out. The CUDA text is torch's own (CUDACachingAllocator's
format since torch 2.1); the host failure is a real one, from torch's CPU allocator."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import out_of_memory

CUDA_OOM = ("CUDA out of memory. Tried to allocate 1.53 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
            "0 bytes is free. Process 4242 has 55.90 GiB memory in use. Including non-PyTorch memory, this process "
            "has 83.20 GiB memory in use. Of the allocated memory 80.11 GiB is allocated by PyTorch, and 1.90 GiB is "
            "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
            "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def test_gpu_out_of_memory_in_grpo_names_the_figures_and_the_servers_share():
    line = out_of_memory(torch.OutOfMemoryError(CUDA_OOM), "grpo")
    assert line.startswith("`trainer grpo` ran out of GPU memory (tried to allocate 1.53 GiB; 0 bytes free of "
                           "139.81 GiB; this process held 83.20 GiB; the rest is other processes')")
    assert "grpo.minibatch_size" in line and "--gpu-memory-utilization" in line
    assert "\n" not in line and "PYTORCH_CUDA_ALLOC_CONF" not in line


def test_host_out_of_memory_in_train_says_what_to_lower():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**42, dtype=torch.uint8)  # 4 TiB
    line = out_of_memory(caught.value, "resume")
    assert line.startswith("`trainer resume` ran out of host memory (tried to allocate 4096.00 GiB at once)")
    assert "train.batch_size" in line and "train.grad_accum" in line


@pytest.mark.parametrize("error", [RuntimeError("Expected all tensors to be on the same device"),
                                   ValueError("out of memory"), KeyError("x")])
def test_other_errors_are_not_memory_errors(error):
    assert out_of_memory(error, "train") is None
