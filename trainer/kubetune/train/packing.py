"""Sequence packing for causal LM: examples concatenated into rows of at most `max_length` tokens, no padding.

Each row carries position ids that restart at 0 for every example. Called with `position_ids` and no
`attention_mask`, transformers (masking_utils.find_packed_sequence_indices) reads the restarts and builds a
block-diagonal causal mask, so no token attends across an example boundary; tests/test_packing.py checks that
a packed row gives each example the loss it has alone.

Rows are filled best-fit decreasing: the longest example first, each into the fullest row it still fits.
That wastes less than greedy filling in reading order (which closes a row at the first example that does not
fit), is deterministic (ties keep reading order) and runs in O(n log n); the epoch's seeded shuffle then
orders the rows, so packing itself needs no seed and a resumed run rebuilds exactly the same rows.
"""

from __future__ import annotations

import bisect
from typing import Any

from kubetune.data.encode import IGNORE_INDEX

Record = dict[str, Any]


def packing_enabled(packing: bool | None, task: str) -> bool:
    """data.packing: null means on for causal LM; classification never packs (the spec refuses true)."""
    return task == "causal-lm" and packing is not False


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices per row, best-fit decreasing; every length must be at most max_length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep reading order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted: the fullest fitting row comes first
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            room, row = max_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def pack_examples(examples: list[Record], max_length: int) -> list[Record]:
    """Packed rows: input_ids, labels, position_ids and the number of examples in the row."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_length)
    packed: list[Record] = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            example = examples[i]
            ids += example["input_ids"]
            # The first token is never a target alone; packed, it must not be predicted from the previous example.
            labels += [IGNORE_INDEX, *example["labels"][1:]]
            positions += range(len(example["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "examples": len(members)})
    return packed
