"""`evaluate` against the same quantities computed one example at a time, straight from the model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

from kubetune.train.evaluate import evaluate
from kubetune.train.precision import Precision

FP32 = Precision("fp32", "cpu", None)
CPU = torch.device("cpu")


def test_classification_loss_and_confusion_match_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    rng = random.Random(0)
    examples = [{"input_ids": [rng.randrange(1, 50) for _ in range(rng.randrange(3, 20))], "label": rng.randrange(3)}
                for _ in range(23)]  # an odd count: a short last batch
    result = evaluate(model, examples, "sequence-classification", ["a", "b", "c"], 4, 0, FP32, CPU)

    model.eval()
    losses, confusion = [], [[0] * 3 for _ in range(3)]
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(e["label"])).item())
            confusion[e["label"]][int(logits.argmax())] += 1
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["confusion_matrix"] == confusion
    assert result["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / len(examples))


def test_causal_lm_loss_averages_every_target_token_alike(tiny_gpt2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    rng = random.Random(1)
    examples = []
    for _ in range(11):
        ids = [rng.randrange(1, 500) for _ in range(rng.randrange(4, 30))]
        prompt = rng.randrange(1, len(ids) - 1)  # targets only after the prompt, as encode_causal_lm marks them
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    result = evaluate(model, examples, "causal-lm", [], 3, 0, FP32, CPU)

    model.eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            targets += int((labels != -100).sum())
    assert result["loss"] == pytest.approx(total / targets, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / targets)).item(), rel=1e-5)
