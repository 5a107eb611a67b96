"""`kubetune predict` and `kubetune evaluate` on the outputs of real runs, driven as a user does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune.jobfile import write_job
from tests.fixtures_models import classification_job
from tests.trainer_runs import KUBETUNE, Trainer, gpt2_job, split_instructions


def kubetune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KUBETUNE, *args], input=stdin, capture_output=True, text=True, timeout=300,
                          env={**Trainer(Path("."), Path(".")).env()})


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path,
                  reviews_subset: Path) -> dict[str, Any]:
    """A short MiniLM + LoRA run with its own test file, so `evaluate` can score the same rows."""
    root = tmp_path_factory.mktemp("sentiment")
    rows = reviews_subset.read_text().splitlines()
    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text("\n".join(rows[::2][:100] + rows[1::2][:100]) + "\n")
    test.write_text("\n".join(rows[::2][100:] + rows[1::2][100:]) + "\n")
    doc = classification_job("predict-sentiment", minilm_path, train, root / "out",
                             data={"test": str(test), "split": {"train": 0.85, "validation": 0.15, "test": 0.0}})
    trainer = Trainer(write_job(doc, root / "job.yaml"), root / "state")
    code, log = trainer.run()
    assert code == 0, log
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    return {"out": root / "out", "test": test, "metrics": metrics, "root": root}


def test_evaluate_reproduces_the_runs_own_test_metrics(sentiment_run: dict[str, Any]) -> None:
    result = kubetune("evaluate", str(sentiment_run["out"]), "--data", str(sentiment_run["test"]), "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    expected = sentiment_run["metrics"]["test"]
    assert scored["examples"] == expected["examples"]
    assert scored["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("accuracy", "f1", "precision", "recall"):
        assert scored[key] == expected[key], key
    # merged/ folds LoRA into the weights: the same function, summed in another order (fp32 rounding).
    assert scored["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_predict_prints_labels_and_writes_jsonl(sentiment_run: dict[str, Any]) -> None:
    out = str(sentiment_run["out"])
    typed = kubetune("predict", out, "great product, works perfectly", "broke after one day, waste of money")
    assert typed.returncode == 0, typed.stderr
    lines = typed.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)

    test_rows = [json.loads(line) for line in sentiment_run["test"].read_text().splitlines()]
    target = sentiment_run["root"] / "predictions.jsonl"
    batch = kubetune("predict", out, "--input", str(sentiment_run["test"]), "--output", str(target))
    assert batch.returncode == 0, batch.stderr
    predictions = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(predictions) == len(test_rows)
    for row in predictions:
        assert set(row["probabilities"]) == {"negative", "positive"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    # The predicted labels are the ones the run's confusion matrix counted.
    matrix = sentiment_run["metrics"]["test"]["confusion_matrix"]
    predicted_positive = sum(r["label"] == "positive" for r in predictions)
    assert predicted_positive == matrix[0][1] + matrix[1][1]

    piped = kubetune("predict", out, stdin="great product\nterrible\n")
    assert piped.returncode == 0, piped.stderr
    assert [json.loads(line)["text"] for line in piped.stdout.splitlines()] == ["great product", "terrible"]


def test_predict_generates_with_a_causal_lm(tmp_path: Path, tiny_gpt2: Path) -> None:
    data = split_instructions(tmp_path / "data")
    doc = gpt2_job("predict-llm", tiny_gpt2, data, str(tmp_path / "out"), batch_size=16, epochs=1, every_steps=100)
    code, log = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == 0, log
    result = kubetune("predict", str(tmp_path / "out"), "Name a colour", "--max-new-tokens", "5", "--output",
                      str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["prompt"] == "Name a colour" and isinstance(row["completion"], str)
    scored = kubetune("evaluate", str(tmp_path / "out"), "--data", str(data["test"]), "--json")
    assert scored.returncode == 0, scored.stderr
    expected = json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]
    assert json.loads(scored.stdout)["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_predict_refuses_an_unverified_output(sentiment_run: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "not-an-output"
    empty.mkdir()
    result = kubetune("predict", str(empty), "hello")
    assert result.returncode == 2
    assert "manifest.json" in result.stderr and "Traceback" not in result.stderr

    # A file changed after publishing no longer matches its manifest: refused, naming the file.
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(sentiment_run["out"]), str(tampered)], check=True)
    (tampered / "metrics.json").write_text("{}")
    result = kubetune("predict", str(tampered), "hello")
    assert result.returncode == 2, result.stderr
    assert "metrics.json" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("does not match its manifest.json") == 1, result.stderr  # said once, not twice

    # Not a count of tokens: argparse's usage error (exit 2), not transformers' ValueError traceback (exit 1).
    for bad in ("0", "-5", "many"):
        result = kubetune("predict", str(sentiment_run["out"]), "hello", "--max-new-tokens", bad)
        assert result.returncode == 2 and "--max-new-tokens" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

    missing = kubetune("evaluate", str(sentiment_run["out"]), "--data", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr
