"""Packed rows' attention per example on CPU (train/speedups/segment_attention.py): same numbers as the dense
block-diagonal mask, the fallbacks, and the model's configuration left as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from kubetune.train.speedups import segment_attention

CPU = torch.device("cpu")


def packed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two 64-token rows: three examples and a tail, and two examples."""
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(30), torch.arange(9), torch.arange(5)]),
                             torch.cat([torch.arange(40), torch.arange(24)])])
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, positions.shape), "position_ids": positions}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()  # eval: no dropout, both ways compute the same function


def llama_gqa() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def logits_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     per_example: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with segment_attention.within(model, batch, CPU if per_example else torch.device("cuda")):
        logits = model(**batch, use_cache=False).logits
        (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()  # every logit weighs in
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def spans_attended(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Query lengths of each SDPA call transformers' sdpa forward makes: a row's, or one example's."""
    seen: list[int] = []
    real = segment_attention.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(query.size(2))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(segment_attention, "sdpa_attention_forward", spy)
    return seen


def test_segment_bounds_follow_the_position_restarts() -> None:
    batch = packed_batch(100)
    assert segment_attention.segment_bounds(batch["position_ids"]) == [
        [(0, 20), (20, 50), (50, 59), (59, 64)], [(0, 40), (40, 64)]]


@pytest.mark.parametrize("build", [gpt2, llama_gqa], ids=["gpt2", "llama-gqa"])
def test_per_example_attention_gives_the_dense_masks_logits_and_gradients(
        build: object, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build()  # type: ignore[operator]
    batch = packed_batch(100)
    dense_logits, dense_grads = logits_and_grads(model, batch, per_example=False)
    seen = spans_attended(monkeypatch)
    logits, grads = logits_and_grads(model, batch, per_example=True)
    assert sorted(set(seen)) == [5, 9, 20, 24, 30, 40]  # each example alone, never the 64-token row
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    for grad, dense in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(grad, dense, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the step


def test_a_sliding_window_shorter_than_the_row_keeps_the_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                             sliding_window=16)).eval()
    batch = packed_batch(100)
    dense_logits, _ = logits_and_grads(model, batch, per_example=False)
    seen = spans_attended(monkeypatch)
    logits, _ = logits_and_grads(model, batch, per_example=True)
    assert seen == [64]  # the whole row, with transformers' mask (block-diagonal and windowed)
    torch.testing.assert_close(logits, dense_logits)


def test_only_packed_batches_on_a_cpu_switch_and_the_switch_is_undone_on_error() -> None:
    model = gpt2()
    padded = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8)}
    with segment_attention.within(model, padded, CPU):
        assert model.config._attn_implementation == "sdpa"
    with segment_attention.within(model, packed_batch(100), torch.device("cuda")):
        assert model.config._attn_implementation == "sdpa"  # GPUs: not measured, left as transformers runs it
    with pytest.raises(RuntimeError), segment_attention.within(model, packed_batch(100), CPU):
        assert model.config._attn_implementation == segment_attention.NAME
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"  # a model that needs eager attention is left alone
    with segment_attention.within(model, packed_batch(100), CPU):
        assert model.config._attn_implementation == "eager"


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, *, scale: float | None, window_size: tuple[int, int],
                     enable_gqa: bool) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn's contract, on a CPU: (tokens, heads, dim) in and out, causal
    attention within each [cu[i], cu[i + 1]) span. The kernel itself needs CUDA (bench/gpu.py runs it)."""
    assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    spans = list(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True))
    assert max(b - a for a, b in spans) == max_q
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale,
        enable_gqa=enable_gqa).transpose(0, 1) for a, b in spans])


def test_the_varlen_layout_gives_the_dense_masks_attention() -> None:
    """Packed rows flattened for the GPU's variable-length kernel (4 query heads over 2 key/value heads): the
    output of transformers' sdpa with the block-diagonal causal mask, reshaped as transformers expects."""
    positions = packed_batch(100)["position_ids"]
    torch.manual_seed(2)
    query, key, value = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    segment = torch.stack([torch.cumsum(row == 0, 0) for row in positions])  # which example each token is in
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    module = llama_gqa().model.layers[0].self_attn  # 4 heads over 2 key/value heads, as transformers repeats them
    dense, _ = segment_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    segments = segment_attention.cumulative_lengths(positions)
    assert segments[0].tolist() == [0, 20, 50, 59, 64, 104, 128] and segments[1] == 40
    flat = segment_attention.varlen_forward(query, key, value, segments, 0.25, kernel=reference_varlen)
    assert flat.shape == dense.shape == (2, 64, 4, 16)
    torch.testing.assert_close(flat, dense, rtol=1e-5, atol=1e-5)
