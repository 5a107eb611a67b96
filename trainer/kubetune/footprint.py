"""What a job's pods need that its spec does not say: the checkpoint a pod uploads on SIGTERM (its grace period)
and the base model it downloads (its work volume's disk), from the memory plan.

The pre-flight (`kubetune validate --deep`) has read the model's config, so it computes this and leaves it in its
termination message; the operator sizes the trainer pods from it (builders.py). Importing this never imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kubetune import contract
from kubetune.memory import MemoryPlan
from kubetune.spec import FineTuneJobSpec
from kubetune.train.interrupts import WORKER_SHARE

# A checkpoint holds each trainable parameter's fp32 weight, AdamW's two fp32 moments and the best model's copy.
CHECKPOINT_BYTES_PER_TRAINABLE = 16
# One pod's save-and-upload rate: a 512 MiB upload to S3 measured 99-100 MB/s here (docs/benchmarks.md, the S3
# server's own ceiling). Pods next to their object store often do better; a grace longer than needed costs only
# when the trainer hangs, and then its watchdog still ends it at WORKER_SHARE of its budget.
UPLOAD_BYTES_PER_SECOND = 100 * 10**6
STOP_SECONDS = contract.DEFAULT_GRACE_SECONDS  # reaching the next update boundary, state.pt, the manifest
WORK_HEADROOM_BYTES = 10 * 2**30  # data files, tokenized rows, library caches, logs
STORED_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}  # config.json's torch_dtype


@dataclass(frozen=True)
class Footprint:
    model_bytes: int       # the base model's weights as stored
    checkpoint_bytes: int  # what the busiest pod uploads per checkpoint (rank 0's all under ddp, its shards under fsdp)

    def to_json(self) -> dict[str, int]:
        return {"modelBytes": self.model_bytes, "checkpointBytes": self.checkpoint_bytes}

    @classmethod
    def from_termination(cls, message: str | None) -> Footprint | None:
        """The pre-flight's termination message ({"footprint": {...}}), None when it has none."""
        try:
            found = json.loads(message or "").get("footprint") or {}
            return cls(int(found["modelBytes"]), int(found["checkpointBytes"]))
        except (ValueError, AttributeError, KeyError, TypeError):
            return None

    def trainer_grace_seconds(self) -> int:
        """The trainer's SIGTERM budget: its workers give up at WORKER_SHARE of it, so the save must fit in that."""
        save = STOP_SECONDS + self.checkpoint_bytes / UPLOAD_BYTES_PER_SECOND
        return max(contract.DEFAULT_GRACE_SECONDS, math.ceil(save / WORKER_SHARE))

    def work_bytes(self) -> int:
        """The work volume: the base model and merged/ beside it, one checkpoint staged and one fetched to resume."""
        return 2 * self.model_bytes + 2 * self.checkpoint_bytes + WORK_HEADROOM_BYTES


def of_plan(spec: FineTuneJobSpec, plan: MemoryPlan, config: dict[str, Any]) -> Footprint:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    checkpoint = plan.trainable * CHECKPOINT_BYTES_PER_TRAINABLE
    if plan.strategy == "fsdp":  # every rank uploads its own shards, a pod's ranks at once
        checkpoint = checkpoint * max(spec.resources.gpus_per_node, 1) // plan.world_size
    return Footprint(plan.parameters * STORED_BYTES.get(dtype, 4), checkpoint)
