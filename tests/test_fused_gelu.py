"""GPT-2's spelled-out tanh GELU swapped for torch's fused one (train/speedups/fused_gelu.py): same function within
float rounding, the trainer's models use it, and nothing of the saved model changes."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification
from transformers.activations import NewGELUActivation

from kubetune.jobfile import parse_job
from kubetune.train.model import build_model
from kubetune.train.speedups.fused_gelu import TanhGELU, fuse_tanh_gelu
from tests.fixtures_models import causal_job


def kinds(model: torch.nn.Module) -> dict[type, int]:
    found: dict[type, int] = {}
    for module in model.modules():
        if isinstance(module, (TanhGELU, NewGELUActivation)):
            found[type(module)] = found.get(type(module), 0) + 1
    return found


def test_fused_gelu_computes_the_spelled_out_one(tiny_gpt2: Path, tmp_path: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    fused = copy.deepcopy(plain)
    layers = plain.config.n_layer
    assert kinds(plain) == {NewGELUActivation: layers}
    assert fuse_tanh_gelu(fused) == layers and kinds(fused) == {TanhGELU: layers}
    ids = torch.randint(0, plain.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (plain, fused):
        model.eval()  # no dropout: the two passes must compute the same function
        logits = model(input_ids=ids).logits
        logits.pow(2).mean().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (plain_logits, plain_grads), (logits, grads) = results
    # The fused kernel rounds differently: 2.4e-7 apart on the activation alone (fp32).
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6)
    fused.save_pretrained(tmp_path / "saved")  # the activation is code, not config: saved as GPT-2 knows it
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.activation_function == "gelu_new" and kinds(reloaded) == {NewGELUActivation: layers}


def test_the_trainer_builds_its_models_with_the_fused_gelu(tiny_gpt2: Path, tmp_path: Path) -> None:
    for method in ("full", "lora"):
        spec = parse_job(causal_job("gelu", tiny_gpt2, "unused.jsonl", tmp_path / "out",
                                    method={"type": method})).spec
        model, _ = build_model(spec, tiny_gpt2)
        assert set(kinds(model)) == {TanhGELU}, method


def test_exact_gelu_models_are_left_alone() -> None:
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=50))  # hidden_act: erf GELU
    assert fuse_tanh_gelu(model) == 0
