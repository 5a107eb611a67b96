"""The trainer's termination message: what the operator turns into status when the pod ends (issue 26 item 3,
issue 32 item 3). Kubernetes keeps 4 KiB of it; the fields the operator reads must survive that limit."""

from __future__ import annotations

import json
import math

from kubetune import contract
from kubetune.train.entry import TERMINATION_LOG_LIMIT, termination_message

RESULT = {  # what a finished recipe returns, with the lists a long run accumulates
    "outcome": "Succeeded", "exitCode": contract.EXIT_OK, "message": "model written",
    "outputUri": "s3://models-out/reviews/", "lastCheckpoint": "s3://models-out/reviews/checkpoints/x/checkpoint-70/",
    "step": 70, "totalSteps": 70, "epochsCompleted": 5,
    "test": {"accuracy": 0.85, "f1": 0.84, "confusion_matrix": [[10, 2], [1, 11]], "loss": math.nan},
    "trainLoss": [{"step": s, "loss": 1.0 / s} for s in range(1, 71)],
    "validation": [{"step": s, "epoch": s / 14, "eval_loss": 0.5 / s, "eval_accuracy": 0.6 + s / 200}
                   for s in (14, 28, 42, 56, 70)],
    "quality": {"metric": "accuracy", "base": 0.53, "tuned": 0.85, "delta": 0.32, "improved": True},
}


def test_the_fields_the_operator_reads_are_there() -> None:
    sent = json.loads(termination_message(RESULT))
    assert {k: sent[k] for k in ("outcome", "exitCode", "outputUri", "lastCheckpoint", "step", "totalSteps")} == {
        k: RESULT[k] for k in ("outcome", "exitCode", "outputUri", "lastCheckpoint", "step", "totalSteps")}
    assert sent["test"] == {"accuracy": 0.85, "f1": 0.84}  # numbers only, and no NaN (the API server refuses it)
    assert sent["final"] == {"trainLoss": 1.0 / 70, "epoch": 5,
                             "validation": {"eval_loss": 0.5 / 70, "eval_accuracy": 0.6 + 70 / 200}}
    assert sent["quality"]["improved"] is True


def test_a_long_message_is_cut_and_the_fields_stay() -> None:
    long = {**RESULT, "outcome": "Failed", "exitCode": contract.EXIT_FAILURE, "message": "Traceback ... " * 2000}
    text = termination_message(long)
    assert len(text.encode()) <= TERMINATION_LOG_LIMIT
    sent = json.loads(text)
    assert sent["message"].endswith("...") and sent["outputUri"] == RESULT["outputUri"] and sent["final"]
