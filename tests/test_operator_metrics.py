"""The operator's own metrics: contract names, served over real HTTP from its own registry."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kubetune import contract
from kubetune.netutil import free_port
from kubetune_operator import metrics


def test_metrics_are_served_with_the_contract_names() -> None:
    metrics.set_job_counts({("ml", "Running"): 2, ("ml", "Pending"): 1})
    metrics.set_job_counts({("ml", "Running"): 3})  # a phase that emptied must not stay stale
    with metrics.time_reconcile():
        pass
    metrics.api_error("409")
    metrics.child_created("Job")
    metrics.gang_restart("ml", "reviews", "Preempted")
    metrics.job_failed("ml", "OOMKilled")
    port = free_port()
    metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[(contract.METRIC_OP_JOBS, (("namespace", "ml"), ("phase", "Running")))] == 3
    assert (contract.METRIC_OP_JOBS, (("namespace", "ml"), ("phase", "Pending"))) not in samples
    assert samples[(contract.METRIC_OP_RECONCILE_SECONDS + "_count", ())] >= 1
    assert samples[(contract.METRIC_OP_API_ERRORS, (("kind", "409"),))] >= 1
    assert samples[(contract.METRIC_OP_CHILDREN, (("kind", "Job"),))] >= 1
    restarts = (contract.METRIC_OP_RESTARTS, (("job", "reviews"), ("namespace", "ml"), ("reason", "Preempted")))
    assert samples[restarts] >= 1
    assert samples[(contract.METRIC_OP_FAILURES, (("namespace", "ml"), ("reason", "OOMKilled")))] == 1
