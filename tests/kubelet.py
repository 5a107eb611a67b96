"""A node agent for the test control plane (tests/control_plane.py): Nodes whose pods run as local processes.

Each configured node is registered with its own identity (a `system:node:<name>` certificate, so the Node
authorizer and NodeRestriction hold), keeps its Lease and Ready condition, and watches the pods the real
scheduler binds to it. A bound pod's containers run as processes (tests/pod_process.py: volumes, env, ports,
what differs from a real node and why); the agent writes Pod status as a kubelet does (phase, container
states, exit code, termination message, restart count, Ready from probes), restarts containers by
restartPolicy, stops them on deletion with SIGTERM and the grace period, then removes the pod object; and it
serves `kubectl logs` (tests/kubelet_server.py). The real Job controller, scheduler and garbage collector do
the rest.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import random
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from tests.control_plane import ControlPlane
from tests.kubelet_server import LogServer, PortForwarder
from tests.pod_process import Image, NotReady, PodApi, PodRun, Process, now

log = logging.getLogger("kubetune.node-agent")
LEASE_SECONDS = 40
RENEW_SECONDS = 10
RESTART_BACKOFF = (1, 2, 4, 8, 10)  # seconds before the n-th restart of a container (a kubelet caps at 300)
NODE_VERSION = "v1.37.2"
STRATEGIC = "application/strategic-merge-patch+json"  # conditions merge by type (PodScheduled, DisruptionTarget)
MERGE = "application/merge-patch+json"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    pods: int = 110
    # A hollow node (Kubernetes' kubemark does the same for scale tests) reports its pods Running without
    # running anything; they end when told (NodeAgent.finish). For the operator scale benchmark.
    hollow: bool = False


@dataclass
class ContainerState:
    restarts: int = 0
    ready: bool = False
    status: dict[str, Any] = field(default_factory=dict)  # state / lastState as the API shows them
    restart_at: float | None = None
    probe_failures: dict[str, int] = field(default_factory=dict)
    probe_next: dict[str, float] = field(default_factory=dict)


@dataclass
class Pod:
    run: PodRun
    containers: dict[str, ContainerState]
    waiting: tuple[str, str] | None = None  # (reason, message) while it cannot start
    retry_at: float = 0.0
    stopping: threading.Thread | None = None
    ended: bool = False
    written: dict[str, Any] | None = None
    token_at: float = 0.0
    hollow: bool = False

    def busy(self) -> bool:
        """Whether the sync loop must look at it without an event: processes to watch, a retry or a restart due."""
        if self.ended or self.hollow:  # a hollow pod changes only by an event, finish() or release()
            return False
        return bool(self.run.processes) or self.waiting is not None or self.stopping is not None


class Node:
    def __init__(self, spec: NodeSpec, kubeconfig: Path) -> None:
        self.spec = spec
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.leases = kubernetes.client.CoordinationV1Api(self.client)
        self.cache: dict[str, dict[str, Any]] = {}  # uid -> the pod as last seen by the watch
        self.dirty: set[str] = set()  # uids the watch changed since the last sync
        self.pods: dict[str, Pod] = {}
        self.lock = threading.Lock()
        self.renewed = 0.0


class NodeAgent:
    def __init__(self, control_plane: ControlPlane, nodes: list[NodeSpec], images: dict[str, Image], state: Path,
                 node_dir: Path) -> None:
        self.control_plane, self.specs, self.images = control_plane, nodes, images
        self.state, self.node_dir = state, node_dir
        self.nodes: list[Node] = []
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []
        # Pod IPs from a loopback /16 of this agent's own, so two clusters on one machine (a test run beside
        # `make cluster`) do not hand out the same addresses.
        block = random.randint(2, 254)
        self.addresses = (f"127.{block}.{a}.{b}" for a, b in itertools.product(range(256), range(1, 255)))
        self.forwarder: PortForwarder | None = None
        self.logs: LogServer | None = None
        self.hold = threading.Event()  # set: hollow nodes keep new pods in ContainerCreating (release() lifts it)
        self.finishes: dict[tuple[str, str], tuple[int, str]] = {}
        self.finish_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        pki = self.control_plane.pki
        assert pki is not None, "start the control plane first"
        self.state.mkdir(parents=True, exist_ok=True)
        self.node_dir.mkdir(parents=True, exist_ok=True)
        cert, key = pki.issue("kubelet-serving", "kubelet", hosts=("127.0.0.1", "localhost"))
        self.logs = LogServer(cert, key, pki.ca, self._log_file).start()
        self.forwarder = PortForwarder()
        for spec in self.specs:
            kubeconfig = self.control_plane.write_kubeconfig(self.state / f"{spec.name}.kubeconfig",
                                                             f"system:node:{spec.name}", ("system:nodes",))
            node = Node(spec, kubeconfig)
            self._register(node)
            self.nodes.append(node)
            self._thread(f"watch-{spec.name}", self._watch, node)
        self._thread("node-agent", self._loop)
        self._thread("node-leases", self._heartbeat)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        for thread in self.threads:
            thread.join(10)
        enders = []
        for node in self.nodes:
            for pod in node.pods.values():
                for process in pod.run.processes.values():
                    ender = threading.Thread(target=PodRun.stop, args=(process, 30), daemon=True)
                    ender.start()
                    enders.append(ender)
        for ender in enders:
            ender.join(40)
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.logs is not None:
            self.logs.stop()

    def _thread(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    # ---- the Node object and its Lease ----------------------------------------------------------------
    def _register(self, node: Node) -> None:
        spec = node.spec
        labels = {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  **spec.labels}
        try:
            node.core.create_node({"metadata": {"name": spec.name, "labels": labels},
                                   "spec": {"taints": list(spec.taints)} if spec.taints else {}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._node_status(node)
        self._renew(node)

    def _node_status(self, node: Node) -> None:
        spec = node.spec
        capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods), "ephemeral-storage": "100Gi"}
        if spec.gpus:
            capacity["nvidia.com/gpu"] = str(spec.gpus)
        stamp = now()
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHasSufficient{kind[:-8]}",
                       "message": "", "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
                      for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "kubelet is posting ready status", "lastHeartbeatTime": stamp,
                           "lastTransitionTime": stamp})
        assert self.logs is not None
        node.core.patch_node_status(spec.name, _content_type=STRATEGIC, body={"status": {
            "capacity": capacity, "allocatable": capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs.port}},
            "nodeInfo": {"machineID": spec.name, "systemUUID": spec.name, "bootID": spec.name,
                         "kernelVersion": "local", "osImage": "kubetune test node (processes, no containers)",
                         "containerRuntimeVersion": "local://processes", "kubeletVersion": NODE_VERSION,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}})

    def _renew(self, node: Node) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": node.spec.name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node.spec.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": stamp}}
        try:
            node.leases.patch_namespaced_lease(node.spec.name, "kube-node-lease", body, _content_type=MERGE)
        except ApiException as exc:
            if exc.status != 404:
                raise
            node.leases.create_namespaced_lease("kube-node-lease", body)
        node.renewed = time.monotonic()

    # ---- watching this node's pods --------------------------------------------------------------------
    def _watch(self, node: Node) -> None:
        selector = f"spec.nodeName={node.spec.name}"
        while not self.stop_event.is_set():
            try:
                response = node.core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                listed = json.loads(response.data)
                with node.lock:
                    node.cache = {p["metadata"]["uid"]: p for p in listed["items"]}
                    node.dirty = set(node.cache) | set(node.pods)
                self.wake.set()
                stream = kubernetes.watch.Watch().stream(
                    node.core.list_pod_for_all_namespaces, field_selector=selector,
                    resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=60,
                    allow_watch_bookmarks=False)
                for event in stream:
                    pod = event["raw_object"]
                    if event["type"] == "ERROR":
                        break  # 410 Gone and the like: list again
                    with node.lock:
                        if event["type"] == "DELETED":
                            node.cache.pop(pod["metadata"]["uid"], None)
                        else:
                            node.cache[pod["metadata"]["uid"]] = pod
                        node.dirty.add(pod["metadata"]["uid"])
                    self.wake.set()
                    if self.stop_event.is_set():
                        return
            except Exception:  # the API server restarting: list and watch again
                if not self.stop_event.is_set():
                    log.exception("watch of %s's pods failed", node.spec.name)
                    time.sleep(1)

    # ---- the sync loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self.wake.wait(0.25)
            self.wake.clear()
            for node in self.nodes:
                try:
                    self._sync_node(node)
                except Exception:  # one bad round must not stop the node
                    log.exception("sync of %s failed", node.spec.name)

    def _heartbeat(self) -> None:
        """Leases on a thread of their own, as a kubelet's: a long sync round (thousands of hollow pods) must not
        let a lease lapse, or the node controller taints the node and evicts every pod on it."""
        while not self.stop_event.wait(RENEW_SECONDS / 2):
            for node in self.nodes:
                if time.monotonic() - node.renewed >= RENEW_SECONDS:
                    try:
                        self._renew(node)
                    except Exception:  # the API server restarting: the next beat tries again
                        log.exception("lease of %s not renewed", node.spec.name)

    def _sync_node(self, node: Node) -> None:
        with node.lock:
            pods = dict(node.cache)
            dirty, node.dirty = node.dirty, set()
        due = dirty | {uid for uid, known in node.pods.items() if known.busy()} | self._finishing(node)
        for uid in due & set(pods):
            pod = pods[uid]
            try:
                self._sync_pod(node, uid, pod)
            except Exception:  # one pod's trouble (the API server restarting) must not hold up the others
                log.exception("sync of pod %s/%s failed", pod["metadata"]["namespace"], pod["metadata"]["name"])
                with node.lock:  # tried again next round, as a kubelet retries a status it could not write
                    node.dirty.add(uid)
        for uid in [u for u in node.pods if u not in pods]:  # the object is gone: nothing may keep running
            gone = node.pods.pop(uid)
            for process in gone.run.processes.values():
                threading.Thread(target=PodRun.stop, args=(process, 0), daemon=True).start()
            self._release(gone)

    def _sync_pod(self, node: Node, uid: str, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        known = node.pods.get(uid)
        if meta.get("deletionTimestamp"):
            self._delete(node, pod, known)
            return
        if known is None:
            if status.get("phase") in ("Succeeded", "Failed"):
                return  # ended before this agent started
            known = node.pods[uid] = self._admit(node, pod)
        if known.ended:
            self._write(node, known)  # a no-op once written; else the end the API server has not heard of yet
            return
        if known.hollow:
            if known.waiting is not None:
                self._start_hollow(known)
            self._end_hollow(known)
        elif known.waiting is not None:
            if time.monotonic() < known.retry_at:
                return
            self._try_start(node, known)
        else:
            self._follow(node, known)
        if known.run.token_refresh and time.monotonic() - known.token_at > known.run.token_refresh:
            known.run.refresh_tokens()
            known.token_at = time.monotonic()
        self._write(node, known)

    def _admit(self, node: Node, pod: dict[str, Any]) -> Pod:
        meta = pod["metadata"]
        folder = self.state / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        api = PodApi(node.core, node.client, self._pod_ip)
        run = PodRun(pod, folder, self._image, api, next(self.addresses), self.node_dir,
                     ("127.0.0.1", self.control_plane.port))
        known = Pod(run, {c["name"]: ContainerState() for c in pod["spec"]["containers"]},
                    waiting=("ContainerCreating", ""), hollow=node.spec.hollow)
        if known.hollow:
            self._start_hollow(known)
        else:
            self._try_start(node, known)
        return known

    def _start_hollow(self, pod: Pod) -> None:
        """Running at once (or when the hold is lifted), with nothing behind it."""
        if self.hold.is_set():
            return
        pod.waiting = None
        for state in pod.containers.values():
            state.status = {"state": {"running": {"startedAt": now()}}}
            state.ready = True

    def _try_start(self, node: Node, pod: Pod) -> None:
        run = pod.run
        try:
            if not run.prepared:
                run.prepare()
                pod.token_at = time.monotonic()
            for container in run.spec["containers"]:
                self._start(pod, container)
        except ApiException as exc:  # e.g. 403 "no relationship found": the Node authorizer's graph lags a bind
            reason = NotReady("CreateContainerConfigError", f"{exc.status} {exc.reason}: retrying")
            pod.waiting, pod.retry_at = (reason.reason, reason.message), time.monotonic() + 1
            return
        except NotReady as reason:
            pulling = reason.reason == "ErrImagePull"
            if pulling and pod.waiting is not None and pod.waiting[0] in ("ErrImagePull", "ImagePullBackOff"):
                reason = NotReady("ImagePullBackOff", f'Back-off pulling image "{run.spec["containers"][0]["image"]}"')
            pod.waiting = (reason.reason, reason.message)
            pod.retry_at = time.monotonic() + (5 if pulling else 2)
            for state in pod.containers.values():
                state.status = {"state": {"waiting": {"reason": reason.reason, "message": reason.message}}}
            return
        pod.waiting = None
        assert self.forwarder is not None
        if run.ports:
            try:
                self.forwarder.open(run.pod_ip, run.ports)
            except OSError as exc:  # pods share the machine's network: a process listening on all addresses at
                # a declared port shadows it (a local `kubetune run` on 9400); the pod runs, unreachable there
                held = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=False).stdout
                log.warning("pod %s/%s: %s; it runs, but %s's declared ports are not reachable\n%s", run.namespace,
                            run.name, exc, run.pod_ip, held)
                self._event(node, run, "PortConflict", f"{exc}: another process on this machine listens on a port "
                            "this pod declares; the pod runs but its pod IP does not forward that port")
        log.info("pod %s/%s running on %s at %s", run.namespace, run.name, node.spec.name, run.pod_ip)

    def _start(self, pod: Pod, container: dict[str, Any]) -> None:
        state = pod.containers[container["name"]]
        process = pod.run.start(container, state.restarts)
        state.status = {"state": {"running": {"startedAt": process.started}},
                        **({"lastState": state.status["lastState"]} if "lastState" in state.status else {})}
        state.ready = not container.get("readinessProbe")
        state.restart_at = None
        state.probe_failures.clear()
        delay = {kind: float((container.get(kind) or {}).get("initialDelaySeconds") or 0)
                 for kind in ("readinessProbe", "livenessProbe")}
        state.probe_next = {kind: time.monotonic() + seconds for kind, seconds in delay.items()}

    def _follow(self, node: Node, pod: Pod) -> None:
        """Exits, restarts by restartPolicy, probes; the pod ends when every container has ended for good."""
        run = pod.run
        policy = run.spec.get("restartPolicy") or "Always"
        for container in run.spec["containers"]:
            state = pod.containers[container["name"]]
            process = run.processes.get(container["name"])
            if state.restart_at is not None:
                if time.monotonic() >= state.restart_at:
                    state.restarts += 1
                    self._start(pod, container)
                continue
            if process is None or "terminated" in state.status.get("state", {}):
                continue
            if process.popen.poll() is None:
                self._probe(pod, container, state, process)
                continue
            terminated = _terminated(process)
            state.ready = False
            if policy == "Always" or (policy == "OnFailure" and terminated["exitCode"] != 0):
                backoff = RESTART_BACKOFF[min(state.restarts, len(RESTART_BACKOFF) - 1)]
                state.status = {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {backoff}s "
                                                      f"restarting failed container={container['name']}"}},
                                "lastState": {"terminated": terminated}}
                state.restart_at = time.monotonic() + backoff
            else:
                state.status = {"state": {"terminated": terminated}}
        if all("terminated" in s.status.get("state", {}) for s in pod.containers.values()):
            pod.ended = True
            self._release(pod)

    def _probe(self, pod: Pod, container: dict[str, Any], state: ContainerState, process: Process) -> None:
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if not probe or time.monotonic() < state.probe_next.get(kind, 0):
                continue
            state.probe_next[kind] = time.monotonic() + float(probe.get("periodSeconds") or 10)
            passed = self._check(pod.run, container, probe)
            failures = 0 if passed else state.probe_failures.get(kind, 0) + 1
            state.probe_failures[kind] = failures
            if kind == "readinessProbe":
                state.ready = passed if passed or failures >= int(probe.get("failureThreshold") or 3) else state.ready
            elif failures >= int(probe.get("failureThreshold") or 3):
                log.info("liveness probe of %s/%s failed %d times: restarting", pod.run.namespace, pod.run.name,
                         failures)
                grace = float(pod.run.spec.get("terminationGracePeriodSeconds") or 30)
                threading.Thread(target=PodRun.stop, args=(process, grace), daemon=True).start()

    @staticmethod
    def _check(run: PodRun, container: dict[str, Any], probe: dict[str, Any]) -> bool:
        """httpGet and tcpSocket probes against the pod IP, as a kubelet sends them; exec probes pass."""
        target = probe.get("httpGet") or probe.get("tcpSocket")
        if target is None:
            return True
        port = target["port"]
        if isinstance(port, str) and not port.isdigit():
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                url = f"http://{run.pod_ip}:{port}{target.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return bool(200 <= response.status < 400)
            import socket

            with socket.create_connection((run.pod_ip, int(port)), timeout=timeout):
                return True
        except OSError:
            return False

    # ---- deletion -------------------------------------------------------------------------------------
    def _delete(self, node: Node, pod: dict[str, Any], known: Pod | None) -> None:
        """SIGTERM, the grace period, SIGKILL; the final status; then the object goes (grace 0, this uid)."""
        meta = pod["metadata"]
        if known is not None and known.stopping is None and known.run.processes:
            for state in known.containers.values():
                state.restart_at = None  # a pod being deleted is not restarted
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            known.stopping = threading.Thread(target=self._stop_all, args=(known, grace), daemon=True)
            known.stopping.start()
        if known is not None and known.stopping is not None and known.stopping.is_alive():
            return
        if known is not None and not known.ended:
            for name, state in known.containers.items():
                process = known.run.processes.get(name)
                if "terminated" in state.status.get("state", {}):
                    continue
                if process is not None and process.popen.poll() is not None and state.restart_at is None:
                    state.status = {**state.status, "state": {"terminated": _terminated(process)}}
                else:  # never started, or waiting to restart
                    state.status = {**state.status, "state": {"terminated": {
                        "exitCode": 137, "reason": "ContainerStatusUnknown", "message": "the pod was deleted",
                        "startedAt": now(), "finishedAt": now()}}}
                state.ready = False
            known.ended = True
            self._release(known)
            self._write(node, known)
        try:
            node.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    @staticmethod
    def _stop_all(pod: Pod, grace: float) -> None:
        enders = [threading.Thread(target=PodRun.stop, args=(p, grace), daemon=True)
                  for p in pod.run.processes.values()]
        for ender in enders:
            ender.start()
        for ender in enders:
            ender.join()

    @staticmethod
    def _event(node: Node, run: PodRun, reason: str, message: str) -> None:
        stamp = now()
        body = {"metadata": {"generateName": f"{run.name}.", "namespace": run.namespace},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": run.name, "namespace": run.namespace,
                                   "uid": run.meta["uid"]},
                "type": "Warning", "reason": reason, "message": message, "firstTimestamp": stamp,
                "lastTimestamp": stamp, "count": 1, "source": {"component": "kubelet", "host": node.spec.name}}
        try:
            node.core.create_namespaced_event(run.namespace, body)
        except ApiException as exc:
            log.warning("event %s for %s/%s not posted: %s", reason, run.namespace, run.name, exc.reason)

    def _release(self, pod: Pod) -> None:
        if self.forwarder is not None:
            self.forwarder.close(pod.run.pod_ip)

    # ---- status ---------------------------------------------------------------------------------------
    def _write(self, node: Node, pod: Pod) -> None:
        status = self._status(pod)
        if status == pod.written:
            return
        try:
            node.core.patch_namespaced_pod_status(pod.run.name, pod.run.namespace, {"status": status},
                                                  _content_type=STRATEGIC)
        except ApiException as exc:
            if exc.status != 404:
                raise
        pod.written = status

    def _status(self, pod: Pod) -> dict[str, Any]:
        run = pod.run
        started = pod.waiting is None
        statuses = []
        for container in run.spec["containers"]:
            state = pod.containers[container["name"]]
            statuses.append({"name": container["name"], "image": container["image"],
                             "imageID": f"local://{container['image']}", "restartCount": state.restarts,
                             "ready": state.ready, "started": "running" in state.status.get("state", {}),
                             **state.status})
        terminated = [s["state"]["terminated"] for s in statuses if "terminated" in s.get("state", {})]
        if pod.ended and len(terminated) == len(statuses):
            phase = "Succeeded" if all(t["exitCode"] == 0 for t in terminated) else "Failed"
        else:
            phase = "Running" if started else "Pending"
        ready = phase == "Running" and all(s["ready"] for s in statuses)
        conditions = [{"type": "PodReadyToStartContainers", "status": str(started)},
                      {"type": "Initialized", "status": "True"},
                      {"type": "ContainersReady", "status": str(ready)}, {"type": "Ready", "status": str(ready)}]
        written = {c["type"]: c for c in (pod.written or {}).get("conditions") or []}
        for condition in conditions:
            old = written.get(condition["type"])
            condition["lastTransitionTime"] = old["lastTransitionTime"] if old and \
                old["status"] == condition["status"] else now()
        status: dict[str, Any] = {"phase": phase, "conditions": conditions, "hostIP": "127.0.0.1",
                                  "hostIPs": [{"ip": "127.0.0.1"}], "containerStatuses": statuses,
                                  "startTime": (pod.written or {}).get("startTime") or now()}
        if started or pod.ended:
            status.update(podIP=run.pod_ip, podIPs=[{"ip": run.pod_ip}])
        return status

    # ---- hollow pods: told how to end ------------------------------------------------------------------
    def finish(self, namespace: str, name: str, code: int = 0, message: str = "") -> None:
        """End a hollow node's pod as if its container exited with `code` and left `message`."""
        with self.finish_lock:
            self.finishes[(namespace, name)] = (code, message)
        self.wake.set()

    def _finishing(self, node: Node) -> set[str]:
        with self.finish_lock:
            asked = set(self.finishes)
        return {uid for uid, pod in node.pods.items() if (pod.run.namespace, pod.run.name) in asked}

    def _end_hollow(self, pod: Pod) -> None:
        with self.finish_lock:
            ending = self.finishes.pop((pod.run.namespace, pod.run.name), None)
        if ending is None or pod.waiting is not None:
            return
        code, message = ending
        for state in pod.containers.values():
            started = state.status.get("state", {}).get("running", {}).get("startedAt", now())
            state.status = {"state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                                     "message": message, "startedAt": started, "finishedAt": now()}}}
            state.ready = False
        pod.ended = True

    def release(self) -> None:
        """Lift the hold: hollow nodes start their pods."""
        self.hold.clear()
        for node in self.nodes:
            with node.lock:
                node.dirty |= set(node.pods)
        self.wake.set()

    # ---- lookups for pods and the log endpoint --------------------------------------------------------
    def _image(self, name: str) -> Image | None:
        if name in self.images:
            return self.images[name]
        repository = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        return self.images.get(f"{repository}:*")

    def _pod_ip(self, namespace: str, hostname: str, subdomain: str) -> str | None:
        for node in self.nodes:
            for pod in list(node.pods.values()):
                spec = pod.run.spec
                if pod.run.namespace == namespace and spec.get("hostname") == hostname and \
                        spec.get("subdomain") == subdomain:  # its IP is given when it is admitted
                    return pod.run.pod_ip
        return None

    def _log_file(self, namespace: str, name: str, container: str, previous: bool) -> tuple[Path, bool] | None:
        for node in self.nodes:
            for pod in list(node.pods.values()):
                if (pod.run.namespace, pod.run.name) == (namespace, name) and container in pod.run.processes:
                    process = pod.run.processes[container]
                    path = process.log.with_suffix(".previous.log") if previous else process.log
                    return path, process.popen.poll() is None
        return None

    def clean(self) -> None:
        """Remove the pods' folders (logs, volumes) once stopped."""
        shutil.rmtree(self.state / "pods", ignore_errors=True)


def _terminated(process: Process) -> dict[str, Any]:
    code = PodRun.exit_code(process)
    return {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "message": PodRun.termination_message(process, code), "startedAt": process.started,
            "finishedAt": now(), "containerID": f"local://{process.popen.pid}"}
