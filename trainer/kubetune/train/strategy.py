"""Which data-parallel strategy a run uses: replicate the model (ddp) or shard it (fsdp)."""

from __future__ import annotations

import importlib
from typing import Literal

from kubetune.spec import FineTuneJobSpec

Strategy = Literal["ddp", "fsdp"]


def resolve_strategy(spec: FineTuneJobSpec, world_size: int, device_bytes: int | None) -> Strategy:
    """Explicit values as given; `auto` asks the memory estimate (kubetune.memory) whether replication fits."""
    chosen = spec.hyperparameters.strategy
    if chosen != "auto":
        return chosen
    try:
        memory = importlib.import_module("kubetune.memory")
    except ImportError:
        return "ddp"  # the memory estimate lands on another branch: the lead wires `auto` to it on merge
    strategy: Strategy = memory.plan(spec, world_size=world_size, device_bytes=device_bytes).strategy
    return strategy
