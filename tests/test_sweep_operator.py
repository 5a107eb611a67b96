"""FineTuneSweeps on the real control plane: the chart's operator runs each trial as a FineTuneJob the sweep owns,
the scripted trainer decides what each trial's pod reports and how it ends (tests/scripted_trainer.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune.sweep import search
from kubetune.sweep.spec import parse_sweep
from tests.operator_harness import NS, Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer

TEMPLATE = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "evaluation": {"everySteps": 2},
    "output": {"uri": "s3://models-out/sweep/"},
    "storage": {"endpoint": "http://minio.storage:9000", "secretRef": "s3-credentials"},
    "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
}
RATES = [1e-4, 1e-3, 1e-2]


def sweep_doc(name: str, **spec: Any) -> dict[str, Any]:
    body = {"template": json.loads(json.dumps(TEMPLATE)),
            "parameters": [{"path": "hyperparameters.learningRate", "values": RATES}], "algorithm": "grid", **spec}
    return {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.SWEEP_KIND,
            "metadata": {"name": name, "namespace": NS}, "spec": body}


@pytest.fixture
def sweeps(api: Api) -> Iterator[list[str]]:
    """Sweeps a test created, deleted afterwards with their trials (the garbage collector's work)."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            api.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                       contract.SWEEP_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        wait_for(f"{name}'s trials gone", lambda n=name: not trials(api, n), timeout=60)  # type: ignore[misc]


def create(api: Api, names: list[str], doc: dict[str, Any]) -> None:
    names.append(doc["metadata"]["name"])
    api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.SWEEP_PLURAL,
                                               doc)


def sweep_status(api: Api, name: str) -> dict[str, Any]:
    found = api.custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                    contract.SWEEP_PLURAL, name)
    return found.get("status") or {}


def trials(api: Api, sweep: str) -> dict[str, dict[str, Any]]:
    found = api.custom.list_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                     label_selector=f"{contract.LABEL_SWEEP}={sweep}")["items"]
    return {t["metadata"]["name"]: t for t in found}


def sweep_events(api: Api, name: str) -> list[str]:
    return [e["reason"] for e in api.events(name) if e["involvedObject"]["kind"] == contract.SWEEP_KIND]


def run_trial(trainer: ScriptedTrainer, api: Api, operator: ChartOperator, trial: str,
              curve: list[tuple[int, float]], metric: str = "accuracy", test: float = 0.8) -> None:
    """The trial's pod reports each validation value (seen by the operator's scrape), then succeeds."""
    role = f"{trial}-0-0"
    wait_for(f"pod {role} running", lambda: trainer.started(role), operator=operator)
    total = curve[-1][0]
    for step, value in curve:
        evals = {"eval_loss": value} if metric == "loss" else {metric: value}
        trainer.report(role, step=step, total=total, loss=0.5, **evals)  # type: ignore[arg-type]
        key = "eval" + metric.title()
        wait_for(f"{trial} at step {step}", lambda s=step, k=key, v=value: (  # type: ignore[misc]
            api.status(trial).get("progress", {}).get("step") == s
            and api.status(trial).get("metrics", {}).get(k) == v), timeout=90, operator=operator)
    last = curve[-1][1]
    trainer.exit(role, 0, {"outcome": "Succeeded", "exitCode": 0, "step": total, "totalSteps": total,
                           "outputUri": f"s3://models-out/sweep/{trial}/", "test": {metric: test},
                           "final": {"validation": {f"eval_{metric}": last}}})


def test_grid_sweep_runs_each_trial_as_an_owned_job_and_picks_the_best(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, sweeps: list[str]) -> None:
    create(api, sweeps, sweep_doc("grid", objective={"metric": "eval_accuracy"}))
    curves = {"grid-0": [(2, 0.6), (4, 0.7)], "grid-1": [(2, 0.8), (4, 0.9)], "grid-2": [(2, 0.55), (4, 0.5)]}
    for index, (trial, curve) in enumerate(curves.items()):
        wait_for(f"{trial} created", lambda t=trial: t in trials(api, "grid"), operator=operator)  # type: ignore[misc]
        assert len(trials(api, "grid")) == index + 1  # parallelism 1: one at a time
        run_trial(trainer, api, operator, trial, curve, test=0.7 + index / 100)
    wait_for("Succeeded", lambda: sweep_status(api, "grid").get("phase") == "Succeeded", operator=operator)
    status = sweep_status(api, "grid")
    assert [(t["name"], t["state"], t["objective"], t["steps"]) for t in status["trials"]] == [
        ("grid-0", "Succeeded", 0.7, 4), ("grid-1", "Succeeded", 0.9, 4), ("grid-2", "Succeeded", 0.55, 4)]
    assert [t["parameters"] for t in status["trials"]] == [{"hyperparameters.learningRate": r} for r in RATES]
    assert status["trials"][1]["curve"] == [[2, 0.8], [4, 0.9]]
    assert status["best"] == {"name": "grid-1", "parameters": {"hyperparameters.learningRate": 1e-3},
                              "objective": 0.9, "steps": 4, "outputUri": "s3://models-out/sweep/grid-1/",
                              "test": {"accuracy": 0.71}}
    assert status["metric"] == "eval_accuracy" and status["trialCount"] == 3 and status["running"] == 0
    owned = trials(api, "grid")
    uid = api.custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                  contract.SWEEP_PLURAL, "grid")["metadata"]["uid"]
    for index, rate in enumerate(RATES):
        job = owned[f"grid-{index}"]
        assert job["metadata"]["ownerReferences"][0]["uid"] == uid
        assert job["spec"]["hyperparameters"]["learningRate"] == rate
        assert job["spec"]["output"]["uri"] == f"s3://models-out/sweep/grid-{index}/"
        assert job["spec"]["evaluation"]["metric"] == "eval_accuracy"
    reasons = sweep_events(api, "grid")
    assert reasons.count("TrialCreated") == 3 and reasons.count("TrialSucceeded") == 3 and "Succeeded" in reasons
    cluster = operator.cluster.run("kubectl", "get", "fts", "grid", "-n", NS).stdout
    assert cluster.split()[:5] == ["NAME", "TRIALS", "RUNNING", "BEST", "METRIC"], cluster
    assert cluster.split()[6:10] == ["grid", "3", "0", "0.9"], cluster
    # Deleting the sweep deletes its trials (the sweeps fixture waits for the garbage collector).


def test_median_rule_stops_a_trial_that_is_behind_and_frees_its_gpu(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, sweeps: list[str]) -> None:
    doc = sweep_doc("prune", earlyStopping={"startupTrials": 2})
    doc["spec"]["template"]["resources"]["gpusPerNode"] = 1  # the one GPU node: trials take turns on its GPU
    create(api, sweeps, doc)
    run_trial(trainer, api, operator, "prune-0", [(2, 0.6), (4, 0.5)], metric="loss")
    wait_for("prune-1", lambda: "prune-1" in trials(api, "prune"), operator=operator)
    run_trial(trainer, api, operator, "prune-1", [(2, 0.55), (4, 0.45)], metric="loss")
    wait_for("prune-2 running", lambda: trainer.started("prune-2-0-0"), operator=operator)
    trainer.report("prune-2-0-0", step=2, total=4, loss=3.0, eval_loss=2.5)  # worse than 0.6 and 0.55 at step 2
    wait_for("prune-2 deleted", lambda: "prune-2" not in trials(api, "prune"), timeout=30, operator=operator)
    wait_for("its pod gone", lambda: not api.core.list_namespaced_pod(
        NS, label_selector=f"{contract.LABEL_JOB_NAME}=prune-2").items, timeout=30, operator=operator)
    wait_for("Succeeded", lambda: sweep_status(api, "prune").get("phase") == "Succeeded", operator=operator)
    status = sweep_status(api, "prune")
    pruned = status["trials"][2]
    assert pruned["state"] == "Pruned" and pruned["steps"] == 2 and "objective" not in pruned, pruned
    assert "eval_loss 2.5 by step 2 is worse than the median 0.575" in pruned["message"], pruned
    assert status["best"]["name"] == "prune-1" and status["best"]["objective"] == 0.45
    assert "TrialPruned" in sweep_events(api, "prune")


def test_an_operator_restart_neither_duplicates_nor_loses_a_trial(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, sweeps: list[str]) -> None:
    doc = sweep_doc("restart", algorithm="random", seed=7, maxTrials=3, parallelism=2,
                    parameters=[{"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-2, "scale": "log"},
                                {"path": "method.lora.r", "values": [4, 8, 16]}])
    create(api, sweeps, doc)
    wait_for("two trials running", lambda: trainer.started("restart-0-0-0") and trainer.started("restart-1-0-0"),
             operator=operator)
    before = {n: t["metadata"]["annotations"][contract.ANNOTATION_PARAMETERS] for n, t in
              trials(api, "restart").items()}
    assert sorted(before) == ["restart-0", "restart-1"]
    operator.kill()
    trainer.exit("restart-0-0-0", 0, {"outcome": "Succeeded", "exitCode": 0, "step": 4, "totalSteps": 4,
                                      "final": {"validation": {"eval_loss": 0.4}}})  # ends while no operator runs
    operator.wait_ready()
    wait_for("the third trial", lambda: trainer.started("restart-2-0-0"), timeout=60, operator=operator)
    after = trials(api, "restart")
    assert sorted(after) == ["restart-0", "restart-1", "restart-2"]
    assert {n: after[n]["metadata"]["annotations"][contract.ANNOTATION_PARAMETERS] for n in before} == before
    for role in ("restart-1-0-0", "restart-2-0-0"):
        trainer.exit(role, 0, {"outcome": "Succeeded", "exitCode": 0, "final": {"validation": {"eval_loss": 0.5}}})
    wait_for("Succeeded", lambda: sweep_status(api, "restart").get("phase") == "Succeeded", operator=operator)
    status = sweep_status(api, "restart")
    assert [t["name"] for t in status["trials"]] == ["restart-0", "restart-1", "restart-2"]
    assert status["best"]["name"] == "restart-0" and status["best"]["objective"] == 0.4
    # The same seed picks the same trials: what the cluster ran is what the search asks for from scratch.
    spec = parse_sweep(doc).spec
    expected, records = [], []
    for index in range(3):
        parameters = search.next_parameters(spec, records)
        expected.append(parameters)
        records.append({"name": f"t{index}", "index": index, "parameters": parameters, "state": "Running"})
    assert [t["parameters"] for t in status["trials"]] == expected
    assert len({json.dumps(p, sort_keys=True) for p in expected}) == 3
    assert sweep_events(api, "restart").count("TrialCreated") == 3


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"parameters": [{"path": "hyperparameters.learnignRate", "values": [1e-3]}]}, "spec.parameters[0].path",
     "Unsupported value"),
    ({"parameters": [{"path": "hyperparameters.learningRate", "min": 1e-2, "max": 1e-4}]}, "spec.parameters[0]",
     "min: must be below max"),
    ({"objective": {"metric": "eval_perplexity"}}, "spec", "objective.metric"),
    ({"maxTrials": 0}, "spec.maxTrials", "should be greater than or equal to 1"),
])
def test_the_api_server_refuses_bad_sweeps_naming_the_field(api: Api, operator: ChartOperator, change: dict[str, Any],
                                                           field: str, words: str) -> None:
    doc = sweep_doc("bad")
    doc["spec"].update(change)
    with pytest.raises(ApiException) as refused:
        api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                   contract.SWEEP_PLURAL, doc)
    assert refused.value.status == 422 and field in refused.value.body and words in refused.value.body, \
        refused.value.body
