"""A whole test cluster: the real control plane, two nodes run by the node agent, the image table, and the
tools a test or a person drives it with (kubectl, helm, the chart's operator).

Nodes: `gpu-node` (one `nvidia.com/gpu`) and `cpu-node`. Images (containers are local processes, see
tests/pod_process.py): the kubetune trainer and operator images are this virtual environment with their
Dockerfile ENTRYPOINTs; `kubetune-test/scripted-trainer` is tests/scripted_image, whose `kubetune` does what a
test scripts (tests/scripted_trainer.py). Any other image fails to pull, as an unknown image would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from tests.control_plane import ControlPlane
from tests.k8s_tools import binary
from tests.kubelet import NodeAgent, NodeSpec
from tests.pod_process import Image

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetune"
RELEASE_NAMESPACE = "kubetune-system"
SCRIPTED_IMAGE = "kubetune-test/scripted-trainer"
NODES = [NodeSpec("gpu-node", cpu="16", memory="64Gi", gpus=1, labels={"kubetune.io/pool": "gpu"}),
         NodeSpec("cpu-node", cpu="8", memory="32Gi", labels={"kubetune.io/pool": "cpu"})]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}  # kubetune's pods meet it; the server checks


def images(workdir: Path, scripts: Path) -> dict[str, Image]:
    venv = (Path(sys.executable).parent,)
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {
        "ghcr.io/kubetune/trainer:*": Image(venv, ("kubetune", "trainer"), workdir=workdir, env=offline),
        "ghcr.io/kubetune/operator:*": Image(venv, ("kubetune", "operator"), workdir=workdir, env=offline),
        f"{SCRIPTED_IMAGE}:*": Image((ROOT / "tests" / "scripted_image" / "bin", *venv), ("kubetune", "trainer"),
                                     workdir=workdir, env={"SCRIPT_DIR": str(scripts), "PYTHONUNBUFFERED": "1"}),
    }


class KubeCluster:
    def __init__(self, workdir: Path, node_dir: Path | None = None, nodes: list[NodeSpec] | None = None,
                 bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.node_dir = node_dir or workdir / "node"
        self.scripts = workdir / "scripts"
        self.control_plane = ControlPlane(workdir / "control-plane", bin_dir)
        self.agent: NodeAgent | None = None
        self.nodes = nodes or NODES

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> KubeCluster:
        self.control_plane.start()
        self.agent = NodeAgent(self.control_plane, self.nodes, images(self.node_dir, self.scripts),
                               self.workdir / "nodes", self.node_dir).start()
        core = kubernetes.client.CoreV1Api(self.client())
        self._until("the default ServiceAccount (the controller manager is working)",
                    lambda: _exists(core.read_namespaced_service_account, "default", "default"), 60)
        return self

    def stop(self) -> None:
        try:
            if self.agent is not None:
                self.agent.stop()
        finally:
            self.control_plane.stop()

    def client(self, kubeconfig: Path | None = None) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(str(kubeconfig or self.kubeconfig))

    @staticmethod
    def _until(what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.2)

    # ---- command-line tools ---------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, timeout: float = 120, kubeconfig: Path | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """kubectl or helm against this cluster, from the repository root."""
        tool = str(binary(command[0]))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        done = subprocess.run([tool, *command[1:]], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def get(self, *what: str, namespace: str | None = None) -> dict[str, Any]:
        args = ["kubectl", "get", *what, "-o", "json"] + (["-n", namespace] if namespace else [])
        found: dict[str, Any] = json.loads(self.run(*args).stdout)
        return found

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create-if-missing, with the restricted Pod Security level enforced by the API server."""
        core = kubernetes.client.CoreV1Api(self.client())
        try:
            core.create_namespace({"metadata": {"name": name, "labels": {**RESTRICTED, **(labels or {})}}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._until(f"namespace {name}'s default ServiceAccount",
                    lambda: _exists(core.read_namespaced_service_account, "default", name), 60)

    def ensure_crd(self, crd: dict[str, Any]) -> None:
        """Install a CRD unless it is there already (another module of the session installed it)."""
        try:
            kubernetes.client.ApiextensionsV1Api(self.client()).create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def delete_namespace(self, name: str, timeout: float = 120) -> None:
        """Delete and wait until the namespace controller has removed everything in it."""
        core = kubernetes.client.CoreV1Api(self.client())
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        self._until(f"namespace {name} deleted", lambda: not _exists(core.read_namespace, name), timeout)

    def install_crd(self) -> None:
        """The FineTuneJob CRD, create-if-missing (helm installs the same bytes from the chart)."""
        from kubetune.crd import build_crd

        extensions = kubernetes.client.ApiextensionsV1Api(self.client())
        try:
            extensions.create_custom_resource_definition(build_crd())
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._until("the FineTuneJob CRD Established", lambda: any(
            c.type == "Established" and c.status == "True" for c in
            extensions.read_custom_resource_definition("finetunejobs.kubetune.io").status.conditions or []), 30)

    def clean_scripts(self) -> None:
        shutil.rmtree(self.scripts, ignore_errors=True)
        self.scripts.mkdir(parents=True)


def _exists(read: Any, *args: Any) -> bool:
    try:
        read(*args)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def open_schema_crd(group: str, kind: str, version: str) -> dict[str, Any]:
    """Another project's kind (Kueue's Workload, the Prometheus Operator's PodMonitor) served with an open schema:
    what the chart or the operator needs is that API, not the project's controller."""
    plural = kind.lower() + "s"
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
