"""FSDP2 (`fully_shard`) wrapping, memory-lean loading from rank 0, and gathering the full model for outputs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import PretrainedConfig

from kubetune.train import distributed
from kubetune.train.model import layer_stack
from kubetune.train.precision import Precision
from kubetune.train.speedups import gloo_overlap

log = logging.getLogger("kubetune.trainer")


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def mixed_precision(precision: Precision) -> MixedPrecisionPolicy | None:
    """Half-precision compute on GPUs with fp32 gradient reduction; on CPU autocast alone does it (fp32 weights)."""
    if precision.device_type != "cuda" or precision.dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, precision: Precision, offload_optimizer: bool) -> nn.Module:
    """fully_shard each transformer block, then the root (embeddings, head, tied weights): in place."""
    options: dict[str, Any] = {}
    policy = mixed_precision(precision)
    if policy is not None:
        options["mp_policy"] = policy
    if offload_optimizer and precision.device_type == "cuda":
        # FSDP offloads the sharded parameters with it, so the optimizer step runs on the host copy.
        options["offload_policy"] = CPUOffloadPolicy()
    elif offload_optimizer and distributed.is_main():
        log.info("offloadOptimizer: the optimizer state is in host memory already (no GPU)")
    _, blocks = layer_stack(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    if precision.device_type == "cpu" and distributed.is_distributed():
        gloo_overlap.apply(model, blocks)
    return model


def wrap(model: nn.Module, full_state: dict[str, torch.Tensor] | None, strategy: str, device: torch.device,
         precision: Precision, offload_optimizer: bool, find_unused: bool = False) -> nn.Module:
    """The training module. Rank 0 holds the loaded weights (full_state); the other ranks' model is on meta
    until this call gives it its shard (fsdp) or its replica (ddp) from rank 0. find_unused: some trainable
    parameter may get no gradient in a step (see skipped_parameters; also detected here from the model)."""
    if not distributed.is_distributed():
        return model.to(device)  # one process: nothing to shard (fsdp checkpoints keep the sharded format)
    main = distributed.is_main()
    if strategy == "fsdp":
        # Rank 0 too shards an empty (meta) model and then receives its shards one tensor at a time: moving its
        # whole fp32 model onto the GPU first took 4 bytes per parameter (263 GiB for 70B) before any sharding.
        buffers = dict(model.named_buffers()) if main else {}  # non-persistent ones too: not in full_state
        if main and full_state is not None:
            model.to("meta")
            _tie(model)
        shard(model, precision, offload_optimizer)
        _materialize(model, device)  # allocates this rank's shards only
        state: dict[str, Any] = full_state if main and full_state is not None else {}
        set_model_state_dict(model, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        with torch.no_grad():
            for name, buffer in model.named_buffers() if buffers else ():
                buffer.copy_(buffers[name])
        _broadcast(list(model.buffers()))  # unsharded: every rank gets rank 0's
        return model
    lean = full_state is not None if main else _on_meta(model)  # not for QLoRA: every rank loaded its own copy
    if main or not lean:
        model.to(device)
    else:
        _materialize(model, device)  # DDP's construction broadcasts rank 0's parameters and buffers into it
    device_ids = [device.index] if device.type == "cuda" else None
    reason = skipped_parameters(model)
    if (find_unused or reason) and main:
        log.info("ddp looks for parameters without gradients every step: %s", reason or "partial.trainModules")
    # Gradients as views into DDP's all-reduce buckets: no second copy of them, no copy in and out per step
    # (202 M parameters, 2 CPU processes: peak RSS 4839 -> 4165 MiB per rank at the same samples/s).
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                   find_unused_parameters=find_unused or reason is not None)


def skipped_parameters(model: nn.Module) -> str | None:
    """Why some parameter of this model may get no gradient in a step, or None. DDP then has to look for such
    parameters every step (a graph walk), else it waits for their gradients and fails the next step."""
    config = getattr(model, "config", None)
    towers = sorted(k for k, v in vars(config or {}).items()
                    if k.endswith("_config") and k != "text_config" and isinstance(v, PretrainedConfig))
    if towers:  # e.g. Gemma 3's vision tower: text-only batches never run it
        return f"towers for other inputs ({', '.join(towers)}) get none from text"
    experts = [n for n, m in model.named_modules() if n.endswith("experts") and isinstance(m, nn.ModuleList)]
    if experts:  # one module per expert (transformers 5 mostly fuses them into one tensor, which always gets one)
        return "an expert no token was routed to gets none"
    return None


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Storage for a meta model's tensors."""
    model.to_empty(device=device)
    _tie(model)


def _tie(model: nn.Module) -> None:
    """Moving to or from meta replaces each module's parameter on its own, so tied weights (GPT-2's lm_head and
    wte) come out as two tensors unless tied again."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _broadcast(tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """No gradient reduction for this micro-batch (accumulation) under DDP. FSDP reduce-scatters every micro-batch
    (as torchtitan does): with sync off it would hold every parameter's unsharded fp32 gradient until the last
    one, 4 bytes per parameter of the whole model on each GPU (Llama-3-8B: +30 GiB)."""
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


def local_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes this rank holds for the tensors: its shard of a DTensor, all of a plain tensor."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Measured: what this rank holds of the weights and of the optimizer state (tied weights counted once)."""
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.ndim > 0]
    return {"parameterBytes": local_bytes(list(model.parameters())), "optimizerBytes": local_bytes(optimizer_tensors)}


def full_model(model: nn.Module, rebuild: Callable[[], nn.Module], trained_only: bool = False) -> nn.Module | None:
    """The whole model on rank 0's host (None elsewhere) for save_pretrained: every rank joins the gather, and
    rank 0 assigns the gathered tensors into an empty (meta) copy, so there is never a second full copy.
    trained_only gathers only what trains (an adapter to save): the frozen weights stay on meta."""
    if not is_sharded(model):
        return model if distributed.is_main() else None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    full = get_model_state_dict(model, options=options)
    if not distributed.is_main():
        return None
    plain = rebuild()
    plain.load_state_dict(full, assign=True, strict=False)  # tied weights may be listed once: tie_weights below
    buffers = dict(model.named_buffers())
    for name, _ in list(plain.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner) if owner else plain
        module._buffers[leaf] = buffers[name].detach().cpu()
    tie = getattr(plain, "tie_weights", None)
    if callable(tie):
        tie()
    empty = [n for n, p in plain.named_parameters() if p.is_meta and (p.requires_grad or not trained_only)]
    if empty:
        raise RuntimeError(f"gathered state dict misses parameters {empty[:3]}")
    return plain
