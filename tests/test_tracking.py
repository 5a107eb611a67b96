"""spec.tracking.mlflow against a real MLflow tracking server (the `mlflow` package, sqlite backend) on loopback:
a local sweep of two trials records a parent run with one child per trial, each holding the flattened spec, the
metric histories its own metrics.json has, the test metrics, the tags and the reports as artifacts. A tracking
server that is not there never fails, or holds up, a run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import contract, tracking
from kubetune.cli import main
from kubetune.jobfile import write_job
from kubetune.netutil import free_port
from kubetune.spec import MlflowSpec
from tests.fixtures_models import classification_job

EXPERIMENT = "kubetune-tests"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (folder / "server.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # migrations and imports: about 30 s on two busy cores
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}") \
                    from None
            time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)  # uvicorn's workers too
    process.wait(timeout=30)


def client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_a_sweep_is_a_parent_run_with_one_child_per_trial(tmp_path: Path, minilm_path: Path, reviews_subset: Path,
                                                          mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_STATE_DIR, str(tmp_path / "state"))
    template = classification_job("t", minilm_path, reviews_subset, tmp_path / "out", data={"maxSeqLength": 64},
                                  hyperparameters={"maxSteps": 4, "batchSize": 16}, evaluation={"everySteps": 2},
                                  tracking={"mlflow": {"uri": mlflow_server, "experiment": EXPERIMENT}})["spec"]
    template["output"]["mergeAdapter"] = False  # the adapter is enough here
    sweep = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "tracked"},
             "spec": {"template": template, "algorithm": "grid",
                      "parameters": [{"path": "hyperparameters.learningRate", "values": [1e-3, 3e-3]}]}}
    assert main(["sweep", str(write_job(sweep, tmp_path / "sweep.yaml"))]) == 0
    mlflow = client(mlflow_server)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    [parent] = mlflow.search_runs([experiment], filter_string="tags.`kubetune.parent` = 'tracked'")
    children = mlflow.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["tracked-0", "tracked-1"]
    for child in children:
        out = tmp_path / "out" / child.info.run_name
        metrics, run = (json.loads((out / name).read_text()) for name in (contract.METRICS_FILE, contract.RUN_FILE))
        data = child.data
        assert child.info.status == "FINISHED"
        assert float(data.params["hyperparameters.learningRate"]) == run["spec"]["hyperparameters"]["learningRate"]
        assert data.params["evaluation.metric"] == "eval_loss"
        assert data.params["model.task"] == "sequence-classification"
        history = mlflow.get_metric_history(child.info.run_id, "eval_loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["eval_loss"]) for r in metrics["validation"]]
        losses = mlflow.get_metric_history(child.info.run_id, "train_loss")
        assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in metrics["trainLoss"]]
        assert data.metrics["test_accuracy"] == metrics["test"]["accuracy"]
        assert data.metrics["base_test_accuracy"] == metrics["baseTest"]["accuracy"]
        assert data.tags["kubetune.job"] == child.info.run_name and data.tags["kubetune.namespace"] == "local"
        assert data.tags["kubetune.data.train.sha256"] == run["data"]["files"][0]["sha256"]
        assert data.tags["kubetune.version"] == run["packages"]["kubetune"] and "kubetune.model.sha256" in data.tags
        artifacts = {a.path for a in mlflow.list_artifacts(child.info.run_id)}
        assert artifacts == {"README.md", "run.json", "metrics.json", "training-curves.png"}


def test_a_tracking_server_that_is_not_there_never_fails_the_run(tmp_path: Path, minilm_path: Path,
                                                                 reviews_subset: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(contract.ENV_STATE_DIR, str(tmp_path / "state"))
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    doc = classification_job("untracked", minilm_path, reviews_subset, tmp_path / "out",
                             hyperparameters={"maxSteps": 2}, tracking={"mlflow": {"uri": gone}})
    doc["spec"]["output"]["mergeAdapter"] = False
    started = time.monotonic()
    assert main(["run", str(write_job(doc, tmp_path / "job.yaml"))]) == 0
    assert (tmp_path / "out" / contract.MANIFEST_NAME).exists()
    assert f"MLflow tracking at {gone} stopped (start: " in capfd.readouterr().err  # the trainer's log, once
    assert time.monotonic() - started < 120


def test_without_the_tracking_extra_tracking_is_off_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if kubetune[tracking] were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    job = yaml.safe_load(yaml.safe_dump(classification_job("j", "/m", "/d.jsonl", "/o")))
    from kubetune.jobfile import parse_job

    tracker = tracking.Tracker(MlflowSpec(uri="http://127.0.0.1:1"))
    with caplog.at_level(logging.WARNING, logger="kubetune.tracking"):
        tracker.start(parse_job(job), "digest", {})
        tracker.metrics(1, {"train_loss": 0.5}, now=True)
        tracker.close()
    assert not tracker.active and "pip install 'kubetune[tracking]'" in caplog.text


def test_trainer_pods_get_mlflow_credentials_by_reference_only() -> None:
    """The Secret's keys reach the trainer as secretKeyRefs (each optional: a token, or a user and password)."""
    from kubetune_operator import builders

    doc = classification_job("creds", "s3://models/m/", "s3://data/d.jsonl", "s3://out/o/",
                             tracking={"mlflow": {"uri": "http://mlflow.mlops:5000", "secretRef": "mlflow-login"}})
    doc["metadata"].update(namespace="ml", uid="u")
    job = builders.build_job(doc, image="trainer:1", service_account="default")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in contract.MLFLOW_SECRET_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-login", "key": key, "optional": True}
    plain = classification_job("plain", "s3://models/m/", "s3://data/d.jsonl", "s3://out/o/")
    plain["metadata"].update(namespace="ml", uid="u")
    names = {e["name"] for e in builders.build_job(plain, image="trainer:1", service_account="default")["spec"][
        "template"]["spec"]["containers"][0]["env"]}
    assert not names & set(contract.MLFLOW_SECRET_KEYS)
