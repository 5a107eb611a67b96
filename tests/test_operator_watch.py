"""State from watches, not polls (issue 27), on the real control plane with the chart's operator.

Scrapes are slowed to once a minute here, so whatever reaches status in seconds came through a watch event; the
API server's audit log counts the operator's requests; and the API server itself is restarted to drop every
watch at once.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.cluster import KubeCluster
from tests.operator_harness import Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_operator import CPU, OPERATOR_USER, submit

READS = ("get", "list")


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {"operator": {"refreshSeconds": 60, "resyncSeconds": 300}}


def test_a_pod_change_reaches_status_within_one_event(api: Api, operator: ChartOperator,
                                                       trainer: ScriptedTrainer) -> None:
    submit(api, "evented", **CPU)
    wait_for("the trainer", lambda: trainer.started("evented-0-0"), operator=operator)
    started = time.monotonic()
    wait_for("Running", lambda: api.status("evented").get("phase") == "Running", timeout=15, operator=operator)
    trainer.exit("evented-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait_for("Succeeded", lambda: api.status("evented").get("phase") == "Succeeded", timeout=15, operator=operator)
    assert time.monotonic() - started < 15  # a sweep would take a refresh (60 s) or a resync (300 s)


def test_an_idle_running_job_costs_no_reads(api: Api, operator: ChartOperator, trainer: ScriptedTrainer,
                                            kube: KubeCluster) -> None:
    submit(api, "idle", **CPU)
    wait_for("the trainer", lambda: trainer.started("idle-0-0"), operator=operator)
    wait_for("Running", lambda: api.status("idle").get("phase") == "Running", operator=operator)
    time.sleep(2)
    _, since = kube.control_plane.audit()
    time.sleep(20)
    events, _ = kube.control_plane.audit(since)
    mine = [e for e in events if e.user == OPERATOR_USER]
    reads = [(e.verb, e.resource, e.name) for e in mine if e.verb in READS]
    assert reads == [], f"an idle running job read the API: {reads}"
    writes = [(e.verb, e.resource, e.name) for e in mine if e.verb not in (*READS, "watch")]
    assert writes == [], f"an idle running job wrote: {writes}"  # the cost figure waits a minute
    trainer.exit("idle-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait_for("Succeeded", lambda: api.status("idle").get("phase") == "Succeeded", operator=operator)


def test_a_job_that_ends_while_every_watch_is_down_still_ends_succeeded(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, kube: KubeCluster) -> None:
    submit(api, "gap", **CPU)
    wait_for("the trainer", lambda: trainer.started("gap-0-0"), operator=operator)
    wait_for("Running", lambda: api.status("gap").get("phase") == "Running", operator=operator)
    with kube.control_plane.apiserver_down():
        trainer.exit("gap-0-0", 0, {"outcome": "Succeeded", "exitCode": 0, "step": 10, "totalSteps": 10})
        wait_for("the pod's end", lambda: trainer.ended("gap-0-0"))
        time.sleep(2)  # the node agent and the operator find no API server meanwhile
    wait_for("Succeeded", lambda: api.status("gap").get("phase") == "Succeeded", timeout=90, operator=operator)
    assert api.status("gap")["progress"]["percent"] == 100.0
