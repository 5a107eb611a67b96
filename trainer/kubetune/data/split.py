"""Seeded train/validation/test split of the parts that have no file of their own."""

from __future__ import annotations

import math
import random
from typing import Any

from kubetune.errors import UserError

PARTS = ("train", "validation", "test")
Record = dict[str, Any]
TIE_ORDER = {"test": 0, "validation": 1, "train": 2}  # small parts win ties, else they round to nothing


def carve_fractions(fractions: dict[str, float], given: set[str]) -> dict[str, float]:
    """Fractions of the train source that go to each part, renormalised over the parts not given as files."""
    parts = ["train", *(p for p in ("validation", "test") if p not in given)]
    total = sum(fractions[p] for p in parts)
    return {p: fractions[p] / total for p in parts}


def _times(n: int, fraction: float) -> float:
    return round(n * fraction, 9)  # so 100 * 0.29 floors to 29, not 28


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to exactly `n`; ties go to test, then validation."""
    ideal = {p: _times(n, f) for p, f in fractions.items()}
    counts = {p: math.floor(v) for p, v in ideal.items()}
    by_remainder = sorted(fractions, key=lambda p: (counts[p] - ideal[p], TIE_ORDER[p]))
    for p in by_remainder[: n - sum(counts.values())]:
        counts[p] += 1
    return counts


def allocate_groups(sizes: dict[Any, int], fractions: dict[str, float]) -> dict[Any, dict[str, int]]:
    """Per-group counts that sum to each group's size while the part totals match `allocate` of the whole."""
    need_part = allocate(sum(sizes.values()), fractions)
    counts = {g: {p: math.floor(_times(n, f)) for p, f in fractions.items()} for g, n in sizes.items()}
    need_group = {g: n - sum(counts[g].values()) for g, n in sizes.items()}
    for g in counts:
        for p in fractions:
            need_part[p] -= counts[g][p]
    # the leftover units go to the cells with the largest remainders, as long as group and part both lack one
    cells = sorted(
        ((g, p) for g in sizes for p in fractions),
        key=lambda c: (counts[c[0]][c[1]] - _times(sizes[c[0]], fractions[c[1]]), TIE_ORDER[c[1]]),
    )
    for g, p in cells:
        if need_group[g] > 0 and need_part[p] > 0:
            counts[g][p] += 1
            need_group[g] -= 1
            need_part[p] -= 1
    for g in sizes:  # rare: the greedy pass left a group short; fill from parts still short (sums are equal)
        while need_group[g] > 0:
            p = max(fractions, key=lambda p: (need_part[p], -TIE_ORDER[p]))
            counts[g][p] += 1
            need_group[g] -= 1
            need_part[p] -= 1
    return counts


def split_records(
    records: list[Record], fractions: dict[str, float], seed: int, stratify: str | None = None
) -> dict[str, list[Record]]:
    """Split `records` by `fractions` (keys: parts); per class when `stratify` names the label key."""
    groups: dict[Any, list[Record]] = {}
    for record in records:
        groups.setdefault(record[stratify] if stratify else None, []).append(record)
    out: dict[str, list[Record]] = {p: [] for p in fractions}
    keys = sorted(groups, key=lambda k: (k is None, k))
    counts = allocate_groups({k: len(groups[k]) for k in keys}, fractions)
    for key in keys:
        group = list(groups[key])
        random.Random(f"{seed}:{key}").shuffle(group)  # seeded per class: one class does not move another
        start = 0
        for part, count in counts[key].items():
            out[part].extend(group[start : start + count])
            start += count
    for part in out:
        random.Random(f"{seed}:{part}").shuffle(out[part])  # mix classes so no part is ordered by label
    return out


def split_data(
    sources: dict[str, list[Record]],
    fractions: dict[str, float],
    seed: int,
    labels: list[str] | None,
) -> tuple[dict[str, list[Record]], list[str]]:
    """Carve the parts missing from `sources` out of train; returns all three parts and the carved names."""
    carve = carve_fractions(fractions, set(sources) - {"train"})
    carved = [p for p in carve if p != "train" and carve[p] > 0]
    parts = {p: sources.get(p, []) for p in PARTS}
    if carved:
        stratify = "label" if labels else None
        parts.update(split_records(sources["train"], {p: f for p, f in carve.items() if f > 0}, seed, stratify))
    if not parts["train"]:
        raise UserError(
            f"spec.data.split: the train split is empty ({len(sources['train'])} rows to split); add training data"
        )
    if labels and "test" in carved:
        present = {r["label"] for r in sources["train"]}
        missing = sorted(present - {r["label"] for r in parts["test"]})
        if missing:
            names = ", ".join(repr(labels[i]) for i in missing)
            which = f"class {names} has" if len(missing) == 1 else f"classes {names} have"
            raise UserError(
                f"spec.data.split: {which} no rows in the test split (test fraction "
                f"{fractions['test']}); add more data for it, raise spec.data.split.test, or give spec.data.test"
            )
    return parts, carved
