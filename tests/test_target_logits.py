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
from kubetune.train.target_logits import TargetLogits
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
