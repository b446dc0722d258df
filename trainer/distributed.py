"""Many processes through torchrun (torch.distributed): who this process is, the process group,
the few collectives the training loop needs, and `launch` for `trainer train --nproc N`.

torchrun gives every worker RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
TORCHELASTIC_RESTART_COUNT. Without them (a plain `trainer train`) this is one process of a
world of one, every collective is the identity and nothing here touches torch.distributed.
Rank 0 is the writer: it alone locks the run and writes checkpoints, metrics and logs.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

from trainer.errors import UserError

log = logging.getLogger("trainer")

# how long a collective may wait for a peer: a rank stuck past this fails instead of hanging
TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def writer(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"${name}={value!r} is not a number; torchrun sets it, so start the workers with "
                        "torchrun (or `trainer train --nproc N`)") from None


def ranks() -> Ranks:
    """This process's place in the torchrun group, from the environment torchrun sets."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Ranks(rank, world, _env_int("LOCAL_RANK", rank % max(local_world, 1)), local_world)


def is_writer() -> bool:
    return ranks().writer


def restarted() -> bool:
    """Whether torchrun restarted this worker group after a failure (its --max-restarts)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0


def init(device: torch.device) -> Ranks:
    """Join the process group (gloo on CPU, NCCL on CUDA, one GPU per local rank); a no-op
    for a world of one. Call before anything blocks the network (offline.go_offline)."""
    r = ranks()
    if r.world == 1 or dist.is_initialized():
        return r
    if device.type == "cuda":
        torch.cuda.set_device(r.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return r


def device_for(device: torch.device) -> torch.device:
    """`cuda` means this local rank's GPU under torchrun."""
    if device.type == "cuda" and device.index is None and ranks().world > 1:
        return torch.device("cuda", ranks().local_rank)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_step(loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """One collective and one host sync per step: (the mean of every rank's loss, a float64
    scalar tensor; whether any rank was asked to stop). Every rank then stops at the same
    step, even when the signal reached them apart."""
    if not active():
        return loss.item(), stop
    t = torch.stack([loss, torch.tensor(float(stop), dtype=loss.dtype, device=loss.device)])
    dist.all_reduce(t)
    loss_mean, any_stop = t.tolist()
    return loss_mean / dist.get_world_size(), any_stop > 0


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None elsewhere. [obj] for a world of one."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_writer(fn):
    """fn() on rank 0, its result on every rank. A UserError there is raised on every rank, so
    the group stops together with rank 0's one line instead of peers failing on a dead socket."""
    if not active():
        return fn()
    box = None
    if is_writer():
        try:
            box = ("ok", fn())
        except UserError as e:
            box = ("error", str(e))
            broadcast(box)
            raise
    kind, value = broadcast(box)
    if kind == "error":
        raise UserError(value)
    return value


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def master_host() -> str | None:
    """The rendezvous / process-group host the offline guard must let through."""
    return os.environ.get("MASTER_ADDR") if ranks().world > 1 else None


def launch(nproc: int, argv: list[str], max_restarts: int = 3) -> int:
    """`trainer train --nproc N ...`: run `trainer <argv>` as N workers on this host through
    torchrun's own launcher (elastic_launch, a c10d rendezvous on localhost). When a worker dies
    the group is started again, up to `max_restarts` times, and resumes from `latest` (argv
    carries --resume=auto); bad input (exit 2) is not retried. -> the exit code: 0; 2 for bad
    input (rank 0 has said why in one line); 1 when the restarts are spent; 0 after
    SIGTERM/SIGINT, once the workers have saved the same step and stopped."""
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its per-worker reports
    # one host: the workers meet on loopback, which is all a `network_mode: none` container has
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in range(max_restarts + 1):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:12],
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
                              monitor_interval=0.2, start_method="spawn", logs_specs=DefaultLogsSpecs())
        try:
            elastic_launch(config, sys.executable)("-m", "trainer", *argv)
            return 0
        except SignalException:  # the workers got the signal too, saved at the same step and stopped
            return 0
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in e.failures.items()}
            if 2 in codes.values():  # bad input: rank 0 has said what and how to fix it
                return 2
            what = ", ".join(f"rank {rank} {_how(code)}" for rank, code in sorted(codes.items()))
            if attempt < max_restarts:
                log.warning(f"{what}: starting the {nproc} workers again from the last checkpoint "
                            f"(restart {attempt + 1} of {max_restarts})")
                continue
            print(f"error: {what}; {max_restarts} restart(s) spent. The last complete checkpoint is `latest`: fix "
                  "the cause and run the same command with --resume=auto to continue", file=sys.stderr, flush=True)
    return 1


def _how(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"
