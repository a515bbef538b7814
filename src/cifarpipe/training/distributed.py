"""Several training processes (DistributedDataParallel under `torchrun`): who is who, and the few
collective calls the epoch loop needs.

torchrun starts `nproc_per_node` copies of the train stage on each node and tells each one its
place in environment variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).
Each process trains on its share of every batch (see loader.DeviceBatches), DDP averages the
gradients over all processes during backward, and the loop adds up the metric sums with
`Group.sum`. Rank 0 alone reads and writes checkpoints, files and MLflow; the others get the
resume state from it with `Group.broadcast`.

Outside torchrun (no WORLD_SIZE in the environment) every call here is a no-op on one process:
the single-process path runs no collective call and no DDP wrapper.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from cifarpipe.config import TrainParams, UserError

# How long a collective call waits for the other processes. A rank that died makes the others
# fail after this instead of hanging for torch's default 30 min (10 min: far above any epoch's
# slowest step, but a dead job is noticed the same morning).
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its node: its GPU
    local_world_size: int = 1  # processes on this node (torchrun's --nproc_per_node)
    active: bool = False  # a process group exists (started by torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reads and writes checkpoints, files and MLflow."""
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Each value added up over all processes (float64: exact for counts up to 2**53)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is True on any: all ranks stop at the same step."""
        return self.max(int(flag), device) > 0

    def max(self, value: int, device: torch.device) -> int:
        """The largest of the processes' values (e.g. the exit status a stop ends with)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every process. DDP copies them at the
        start of each training forward, so after the epoch's last step every process holds its
        own shard's update; validation must use the one model rank 0 saves."""
        if self.active:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (pickled; e.g. the checkpoint to resume from)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the loop trains: DDP (gradients all-reduced during backward) when distributed.
        DDP copies rank 0's parameters and buffers to every process when it is built."""
        if not self.active:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def start(device_type: str) -> Group:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); outside torchrun, Group()."""
    if not under_torchrun():
        return Group()
    env = os.environ
    group = Group(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                  local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), active=True)
    _die_with_parent()
    if device_type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            raise UserError(f"process {group.local_rank} of this node has no GPU: {torch.cuda.device_count()} "
                            f"visible, {group.local_world_size} processes (lower train.nproc_per_node)")
        torch.cuda.set_device(group.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=_COLLECTIVE_TIMEOUT)
    return group


_LAUNCHER_PID = "CIFARPIPE_TORCHRUN_PID"  # set by launch(): the pid of the process that runs torchrun


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when torchrun dies.

    torchrun starts each worker in a session of its own, so a `kill -9` of torchrun (or of the
    `dvc repro` above it) would leave the workers training on as orphans, still writing checkpoints,
    beside the next `dvc repro`'s job. With this they go down together, like one process.

    If torchrun died before prctl took effect, this worker has been re-parented already: its parent
    is no longer torchrun's pid (the one launch() exported, else the parent before the call). A
    parent that *is* PID 1 proves nothing: torchrun, or the stage running it, is PID 1 in a container
    whose entrypoint it is (or under `unshare -fp`).
    """
    if not sys.platform.startswith("linux"):
        return
    launcher = os.environ.get(_LAUNCHER_PID)
    parent = int(launcher) if launcher and launcher.isdigit() else os.getppid()
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # torchrun died before the call above took effect
        print(f"error: torchrun (pid {parent}) is gone; this worker stops (exit 137)", file=sys.stderr, flush=True)
        os._exit(137)


def launch_args(nproc_per_node: int, script: str, argv: list[str]) -> list[str]:
    """torchrun's arguments for one node, as torch documents them: `--standalone --nproc_per_node N script argv...`."""
    return ["--standalone", f"--nproc_per_node={nproc_per_node}", script, *argv]


def launch(nproc_per_node: int, script: str, argv: list[str], device_type: str) -> int:
    """Run `script argv` in `nproc_per_node` processes under torchrun (torch.distributed.run, in this
    process: it is the workers' parent, forwards SIGINT/SIGTERM to them and waits). Returns the exit
    status a single process would have given: 0, the first failed worker's status (2 for a
    UserError, 128 + N for signal N: 130 after Ctrl-C, 143 after SIGTERM), or 128 + the signal that
    stopped torchrun itself."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 thread per process; the CPU's cores shared out instead, so that
        # N processes use the machine as one process does.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    # torchrun runs in this process: the workers' parent, which _die_with_parent compares with.
    os.environ[_LAUNCHER_PID] = str(os.getpid())
    # torchrun's own log: its warnings (each closing signal it sends) out, its errors kept.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        torchrun.run(torchrun.parse_args(launch_args(nproc_per_node, script, argv)))
    except ChildFailedError as e:
        # Rank 0's status when it failed: it has the error the user must see (the others then
        # fail only because it left), else the first failure's.
        failure = e.failures.get(0) or e.get_first_failure()[1]
        code = failure.exitcode
        return 128 - code if code < 0 else code
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def check_world(p: TrainParams, world_size: int, device: torch.device) -> None:
    """What several processes need, checked before any of them starts."""
    if p.batch_size % world_size:
        raise UserError(f"params.yaml: train.batch_size = {p.batch_size} does not split evenly over {world_size} "
                        f"processes (train.nproc_per_node x nodes): it is the batch of all of them together")
    if p.loader != "device":
        raise UserError(f"params.yaml: train.loader = {p.loader!r}: several processes need loader: device")
    if not p.drop_last:
        raise UserError("params.yaml: train.drop_last = false: several processes need drop_last: true "
                        "(an incomplete last batch would give some processes no images)")
    if device.type == "cuda" and p.nproc_per_node > torch.cuda.device_count():
        raise UserError(f"params.yaml: train.nproc_per_node = {p.nproc_per_node}, but this machine has "
                        f"{torch.cuda.device_count()} GPU(s): one process per GPU")
    if device.type == "mps":
        raise UserError("params.yaml: train.nproc_per_node > 1 needs CUDA (NCCL) or the CPU (gloo), not MPS")


def run_in_group(p: TrainParams, device: torch.device, body: Callable[[torch.device, Group], int]) -> int:
    """Run `body(device, group)` as this process's part of the training: in the process group when
    torchrun started this process (checked against train.nproc_per_node; the process's own GPU),
    else as the one process. Returns the exit status one process would give.

    Under torchrun a failing process reports and exits at once (os._exit): the other processes see
    its connections close and stop too, and torchrun must find it already gone with its own status
    (2 for a UserError), not still shutting down, when it then stops the rest with SIGTERM. A
    process that failed only because another one did says why it stopped, not a second traceback.
    """
    group = start(device.type)
    try:
        if group.active:
            if group.local_world_size != p.nproc_per_node:
                raise UserError(f"torchrun started {group.local_world_size} processes per node but params.yaml has "
                                f"train.nproc_per_node = {p.nproc_per_node}: set it to {group.local_world_size} "
                                "so the run records what ran")
            check_world(p, group.world_size, device)
            if device.type == "cuda":
                device = torch.device("cuda", group.local_rank)
        return body(device, group)
    except Exception as e:
        if not group.active:
            raise
        if group.is_main or isinstance(e, UserError):
            if isinstance(e, UserError):
                print(f"error: {e}", file=sys.stderr)
            else:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2 if isinstance(e, UserError) else 1)
        print(f"rank {group.rank}: stopped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
              file=sys.stderr)
        return 1
    finally:
        group.close()
