"""Direct Preference Optimization: the loss, its metrics and the frozen reference model.

A micro-batch of n pairs is one forward of 2n rows, chosen then rejected (each pair whole in one micro-batch,
never packed). A side's log-probability is the sum over its answer tokens (labels != -100). The reference is the
starting model: under LoRA the same weights with the adapters disabled (no second copy), under full fine-tuning a
frozen copy, or log-probabilities computed once before training (method.dpo.precomputeReference). The reference
is always scored in eval mode (no dropout), so the three give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from kubetune.data.encode import IGNORE_INDEX
from kubetune.spec import DpoSpec
from kubetune.train import distributed
from kubetune.train.batching import batch_to, collate, eval_batches

# Per-pair sums, in this order, that metrics are means of (loss first; the pair count last). preference_accuracy:
# the chosen answer's reward above the rejected one's, a tie counting half, so the starting model (rewards 0)
# scores 0.5, chance, and a tuned one is judged by how often it learned the right side on held-out pairs.
SUMS = ("loss", "preference_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "chosen_reward",
        "rejected_reward")

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # a collated batch -> logits


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int, multiple: int = 1,
                  limit: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of 2n rows: the n chosen sides, then the n rejected ones."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id, multiple, limit)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probabilities, answer token count) per row, in fp32."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    shifted = logits[:, :-1].float()
    picked = shifted.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - shifted.logsumexp(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor,
               dpo: DpoSpec) -> dict[str, torch.Tensor]:
    """Per-pair loss and metrics from the 2n rows' policy and reference log-probabilities and answer lengths."""
    ratio_c, ratio_r = (policy - reference).chunk(2)
    if dpo.loss == "ipo":  # TRL's IPO: log-ratios averaged per answer token, squared distance to 1 / (2 beta)
        count_c, count_r = counts.float().clamp(min=1).chunk(2)
        loss = (ratio_c / count_c - ratio_r / count_r - 1 / (2 * dpo.beta)) ** 2
    else:  # DPO, with conservative label smoothing (eps of the pairs assumed flipped)
        logits = dpo.beta * (ratio_c - ratio_r)
        loss = -(1 - dpo.label_smoothing) * F.logsigmoid(logits) - dpo.label_smoothing * F.logsigmoid(-logits)
    reward_c, reward_r = dpo.beta * ratio_c.detach(), dpo.beta * ratio_r.detach()
    chosen, rejected = policy.detach().chunk(2)
    return {"loss": loss, "preference_accuracy": (reward_c > reward_r).float() + 0.5 * (reward_c == reward_r).float(),
            "reward_margin": reward_c - reward_r, "chosen_logp": chosen, "rejected_logp": rejected,
            "chosen_reward": reward_c, "rejected_reward": reward_r}


def sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's sums of every metric, and its pair count, as one tensor (one all-reduce for all of them)."""
    pairs = terms["loss"].new_tensor([terms["loss"].numel()])
    return torch.cat([torch.stack([terms[k].detach().sum() for k in SUMS]), pairs]).double()


def means(totals: torch.Tensor) -> dict[str, float]:
    """Metrics from summed totals (see sums)."""
    pairs = max(float(totals[-1]), 1.0)
    return {k: float(totals[i]) / pairs for i, k in enumerate(SUMS)}


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Reference:
    """Reference log-probabilities of a collated batch: `adapter_off` is the trained model itself (LoRA: its
    adapters are switched off around the forward), or `frozen` a copy that never trains; or they were
    precomputed into each pair (`precomputed`)."""

    def __init__(self, model: nn.Module, frozen: nn.Module | None = None) -> None:
        self.model = frozen if frozen is not None else model
        self.adapter = frozen is None
        self.precomputed = False

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], autocast: Callable[[], Any],
              pairs: list[dict[str, Any]] | None = None) -> torch.Tensor:
        if self.precomputed:
            assert pairs is not None
            values = [p["reference"][0] for p in pairs] + [p["reference"][1] for p in pairs]
            return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)
        off = self.model.disable_adapter() if self.adapter else contextlib.nullcontext()  # type: ignore[operator]
        with off, evaluating(self.model), autocast():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["labels"])[0]

    def precompute(self, sets: list[list[dict[str, Any]]], batch_size: int, pad_id: int, multiple: int,
                   limit: int | None, device: torch.device, autocast: Callable[[], Any]) -> None:
        """Score every pair of `sets` once (each rank its share, then shared by all), then answer from them."""
        for examples in sets:
            mine: dict[int, tuple[float, float]] = {}
            for indices, batch in rank_batches(self.model, examples, batch_size, pad_id, multiple, limit, device):
                chosen, rejected = self.logps(batch, autocast).cpu().chunk(2)
                mine.update({i: (float(c), float(r)) for i, c, r in zip(indices, chosen, rejected, strict=True)})
            for shard in distributed.gather_objects(mine):
                for i, value in shard.items():
                    examples[i]["reference"] = value
        self.precomputed = True


def rank_batches(model: nn.Module, examples: list[dict[str, Any]], batch_size: int, pad_id: int, multiple: int,
                 limit: int | None, device: torch.device) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """This rank's share of `examples` as collated pair batches on the device. A sharded model's forward is a
    collective, so every rank runs as many as the busiest: the extra ones repeat a pair and score nothing
    (their indices are empty)."""
    lengths = [len(e["input_ids"]) for e in examples]
    batches = eval_batches(len(examples), lengths, batch_size, distributed.world_size(), distributed.rank())
    rounds = distributed.max_over_ranks(len(batches)) if isinstance(model, FSDPModule) else len(batches)
    for round_ in range(rounds):
        indices = batches[round_] if round_ < len(batches) else []
        pairs = [examples[i] for i in indices] or examples[:1]
        yield indices, batch_to(collate_pairs(pairs, pad_id, multiple, limit), device)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, reference: Reference, examples: list[dict[str, Any]], dpo: DpoSpec,
                   batch_size: int, pad_id: int, autocast: Callable[[], Any], device: torch.device,
                   multiple: int = 1, limit: int | None = None) -> dict[str, Any]:
    """Loss and preference metrics over `examples`, summed across ranks so every rank gets the same numbers."""
    totals = torch.zeros(len(SUMS) + 1, dtype=torch.float64)
    with evaluating(model):
        for indices, batch in rank_batches(model, examples, batch_size, pad_id, multiple, limit, device):
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            policy, counts = sequence_logps(logits, batch["labels"])
            if indices:
                ref = reference.logps(batch, autocast, [examples[i] for i in indices])
                totals += sums(pair_terms(policy, ref, counts, dpo)).cpu()
            elif not reference.precomputed:
                reference.logps(batch, autocast, examples[:1])  # the reference's forward is a collective too
    distributed.all_reduce_sum(totals)
    return {**means(totals), "examples": len(examples)}
