"""Attention per packed example, instead of over the whole packed row with a block-diagonal mask.

Why: a packed row (train/packing.py) holds several examples. transformers' `sdpa` path reads the position-id
restarts and builds a row × row block-diagonal mask, so attention computes (and masks away) every
cross-example block: a 256-token row of four 64-token examples does four times the attention work its
examples need. On a GPU, PyTorch's variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`, half
precision, sm80 and later) takes the examples' boundaries and skips those blocks; on a CPU there is no such
kernel, so each example's span of the row goes to SDPA alone, causal, without a mask. The numbers are the same
up to float rounding (tests/test_segment_attention.py); on a CPU the dropout masks on attention probabilities
are drawn per example, so a run is not bit-identical with the dense path.

It applies only while `within()` is active, which the trainer enters for a packed batch: the model's
configuration then names this implementation (registered with transformers' attention and mask interfaces;
the mask is still built, as for `sdpa`). Anything it does not handle — a KV cache, a sliding window shorter
than the row, soft-capped logits, attention sinks, position biases, non-causal attention, and on a GPU fp32 or
attention dropout — goes to transformers' own `sdpa_attention_forward` with that mask, unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kubetune.train.batching import to_device

VARLEN: Callable[..., Any] | None
try:
    from torch.nn.attention import varlen

    VARLEN = varlen.varlen_attn
except ImportError:  # torch before 2.10
    VARLEN = None

NAME = "kubetune_segments"
_DENSE = "sdpa"
# On a GPU: (cumulative example lengths over the flattened batch, on the device; the longest example), found on
# the host once per batch by within(): reading position ids on the device in every layer would stall it.
_SEGMENTS: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = contextvars.ContextVar("segments", default=None)


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (start, end) of each span whose positions count up by one (a packed example, or a row's tail)."""
    length = position_ids.size(-1)
    restarts = (position_ids[:, 1:] != position_ids[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(position_ids.size(0))]
    for row, column in restarts:
        starts[row].append(column + 1)
    return [list(zip(row, [*row[1:], length], strict=True)) for row in starts]


def cumulative_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The varlen kernels' description of a packed batch flattened to one sequence: where each example starts
    (int32, the total last), and the longest example."""
    lengths = [end - start for row in segment_bounds(position_ids) for start, end in row]
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), max(lengths)


def varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: tuple[torch.Tensor, int],
                   scaling: float | None, kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention within each example through a variable-length kernel: (batch, heads, length, head dim)
    in, (batch, length, heads, head dim) out; the kernel takes (tokens, heads, head dim)."""
    batch, heads, length, dim = query.shape
    cumulative, longest = segments
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.size(1), dim) for t in (query, key, value))
    attend = kernel or VARLEN
    assert attend is not None, "no varlen kernel in this torch"
    out: torch.Tensor = attend(q, k, v, cumulative, cumulative, longest, longest, scale=scaling,
                               window_size=(-1, 0), enable_gqa=key.size(1) != heads)
    return out.view(batch, length, heads, dim)


def varlen_available(device: torch.device) -> bool:
    """PyTorch's varlen kernel is flash attention's: CUDA, Ampere (sm80) or later."""
    if VARLEN is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def _varlen_takes(query: torch.Tensor, dropout: float) -> bool:
    dim = query.size(-1)
    return query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 and dim <= 256 and dim % 8 == 0


def _per_segment(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, **kwargs: Any) -> bool:
    position_ids = kwargs.get("position_ids")
    if position_ids is None or not getattr(module, "is_causal", False):
        return False
    if query.device.type != "cpu" and (_SEGMENTS.get() is None or not _varlen_takes(query, kwargs["dropout"])):
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
    if not _per_segment(module, query, key, dropout=dropout, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    segments = _SEGMENTS.get()
    if query.device.type != "cpu" and segments is not None:
        return varlen_forward(query, key, value, segments, scaling), None
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
    """Attention per example for this packed batch (`batch` on the host) on a CPU, or a GPU with the varlen
    kernel; elsewhere nothing changes. Wrap forward *and* backward: gradient checkpointing recomputes the forward
    during backward."""
    if "position_ids" not in batch or not (device.type == "cpu" or varlen_available(device)):
        yield
        return
    segments = None
    if device.type != "cpu":
        cumulative, longest = cumulative_lengths(batch["position_ids"])
        segments = (to_device(cumulative, device), longest)
    token = _SEGMENTS.set(segments)
    configs = _configs(model)
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = _DENSE
        _SEGMENTS.reset(token)
