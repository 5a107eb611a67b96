"""Seeded, length-grouped batches: little padding, same order on every restart, sharded by rank."""

from __future__ import annotations

import random
from typing import Any

import torch

MEGA_BATCHES = 50  # sort by length inside windows of 50 batches: low padding, still well shuffled
# On GPUs every new sequence length costs a new attention plan (cuDNN's SDPA: 0.1-2.5 s each on an H100, measured
# with bench/gpu.py); batches padded to a multiple of 64 tokens see at most maxSeqLength / 64 lengths. On a CPU
# padding is only more work: there batches stay at their longest example. Never past the model's position limit
# (`limit`, the clamped maxSeqLength): 300 positions and a 290-token batch pad to 300, not 320 (a CUDA assert).
GPU_LENGTH_MULTIPLE = 64


def length_multiple(device: torch.device) -> int:
    return GPU_LENGTH_MULTIPLE if device.type == "cuda" else 1


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, world: int, rank: int) -> list[list[int]]:
    """Index batches this rank trains on in `epoch`; a pure function of its arguments (resume relies on it)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * MEGA_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world
    # Every rank must run the same number of steps or collectives would hang: drop the remainder.
    return batches[rank:usable:world] if world > 1 else batches


def padded_length(longest: int, multiple: int, limit: int | None = None) -> int:
    rounded = -(-longest // multiple) * multiple
    return rounded if limit is None else max(longest, min(rounded, limit))


def collate(examples: list[dict[str, Any]], pad_id: int, multiple: int = 1,
            limit: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch, rounded up to `multiple` but not past `limit` (right padding)."""
    if "position_ids" in examples[0]:
        return collate_packed(examples, pad_id, multiple, limit)
    longest = padded_length(max(len(e["input_ids"]) for e in examples), multiple, limit)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels: torch.Tensor | None = None
    if "labels" in examples[0]:
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        mask[row, :n] = 1
        if labels is not None:
            labels[row, :n] = torch.tensor(example["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def collate_packed(rows: list[dict[str, Any]], pad_id: int, multiple: int = 1,
                   limit: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows (train/packing.py): no attention mask, so transformers derives the block-diagonal one from
    position_ids; a short row's tail is one more segment of its own (positions from 0, no targets)."""
    longest = padded_length(max(len(r["input_ids"]) for r in rows), multiple, limit)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for n, row in enumerate(rows):
        size = len(row["input_ids"])
        ids[n, :size] = torch.tensor(row["input_ids"])
        labels[n, :size] = torch.tensor(row["labels"])
        positions[n, :size] = torch.tensor(row["position_ids"])
        positions[n, size:] = torch.arange(longest - size)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device. To a GPU from pinned memory without blocking: a copy from pageable memory
    makes the host wait until the GPU has run everything queued before it, once per micro-batch. (torch's pinned
    allocator keeps the buffer until the copy is done.)"""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: to_device(v, device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the model's forward takes from a collated batch (labels stay out: the loss is ours)."""
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if "position_ids" in inputs:
        # transformers derives the packed mask only without a KV cache; with one (the default) examples would leak.
        inputs["use_cache"] = False
    return inputs


def eval_batches(count: int, lengths: list[int], batch_size: int, world: int, rank: int) -> list[list[int]]:
    """Sorted by length (fast), sharded across ranks; results are summed across ranks afterwards."""
    mine = sorted(range(rank, count, world), key=lambda i: lengths[i])
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
