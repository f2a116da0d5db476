"""Processes: start-up, the one device rule, and every collective pptrain makes.

Collectives go through `reduce`, `gather_objects` and `barrier` only (tests check that no other
module calls torch.distributed's collectives). `reduce` hands torch.distributed a tensor on the
rank's device and returns one on the caller's device: NCCL has no CPU backend, so a CPU tensor
given to it fails with "No backend type associated with device type cpu", while the reference
table and the metrics live on the CPU.

One process on the CPU needs no launcher: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT get single-process defaults and the gloo backend is used.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ppo_train.errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo(0, 1, 0, torch.device("cpu"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for(setting: str, local_rank: int = 0) -> torch.device:
    """`trainer.device`: auto = this rank's GPU when CUDA is visible, else the CPU."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["trainer.device=cuda: no CUDA device is visible to this process; "
                           "use trainer.device=cpu (or auto)"])
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def use_accelerator(device: torch.device) -> None:
    """Make DeepSpeed's accelerator the one of `device`, before DeepSpeed picks its own.

    DeepSpeed chooses its accelerator once per process (DS_ACCELERATOR, else CUDA when a GPU is
    visible) and puts every engine's module on it: under trainer.device=cpu on a machine with a
    GPU it would move the model to cuda:N while the batches stay on the CPU. The environment
    variable covers a DeepSpeed that is not imported yet; an imported one that already chose
    another accelerator is told through its own deepspeed.accelerator.set_accelerator."""
    name = "cuda" if device.type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    current = getattr(real, "ds_accelerator", None)
    if current is None or current.device_name() == name:
        return
    if name == "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    real.set_accelerator(Accelerator())


def init_distributed(device_setting: str) -> DistInfo:
    """Join (or start) the process group: NCCL on GPUs, gloo on the CPU."""
    if "WORLD_SIZE" not in os.environ:  # one process, no launcher: a free local port
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(device_setting, local_rank)
    use_accelerator(device)
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def reduce(values: torch.Tensor, dist: DistInfo, op: str = "sum") -> torch.Tensor:
    """Element-wise sum, max or min of `values` over all ranks; same device and dtype as given."""
    if dist.world_size == 1:
        return values
    on_device = values.detach().to(dist.device, copy=True)
    torch.distributed.all_reduce(on_device, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
    return on_device.to(values.device)


def reduce_number(value: float, dist: DistInfo, op: str = "sum") -> float:
    if dist.world_size == 1:
        return value
    return float(reduce(torch.tensor([float(value)], dtype=torch.float64), dist, op).item())


def any_rank(flag: bool, dist: DistInfo) -> bool:
    return reduce_number(1.0 if flag else 0.0, dist, "max") > 0


def any_ranks(flags: list[bool], dist: DistInfo) -> list[bool]:
    """For each flag: whether it is set on any rank (one collective for all of them)."""
    if dist.world_size == 1:
        return [bool(f) for f in flags]
    values = reduce(torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64), dist, "max")
    return [v > 0 for v in values.tolist()]


def all_ranks(flag: bool, dist: DistInfo) -> bool:
    return reduce_number(1.0 if flag else 0.0, dist, "min") > 0


def gather_objects(value: Any, dist: DistInfo) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if dist.world_size == 1:
        return [value]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()



@contextlib.contextmanager
def local_main_first(dist: DistInfo):
    """The first process of each machine (local rank 0) runs the block first; the others wait
    at a barrier and then run it (reading what it made). The local main reaches the barrier
    even when its block fails, so the others are never left waiting: they run the block
    themselves and meet the same error."""
    if dist.local_rank != 0:
        barrier(dist)
    try:
        yield
    finally:
        if dist.local_rank == 0:
            barrier(dist)
