"""The trainer's CPU dropout: the same distribution and gradients as torch's, drawn faster (fast_dropout.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kubetune.train.speedups import fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_of_the_elements(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of four: the last word is only partly used
    kept = fast_dropout.keep_mask(torch.Size([n]), p, torch.device("cpu")).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma, (kept, n * (1 - p))


def test_masks_follow_the_seed_and_differ_between_draws() -> None:
    shape = torch.Size([64, 33])
    torch.manual_seed(7)
    first, second = (fast_dropout.keep_mask(shape, 0.3, torch.device("cpu")) for _ in range(2))
    torch.manual_seed(7)
    assert torch.equal(fast_dropout.keep_mask(shape, 0.3, torch.device("cpu")), first)
    assert not torch.equal(first, second)


def test_dropout_scales_the_kept_values_and_routes_gradients_through_them_only() -> None:
    x = torch.randn(128, 96, requires_grad=True)
    with fast_dropout.enabled():
        y = F.dropout(x, 0.25, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.where(kept, 1 / 0.75, 0.0))


def test_eval_mode_p_zero_and_in_place_go_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(8, 8)

    def no_draws(*args: Any) -> torch.Tensor:
        raise AssertionError("fast path taken")

    monkeypatch.setattr(fast_dropout, "keep_mask", no_draws)
    with fast_dropout.enabled():
        F.dropout(x.clone(), 0.5, training=True, inplace=True)  # callers of in-place dropout keep its semantics
        assert torch.equal(F.dropout(x, 0.5, training=False), x)
        assert torch.equal(F.dropout(x, 0.0, training=True), x)
        assert torch.equal(torch.nn.Dropout(0.5).eval()(x), x)


def test_gradient_checkpointing_redraws_the_same_masks() -> None:
    """torch.utils.checkpoint restores the generator before recomputing: the gradients are those of one pass."""
    layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.3), torch.nn.Linear(64, 1))
    x = torch.randn(16, 32)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        torch.manual_seed(3)
        with fast_dropout.enabled():
            out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            out.sum().backward()
        return [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    for plain, recomputed in zip(grads(False), grads(True), strict=True):
        assert torch.allclose(plain, recomputed)


@pytest.mark.parametrize("case", ["bool mask", "float mask", "causal", "grouped heads"])
def test_attention_with_dropout_is_torchs_attention_on_the_kept_probabilities(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every element kept, the math path equals torch's attention scaled by 1 / (1 - p): the same
    scores, masking and softmax; dropout then acts on the probabilities as torch's does."""
    torch.manual_seed(0)
    heads, kv_heads = (4, 2) if case == "grouped heads" else (4, 4)
    q, k = torch.randn(2, heads, 5, 8), torch.randn(2, kv_heads, 5 if case == "causal" else 7, 8)
    v = torch.randn_like(k)
    kwargs: dict[str, Any] = {}
    if case == "bool mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 7) > 0.3
        kwargs["attn_mask"][..., 0] = True  # every query sees one key at least, as with real padding masks
    elif case == "float mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 7)
    elif case == "causal":
        kwargs["is_causal"] = True
    else:
        kwargs["enable_gqa"] = True
    monkeypatch.setattr(fast_dropout, "keep_mask", lambda shape, p, device: torch.ones(shape, dtype=torch.bool))
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, **kwargs) / 0.8
    with fast_dropout.enabled():
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, **kwargs)
    assert torch.allclose(got, expected, atol=1e-5)


def test_torch_functions_come_back_after_an_error() -> None:
    with pytest.raises(RuntimeError), fast_dropout.enabled():
        raise RuntimeError("step failed")
    assert F.dropout is fast_dropout._TORCH_DROPOUT
    assert F.scaled_dot_product_attention is fast_dropout._TORCH_SDPA
