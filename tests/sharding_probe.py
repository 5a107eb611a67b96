"""Run under `torchrun --nproc-per-node 2 -m tests.sharding_probe OUT_DIR`: kubetune's DDP and FSDP wrapping on
gloo, as the trainer loads (rank 0 holds the weights, rank 1 an empty meta model), one case after another. Each
rank writes OUT_DIR/rank-<R>.json: per case, its findings or the error it raised (tests/test_sharding.py)."""

from __future__ import annotations

import copy
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kubetune.train import distributed, sharding
from kubetune.train.precision import choose_precision

FP32 = choose_precision("fp32", torch.device("cpu"))
CPU = torch.device("cpu")


def loaded(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor] | None, nn.Module]:
    """(this rank's model as the trainer hands it to wrap, rank 0's full state, a plain copy of the weights)."""
    torch.manual_seed(0)
    reference = build()
    if distributed.is_main():
        model = copy.deepcopy(reference)
        return model, model.state_dict(), reference
    with torch.device("meta"):
        return build(), None, reference


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def batches(count: int, rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
    return [torch.randint(0, 300, (2, 32), generator=generator) for _ in range(count)]


def fsdp_accumulation() -> dict[str, Any]:
    """Item 2: two micro-batches; after the first (under no_sync), is each gradient already a shard?"""
    model, full, reference = loaded(gpt2)
    model = sharding.wrap(model, full, "fsdp", CPU, FP32, False)
    first, second = batches(2, distributed.rank())
    with sharding.no_sync(model):
        model(input_ids=first, labels=first).loss.backward()
    sharded = [isinstance(p.grad, DTensor) for p in model.parameters()]
    held = sum(p.grad.to_local().numel() for p in model.parameters() if isinstance(p.grad, DTensor))
    model(input_ids=second, labels=second).loss.backward()
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    for rank in range(distributed.world_size()):  # what FSDP computes: the mean over ranks of each one's sum
        for ids in batches(2, rank):
            reference(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad / distributed.world_size() for n, p in reference.named_parameters()}  # type: ignore
    error = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    return {"shardedAfterFirst": all(sharded), "heldElements": held,
            "parameters": sum(p.numel() for p in reference.parameters()), "maxError": error}


def fsdp_from_meta() -> dict[str, Any]:
    """Item 1: rank 0 shards an empty model too; its weights, ties and buffers must come out as loaded."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    model, full, reference = loaded(lambda: LlamaForCausalLM(config))
    model = sharding.wrap(model, full, "fsdp", CPU, FP32, False)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
    expected = reference.state_dict()
    weights = bool(state) and all(torch.equal(t, expected[n]) for n, t in state.items())  # ties listed once
    buffers = dict(model.named_buffers())
    return {"weights": weights, "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "buffers": all(torch.equal(buffers[n], b) for n, b in reference.named_buffers())}


def ddp_broadcasts_once() -> dict[str, Any]:
    """Item 12: the replica reaches rank 1 through DDP's own start-up broadcast only."""
    model, full, reference = loaded(gpt2)
    calls = []
    real = dist.broadcast
    dist.broadcast = lambda tensor, *a, **k: calls.append(tensor.numel()) or real(tensor, *a, **k)  # type: ignore
    try:
        wrapped = sharding.wrap(model, full, "ddp", CPU, FP32, False)
    finally:
        dist.broadcast = real
    same = all(torch.equal(p, r) for p, r in zip(wrapped.module.parameters(), reference.parameters(), strict=True))
    return {"handBroadcasts": len(calls), "sameAsLoaded": same}


def tiny_gemma3() -> nn.Module:
    text = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "intermediate_size": 64, "vocab_size": 300, "head_dim": 16}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 28, "patch_size": 14}
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return AutoModelForCausalLM.from_config(config)


def ddp_unused_tower() -> dict[str, Any]:
    """Item 6: Gemma 3 loaded for causal LM carries a vision tower that text never runs: its parameters get no
    gradient, which DDP must be told to expect."""
    model, full, _ = loaded(tiny_gemma3)
    wrapped = sharding.wrap(model, full, "ddp", CPU, FP32, False)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    losses = []
    for ids in batches(3, distributed.rank()):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"steps": len(losses), "reason": sharding.skipped_parameters(model)}


def fsdp_adapter_only(out: Path) -> dict[str, Any]:
    """Item 12: LoRA under FSDP with mergeAdapter false gathers the adapter alone for outputs."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    model, full, _ = loaded(lambda: get_peft_model(gpt2(), lora))
    model = sharding.wrap(model, full, "fsdp", CPU, FP32, False)
    everything = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def rebuild() -> nn.Module:
        with torch.device("meta"):
            return get_peft_model(gpt2(), lora)

    adapter = sharding.full_model(model, rebuild, trained_only=True)
    if adapter is None:
        return {}
    frozen = [p.is_meta for p in adapter.parameters() if not p.requires_grad]
    trained = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
    adapter.save_pretrained(out / "adapter")  # what outputs.save_model does with it
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    return {"frozenLeftOnMeta": bool(frozen) and all(frozen), "trained": len(trained),
            "equal": all(torch.equal(p, everything[n]) for n, p in trained.items()), "saved": len(saved)}


def main(out: Path) -> None:
    distributed.init()
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "fsdp_accumulation": fsdp_accumulation, "fsdp_from_meta": fsdp_from_meta,
        "ddp_broadcasts_once": ddp_broadcasts_once, "ddp_unused_tower": ddp_unused_tower,
        "fsdp_adapter_only": lambda: fsdp_adapter_only(out)}
    results: dict[str, Any] = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as exc:  # the other cases still run; a failed collective may leave the group unusable
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        (out / f"rank-{distributed.rank()}.json").write_text(json.dumps(results, default=str))
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
