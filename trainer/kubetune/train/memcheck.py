"""At trainer start: the memory plan for this device, a job that cannot fit refused before training."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kubetune.contract import ENV_DEVICE_MEMORY
from kubetune.errors import UserError
from kubetune.memory import MemoryPlan, host_available_bytes, parse_quantity, plan, read_config
from kubetune.spec import FineTuneJobSpec
from kubetune.train import distributed


def device_bytes(device: torch.device) -> int:
    """$KUBETUNE_DEVICE_MEMORY, else the GPU's memory, else this process's share of the host's free memory."""
    configured = os.environ.get(ENV_DEVICE_MEMORY)
    if configured:
        parsed = parse_quantity(configured)
        if parsed is None:
            raise UserError(f"{ENV_DEVICE_MEMORY}: {configured!r} is not a quantity like 80Gi")
        return parsed
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the processes of this node share its memory
    return host_available_bytes() // max(local, 1)


def check_memory(spec: FineTuneJobSpec, model_dir: Path, device: torch.device, precision: str) -> MemoryPlan:
    """The plan for this device and the precision resolved for it (`auto` is bf16 or fp16 by now: LoRA's base
    counts 2 bytes, not 4, where it is held in bf16, which decides between ddp and fsdp)."""
    # The smallest device decides, on every rank alike: ranks must agree on checkpointing and on failing.
    smallest = min(distributed.gather_objects(device_bytes(device)))
    memory = plan(spec, world_size=distributed.world_size(), device_bytes=smallest, config=read_config(model_dir),
                  precision=precision, gpu=device.type == "cuda")
    if not memory.fits:
        raise UserError(memory.advice(spec))
    return memory
