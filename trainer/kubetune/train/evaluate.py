"""Validation and test metrics, summed across ranks so every rank gets the same numbers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from kubetune.data.encode import IGNORE_INDEX
from kubetune.train import distributed
from kubetune.train.batching import batch_to, collate, eval_batches, length_multiple
from kubetune.train.precision import Precision
from kubetune.train.speedups.target_logits import TargetLogits


def classification_metrics(confusion: list[list[int]], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro precision/recall/F1 from a confusion matrix (rows = true, columns = predicted).

    Macro averages run over the classes present in the truth or the predictions (scikit-learn's rule):
    a class absent from both says nothing about the model and must not count as a zero.
    """
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    precisions, recalls, f1s = [], [], []
    for k in range(len(labels)):
        tp = confusion[k][k]
        predicted = sum(row[k] for row in confusion)
        actual = sum(confusion[k])
        if not predicted and not actual:
            continue
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = max(len(f1s), 1)
    return {
        "accuracy": correct / total if total else 0.0,
        "f1": sum(f1s) / n,
        "precision": sum(precisions) / n,
        "recall": sum(recalls) / n,
        "confusion_matrix": confusion,
    }


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy summed over the targets (see target_count), in fp32: training and evaluation share it."""
    # Classification; or a causal LM's logits at its targets only (speedups/target_logits.py), `labels` the targets.
    if task == "sequence-classification" or logits.dim() == 2:
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    # Causal LM: position t predicts token t+1; only completion tokens are targets (labels = -100 elsewhere).
    shifted = logits[:, :-1].float()
    return nn.functional.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(labels: torch.Tensor, task: str) -> int:
    """What a loss is averaged over: examples for classification, target tokens for causal LM."""
    if task == "sequence-classification":
        return labels.numel()
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[dict[str, Any]],
    task: str,
    labels: list[str],
    batch_size: int,
    pad_id: int,
    precision: Precision,
    device: torch.device,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Loss plus task metrics over `examples`, each rank scoring its shard; batches never pad past max_length."""
    was_training = model.training
    model.eval()
    lengths = [len(e["input_ids"]) for e in examples]
    multiple = length_multiple(device)
    batches = eval_batches(len(examples), lengths, batch_size * 2, distributed.world_size(), distributed.rank())
    n_labels = max(len(labels), 1)
    # [loss_sum, target_count, confusion...]: one all-reduce for everything. Summed where the logits are and read
    # back once at the end: on a GPU a read per batch would stall the queue of kernels each time.
    totals = torch.zeros(2 + n_labels * n_labels, dtype=torch.float64, device=device)
    # A sharded model's forward is a collective: every rank runs as many as the busiest, extra ones unscored.
    rounds = distributed.max_over_ranks(len(batches)) if isinstance(model, FSDPModule) else len(batches)
    for round_ in range(rounds):
        if round_ >= len(batches):
            spare = batch_to(collate(examples[:1], pad_id, multiple, max_length), device)
            model(input_ids=spare["input_ids"], attention_mask=spare["attention_mask"])
            continue
        host = collate([examples[i] for i in batches[round_]], pad_id, multiple, max_length)
        batch = batch_to(host, device)
        with precision.autocast(), TargetLogits(model, task, host["labels"], batch["labels"]) as selection:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        totals[0] += summed_loss(logits, selection.labels_for(logits), task)
        totals[1] += target_count(host["labels"], task)  # counted on the host copy: no device read
        if task == "sequence-classification":
            flat = batch["labels"] * n_labels + logits.argmax(-1)
            totals[2:] += torch.bincount(flat, minlength=n_labels * n_labels)
    totals = totals.cpu()
    distributed.all_reduce_sum(totals)
    model.train(was_training)
    mean_loss = float(totals[0] / max(totals[1].item(), 1))
    result: dict[str, Any] = {"loss": mean_loss, "examples": len(examples)}
    if task == "sequence-classification":
        confusion = totals[2:].long().view(n_labels, n_labels).tolist()
        result.update(classification_metrics(confusion, labels))
    else:
        result["perplexity"] = math.exp(min(mean_loss, 50.0))
    return result


def prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{'loss': x} -> {'eval_loss': x}; scalars only (the confusion matrix is reported separately)."""
    return {f"{prefix}_{k}": v for k, v in metrics.items() if isinstance(v, int | float) and k != "examples"}
