"""The Job controller, scheduler and kubelet of a one-node dev cluster: pods run as local subprocesses.

It watches (polls) Jobs and Pods over the Kubernetes API like the real components, creates one pod per
completion index, runs each pod's real container command (`kubetune trainer`, `kubetune validate --deep`)
with the pod's env and volumes, and writes Pod and Job statuses as a kubelet and the Job controller would:
Running, then Succeeded/Failed with the exit code and the termination message file's content.

What differs from a real node, each for a reason:
- pods share this machine's network: the pod IP is 127.0.0.1, the trainer's metrics port is the one the dev
  cluster gave the operator, and a single-node job's master address (its own DNS name) is 127.0.0.1;
- one trainer pod runs at a time (a one-GPU node); multi-node jobs are Unschedulable here;
- the image is this virtual environment (its `bin/` leads PATH) and the image's WORKDIR is `<node>/examples`,
  so relative paths in a spec mean what they mean beside the examples (`make demo`'s layout);
- a subPath file from a ConfigMap is written into that WORKDIR while the pod lives, so the trainer (relative
  to its working dir) and the pre-flight (relative to the spec file) resolve relative paths alike.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from kubetune import contract

log = logging.getLogger("kubetune.devcluster")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
MESSAGE_LIMIT = 4096  # a real kubelet keeps at most 4096 bytes of a termination message
LOG_TAIL_LINES = 80  # FallbackToLogsOnError: the last 80 lines (or 2048 bytes) of the log


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunningPod:
    namespace: str
    name: str
    job: str
    trainer: bool
    process: subprocess.Popen[bytes]
    folder: Path
    started: str
    termination_log: Path
    cleanup: list[Path] = field(default_factory=list)


class Kubelet:
    def __init__(self, kubeconfig: Path, node: Path, state: Path, metrics_port: int, poll_seconds: float = 0.5
                 ) -> None:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.node, self.state, self.metrics_port, self.poll_seconds = node, state, metrics_port, poll_seconds
        self.workdir = node / "examples"
        self.running: dict[tuple[str, str], RunningPod] = {}
        self.dying: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Kubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        for pod in list(self.running.values()):
            self._kill(pod)
        for ender in self.dying:
            ender.join()

    def _loop(self) -> None:
        while not self.stop_event.wait(self.poll_seconds):
            try:
                self.step()
            except Exception:  # the API restarting or a half-deleted object: the next round sees it settled
                log.exception("kubelet round failed")

    # ---- one round: Job controller, then scheduler + kubelet -------------------------------------------
    def step(self) -> None:
        jobs = [self._dict(j) for j in self.batch.list_job_for_all_namespaces().items]
        pods = [self._dict(p) for p in self.core.list_pod_for_all_namespaces().items]
        by_job: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for pod in pods:
            by_job.setdefault((pod["metadata"]["namespace"], (pod["metadata"].get("labels") or {}).get(
                "job-name", "")), []).append(pod)
        alive = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}
        for key, local in list(self.running.items()):
            if key not in alive:  # deleted (garbage-collected with its FineTuneJob, or a suspend): stop it
                self._kill(local)
                del self.running[key]
        for job in jobs:
            self._control(job, by_job.get((job["metadata"]["namespace"], job["metadata"]["name"]), []))
        for key, local in list(self.running.items()):
            if local.process.poll() is not None:
                del self.running[key]
                self._finished(local)
        for pod in pods:
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            if key not in self.running and not (pod.get("status") or {}).get("phase") and \
                    not pod["metadata"].get("deletionTimestamp"):
                self._schedule(pod)

    def _control(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        """The Job controller: pods for an unsuspended, unfinished Job; a suspended one loses its pods."""
        meta, spec = job["metadata"], job["spec"]
        finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                       for c in (job.get("status") or {}).get("conditions") or [])
        if finished:
            return
        if spec.get("suspend"):
            for pod in pods:
                self._delete_pod(pod)
            if (job.get("status") or {}).get("active"):
                self._job_status(job, {"active": 0})
            return
        if pods:
            return
        template = spec["template"]
        for index in range(int(spec.get("completions") or 1)):
            name = f"{meta['name']}-{index}-{uuid.uuid4().hex[:5]}"
            self.core.create_namespaced_pod(meta["namespace"], {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": meta["namespace"],
                             "labels": {**(template["metadata"].get("labels") or {}), "job-name": meta["name"]},
                             "annotations": {COMPLETION_INDEX: str(index)},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                  "uid": meta["uid"], "controller": True}]},
                "spec": template["spec"],
            })
        self._job_status(job, {"active": int(spec.get("completions") or 1), "startTime": now()})

    def _schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        job = self._owner_job(pod)
        if job is None:
            return
        if int(job["spec"].get("completions") or 1) > 1:
            self._pod_status(pod, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": now(),
                "message": "0/1 nodes are available: the dev cluster runs single-node jobs only "
                           "(resources.nodes: 1)"}]})
            return
        trainer = (meta.get("labels") or {}).get(contract.LABEL_COMPONENT) == "trainer"
        if trainer and any(p.trainer for p in self.running.values()):
            return  # the node's one GPU slot is taken: the pod waits, as it would for a real scheduler
        self._run(pod, job, trainer)

    # ---- the kubelet ------------------------------------------------------------------------------------
    def _run(self, pod: dict[str, Any], job: dict[str, Any], trainer: bool) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        folder = self.state / "pods" / f"{meta['namespace']}-{meta['name']}"
        folder.mkdir(parents=True, exist_ok=True)
        paths, cleanup = self._volumes(pod, folder)
        termination_log = folder / "termination-log"
        termination_log.write_text("")
        paths[container.get("terminationMessagePath") or "/dev/termination-log"] = termination_log
        env = self._env(pod, container, paths, int(job["spec"].get("completions") or 1))
        command = [self._local(arg, paths) for arg in [*(container.get("command") or []),
                                                         *(container.get("args") or [])]]
        command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
        started = now()
        with (folder / "log").open("ab") as out:
            process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        log.info("pod %s/%s started: %s (log %s)", meta["namespace"], meta["name"], " ".join(command),
                 folder / "log")
        self.running[(meta["namespace"], meta["name"])] = RunningPod(
            meta["namespace"], meta["name"], job["metadata"]["name"], trainer, process, folder, started,
            termination_log, cleanup)
        self._pod_status(pod, {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": started,
                               "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                                              {"type": "Ready", "status": "True", "lastTransitionTime": started}],
                               "containerStatuses": [{"name": container["name"], "ready": True, "restartCount": 0,
                                                      "image": container.get("image", ""), "imageID": "",
                                                      "state": {"running": {"startedAt": started}}}]})

    def _volumes(self, pod: dict[str, Any], folder: Path) -> tuple[dict[str, Path], list[Path]]:
        """Container path -> local path for every volume mount (ConfigMaps written out, emptyDirs as folders)."""
        meta, spec = pod["metadata"], pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        paths: dict[str, Path] = {}
        cleanup: list[Path] = []
        for mount in spec["containers"][0].get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            local = folder / "volumes" / mount["name"]
            if "configMap" in volume:
                data = self.core.read_namespaced_config_map(volume["configMap"]["name"], meta["namespace"]).data or {}
                if mount.get("subPath"):
                    local = self.workdir / f".{meta['name']}-{mount['subPath']}"  # see the module docstring
                    local.write_text(data[mount["subPath"]])
                    cleanup.append(local)
                else:
                    local.mkdir(parents=True, exist_ok=True)
                    for key, value in data.items():
                        (local / key).write_text(value)
            else:  # emptyDir (memory-backed or not): a fresh folder
                local.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"]] = local
        return paths, cleanup

    @staticmethod
    def _local(value: str, paths: dict[str, Path]) -> str:
        for mount in sorted(paths, key=len, reverse=True):
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                return str(paths[mount]) + value[len(mount):]
        return value

    def _env(self, pod: dict[str, Any], container: dict[str, Any], paths: dict[str, Path], nodes: int
             ) -> dict[str, str]:
        meta = pod["metadata"]
        # The image's environment: this venv first on PATH, this HOME (its caches: matplotlib's font list), offline.
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HOME": os.environ.get("HOME", str(self.state)), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = self._local(str(item["value"]), paths)
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = self._field(meta, item["valueFrom"]["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.core.read_namespaced_secret(ref["name"], meta["namespace"])
                env[item["name"]] = base64.b64decode((secret.data or {})[ref["key"]]).decode()
        # Pods share this machine's network (see the module docstring).
        if contract.ENV_METRICS_PORT in env:
            env[contract.ENV_METRICS_PORT] = str(self.metrics_port)
        if nodes == 1 and contract.ENV_MASTER_ADDR in env:
            env[contract.ENV_MASTER_ADDR] = "127.0.0.1"
        return env

    @staticmethod
    def _field(meta: dict[str, Any], path: str) -> str:
        if path in ("metadata.name", "metadata.namespace"):
            return str(meta[path.split(".")[1]])
        for kind in ("annotations", "labels"):
            prefix = f"metadata.{kind}['"
            if path.startswith(prefix):
                return str((meta.get(kind) or {}).get(path[len(prefix):-2], ""))
        raise ValueError(f"fieldRef {path} is not supported by the dev cluster")

    def _finished(self, pod: RunningPod) -> None:
        code = pod.process.returncode
        if code < 0:  # killed by a signal: a container runtime reports 128 + the signal number
            code = 128 - code
        message = pod.termination_log.read_text(errors="replace")[:MESSAGE_LIMIT]
        if not message.strip() and code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            lines = (pod.folder / "log").read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            message = "\n".join(lines)[-2048:]
        for path in pod.cleanup:
            path.unlink(missing_ok=True)
        log.info("pod %s/%s exited %s", pod.namespace, pod.name, code)
        try:
            current = self._dict(self.core.read_namespaced_pod(pod.name, pod.namespace))
            job = self._dict(self.batch.read_namespaced_job(pod.job, pod.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile: nobody is left to tell
            raise
        container = current["spec"]["containers"][0]
        self._pod_status(current, {"phase": "Succeeded" if code == 0 else "Failed", "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": now()}], "containerStatuses": [{
                "name": container["name"], "ready": False, "restartCount": 0, "image": container.get("image", ""),
                "imageID": "", "state": {"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                    "startedAt": pod.started, "finishedAt": now()}}}]})
        self._job_finished(job, code)

    def _job_finished(self, job: dict[str, Any], code: int) -> None:
        """Single-pod Jobs only (the scheduler refuses others): its pod's end is the Job's end."""
        if code == 0:
            self._job_status(job, {"active": 0, "succeeded": 1, "completionTime": now(), "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                 "lastTransitionTime": now()},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached", "lastTransitionTime": now()}]})
            return
        rules = ((job["spec"].get("podFailurePolicy") or {}).get("rules")) or []
        by_policy = any(code in ((r.get("onExitCodes") or {}).get("values") or []) and r.get("action") == "FailJob"
                        for r in rules)
        reason = "PodFailurePolicy" if by_policy else "BackoffLimitExceeded"
        message = f"Container trainer for failed pod matched FailJob rule (exit code {code})" if by_policy else \
            "Job has reached the specified backoff limit"
        self._job_status(job, {"active": 0, "failed": 1, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": now()},
            {"type": "Failed", "status": "True", "reason": reason, "message": message, "lastTransitionTime": now()}]})

    def _kill(self, pod: RunningPod) -> None:
        """A pod's end: SIGTERM, the grace period, then SIGKILL (the whole process group, as a runtime would)."""
        def end() -> None:
            if pod.process.poll() is None:
                os.killpg(pod.process.pid, signal.SIGTERM)
                try:
                    pod.process.wait(contract.DEFAULT_GRACE_SECONDS + 5)
                except subprocess.TimeoutExpired:
                    os.killpg(pod.process.pid, signal.SIGKILL)
                    pod.process.wait(10)
            for path in pod.cleanup:
                path.unlink(missing_ok=True)

        ender = threading.Thread(target=end, name=f"kill-{pod.name}", daemon=True)  # other pods go on meanwhile
        ender.start()
        self.dying.append(ender)

    # ---- API helpers ------------------------------------------------------------------------------------
    def _dict(self, obj: Any) -> dict[str, Any]:
        value: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return value

    def _owner_job(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        owner = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "Job"), None)
        if owner is None:
            return None
        try:
            return self._dict(self.batch.read_namespaced_job(owner["name"], pod["metadata"]["namespace"]))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                              {"status": status})

    def _job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(job["metadata"]["name"], job["metadata"]["namespace"],
                                               {"status": status})

    def _delete_pod(self, pod: dict[str, Any]) -> None:
        try:
            self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"])
        except ApiException as exc:
            if exc.status != 404:
                raise
