"""Memory-lean loading: only rank 0 reads the weights; the other ranks build the model on the meta device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kubetune.spec import FineTuneJobSpec
from kubetune.train import distributed
from kubetune.train.model import ParamCounts, build_model
from kubetune.train.precision import Precision


def load_model(spec: FineTuneJobSpec, model_dir: Path, pad_token_id: int | None, gradient_checkpointing: bool = False,
               frozen_dtype: torch.dtype | None = None, precision: Precision | None = None
               ) -> tuple[nn.Module, ParamCounts, dict[str, torch.Tensor] | None]:
    """(model, counts, rank 0's full state dict). On other ranks the model is empty (meta) and the state None:
    sharding.wrap fills it from rank 0, so a node never holds more than one loaded copy of the weights."""
    if not distributed.is_distributed() or spec.method.weights == "qlora":
        # QLoRA: bitsandbytes quantises while loading, so each rank loads its own (4-bit, small) copy.
        model, counts = build_model(spec, model_dir, pad_token_id, gradient_checkpointing, frozen_dtype=frozen_dtype,
                                    precision=precision)
        return model, counts, None
    new_modules: list[str] | None = None
    if distributed.is_main():
        model, counts = build_model(spec, model_dir, pad_token_id, gradient_checkpointing, frozen_dtype=frozen_dtype)
        new_modules = list(getattr(model, "kubetune_new_modules", []))
    new_modules = distributed.broadcast_object(new_modules, io=True)  # a fresh head's names decide what trains
    if not distributed.is_main():
        model, counts = build_model(spec, model_dir, pad_token_id, gradient_checkpointing, empty_like=new_modules,
                                   frozen_dtype=frozen_dtype)
    # Rank 0's initialisation drew random numbers the meta ranks did not: continue from its generator, as
    # every rank did when each loaded the model itself.
    torch.set_rng_state(distributed.broadcast_object(torch.get_rng_state()))
    full = model.state_dict() if distributed.is_main() else None  # views of the loaded tensors, not a copy
    return model, counts, full
