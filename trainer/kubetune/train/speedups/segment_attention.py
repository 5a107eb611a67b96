"""Attention per packed example on CPU, instead of over the whole packed row with a block-diagonal mask.

Why: a packed row (train/packing.py) holds several examples. transformers' `sdpa` path reads the position-id
restarts and builds a row × row block-diagonal mask, so attention computes (and masks away) every
cross-example block: a 256-token row of four 64-token examples does four times the attention work its
examples need. On a GPU the variable-length kernels (flash-attention's, `torch.nn.attention.varlen`) skip those
blocks; on a CPU there is none, so here each example's span of the row goes to SDPA alone, causal, without a
mask. The numbers are the same up to float rounding (tests/test_segment_attention.py); the dropout masks
on attention probabilities are drawn per example, so a run is not bit-identical with the dense path.

It applies only while `within()` is active, which the trainer enters for a packed batch on the CPU: the
model's configuration then names this implementation (registered with transformers' attention and mask
interfaces; the mask is still built, as for `sdpa`). Anything it does not handle — a KV cache, a sliding
window shorter than the row, soft-capped logits, attention sinks, position biases, non-causal attention —
goes to transformers' own `sdpa_attention_forward` with that mask, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kubetune_segments"
_DENSE = "sdpa"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (start, end) of each span whose positions count up by one (a packed example, or a row's tail)."""
    length = position_ids.size(-1)
    restarts = (position_ids[:, 1:] != position_ids[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(position_ids.size(0))]
    for row, column in restarts:
        starts[row].append(column + 1)
    return [list(zip(row, [*row[1:], length], strict=True)) for row in starts]


def _per_segment(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, **kwargs: Any) -> bool:
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.device.type != "cpu" or not getattr(module, "is_causal", False):
        return False
    length = query.size(2)
    if key.size(2) != length or position_ids.size(-1) != length or kwargs.get("is_causal") is False:
        return False  # a cache, or a caller that asked for bidirectional attention
    window = kwargs.get("sliding_window")
    if window is not None and window < length:
        return False
    return all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias"))


def segment_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query, key, value (batch, heads, length, head dim) in, output
    (batch, length, heads, head dim) out, like `sdpa_attention_forward`."""
    if not _per_segment(module, query, key, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    position_ids = kwargs.pop("position_ids").expand(query.size(0), -1)
    rows = []
    # split and unbind, not slicing: their backward joins the pieces' gradients in one copy, where each slice's
    # backward would write its gradient into a zero tensor of the whole row.
    bounds = segment_bounds(position_ids)
    for spans, q, k, v in zip(bounds, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        sizes = [end - start for start, end in spans]
        pieces = zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True)
        parts = [sdpa_attention_forward(module, q_part[None], k_part[None], v_part[None], None, dropout=dropout,
                                        scaling=scaling, **kwargs)[0] for q_part, k_part, v_part in pieces]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(NAME, segment_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the dense mask stays available to the fallback


def _configs(model: torch.nn.Module) -> list[Any]:
    """Each distinct configuration the model's modules read their attention implementation from."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == _DENSE:
            found.setdefault(id(config), config)
    return list(found.values())


@contextlib.contextmanager
def within(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Attention per example for this packed batch on a CPU; elsewhere nothing changes. Wrap forward *and*
    backward: gradient checkpointing recomputes the forward during backward."""
    if device.type != "cpu" or "position_ids" not in batch:
        yield
        return
    configs = _configs(model)
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = _DENSE
