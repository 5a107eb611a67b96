"""End to end on one machine: a real MiniLM and a tiny GPT-2 fine-tuned through `kubetune run`."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.cli import main
from kubetune.jobfile import write_job
from kubetune.storage.manifest import sha256_file
from tests.fixtures_models import causal_job, classification_job


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))


def run_job(doc: dict[str, Any], tmp_path: Path) -> int:
    return main(["run", str(write_job(doc, tmp_path / "job.yaml"))])


def outputs(out: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return (json.loads((out / "manifest.json").read_text()), json.loads((out / "metrics.json").read_text()),
            json.loads((out / "run.json").read_text()))


def test_lora_classification_outputs_load_and_predict_like_the_trained_model(
    tmp_path: Path, minilm_path: Path, reviews_subset: Path
) -> None:
    out = tmp_path / "out"
    doc = classification_job("lora-cls", minilm_path, reviews_subset, out,
                             hyperparameters={"maxSteps": None, "epochs": 3, "batchSize": 8,
                                              "learningRate": 2e-3})
    assert run_job(doc, tmp_path) == 0
    manifest, metrics, run = outputs(out)

    # manifest.json vouches for every file, with the right size and sha256.
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
               and not p.relative_to(out).as_posix().startswith("checkpoints/") and p.name != "manifest.json"}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert entry["size"] == (out / path).stat().st_size and entry["sha256"] == sha256_file(out / path)
    assert {"adapter/adapter_config.json", "merged/model.safetensors", "README.md"} <= set(listed)

    # The run learned something: better than the untrained head on the same test split.
    assert metrics["test"]["accuracy"] > metrics["baseTest"]["accuracy"]
    assert metrics["test"]["accuracy"] >= 0.7
    assert len(metrics["test"]["confusion_matrix"]) == 2
    assert run["data"]["splitSizes"] == {"train": 168, "validation": 36, "test": 36}
    assert run["data"]["files"][0]["sha256"] == sha256_file(reviews_subset)
    assert run["packages"]["torch"] == importlib.metadata.version("torch")  # a CUDA wheel's __version__ adds +cu130
    assert run["seed"] == 42 and run["hardware"]["device"] == "cpu"
    assert 0 < metrics["trainableParameters"] < metrics["totalParameters"] / 50

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    texts = ["Stopped working after a week and support ignored me.", "Absolutely love it, best purchase this year."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(**batch).logits, merged(**batch).logits, atol=1e-4, rtol=1e-4)
    assert merged.config.id2label == {0: "negative", 1: "positive"}

    # The merged model reproduces the trainer's reported test accuracy on the same split.
    from kubetune.data import prepare_data
    from kubetune.jobfile import load_job

    spec = load_job(tmp_path / "job.yaml").spec
    test = prepare_data(spec, {"train": reviews_subset, "validation": None, "test": None}).test
    enc = tokenizer([r["text"] for r in test], return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        predicted = merged(**enc).logits.argmax(-1).tolist()
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test, strict=True)) / len(test)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=2 / len(test))


@pytest.mark.parametrize(("method", "expect_all"), [({"type": "full"}, True),
                                                    ({"type": "partial", "partial": {"trainLastLayers": 2}}, False),
                                                    ({"type": "partial", "partial": {"trainModules": ["pooler"]}},
                                                     False)])
def test_full_and_partial_methods(tmp_path: Path, minilm_path: Path, reviews_subset: Path,
                                  method: dict[str, Any], expect_all: bool) -> None:
    out = tmp_path / "out"
    doc = classification_job("methods", minilm_path, reviews_subset, out, method=method,
                             hyperparameters={"learningRate": 5e-5, "maxSteps": 3})
    assert run_job(doc, tmp_path) == 0
    manifest, metrics, _ = outputs(out)
    assert (metrics["trainableParameters"] == metrics["totalParameters"]) is expect_all
    assert metrics["trainableParameters"] > 768  # the head always trains
    assert not any(f["path"].startswith("adapter/") for f in manifest["files"])
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out / "merged").config.num_labels == 2


def test_partial_last_layers_trains_exactly_those_layers(minilm_path: Path) -> None:
    from kubetune.spec import FineTuneJobSpec
    from kubetune.train.model import build_model

    spec = FineTuneJobSpec.model_validate(classification_job(
        "p", minilm_path, "x.jsonl", "out", method={"type": "partial", "partial": {"trainLastLayers": 2}})["spec"])
    model, counts = build_model(spec, minilm_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("bert.encoder.layer.5.") for n in trainable)
    assert any(n.startswith("bert.encoder.layer.4.") for n in trainable)
    assert not any(n.startswith(("bert.encoder.layer.3.", "bert.embeddings.")) for n in trainable)
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert counts.trainable < counts.total


@pytest.mark.parametrize("shape", ["prompt-completion", "messages"])
def test_causal_lm_lora_trains_on_completions(tmp_path: Path, tiny_gpt2: Path, shape: str) -> None:
    from kubetune.samples import INSTRUCTIONS, sample_path

    rows = [json.loads(line) for line in sample_path(INSTRUCTIONS).read_text().splitlines()]
    chosen = [r for r in rows if ("messages" in r) == (shape == "messages")]
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    out = tmp_path / "out"
    # The tiny model starts from random weights: a high learning rate shows learning within a few steps.
    doc = causal_job("llm", tiny_gpt2, data, out, method={"type": "lora", "lora": {"r": 16, "alpha": 32}},
                     hyperparameters={"maxSteps": 12, "learningRate": 3e-2}, evaluation={"everySteps": 6})
    assert run_job(doc, tmp_path) == 0
    _, metrics, _ = outputs(out)
    assert metrics["test"]["perplexity"] < metrics["baseTest"]["perplexity"]
    first, last = metrics["trainLoss"][:3], metrics["trainLoss"][-3:]
    assert sum(x["loss"] for x in last) < sum(x["loss"] for x in first)
    assert [v["step"] for v in metrics["validation"]] == [6, 12]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), out / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)


def test_same_seed_same_losses(tmp_path: Path, minilm_path: Path, reviews_subset: Path) -> None:
    losses = []
    for run in ("a", "b"):
        out = tmp_path / run
        doc = classification_job(f"seed-{run}", minilm_path, reviews_subset, out, hyperparameters={"maxSteps": 4})
        assert run_job(doc, tmp_path) == 0
        losses.append([x["loss"] for x in outputs(out)[1]["trainLoss"]])
    assert losses[0] == losses[1]


def test_early_stopping_and_best_model(tmp_path: Path, minilm_path: Path, reviews_subset: Path) -> None:
    out = tmp_path / "out"
    # A learning rate too small to move the metric: no evaluation improves on the first one.
    doc = classification_job("early", minilm_path, reviews_subset, out,
                             hyperparameters={"maxSteps": 20, "learningRate": 1e-12},
                             evaluation={"everySteps": 2, "metric": "eval_accuracy", "earlyStoppingPatience": 2})
    assert run_job(doc, tmp_path) == 0
    metrics = outputs(out)[1]
    assert metrics["stoppedEarly"] is True
    assert metrics["steps"] == 6 and metrics["bestStep"] == 6  # equal metric and loss: the later step wins
    assert [v["step"] for v in metrics["validation"]] == [2, 4, 6]


def test_plain_log_lines_without_a_terminal(tmp_path: Path, minilm_path: Path, reviews_subset: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    doc = classification_job("logs", minilm_path, reviews_subset, tmp_path / "out", hyperparameters={"maxSteps": 2})
    assert run_job(doc, tmp_path) == 0
    err = capfd.readouterr().err
    assert "step 2/2" in err and "samples/s" in err and "eta" in err
