"""The operator at scale on the real control plane: N FineTuneJobs at once, then all their pods Running, then 5%
finishing a minute.

    .venv/bin/python bench/operator_scale.py --jobs 1000 [--finish-minutes 3] [--idle-seconds 120]

The API server, controller manager and scheduler are the test control plane's (tests/control_plane.py, built
from the Kubernetes Go module; the controllers' client rate limits raised as large clusters do); two hollow
nodes report their pods Running without running anything (Kubernetes' kubemark does the same; the node agent's
`hollow` mode), and end them when told. `kubetune operator` runs as a process with its own identity, so the API
server's audit log attributes its requests. Measures: time until every job has its children and phase Pending;
then, pods released, the lag from a pod turning Running to its job's phase (p50, p99); API requests per running
job per minute while idle (scrapes are not API requests; hollow pods refuse them at once); writes per job on
creation; the lag from a pod's end to its job's Succeeded; the operator's peak RSS and reconcile latency. Not
a test: it prints numbers, the last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kubernetes
from prometheus_client.parser import text_string_to_metric_families

from kubetune import contract, procmem
from kubetune.crd import build_crd
from kubetune.jobfile import job_document
from kubetune.netutil import free_port
from tests.control_plane import ControlPlane
from tests.kubelet import NodeAgent, NodeSpec

NS = "scale"
OPERATOR_USER = "kubetune-operator-bench"
SPEC = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
    "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "1Gi"},
}
FAST_CONTROLLERS = {  # what a large cluster's control plane runs with; the defaults (20 QPS) would dominate
    "kube-controller-manager": ["--kube-api-qps=400", "--kube-api-burst=800", "--concurrent-job-syncs=50"],
    "kube-scheduler": ["--kube-api-qps=400", "--kube-api-burst=800"],
    "kube-apiserver": ["--max-requests-inflight=1600", "--max-mutating-requests-inflight=800"],
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else float("nan")


class Watcher:
    """Per-object times from watches: when each FineTuneJob first showed a phase, when each pod first ran."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.phase_at: dict[tuple[str, str], float] = {}  # (job, phase) -> monotonic seconds
        self.pod_running_at: dict[str, float] = {}  # FineTuneJob name -> when its pod first ran
        for target in (self._jobs, self._pods):
            threading.Thread(target=target, daemon=True).start()

    def _stream(self, call: Any, *args: Any) -> Any:
        while True:
            try:
                yield from kubernetes.watch.Watch().stream(call, *args, timeout_seconds=600, deserialize=False)
            except Exception:  # an ended watch: start another (events seen twice only refine nothing)
                time.sleep(0.5)

    def _jobs(self) -> None:
        for event in self._stream(self.custom.list_namespaced_custom_object, contract.API_GROUP,
                                  contract.API_VERSION, NS, contract.PLURAL):
            obj = event.get("object") or {}
            phase = (obj.get("status") or {}).get("phase")
            created = any(c.get("type") == "Created" and c.get("status") == "True"
                          for c in (obj.get("status") or {}).get("conditions") or [])
            if phase and (phase != "Pending" or created):
                self.phase_at.setdefault((obj["metadata"]["name"], phase), time.monotonic())

    def _pods(self) -> None:
        for event in self._stream(self.core.list_namespaced_pod, NS):
            obj = event.get("object") or {}
            if (obj.get("status") or {}).get("phase") == "Running":
                name = (obj["metadata"].get("labels") or {}).get(contract.LABEL_JOB_NAME)
                if name:
                    self.pod_running_at.setdefault(name, time.monotonic())

    def wait(self, names: list[str], phase: str, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout and sum((n, phase) in self.phase_at for n in names) < len(names):
            time.sleep(0.5)
        return time.monotonic() - start


def histogram(text: str, name: str, q: float) -> float:
    buckets = sorted((float(s.labels["le"]), s.value) for f in text_string_to_metric_families(text)
                     for s in f.samples if s.name == name + "_bucket")
    total = buckets[-1][1] if buckets else 0
    return next((bound for bound, count in buckets if total and count >= q * total), float("nan"))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def operator_requests(plane: ControlPlane, since: int) -> tuple[list[Any], int]:
    events, offset = plane.audit(since)
    return [e for e in events if e.user == OPERATOR_USER], offset


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_profile(pids: dict[str, int], since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds per process (since an earlier profile): who the 2 cores worked for."""
    now = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return {name: round(value - (since or {}).get(name, 0.0), 1) for name, value in now.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument("--finish-minutes", type=int, default=3, help="minutes in which 5%% of the jobs end each")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    print(f"cpu: {cpu_model()}, cores: {os.cpu_count()}, python {platform.python_version()}; precision: n/a "
          f"(no tensors); load average at start: {os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    plane = ControlPlane(work / "control-plane", extra_args=FAST_CONTROLLERS).start()
    half = args.jobs // 2 + 1
    nodes = [NodeSpec(f"hollow-{n}", cpu=str(2 * half), memory=f"{2 * half}Gi", gpus=half, pods=half + 10,
                      hollow=True) for n in "ab"]
    agent = NodeAgent(plane, nodes, {}, work / "nodes", work / "node")
    agent.hold.set()  # pods wait in ContainerCreating until every job is Pending
    agent.start()
    client = kubernetes.config.new_client_from_config(str(plane.kubeconfig))
    kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition(build_crd())
    core = kubernetes.client.CoreV1Api(client)
    while True:
        try:
            core.create_namespace({"metadata": {"name": NS}})
            break
        except kubernetes.client.ApiException:
            time.sleep(0.5)  # the controller manager's first seconds
    operator_config = plane.write_kubeconfig(work / "operator.kubeconfig", OPERATOR_USER, ("system:masters",))
    metrics_port = free_port()
    env = {**os.environ, "KUBECONFIG": str(operator_config), "KUBETUNE_PREFLIGHT": "false",
           "KUBETUNE_REFRESH_SECONDS": "10", "KUBETUNE_RESYNC_SECONDS": "300",
           "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port), "KUBETUNE_HEALTH_PORT": str(free_port())}
    with (work / "operator.log").open("wb") as log:
        operator = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
    watcher = Watcher(client)
    time.sleep(8)  # the operator's start: imports, discovery, the first empty lists
    pids = {**{name: process.pid for name, process in plane.processes.items()}, "kubetune operator": operator.pid,
            "bench (node agent, watcher, submitters)": os.getpid()}
    cpu_start = cpu_profile(pids)
    names = [f"scale-{i:05d}" for i in range(args.jobs)]
    _, mark = plane.audit()
    submitted: dict[str, float] = {}
    custom = kubernetes.client.CustomObjectsApi(client)

    def submit(name: str) -> None:
        doc = job_document(name, SPEC)
        doc["metadata"]["namespace"] = NS
        submitted[name] = time.monotonic()
        custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL, doc)

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(submit, names))
    submit_s = time.monotonic() - start
    pending_s = watcher.wait(names, "Pending", args.timeout) + submit_s
    to_pending = [watcher.phase_at[(n, "Pending")] - submitted[n] for n in names if (n, "Pending") in watcher.phase_at]
    cpu_pending = cpu_profile(pids, cpu_start)
    time.sleep(5)
    created, mark = operator_requests(plane, mark)
    writes = [e for e in created if e.verb in ("create", "update", "patch", "delete")]
    print(f"{args.jobs} submitted in {submit_s:.1f} s, all Pending with children {pending_s:.1f} s after the first",
          flush=True)

    released = time.monotonic()
    agent.release()
    running_s = watcher.wait(names, "Running", args.timeout)
    lag_running = [watcher.phase_at[(n, "Running")] - watcher.pod_running_at[n] for n in names
                   if (n, "Running") in watcher.phase_at and n in watcher.pod_running_at]
    pods_running_s = max(watcher.pod_running_at.values(), default=released) - released
    print(f"pods released: all Running in {pods_running_s:.1f} s, all jobs Running {running_s:.1f} s", flush=True)

    _, mark = operator_requests(plane, mark)
    time.sleep(args.idle_seconds)
    idle, mark = operator_requests(plane, mark)
    idle_requests = [e for e in idle if e.verb != "watch"]
    per_job_minute = len(idle_requests) / args.jobs / (args.idle_seconds / 60)

    finished: dict[str, float] = {}
    each = max(1, args.jobs // 20)
    for minute in range(args.finish_minutes):
        batch = names[minute * each:(minute + 1) * each]
        message = json.dumps({"outcome": "Succeeded", "exitCode": 0})
        for pod in core.list_namespaced_pod(NS, label_selector=f"{contract.LABEL_COMPONENT}=trainer").items:
            name = pod.metadata.labels.get(contract.LABEL_JOB_NAME)
            if name in batch:
                finished[name] = time.monotonic()
                agent.finish(NS, pod.metadata.name, 0, message)
        time.sleep(max(0.0, 60 - (time.monotonic() - finished[batch[0]])) if minute + 1 < args.finish_minutes
                   else 0)
    watcher.wait(list(finished), "Succeeded", 300)
    lag_done = [watcher.phase_at[(n, "Succeeded")] - t for n, t in finished.items() if (n, "Succeeded") in
                watcher.phase_at]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    rss = procmem.peak_rss_bytes(operator.pid) / 2**20
    cpu_total = cpu_profile(pids, cpu_start)
    operator.terminate()
    operator.wait(60)
    agent.stop()
    plane.stop()
    result = {
        "jobs": args.jobs, "api_server": "kube-apiserver v1.37.2 (tests/control_plane.py), hollow nodes",
        "submit_seconds": round(submit_s, 1), "all_pending_seconds": round(pending_s, 1),
        "pending_reached": len(to_pending), "submit_to_pending_p50_s": percentile(to_pending, 0.5),
        "submit_to_pending_p99_s": percentile(to_pending, 0.99),
        "api_writes_per_job_on_creation": round(len(writes) / args.jobs, 2),
        "api_requests_per_job_on_creation": round(len(created) / args.jobs, 2),
        "pods_running_seconds": round(pods_running_s, 1), "all_running_seconds": round(running_s, 1),
        "running_reached": len(lag_running), "pod_running_to_phase_p50_s": percentile(lag_running, 0.5),
        "pod_running_to_phase_p99_s": percentile(lag_running, 0.99),
        "idle_requests_per_running_job_per_minute": round(per_job_minute, 3),
        "idle_requests_by_verb": {v: sum(e.verb == v for e in idle_requests) for v in
                                  sorted({e.verb for e in idle_requests})},
        "finished": len(finished), "pod_end_to_succeeded_p50_s": percentile(lag_done, 0.5),
        "pod_end_to_succeeded_p99_s": percentile(lag_done, 0.99),
        "reconcile_p50_s_le": histogram(text, contract.METRIC_OP_RECONCILE_SECONDS, 0.5),
        "reconcile_p99_s_le": histogram(text, contract.METRIC_OP_RECONCILE_SECONDS, 0.99),
        "operator_peak_rss_mib": round(rss, 1),
        "cpu_seconds_until_all_pending": cpu_pending, "cpu_seconds_whole_run": cpu_total,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
