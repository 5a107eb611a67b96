"""Module-scoped fixtures: a trainer metrics endpoint on loopback, the operator process, an API client."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubetune import contract
from kubetune.crd import build_crd
from kubetune.netutil import free_port
from tests.fixtures_k8s import Cluster
from tests.operator_harness import NS, Api, Operator, wait_for


class TrainerEndpoint:
    """A real prometheus_client registry with the trainer's contract names, served on loopback (rank 0)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["job", "namespace"]
        self.gauges = {name: Gauge(name, name, labels, registry=self.registry) for name in (
            contract.METRIC_STEP, contract.METRIC_TOTAL_STEPS, contract.METRIC_EPOCH, contract.METRIC_PROGRESS,
            contract.METRIC_ETA, contract.METRIC_TRAIN_LOSS, contract.METRIC_EVAL_LOSS)}
        self.eval = Gauge(contract.METRIC_EVAL, "eval", [*labels, "metric"], registry=self.registry)
        self.port = free_port()
        start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def report(self, job: str, step: int, total: int, loss: float, accuracy: float | None = None) -> None:
        values = {contract.METRIC_STEP: step, contract.METRIC_TOTAL_STEPS: total, contract.METRIC_EPOCH: step / 10,
                  contract.METRIC_PROGRESS: step / total, contract.METRIC_ETA: (total - step) * 2.0,
                  contract.METRIC_TRAIN_LOSS: loss, contract.METRIC_EVAL_LOSS: loss + 0.1}
        for name, value in values.items():
            self.gauges[name].labels(job=job, namespace=NS).set(value)
        if accuracy is not None:
            self.eval.labels(job=job, namespace=NS, metric="accuracy").set(accuracy)


@pytest.fixture(scope="module")
def trainer() -> TrainerEndpoint:
    return TrainerEndpoint()


@pytest.fixture(scope="module")
def operator_env(trainer: TrainerEndpoint) -> dict[str, str]:
    return {
        "KUBETUNE_REFRESH_SECONDS": "1",
        # These scenarios follow the training Job's lifecycle; tests/test_operator_preflight.py runs with it on.
        "KUBETUNE_PREFLIGHT": "false",
        "KUBETUNE_STALL_SECONDS": "4",
        "KUBETUNE_NAMESPACES": "",  # cluster-wide; tests/test_operator_namespaced.py runs the namespaced mode
        "KUBETUNE_OPERATOR_METRICS_PORT": str(free_port()),
        "KUBETUNE_HEALTH_PORT": str(free_port()),
        "KUBETUNE_TRAINER_IMAGE": "ghcr.io/kubetune/trainer:test",
        "KUBETUNE_TRAINER_METRICS_URL": f"http://{{pod_ip}}:{trainer.port}/metrics",
    }


E2E_VARIABLE = "KUBETUNE_E2E_KUBECONFIG"


class Backend:
    """Where the scenarios run: the emulator (the test plays the controllers) or a real cluster."""

    def __init__(self, kubeconfig: Path, cluster: Cluster | None) -> None:
        self.kubeconfig, self.cluster = kubeconfig, cluster

    @property
    def emulated(self) -> bool:
        return self.cluster is not None


@pytest.fixture(scope="module", params=["emulator", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The same scenario module against both; a real cluster only with KUBETUNE_E2E_KUBECONFIG set."""
    if request.param == "emulator":
        cluster: Cluster = request.getfixturevalue("k8s_cluster")
        return Backend(cluster.kubeconfig, cluster)
    path = os.environ.get(E2E_VARIABLE)
    if not path:
        pytest.skip(f"set {E2E_VARIABLE} to a kubeconfig (kind, k3d, a dev cluster) to run these against it")
    install_crd(Path(path))
    return Backend(Path(path), None)


def install_crd(kubeconfig: Path) -> None:
    """On a real cluster: the CRD and the test namespace, create-if-missing."""
    client = Api(kubeconfig).client
    for create, body in (
        (kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition, build_crd()),
        (kubernetes.client.CoreV1Api(client).create_namespace, {"metadata": {"name": NS}}),
    ):
        try:
            create(body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise


@pytest.fixture(autouse=True)
def _controller_played_only_on_the_emulator(request: pytest.FixtureRequest) -> None:
    """Tests marked plays_controller write Pod/Job statuses: never on a real cluster, its controllers do that."""
    marked = request.node.get_closest_marker("plays_controller") and "backend" in request.fixturenames
    if marked and not request.getfixturevalue("backend").emulated:
        pytest.skip("plays the Job controller and kubelet: emulator only")


@pytest.fixture(scope="module")
def operator(backend: Backend, operator_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Operator]:
    process = Operator(backend.kubeconfig, operator_env, tmp_path_factory.mktemp("op") / "operator.log").start()
    health = f"http://127.0.0.1:{operator_env['KUBETUNE_HEALTH_PORT']}/healthz"
    assert _up(health, 60), process.tail()
    yield process
    assert process.stop() == 0, process.tail()


def _up(url: str, timeout: float) -> bool:
    def ok() -> bool:
        try:
            return bool(urllib.request.urlopen(url, timeout=1).status == 200)
        except OSError:
            return False

    return bool(wait_for(url, ok, timeout))



@pytest.fixture(scope="module")
def api(backend: Backend) -> Api:
    return Api(backend.kubeconfig)
