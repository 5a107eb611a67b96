"""Dropout on CPU without torch's per-element Bernoulli draws.

Why: on CPU, `bernoulli_` draws one Mersenne-Twister number per element on one thread. Fine-tuning MiniLM
with LoRA spent 18% of each step there (torch.profiler, 2-core EPYC; 32 dropout calls per step: hidden,
LoRA and attention-probability dropout). Here one 64-bit draw gives the keep/drop decision of four
elements (16 random bits each, p rounded to 1/65536), from the same default generator, so seeds,
checkpointed RNG state and gradient-checkpoint recomputation behave as before. The masks differ from
torch's (another stream of the same distribution), so runs are not bit-identical with the native path;
`bench/trainer_throughput.py` checks that accuracy stays within noise.

`enabled()` swaps `torch.nn.functional.dropout` and, for attention dropout on CPU, the math path of
`scaled_dot_product_attention` (the path torch itself takes on CPU when dropout_p > 0) for the duration
of a training step. Anything else (CUDA tensors, eval mode, p of 0 or 1, in-place dropout) goes to torch
unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

_TORCH_DROPOUT = F.dropout
_TORCH_SDPA = F.scaled_dot_product_attention
_LEVELS = 1 << 16  # each decision reads 16 random bits


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`: True with probability 1 - p (p rounded to a multiple of 1/65536)."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    threshold = -(_LEVELS // 2) + round(p * _LEVELS)  # int16 values below it are dropped
    return (words.view(torch.int16)[:count] >= threshold).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(mask)  # 1 byte per element, as torch's native dropout keeps
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(mask, x * ctx.scale, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad * ctx.scale, 0.0), None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if training and 0.0 < p < 1.0 and not inplace and input.device.type == "cpu":  # in place: torch's own
        return _Dropout.apply(input, p)
    return _TORCH_DROPOUT(input, p, training, inplace)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    if dropout_p == 0.0 or query.device.type != "cpu":
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = (query @ key.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(query.size(-1)))
    # The dtype's lowest value, not -inf: a row with every key masked (a padding query) stays finite.
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, lowest) if attn_mask.dtype == torch.bool else scores + attn_mask
    return dropout(torch.softmax(scores, dim=-1), dropout_p) @ value


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Within: dropout of CPU tensors draws its masks as above. Wrap forward *and* backward: gradient
    checkpointing recomputes the forward during backward and must draw the same masks again."""
    F.dropout, F.scaled_dot_product_attention = dropout, scaled_dot_product_attention
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = _TORCH_DROPOUT, _TORCH_SDPA
