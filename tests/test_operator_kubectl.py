"""kubectl drives the real API server as a user would: apply an example with the server's validation on, get it
with the CRD's printer columns, describe it (its own events only), read its pods and logs, wait for Succeeded.
The operator is the chart's Deployment; the trainer pod runs the scripted image."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.cluster import KubeCluster
from tests.k8s_tools import binary
from tests.operator_harness import NS, Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "reviews-sentiment-s3.yaml"


def kubectl(kube: KubeCluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return kube.run("kubectl", "-n", NS, *args, check=False, input=stdin)


def test_kubectl_apply_get_describe_logs_and_wait_for_succeeded(kube: KubeCluster, operator: ChartOperator,
                                                                api: Api, trainer: ScriptedTrainer) -> None:
    applied = kubectl(kube, "apply", "-f", str(EXAMPLE))
    assert applied.returncode == 0, applied.stderr
    assert "finetunejob.kubetune.io/reviews-sentiment created" in applied.stdout
    wait_for("the trainer pod", lambda: trainer.started("reviews-sentiment-0-0"), operator=operator)
    trainer.report("reviews-sentiment-0-0", step=7, total=10, loss=0.4213)
    wait_for("Running", lambda: api.status("reviews-sentiment").get("progress", {}).get("step") == 7,
             operator=operator)
    listed = kubectl(kube, "get", "ftj")
    assert re.search(r"^reviews-sentiment\s+Running\s+70\s+0\.4213", listed.stdout, re.M), listed.stdout
    one = kubectl(kube, "get", "ftj", "reviews-sentiment", "-o", "json")
    assert json.loads(one.stdout)["spec"]["model"]["task"] == "sequence-classification", one.stderr
    waiter = subprocess.Popen([str(binary("kubectl")), "-n", NS, "wait", "--for=condition=Succeeded",
                               "ftj/reviews-sentiment", "--timeout=120s"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)})
    assert waiter.poll() is None  # still waiting: not Succeeded yet
    trainer.exit("reviews-sentiment-0-0", 0, {"outcome": "Succeeded", "exitCode": 0}, log="test accuracy 0.85")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    phase = kubectl(kube, "get", "ftj", "reviews-sentiment", "-o", "jsonpath={.status.phase}")
    assert phase.stdout == "Succeeded", phase.stderr
    described = kubectl(kube, "describe", "ftj", "reviews-sentiment").stdout
    assert re.search(r"Normal\s+Succeeded", described), described
    pods = kubectl(kube, "get", "pods", "-l", "kubetune.io/job-name=reviews-sentiment").stdout
    assert re.search(r"^reviews-sentiment-0-0-\S+\s+0/1\s+Completed", pods, re.M), pods
    logs = kubectl(kube, "logs", "job/reviews-sentiment-0")
    assert "test accuracy 0.85" in logs.stdout, logs.stderr


def test_describe_shows_only_its_own_events(kube: KubeCluster, operator: ChartOperator, api: Api) -> None:
    for name in ("first", "second"):
        kubectl(kube, "apply", "-f", "-", stdin=EXAMPLE.read_text().replace("name: reviews-sentiment",
                                                                            f"name: {name}"))
    wait_for("both Pending", lambda: all(api.status(n).get("phase") for n in ("first", "second")),
             operator=operator)
    described = kubectl(kube, "describe", "ftj", "first").stdout
    events = described.split("Events:", 1)[1]
    assert "first" in events or "Pending" in events
    assert "second" not in events, events


@pytest.mark.parametrize("mistake", ["misspelled", "wrong-type"])
def test_apply_refuses_a_manifest_the_schema_refuses(kube: KubeCluster, operator: ChartOperator,
                                                     mistake: str) -> None:
    """kubectl's strict field validation happens on the server: a misspelled field is an error, not a warning."""
    text = EXAMPLE.read_text().replace("name: reviews-sentiment", f"name: {mistake}")
    text = text.replace("learningRate:", "learningrate:") if mistake == "misspelled" else \
        text.replace("epochs: 4", "epochs: four")
    done = kubectl(kube, "apply", "-f", "-", stdin=text)
    assert done.returncode == 1
    field = "spec.hyperparameters.learningrate" if mistake == "misspelled" else "spec.hyperparameters.epochs"
    assert field in done.stderr, done.stderr
