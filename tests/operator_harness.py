"""The operator as a cluster runs it, and the client side of the operator tests.

`ChartOperator` installs charts/kubetune with helm into the test cluster (tests/cluster.py): the operator runs
as the chart's Deployment pod, with in-cluster config and its ServiceAccount's token, so RBAC and admission
apply to every call it makes. Trainer pods run the scripted image (tests/scripted_trainer.py) unless a test
asks for the real trainer. `Api` is the test's own admin client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from kubernetes.client.rest import ApiException

from kubetune import contract
from tests.cluster import CHART, RELEASE_NAMESPACE, SCRIPTED_IMAGE, KubeCluster

NS = "ml"
OPERATOR_SELECTOR = "app.kubernetes.io/component=operator"
TEST_VALUES: dict[str, Any] = {  # fast refreshes for tests; the pre-flight has tests of its own
    "image": {"trainer": {"repository": SCRIPTED_IMAGE, "tag": "1"}},
    "operator": {"refreshSeconds": 1, "preflight": False, "stallSeconds": 4, "imagePullSeconds": 6},
}


class Api:
    def __init__(self, kubeconfig: Path, namespace: str = NS) -> None:
        self.client = kubernetes.config.new_client_from_config(str(kubeconfig))
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    def _dict(self, obj: Any) -> dict[str, Any]:
        value: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return value

    # ---- FineTuneJobs -------------------------------------------------------------------------------
    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, doc)
        return created

    def ftj(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL, name)
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_ftj(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, self.namespace,
                                                   contract.PLURAL, name, patch)

    def delete_ftj(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, self.namespace,
                                                    contract.PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.ftj(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    # ---- children ---------------------------------------------------------------------------------
    def jobs(self, name: str) -> list[dict[str, Any]]:
        found = self.batch.list_namespaced_job(self.namespace, label_selector=f"{contract.LABEL_JOB_NAME}={name}")
        return sorted((self._dict(j) for j in found.items), key=lambda j: j["metadata"]["name"])

    def _read(self, read: Callable[..., Any], name: str) -> dict[str, Any] | None:
        """One object by name, None when it does not exist (404)."""
        try:
            return self._dict(read(name, self.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def job(self, name: str) -> dict[str, Any] | None:
        return self._read(self.batch.read_namespaced_job, name)

    def configmap(self, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_config_map, name)

    def service(self, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_service, name)

    def pods(self, job: str) -> list[dict[str, Any]]:
        """The pods of one batch Job (the Job controller labels them job-name=<job>)."""
        found = self.core.list_namespaced_pod(self.namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
        return [self._dict(p) for p in found.items]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}")
        return [self._dict(e) for e in found.items]


class ChartOperator:
    """The chart's operator Deployment: installed, followed, killed and removed like a user would."""

    def __init__(self, cluster: KubeCluster, values: dict[str, Any] | None = None, release: str = "kubetune",
                 namespace: str = RELEASE_NAMESPACE, extra_args: tuple[str, ...] = ()) -> None:
        """values: the chart's values as given (merge TEST_VALUES in for the tests' fast settings)."""
        self.cluster, self.release, self.namespace = cluster, release, namespace
        self.values = values or {}
        self.extra_args = extra_args
        self.core = kubernetes.client.CoreV1Api(cluster.client())

    def install(self, timeout: float = 120) -> ChartOperator:
        self.cluster.namespace(self.namespace)
        values = self.cluster.workdir / f"values-{self.release}.yaml"
        values.write_text(yaml.safe_dump(self.values))
        self.cluster.run("helm", "install", self.release, str(CHART), "-n", self.namespace, "-f", str(values),
                         *self.extra_args)
        self.wait_ready(timeout)
        return self

    def uninstall(self) -> None:
        self.cluster.run("helm", "uninstall", self.release, "-n", self.namespace, "--wait", "--timeout", "120s")

    def pods(self) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(self.namespace, label_selector=OPERATOR_SELECTOR)
        return [self.core.api_client.sanitize_for_serialization(p) for p in found.items]

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            for pod in self.pods():
                conditions = (pod.get("status") or {}).get("conditions") or []
                if not pod["metadata"].get("deletionTimestamp") and any(
                        c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return pod
            return None

        found: dict[str, Any] = wait_for("the operator pod Ready", ready, timeout, operator=self)
        return found

    def tail(self) -> str:
        done = self.cluster.run("kubectl", "logs", "-n", self.namespace, "-l", OPERATOR_SELECTOR, "--tail=120",
                                check=False, timeout=30)
        return (done.stdout + done.stderr)[-6000:]

    def diagnose(self) -> str:
        """What a person would look at next: the test namespace's pods and their containers' states."""
        lines = []
        for pod in kubernetes.client.CoreV1Api(self.cluster.client()).list_namespaced_pod(NS).items:
            states = [s.state.to_dict() for s in pod.status.container_statuses or []]
            lines.append(f"{pod.metadata.name} on {pod.spec.node_name}: {pod.status.phase} "
                         f"{[c.reason for c in pod.status.conditions or [] if c.reason]} {states}")
        return "\n".join(lines)

    def kill(self) -> None:
        """The operator pod deleted at once, as when its node dies: the Deployment brings up another."""
        for pod in self.pods():
            self.core.delete_namespaced_pod(pod["metadata"]["name"], self.namespace, grace_period_seconds=0)

    def metrics(self) -> str:
        """The operator's own /metrics, at its pod IP as Prometheus scrapes it."""
        import urllib.request

        pod = self.wait_ready()
        port = (self.values.get("operator") or {}).get("metricsPort", contract.DEFAULT_OPERATOR_METRICS_PORT)
        url = f"http://{pod['status']['podIP']}:{port}/metrics"
        return str(urllib.request.urlopen(url, timeout=5).read().decode())


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """extra over base, key by key into nested mappings."""
    result: dict[str, Any] = json.loads(json.dumps(base))
    for key, value in extra.items():
        result[key] = merged(result.get(key) or {}, value) if isinstance(value, dict) else value
    return result


def wait_for(what: str, check: Callable[[], Any], timeout: float = 45.0, operator: ChartOperator | None = None
             ) -> Any:
    """Poll until check() is truthy; the failure says what was awaited, the last value and the operator log."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (KeyError, TypeError, IndexError):
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last value {value!r}\n"
                         f"operator log:\n{operator.tail() if operator else ''}\n"
                         f"pods:\n{operator.diagnose() if operator else ''}")
