"""Cluster fixtures (pytest plugin): one real control plane with its node agent for the whole session, and per
test module the chart's operator installed with helm into it, the test namespace, and the scripted trainer.

A module changes the chart's values by overriding the `operator_values` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from kubetune import contract
from tests.cluster import KubeCluster
from tests.operator_harness import NS, TEST_VALUES, Api, ChartOperator, merged
from tests.scripted_trainer import ScriptedTrainer

S3_SECRET = "s3-credentials"


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    cluster = KubeCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module")
def operator(kube: KubeCluster, operator_values: dict[str, Any]) -> Iterator[ChartOperator]:
    kube.clean_scripts()
    kube.delete_namespace(NS)  # nothing left from another module
    kube.namespace(NS)
    kubernetes.client.CoreV1Api(kube.client()).create_namespaced_secret(NS, {
        "metadata": {"name": S3_SECRET},
        "stringData": {contract.SECRET_ACCESS_KEY_ID: "test", contract.SECRET_SECRET_ACCESS_KEY: "test-secret"}})
    chart = ChartOperator(kube, merged(TEST_VALUES, operator_values)).install()
    yield chart
    chart.uninstall()
    kube.delete_namespace(NS)


@pytest.fixture(scope="module")
def api(kube: KubeCluster, operator: ChartOperator) -> Api:
    return Api(kube.kubeconfig)


@pytest.fixture(scope="module")
def trainer(kube: KubeCluster, operator: ChartOperator) -> ScriptedTrainer:
    return ScriptedTrainer(kube.scripts)
