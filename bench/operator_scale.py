"""500 FineTuneJobs at once against the emulated API: how fast and how cheaply the operator takes them.

    .venv/bin/python bench/operator_scale.py [--jobs 500] [--refresh 2]

Measures: seconds until every job has its children and `phase: Pending`; per-job latency from submit to
Pending (p50/p99) and the operator's own reconcile-pass histogram; API requests and writes per job on
creation; the operator's peak RSS; then seconds until 500 jobs follow their pods to `phase: Running`.
The last line is one JSON object. Targets (issue 9): < 60 s for 500 on 2 cores, <= 6 writes per job,
peak RSS < 200 MiB. Not a test: it prints numbers, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from kubetune import contract, procmem
from kubetune.jobfile import job_document
from kubetune.netutil import free_port
from tests.fixtures_k8s import Cluster
from tests.operator_harness import NS, Api, Operator

SPEC = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
    "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "1Gi"},
}
BENCH_AGENT = "kubetune-bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def list_ftjs(api: Api) -> list[dict[str, Any]]:
    found = api.custom.list_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL)
    items: list[dict[str, Any]] = found["items"]
    return items


def wait_phase(api: Api, names: set[str], phase: str, submitted: dict[str, float], timeout: float
               ) -> tuple[float, dict[str, float]]:
    """Poll one list per second (the emulator shares this process: faster polling slows what it measures).

    Returns (seconds until all, per-job seconds from submit to the phase)."""
    start, seen = time.monotonic(), {}
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        for item in list_ftjs(api):
            name = item["metadata"]["name"]
            if name in names and name not in seen and (item.get("status") or {}).get("phase") == phase:
                seen[name] = now - submitted[name]
        if len(seen) == len(names):
            break
        time.sleep(1.0)
    return time.monotonic() - start, seen


def histogram_quantile(text: str, name: str, q: float) -> float:
    buckets = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def peak_rss_mib(pid: int) -> float:
    return procmem.peak_rss_bytes(pid) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--refresh", type=float, default=2.0, help="KUBETUNE_REFRESH_SECONDS of the operator")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    print(f"cpu: {cpu_model()}, cores: {os.cpu_count()}, python {platform.python_version()}; "
          f"precision: n/a (no tensors); load average at start: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cluster = Cluster(work).start()
    metrics_port = free_port()
    # Without the pre-flight stage, so the figures stay comparable with the recorded ones (issue 9's targets).
    env = {"KUBETUNE_PREFLIGHT": "false",
           "KUBETUNE_REFRESH_SECONDS": str(args.refresh), "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
           "KUBETUNE_HEALTH_PORT": str(free_port()), "KUBETUNE_TRAINER_METRICS_URL": "http://127.0.0.1:9/{pod_ip}"}
    operator = Operator(cluster.kubeconfig, env, work / "operator.log").start()
    api = Api(cluster.kubeconfig)
    api.client.user_agent = BENCH_AGENT
    time.sleep(5)  # the operator's startup (imports, discovery, the first empty list)
    assert cluster.emulator is not None
    first = len(cluster.emulator.requests_seen)
    names = {f"scale-{i:04d}" for i in range(args.jobs)}
    submitted: dict[str, float] = {}

    def submit(name: str) -> None:
        doc = job_document(name, SPEC)
        doc["metadata"]["namespace"] = NS
        submitted[name] = time.monotonic()
        api.apply(doc)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(submit, sorted(names)))
    pending_s, to_pending = wait_phase(api, names, "Pending", submitted, args.timeout)
    time.sleep(args.refresh + 1)  # let a refresh pass run over all: it must not write again
    requests = list(zip(cluster.emulator.requests_seen[first:], cluster.emulator.agents_seen[first:], strict=True))
    by_operator = [r for r, agent in requests if agent != BENCH_AGENT and not r[1].endswith("/healthz")]
    writes = [r for r in by_operator if r[0] in ("POST", "PATCH", "PUT", "DELETE")]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    pass_p50 = histogram_quantile(text, contract.METRIC_OP_RECONCILE_SECONDS, 0.5)
    pass_p99 = histogram_quantile(text, contract.METRIC_OP_RECONCILE_SECONDS, 0.99)

    # 500 status updates: the kubelet reports every pod Running; the operator must follow.
    mark = time.monotonic()

    def run_pods(name: str) -> None:
        submitted[name] = time.monotonic()
        api.start_pods(f"{name}-0")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run_pods, sorted(names)))
    started_s = time.monotonic() - mark
    running_s, to_running = wait_phase(api, names, "Running", submitted, args.timeout)
    rss = peak_rss_mib(operator.process.pid) if operator.process else float("nan")
    operator.stop()
    cluster.stop()
    result = {
        "jobs": args.jobs, "refresh_seconds": args.refresh,
        "all_pending_seconds": round(pending_s, 2), "pending_reached": len(to_pending),
        "submit_to_pending_p50_s": round(percentile(list(to_pending.values()), 0.5), 3),
        "submit_to_pending_p99_s": round(percentile(list(to_pending.values()), 0.99), 3),
        "reconcile_pass_p50_s_le": pass_p50, "reconcile_pass_p99_s_le": pass_p99,
        "api_requests_per_job": round(len(by_operator) / args.jobs, 2),
        "api_writes_per_job": round(len(writes) / args.jobs, 2),
        "kubelet_updates_seconds": round(started_s, 2),
        "all_running_seconds": round(running_s, 2), "running_reached": len(to_running),
        "pods_running_to_phase_p50_s": round(percentile(list(to_running.values()), 0.5), 3),
        "pods_running_to_phase_p99_s": round(percentile(list(to_running.values()), 0.99), 3),
        "operator_peak_rss_mib": round(rss, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
