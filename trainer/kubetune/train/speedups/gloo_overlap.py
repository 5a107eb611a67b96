"""FSDP on CPU processes of one host (gloo): faster collectives and all-gathers that overlap compute.

Two things FSDP2 leaves on the table there, both measured (docs/benchmarks.md, issue 12):
- gloo's all_gather and reduce_scatter take 2-2.5x as long as its all_reduce over the same bytes on loopback
  (2 ranks, 50 MB: 0.14 and 0.15 s against 0.06 s). Both are written here as one all_reduce: the gathered
  buffer with the other ranks' rows zeroed (x + 0 is exact, so the gathered weights are bit-identical), and
  the gradient buffer summed, of which this rank keeps its row. Across hosts the network's bytes decide, and
  all_reduce moves twice as many: there torch's own collectives stay.
- Without CUDA streams FSDP2 runs each block's all-gather in line with the compute. Asking each block to
  prefetch the next one's (forward) and the previous one's (backward), with the all-gathers issued
  asynchronously, lets gloo's thread move the next block while this one computes, as DDP's bucketed
  all-reduce does; it holds one more gathered block.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

# The comm interfaces that FSDPModule.set_custom_all_gather/_reduce_scatter take live in a private module.
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter


class _PlainBuffers:
    """The comm interfaces ask their implementation for the buffers too: plain tensors, as torch's default."""

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class AllReduceAllGather(_PlainBuffers, AllGather):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        rows = output_tensor.view(group.size(), -1)
        mine = group.rank()
        if rows[mine].data_ptr() != input_tensor.data_ptr():  # FSDP copies the shard in place; if not, do it
            rows[mine].copy_(input_tensor)
        for rank, row in enumerate(rows):
            if rank != mine:
                row.zero_()
        return dist.all_reduce(output_tensor, group=group, async_op=async_op)


class AllReduceReduceScatter(_PlainBuffers, ReduceScatter):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: object, async_op: bool = False) -> dist.Work | None:
        if async_op:  # FSDP2 calls it synchronously; the copy below needs the sum done
            raise NotImplementedError("asynchronous reduce-scatter")
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])
        return None


def one_host() -> bool:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == dist.get_world_size()


def apply(model: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """For a model fully_shard-ed block by block and at the root, trained by gloo processes."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if one_host():
        for module in fsdp_modules:
            module.set_custom_all_gather(AllReduceAllGather())
            module.set_custom_reduce_scatter(AllReduceReduceScatter())
            module.set_force_sum_reduction_for_comms(True)  # gloo's all_reduce has no AVG: SUM, then divide
    sharded = [b for b in blocks if isinstance(b, FSDPModule)]
    for i, block in enumerate(sharded):
        if i + 1 < len(sharded):
            block.set_modules_to_forward_prefetch([sharded[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([sharded[i - 1]])
    if isinstance(model, FSDPModule):
        model._set_unshard_async_op(True)  # private; its docstring: pair it with explicit prefetching, as here
