"""Many processes through torchrun (torch.distributed): who this process is, the process group,
the few collectives the training loop needs, and `launch` for `trainer train --nproc N`.

torchrun gives every worker RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
TORCHELASTIC_RESTART_COUNT. Without them (a plain `trainer train`) this is one process of a
world of one, every collective is the identity and nothing here touches torch.distributed.
Rank 0 is the writer: it alone locks the run and writes checkpoints, metrics and logs.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import sys
import uuid

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
    # left to the interpreter's teardown, the group's threads can outlive it and abort the
    # process ("terminate called without an active exception"): a worker that had exited 2 with
    # rank 0's one line then reads to the launcher as a crash, and it restarts the group
    atexit.register(shutdown)
    return r


def device_for(device: torch.device) -> torch.device:
    """`cuda` means this local rank's GPU under torchrun."""
    if device.type == "cuda" and device.index is None and ranks().world > 1:
        return torch.device("cuda", ranks().local_rank)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_step(loss: torch.Tensor, stop: bool, grad_norm: torch.Tensor | None = None) -> StepNumbers:
    """One collective per step, queued, not waited for: the mean of every rank's loss (a float64
    scalar tensor), whether any rank was asked to stop, and the gradient norm (already the same
    on every rank), read together by `StepNumbers.read`. Every rank reads the same stop flag for
    the same step, so every rank stops at the same step, even when the signal reached them apart."""
    flag = torch.full((), float(stop), dtype=loss.dtype, device=loss.device)  # a fill: no copy from the host
    t = torch.stack([loss, flag])
    if active():
        dist.all_reduce(t)
    if grad_norm is not None:
        t = torch.cat([t, grad_norm.detach().reshape(1).to(t.dtype)])
    return StepNumbers(t, dist.get_world_size() if active() else 1, grad_norm is not None)


class StepNumbers:
    """A step's loss, stop flag and gradient norm on their way to the host. On a GPU the copy
    goes into page-locked memory behind the step's kernels and `read` waits for that copy
    alone, not for work queued after it: the GPU runs the next step while the host reads."""

    def __init__(self, t: torch.Tensor, world: int, has_norm: bool):
        self.world, self.has_norm, self.copied = world, has_norm, None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = t

    def read(self) -> tuple[float, bool, float | None]:
        """(mean loss, stop, grad norm or None): the step's one host sync."""
        if self.copied is not None:
            self.copied.synchronize()
        values = self.host.tolist()
        return values[0] / self.world, values[1] > 0, values[2] if self.has_norm else None


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
    """Leave the process group (its threads end here); registered at exit by `init`."""
    if active():
        dist.destroy_process_group()


def master_host() -> str | None:
    """The rendezvous / process-group host the offline guard must let through."""
    return os.environ.get("MASTER_ADDR") if ranks().world > 1 else None


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where and how `launch` starts the workers: torchrun's options, read by the train and
    resume commands (`--nproc --nnodes --rdzv_endpoint --rdzv_id --max_restarts`)."""

    nproc: int = 1  # workers on this host
    nnodes: int = 1  # hosts; every one runs the same command
    rdzv_endpoint: str = ""  # HOST:PORT on the first host; "" = this host alone, any free loopback port
    rdzv_id: str = ""  # the job's id, the same on every host ("" = the run name)
    max_restarts: int = 3  # group restarts after a worker dies (bad input is never retried)

    def __post_init__(self) -> None:
        problems = [f"--{name}={getattr(self, name)} must be at least {low}"
                    for name, low in (("nproc", 1), ("nnodes", 1), ("max_restarts", 0)) if getattr(self, name) < low]
        if self.nnodes > 1 and not self.rdzv_endpoint:
            problems.append(f"--nnodes={self.nnodes} needs --rdzv_endpoint=HOST:PORT (the first host, which every "
                            "host can reach)")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 - self.max_restarts:
                problems.append(f"--rdzv_endpoint={self.rdzv_endpoint!r} must be HOST:PORT with a port below "
                                f"{65536 - self.max_restarts}, e.g. node001:29500")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def wanted(self) -> bool:
        """Whether these options ask for the launcher (in a process that is not a worker already)."""
        return ranks().world == 1 and (self.nproc > 1 or self.nnodes > 1 or bool(self.rdzv_endpoint))

    def rendezvous(self, attempt: int, run_name: str) -> tuple[str, str]:
        """(endpoint, id) of one attempt. Every attempt meets on a new port with a new id, so a
        restarted group never reads the last attempt's addresses from a reused store (restarts
        inside one torchrun agent can hang in gloo's connect for that reason: pytorch#167288)."""
        if not self.rdzv_endpoint:  # one host: a fresh store on a free loopback port
            return "127.0.0.1:0", f"{run_name}-{uuid.uuid4().hex[:8]}"
        host, _, port = self.rdzv_endpoint.rpartition(":")
        return f"{host}:{int(port) + attempt}", f"{self.rdzv_id or run_name}-{attempt}"


# seconds the launcher gives its workers between its stop signal and SIGKILL: they finish the
# step and save (torchrun's own default, 30 s, can cut a large checkpoint's write short)
STOP_GRACE = 300


def launch(options: Launch, argv: list[str], run_name: str) -> int:
    """`trainer train --nproc N ...`: run `trainer <argv>` as N workers on this host (and on
    every host given --nnodes, each running the same command) through torchrun's launcher,
    elastic_launch with a c10d rendezvous. When a worker dies the group starts again on every
    host, up to `max_restarts` times, and resumes from `latest` (argv carries --resume=auto);
    each attempt is a fresh launch with its own rendezvous. -> the exit code: 0 when done; 0
    after SIGTERM/SIGINT once the workers have saved the same step and stopped; 2 for bad input
    (rank 0 has said why in one line; never retried); 1 when the restarts are spent."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trainer.signals import Stopped

    # its per-worker reports and "Received 15 death signal": the workers say what happened. Its
    # modules set their own levels, so each logger is quietened, not just the parent
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    host = options.rdzv_endpoint.rpartition(":")[0]
    loopback = not options.rdzv_endpoint or host in ("127.0.0.1", "localhost", "::1")
    if loopback:
        # one host: the workers meet on loopback, which is all a `network_mode: none` container has
        # (where the host's name resolves to nothing, so gloo must not look it up)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    what = "the launch failed"
    try:
        for attempt in range(options.max_restarts + 1):
            endpoint, run_id = options.rendezvous(attempt, run_name)
            config = LaunchConfig(min_nodes=options.nnodes, max_nodes=options.nnodes, nproc_per_node=options.nproc,
                                  run_id=run_id, rdzv_backend="c10d", rdzv_endpoint=endpoint,
                                  local_addr="127.0.0.1" if loopback else None, max_restarts=0,
                                  monitor_interval=0.2, start_method="spawn", logs_specs=DefaultLogsSpecs(),
                                  shutdown_timeout=STOP_GRACE)
            try:
                elastic_launch(config, sys.executable)("-m", "trainer", *argv)
                return 0
            except ChildFailedError as e:
                codes = {rank: f.exitcode for rank, f in e.failures.items()}
                if 2 in codes.values():  # bad input: rank 0 has said what and how to fix it
                    return 2
                what = ", ".join(f"rank {rank} {_how(code)}" for rank, code in sorted(codes.items()))
            except RendezvousError as e:  # a host that never came, a store that did not answer
                what = f"the rendezvous at {endpoint} failed ({type(e).__name__}: {_first_line(e)})"
            if attempt < options.max_restarts:
                log.warning(f"{what}: starting the workers again from the last checkpoint "
                            f"(restart {attempt + 1} of {options.max_restarts})")
    except (SignalException, Stopped):
        # the workers got the signal too (from the launcher, or from the scheduler at the same
        # instant), finished the same step, saved it and stopped; a stop is not a failure
        return 0
    print(f"error: {what}; {options.max_restarts} restart(s) spent. The last complete checkpoint is `latest`: "
          "fix the cause and run the same command again (it continues with --resume=auto)", file=sys.stderr,
          flush=True)
    return 1


def _first_line(error: BaseException) -> str:
    text = str(error) or repr(error)
    return text.splitlines()[0] if text.splitlines() else text


def _how(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"
