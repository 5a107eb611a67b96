"""Model FLOPs utilisation: the FLOPs a training step must do, against a matmul peak measured on this machine.

Model FLOPs of the trained tokens (padding and masked-out attention are waste, not counted):

    matmul weights   6 x trainable x tokens + 4 x frozen x tokens (a causal LM's output layer: target tokens)
    attention        12 x layers x width x sum over examples of length^2

A weight that trains costs 2 FLOPs per token forward, 2 for the input gradient and 2 for its own gradient; a
frozen one (LoRA's base weights) skips the last 2, so LoRA counts 4 x frozen + 6 x trainable. (Frozen layers
below the first trainable one need no input gradient either; we count them at 4 anyway, an upper bound of the
work.) Embedding lookups are no matmuls and do not count; a tied LM head counts as the Linear it runs as.
Attention's two matmuls (QK^T, AV) cost 4 x length^2 x width per layer forward and twice that backward (PaLM's
appendix B convention, full square even for causal models).
"""

from __future__ import annotations

import itertools
import time
from typing import Any


def matmul_weights(model: Any) -> tuple[int, int]:
    """(trainable, frozen) weight elements of the model's matmuls: nn.Linear and GPT-2's Conv1D."""
    from torch import nn

    trainable = frozen = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            weight = module.weight
            # From the shape, not weight.numel(): bitsandbytes' 4-bit Linear packs two weights per stored byte.
            count = module.in_features * module.out_features if isinstance(module, nn.Linear) else weight.numel()
            if weight.requires_grad:
                trainable += count
            else:
                frozen += count
    return trainable, frozen


def attention_shape(model: Any) -> tuple[int, int]:
    """(layers, attention width) from the model's config."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    return int(layers), int(width)


def example_lengths(row: dict[str, Any]) -> list[int]:
    """Lengths of the examples in a training row: one, or several in a packed row (where positions restart)."""
    if "position_ids" not in row:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [end - start for start, end in itertools.pairwise(starts)]


def causal_targets(recipe: Any, batches: list[list[int]]) -> int | None:
    """Target tokens (position t predicts labels[t + 1]) of a causal LM's training rows in `batches`, for
    step_flops; None for classification."""
    if recipe.spec.model.task != "causal-lm":
        return None
    return sum(label != -100 for batch in batches for i in batch for label in recipe.train_set[i]["labels"][1:])


def step_flops(model: Any, example_lengths: list[int], targets: int | None = None) -> float:
    """Model FLOPs of forward + backward over examples of these lengths (see the module docstring). For a
    causal LM, `targets` (its target tokens) are the only positions whose logits the trainer computes
    (train/speedups/target_logits.py), so its output layer counts there and not at every token."""
    trainable, frozen = matmul_weights(model)
    layers, width = attention_shape(model)
    tokens = sum(example_lengths)
    flops = (6 * trainable + 4 * frozen) * tokens + 12 * layers * width * sum(n * n for n in example_lengths)
    head = model.get_output_embeddings() if targets is not None else None
    if head is not None:
        flops -= (6 if head.weight.requires_grad else 4) * head.weight.numel() * (tokens - targets)
    return flops


def matmul_peak(dtype_name: str, size: int = 1024, seconds: float = 3.0) -> float:
    """FLOP/s of the best of repeated square matmuls in this dtype (fp32 or bf16) with the current threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernel choice
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best
