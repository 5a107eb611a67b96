"""The operator's own Prometheus metrics, on their own registry (served on the operator metrics port).

Names come from kubetune.contract (METRIC_OP_*) so the dashboard and alerts agree with what is exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubetune import contract

REGISTRY = CollectorRegistry()

_JOBS = Gauge(contract.METRIC_OP_JOBS, "FineTuneJobs by namespace and phase.", ["namespace", "phase"],
              registry=REGISTRY)
_RECONCILE = Histogram(contract.METRIC_OP_RECONCILE_SECONDS, "Duration of one reconcile pass of one FineTuneJob.",
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=REGISTRY)
# Counter names given without `_total`: prometheus_client appends it on export.
_API_ERRORS = Counter(contract.METRIC_OP_API_ERRORS.removesuffix("_total"),
                      "Kubernetes API errors by kind (HTTP status or exception name).", ["kind"], registry=REGISTRY)
_CHILDREN = Counter(contract.METRIC_OP_CHILDREN.removesuffix("_total"), "Child objects created, by kind.", ["kind"],
                    registry=REGISTRY)
_FAILURES = Counter(contract.METRIC_OP_FAILURES.removesuffix("_total"), "FineTuneJobs that ended Failed, by reason.",
                    ["namespace", "reason"], registry=REGISTRY)
_RESTARTS = Counter(contract.METRIC_OP_RESTARTS.removesuffix("_total"), "Gang restarts of FineTuneJobs.",
                    ["namespace", "job", "reason"], registry=REGISTRY)


def set_job_counts(counts: dict[tuple[str, str], int]) -> None:
    """(namespace, phase) -> count; series that disappeared drop to nothing rather than staying stale."""
    _JOBS.clear()
    for (namespace, phase), count in counts.items():
        _JOBS.labels(namespace=namespace, phase=phase).set(count)


@contextmanager
def time_reconcile() -> Iterator[None]:
    with _RECONCILE.time():
        yield


def api_error(kind: str) -> None:
    _API_ERRORS.labels(kind=kind).inc()


def child_created(kind: str) -> None:
    _CHILDREN.labels(kind=kind).inc()


def job_failed(namespace: str, reason: str) -> None:
    _FAILURES.labels(namespace=namespace, reason=reason).inc()


def gang_restart(namespace: str, job: str, reason: str) -> None:
    _RESTARTS.labels(namespace=namespace, job=job, reason=reason).inc()


def serve(port: int) -> None:
    prometheus_client.start_http_server(port, registry=REGISTRY)
