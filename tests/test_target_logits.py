"""Causal LM logits at target positions only (train/target_logits.py): the same loss and gradients as full logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.data.encode import encode_causal_lm
from kubetune.jobfile import parse_job
from kubetune.samples import INSTRUCTIONS, sample_path
from kubetune.train.batching import collate, collate_packed, model_inputs
from kubetune.train.evaluate import summed_loss
from kubetune.train.model import build_model, load_tokenizer
from kubetune.train.packing import pack_examples
from kubetune.train.speedups.target_logits import TargetLogits
from tests.fixtures_models import causal_job

# fp32 sums of a few hundred token losses: the kept rows go through the same matmul, in a smaller batch.
RTOL = 1e-5


def batches(tiny_gpt2: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A padded batch (prompts and padding carry no target) and a packed one (a short row's tail neither)."""
    tokenizer = load_tokenizer(tiny_gpt2, str(tiny_gpt2))
    rows = [json.loads(line) for line in sample_path(INSTRUCTIONS).read_text().splitlines()[:24]]
    examples = encode_causal_lm(rows, tokenizer, 128)
    return {"padded": collate(examples[:8], tokenizer.pad_token_id),
            "packed": collate_packed(pack_examples(examples, 128)[:4], tokenizer.pad_token_id)}


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[Any, ...]:
    """task "causal-lm" selects the targets' logits; "full" is the same forward with nothing selected."""
    model.zero_grad(set_to_none=True)
    with TargetLogits(model, "causal-lm" if task == "causal-lm" else "none", batch["labels"],
                      batch["labels"]) as selection:
        logits = model(**model_inputs(batch)).logits
    loss = summed_loss(logits, selection.labels_for(logits), "causal-lm")
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.shape, float(loss), grads


@pytest.mark.parametrize("method", ["full", "lora"])
def test_selected_logits_give_the_full_logits_loss_and_gradients(tiny_gpt2: Path, tmp_path: Path,
                                                                 method: str) -> None:
    spec = parse_job(causal_job("sel", tiny_gpt2, "unused.jsonl", tmp_path / "out", method={"type": method},
                                hyperparameters={"precision": "fp32"})).spec
    torch.manual_seed(0)
    model, _ = build_model(spec, tiny_gpt2)
    model.eval()  # no dropout: both passes must see the same function
    for name, batch in batches(tiny_gpt2).items():
        targets = int((batch["labels"][:, 1:] != -100).sum())
        assert 0 < targets < batch["labels"].numel() * 0.8, name  # prompts/padding/tails are really skipped
        full_shape, full_loss, full_grads = loss_and_grads(model, batch, "full")
        shape, loss, grads = loss_and_grads(model, batch, "causal-lm")
        assert len(full_shape) == 3 and tuple(shape) == (targets, full_shape[-1]), name
        assert loss == pytest.approx(full_loss, rel=RTOL), name
        assert grads.keys() == full_grads.keys() and grads, name
        for key, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    # The check can fail: pairing the selected logits with targets one position off (the unshifted labels)
    # gives another loss.
    batch = batches(tiny_gpt2)["padded"]
    with TargetLogits(model, "causal-lm", batch["labels"], batch["labels"]) as selection:
        logits = model(**model_inputs(batch)).logits
    unshifted = batch["labels"][:, :-1][batch["labels"][:, 1:] != -100]
    assert float(summed_loss(logits, unshifted, "causal-lm")) != pytest.approx(
        float(summed_loss(logits, selection.labels_for(logits), "causal-lm")), rel=1e-3)


def test_the_hook_is_gone_after_the_step_and_classification_is_untouched(tiny_gpt2: Path, tmp_path: Path,
                                                                         minilm_path: Path) -> None:
    spec = parse_job(causal_job("sel", tiny_gpt2, "unused.jsonl", tmp_path / "out")).spec
    model, _ = build_model(spec, tiny_gpt2)
    batch = batches(tiny_gpt2)["padded"]
    with torch.no_grad():
        with TargetLogits(model, "causal-lm", batch["labels"], batch["labels"]):
            assert model(**model_inputs(batch)).logits.dim() == 2
        assert model(**model_inputs(batch)).logits.shape[:2] == batch["input_ids"].shape  # generation, predict
    labels = torch.tensor([0, 1])
    selection = TargetLogits(model, "sequence-classification", labels, labels)
    with selection:
        assert selection.handle is None
    assert selection.labels_for(torch.zeros(2, 2)) is labels


DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}
ARCHITECTURES = {  # model_type: config fields (tiny, random weights); the families users fine-tune most
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": {**DECODER, "head_dim": 16},
    "gemma2": {**DECODER, "head_dim": 16},  # soft-capped logits
    "phi3": {**DECODER, "pad_token_id": 0},
    "gpt_neox": {k: DECODER[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "vocab_size")},
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
            "word_embed_proj_dim": 64},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300},
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_common_architecture_routes_its_logits_through_the_hooked_layer(model_type: str) -> None:
    """Each model's forward must call its output layer on (batch, length, hidden) and return what it gives back:
    otherwise the selection would be skipped (full logits) or break. Checked on the families users bring."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])).eval()
    ids = torch.randint(1, 300, (3, 20))
    labels = ids.clone()
    labels[:, :7] = -100  # prompts
    labels[2, 15:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(20) < 15), "labels": labels}
    full_shape, full_loss, full_grads = loss_and_grads(model, batch, "full")
    shape, loss, grads = loss_and_grads(model, batch, "causal-lm")
    assert tuple(shape) == (int((labels[:, 1:] != -100).sum()), 300) and len(full_shape) == 3
    assert loss == pytest.approx(full_loss, rel=RTOL)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[key], rtol=1e-4, atol=1e-6, msg=key)
