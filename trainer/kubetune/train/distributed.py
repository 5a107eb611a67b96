"""torchrun process-group helpers: every function also works in a single plain process."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kubetune import contract
from kubetune.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def node_ranks() -> range:
    """The ranks on this node (torchrun numbers a node's processes consecutively)."""
    first = rank() - local_rank()
    return range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


_io_group: Any = None  # gloo, long timeout: for waiting on rank 0's I/O (see init)


def init() -> None:
    """Join the torchrun group: nccl on GPUs, gloo on CPU, with a timeout so a dead rank fails the run."""
    global _io_group
    if world_size() <= 1 or is_distributed():
        return
    seconds = _seconds(contract.ENV_COLLECTIVE_TIMEOUT, contract.DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)
    io_seconds = _seconds(contract.ENV_IO_TIMEOUT, contract.DEFAULT_IO_TIMEOUT_SECONDS)
    options: dict[str, Any] = {}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        # NCCL then binds each rank's communicator to its own GPU at once, not by guessing on the first collective
        # (a guess that can put two ranks on one GPU and hang, and that torch warns about).
        options["device_id"] = device()
    dist.init_process_group(backend=backend(), timeout=timedelta(seconds=seconds), **options)
    # The other ranks wait while rank 0 alone downloads and hashes the model, loads the weights, fetches a
    # checkpoint, saves and uploads one, merges and uploads the outputs: for a large model far past the training
    # collectives' timeout, after which they raised and torchrun killed rank 0 mid-upload on every retry. Those
    # waits use their own group; a rank that dies still ends them at once (its connections close).
    _io_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_seconds))


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"{name}: {value!r} is not a whole number of seconds (1 or more)")
    return int(value)


def backend() -> str:
    """nccl for GPU tensors, gloo for CPU ones: nccl alone has no backend for the CPU tensors of our flags,
    loss totals and object collectives ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _group(io: bool) -> Any:
    """io: some rank may still be in slow I/O (rank 0's downloads, loading, uploads): wait as long as it takes."""
    return _io_group if io else None


def barrier(io: bool = False) -> None:
    if is_distributed():
        dist.barrier(group=_group(io))


def broadcast_object(value: Any, io: bool = False) -> Any:
    """Rank 0's value on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group(io))
    return box[0]


def gather_objects(value: Any, io: bool = False) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value, group=_group(io))
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value: int) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool, io: bool = False) -> bool:
    """True when the flag is set on any rank (e.g. SIGTERM seen), so all ranks act together."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_group(io))
    return bool(tensor.item() > 0)


def shutdown() -> None:
    global _io_group
    if is_distributed():
        dist.destroy_process_group()
    _io_group = None
