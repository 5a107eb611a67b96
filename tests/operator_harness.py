"""The real operator process against a Kubernetes API, and the test playing the Job controller and kubelet.

Everything goes over HTTP with the official client, as a cluster would see it.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from kubetune import contract

NS = "ml"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Operator:
    """`kubetune operator` as a subprocess; its log goes to a file the failure messages quote."""

    def __init__(self, kubeconfig: Path, env: dict[str, str], log: Path) -> None:
        self.kubeconfig, self.env, self.log = kubeconfig, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator"], env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful anything, as when a node dies under the operator."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class Api:
    def __init__(self, kubeconfig: Path) -> None:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        client = kubernetes.client.ApiClient(configuration)
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def _dict(self, obj: Any) -> dict[str, Any]:
        value: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return value

    # ---- FineTuneJobs -------------------------------------------------------------------------------
    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL, doc)
        return created

    def ftj(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL, name)
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_ftj(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                   name, patch)

    def delete_ftj(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL,
                                                    name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.ftj(name) or {}).get("status") or {}

    # ---- children ---------------------------------------------------------------------------------
    def jobs(self, name: str) -> list[dict[str, Any]]:
        found = self.batch.list_namespaced_job(NS, label_selector=f"{contract.LABEL_JOB_NAME}={name}")
        return sorted((self._dict(j) for j in found.items), key=lambda j: j["metadata"]["name"])

    def _read(self, read: Callable[..., Any], name: str) -> dict[str, Any] | None:
        """One object by name, None when it does not exist (404)."""
        try:
            return self._dict(read(name, NS))
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
        found = self.core.list_namespaced_pod(NS, label_selector=f"job-name={job}")
        return [self._dict(p) for p in found.items]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_event(NS)
        return [self._dict(e) for e in found.items if e.involved_object.name == name]

    # ---- the Job controller and the kubelet, played by the test ---------------------------------------
    def start_pods(self, job_name: str, ip: str = "127.0.0.1", phase: str = "Running") -> list[str]:
        """What the Job controller + scheduler + kubelet do: one pod per index, running."""
        job = self.job(job_name)
        assert job is not None, f"no Job {job_name}"
        template = job["spec"]["template"]
        names = []
        for index in range(job["spec"]["completions"]):
            name = f"{job_name}-{index}-{uuid.uuid4().hex[:5]}"
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS,
                             "labels": {**template["metadata"]["labels"], "job-name": job_name},
                             "annotations": {COMPLETION_INDEX: str(index)},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                  "uid": job["metadata"]["uid"], "controller": True}]},
                "spec": template["spec"],
            }
            self.core.create_namespaced_pod(NS, pod)
            names.append(name)
            if phase == "Running":
                self.set_pod(name, {"phase": "Running", "podIP": ip, "startTime": ago(60), "containerStatuses": [
                    {"name": "trainer", "ready": True, "restartCount": 0, "image": "x", "imageID": "",
                     "state": {"running": {"startedAt": ago(60)}}}]})
        self.batch.patch_namespaced_job_status(job_name, NS, {"status": {"active": len(names),
                                                                           "startTime": ago(60)}})
        return names

    def set_pod(self, name: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(name, NS, {"status": status})

    def terminate(self, name: str, exit_code: int, message: str = "", reason: str = "Error",
                  conditions: list[dict[str, Any]] | None = None) -> None:
        phase = "Succeeded" if exit_code == 0 else "Failed"
        status: dict[str, Any] = {"phase": phase, "containerStatuses": [
            {"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
             "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                      "startedAt": ago(60), "finishedAt": now()}}}]}
        if conditions:
            status["conditions"] = conditions
        self.set_pod(name, status)

    def finish_job(self, job_name: str, condition: str, reason: str = "", message: str = "") -> None:
        self.batch.patch_namespaced_job_status(job_name, NS, {"status": {"active": 0, "conditions": [
            {"type": condition, "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": now()}]}})


def wait_for(what: str, check: Callable[[], Any], timeout: float = 45.0, operator: Operator | None = None) -> Any:
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
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last value {value!r}\n"
                         f"operator log:\n{operator.tail() if operator else ''}")
