"""The data position in samples: an epoch's batch plan resumed after any number of consumed examples, on any
world size.

The epoch's batch order (batching.epoch_batches with one rank) does not depend on the world size; rank r of W
takes every W-th batch of it. So "the first N examples of the epoch" names the same examples whatever W was,
and a run resumed on another world size skips exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.train.batching import epoch_batches


@dataclass
class EpochPlan:
    batches: list[list[int]]  # this rank's remaining micro-batches, in order
    consumed: list[int]       # examples of the epoch consumed by every rank together after each update


def epoch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, world: int, rank: int, accum: int,
               skip: int) -> EpochPlan:
    """What rank trains on in `epoch` after the first `skip` examples of the epoch were consumed."""
    order = epoch_batches(lengths, batch_size, seed, epoch, 1, 0)
    done, start = 0, 0
    while done < skip and start < len(order):
        done += len(order[start])
        start += 1
    if done != skip:
        raise RuntimeError(f"checkpoint position {skip} examples does not end a batch of epoch {epoch}")
    rest = order[start:]
    usable = len(rest) - len(rest) % world  # every rank runs the same number of micro-batches
    consumed, total = [], skip
    for first in range(0, usable, accum * world):
        total += sum(len(b) for b in rest[first : min(first + accum * world, usable)])
        consumed.append(total)
    return EpochPlan(rest[rank:usable:world], consumed)
