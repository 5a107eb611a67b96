"""`kubetune run --dry-run`: a short sampled run that estimates the full job, and publishes no model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kubetune.jobfile import write_job
from tests.fixtures_models import classification_job
from tests.trainer_runs import Trainer

TOLERANCE = 0.30  # the bound on the time estimate


def test_dry_run_estimates_the_full_run_and_publishes_no_model(tmp_path: Path, minilm_path: Path,
                                                               reviews_subset: Path) -> None:
    out = tmp_path / "out"
    doc = classification_job("dry", minilm_path, reviews_subset, out,
                             hyperparameters={"batchSize": 16, "epochs": 3, "maxSteps": None, "precision": "fp32"},
                             dryRun={"fraction": 0.25, "maxSteps": 8})
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state")
    started = time.monotonic()
    code, log = trainer.run()
    dry_seconds = time.monotonic() - started
    assert code == 0, log
    assert "dry run: 8 steps" in log and "Not a finished model" in log
    # Only the report: no model, no manifest at the output's root, no checkpoints.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "dry-run/dry-run.json", "dry-run/manifest.json"]
    report = json.loads((out / "dry-run" / "dry-run.json").read_text())
    assert report["dryRun"] is True and report["steps"] == 8
    assert report["peakMemoryBytes"] > 0 and report["validation"]["loss"] > 0
    assert trainer.result()["dryRun"]["estimatedTrainSeconds"] == report["estimatedTrainSeconds"]

    # The same job for real, into the same output: the dry run's report is replaced by a model.
    del doc["spec"]["dryRun"]
    code, log = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["fullSteps"] == metrics["steps"] == metrics["totalSteps"]
    error = abs(report["estimatedTrainSeconds"] - metrics["trainSeconds"]) / metrics["trainSeconds"]
    print(f"dry run {dry_seconds:.0f} s; estimate {report['estimatedTrainSeconds']:.1f} s vs measured "
          f"{metrics['trainSeconds']:.1f} s of training ({error:.0%} off)")
    assert error <= TOLERANCE, (report, metrics["trainSeconds"])
    assert not (out / "dry-run").exists()
