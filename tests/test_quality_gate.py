"""Issue 28, items 1 and 2: base against fine-tuned on the test split is a first-class result, and
`evaluation.minImprovement` keeps a model that misses it from being published (exit 3).

Real runs of `kubetune run` on the tiny GPT-2 (full fine-tuning, a handful of steps): a learning rate of 1.0
ruins it (worse than its base), 3e-3 improves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune import contract
from kubetune.jobfile import write_job
from kubetune.spec import FineTuneJob
from kubetune.train.entry import termination_message
from kubetune.train.quality import compare, quality_metric
from tests.fixtures_models import causal_job, classification_job
from tests.trainer_runs import Trainer, split_instructions


def _job(tmp_path: Path, tiny_gpt2: Path, name: str, learning_rate: float, **evaluation: Any) -> Path:
    data = split_instructions(tmp_path / "data")
    doc = causal_job(name, tiny_gpt2, data["train"], tmp_path / "out", method={"type": "full"},
                     data={"validation": str(data["validation"]), "test": str(data["test"]), "packing": False},
                     hyperparameters={"learningRate": learning_rate, "batchSize": 16, "maxSteps": 4,
                                      "precision": "fp32"},
                     evaluation={"metric": "eval_loss", **evaluation})
    return write_job(doc, tmp_path / f"{name}.yaml")


def test_a_model_that_misses_min_improvement_is_not_published(tmp_path: Path, tiny_gpt2: Path) -> None:
    trainer = Trainer(_job(tmp_path, tiny_gpt2, "gated", 1.0, minImprovement=0.05), tmp_path / "state")
    code, log = trainer.run()
    assert code == contract.EXIT_NOT_IMPROVED == 3, log
    out = tmp_path / "out"
    # Nothing at the output's top: no manifest, no model; the report and curves in a folder named for why.
    assert not (out / contract.MANIFEST_NAME).exists() and not (out / contract.MERGED_DIR).exists()
    report = out / contract.NOT_IMPROVED_DIR
    assert {contract.METRICS_FILE, contract.CURVES_FILE, contract.MODEL_CARD, contract.RUN_FILE,
            contract.MANIFEST_NAME} <= {p.name for p in report.iterdir()}
    quality = json.loads((report / contract.METRICS_FILE).read_text())["quality"]
    assert quality["metric"] == "loss" and quality["tuned"] > quality["base"] and not quality["improved"]
    assert "Nothing was published" in (report / contract.MODEL_CARD).read_text()
    # The message names both numbers and the field; the termination message carries the verdict for the operator.
    assert "spec.evaluation.minImprovement" in log and f"{quality['base']:.4f}" in log and \
        f"{quality['tuned']:.4f}" in log and "Traceback" not in log
    result = trainer.result()
    assert result["reason"] == "NotImproved" and result["exitCode"] == 3
    assert result["quality"] == {**quality, "minImprovement": 0.05}
    assert result["outputUri"] == str(out) and Path(result["lastCheckpoint"]).is_absolute()


def test_an_ungated_worse_model_is_published_with_a_warning(tmp_path: Path, tiny_gpt2: Path) -> None:
    trainer = Trainer(_job(tmp_path, tiny_gpt2, "ungated", 1.0), tmp_path / "state")
    code, log = trainer.run()
    assert code == contract.EXIT_OK, log
    assert (tmp_path / "out" / contract.MANIFEST_NAME).is_file()
    quality = json.loads((tmp_path / "out" / contract.METRICS_FILE).read_text())["quality"]
    assert not quality["improved"] and quality["minImprovement"] is None
    assert "warning: the fine-tuned model is not better than its base" in log
    assert f"test loss: base {quality['base']:.4f} -> fine-tuned {quality['tuned']:.4f}" in log
    assert trainer.result()["quality"]["improved"] is False
    assert "NOT better than the base" in (tmp_path / "out" / contract.MODEL_CARD).read_text()


def test_a_model_that_meets_min_improvement_is_published(tmp_path: Path, tiny_gpt2: Path) -> None:
    trainer = Trainer(_job(tmp_path, tiny_gpt2, "better", 3e-3, minImprovement=0.01), tmp_path / "state")
    code, log = trainer.run()
    assert code == contract.EXIT_OK, log
    quality = trainer.result()["quality"]
    assert quality["improved"] and quality["base"] - quality["tuned"] >= 0.01 and quality["delta"] < 0
    assert "warning" not in log and "better than the base" in log
    card = (tmp_path / "out" / contract.MODEL_CARD).read_text()
    assert "| metric | base model | fine-tuned | difference |" in card and "meets evaluation.minImprovement" in card


def _spec(task: str = "causal-lm", **evaluation: Any) -> Any:
    maker = classification_job if task == "sequence-classification" else causal_job
    doc = maker("q", "s3://models/m/", "s3://data/t.jsonl", "s3://out/q/", evaluation=evaluation)
    return FineTuneJob.model_validate(doc).spec


def test_the_quality_metric_follows_the_task_and_evaluation_metric() -> None:
    assert quality_metric(_spec("sequence-classification")) == "accuracy"  # eval_loss: judged by its answers
    assert quality_metric(_spec("sequence-classification", metric="eval_f1")) == "f1"
    assert quality_metric(_spec()) == "loss"
    assert quality_metric(_spec(metric="eval_perplexity")) == "perplexity"


def test_compare_counts_the_improvement_in_the_metrics_direction() -> None:
    assert compare("accuracy", {"accuracy": 0.5}, {"accuracy": 0.8}, 0.3)["improved"]
    assert not compare("accuracy", {"accuracy": 0.5}, {"accuracy": 0.79}, 0.3)["improved"]
    lower = compare("loss", {"loss": 3.0}, {"loss": 2.5}, None)
    assert lower["improved"] and lower["delta"] == -0.5 and not lower["higherIsBetter"]
    assert not compare("loss", {"loss": 3.0}, {"loss": 3.0}, None)["improved"]  # a tie is not better
    assert compare("loss", {"loss": 3.0}, None, None) is None


def test_the_termination_message_leaves_out_numbers_the_api_server_refuses() -> None:
    quality = compare("perplexity", {"perplexity": float("inf")}, {"perplexity": 12.0}, None)
    sent = json.loads(termination_message({"outcome": "Succeeded", "exitCode": 0, "quality": quality}))
    assert sent["quality"] == {"metric": "perplexity", "tuned": 12.0, "higherIsBetter": False, "improved": True,
                               "minImprovement": None}


@pytest.mark.parametrize(("evaluation", "data", "message"), [
    ({"minImprovement": -0.1}, {}, "evaluation.minImprovement"),
    ({"minImprovement": 0.1}, {"split": {"train": 0.8, "validation": 0.2, "test": 0.0}},
     "evaluation.minImprovement: the gate compares base and fine-tuned on the test split"),
])
def test_min_improvement_is_checked(tmp_path: Path, evaluation: dict[str, Any], data: dict[str, Any],
                                    message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main as cli

    doc = classification_job("bad", "s3://models/m/", "s3://data/t.jsonl", "s3://out/q/", evaluation=evaluation,
                             data={"train": "s3://data/t.jsonl", **data})
    assert cli(["validate", str(write_job(doc, tmp_path / "bad.yaml"))]) == contract.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
