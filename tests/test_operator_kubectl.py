"""A real client drives the emulated API: kubectl apply an example, get ftj, wait for Succeeded.

kubectl needs list responses with `kind` and honoured field selectors (kubectl wait lists with
metadata.name=...): tests/fixtures_k8s.py mends both; the test itself is not weakened.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
import yaml

from kubetune import contract
from tests.fixtures_operator import Backend
from tests.k8s_tools import binary
from tests.operator_harness import NS, Api, Operator, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "reviews-sentiment-s3.yaml"


def kubectl(cluster: Backend, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run([str(binary("kubectl")), "-n", NS, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.plays_controller
def test_kubectl_apply_get_and_wait_for_succeeded(backend: Backend, operator: Operator, api: Api) -> None:
    k8s_cluster = backend
    applied = kubectl(k8s_cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert applied.returncode == 0, applied.stderr
    assert "finetunejob.kubetune.io/reviews-sentiment created" in applied.stdout
    job = wait_for("the Job", lambda: api.job("reviews-sentiment-0"), operator=operator)
    listed = kubectl(k8s_cluster, "get", "ftj")
    assert listed.returncode == 0 and "reviews-sentiment" in listed.stdout, listed.stderr
    one = kubectl(k8s_cluster, "get", "ftj", "reviews-sentiment", "-o", "json")
    assert json.loads(one.stdout)["spec"]["model"]["task"] == "sequence-classification", one.stderr
    waiter = subprocess.Popen([str(binary("kubectl")), "-n", NS, "wait", "--for=condition=Succeeded",
                               "ftj/reviews-sentiment", "--timeout=120s"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)})
    [pod] = api.start_pods(job["metadata"]["name"])
    wait_for("Running", lambda: api.status("reviews-sentiment").get("phase") == "Running", operator=operator)
    assert waiter.poll() is None  # still waiting: not Succeeded yet
    api.terminate(pod, 0, json.dumps({"outcome": "Succeeded", "exitCode": 0}), reason="Completed")
    api.finish_job("reviews-sentiment-0", "Complete")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    phase = kubectl(k8s_cluster, "get", "ftj", "reviews-sentiment", "-o", "jsonpath={.status.phase}")
    assert phase.stdout == "Succeeded", phase.stderr


def watch_events(list_call: Any, *args: Any, resource_version: str, **kwargs: Any) -> list[tuple[str, str]]:
    """(type, name) of each event a watch from `resource_version` streams."""
    events: list[tuple[str, str]] = []
    stream = kubernetes.watch.Watch().stream(list_call, *args, resource_version=resource_version, timeout_seconds=3,
                                             _request_timeout=5, **kwargs)
    try:
        for event in stream:
            found = event["object"]  # a dict from the custom-objects API, a model object from the core one
            events.append((event["type"], found["metadata"]["name"] if isinstance(found, dict) else
                           found.metadata.name))
    except urllib3.exceptions.ReadTimeoutError:
        pass  # the emulator ignores timeoutSeconds; a real server closes the stream after it
    return events


def test_a_watch_from_a_listed_version_streams_only_later_changes(backend: Backend, api: Api) -> None:
    """What kopf does: list, then watch from the list's resourceVersion. A real API server then streams only
    what changed after that version; kmock started every watch with an ADDED per stored object, and
    tests/fixtures_k8s.py mends that. (kubectl's `get -w` watches from version 0, "any", so it cannot tell.)"""
    manifest = yaml.safe_load(EXAMPLE.read_text())

    def create(name: str) -> None:
        api.apply({**manifest, "metadata": {"name": name, "namespace": NS}})

    create("watch-unchanged")
    create("watch-changed")
    listed = api.custom.list_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS, contract.PLURAL)
    api.patch_ftj("watch-changed", {"metadata": {"labels": {"team": "ml"}}})
    create("watch-new")
    try:
        events = watch_events(api.custom.list_namespaced_custom_object, contract.API_GROUP, contract.API_VERSION, NS,
                              contract.PLURAL, resource_version=listed["metadata"]["resourceVersion"])
    finally:
        for name in ("watch-unchanged", "watch-changed", "watch-new"):
            api.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, NS,
                                                       contract.PLURAL, name)
    # A running operator may patch the jobs' status meanwhile (more MODIFIED events): only these are fixed.
    assert ("ADDED", "watch-unchanged") not in events and ("ADDED", "watch-changed") not in events, events
    assert events.count(("ADDED", "watch-new")) == 1, events
    assert [e for e in events if e[1] == "watch-changed"][:1] == [("MODIFIED", "watch-changed")], events


def test_a_watch_from_a_listed_version_streams_deletions_since(backend: Backend, api: Api) -> None:
    """An object the list showed and that is deleted before the watch starts arrives as DELETED (kmock's
    replay skips deleted objects, so a watcher would keep it forever; tests/fixtures_k8s.py mends that).
    ConfigMaps: nothing in the suite's operator touches them, so the events are exactly these."""
    selector = "kubetune-test=watch-deletions"

    def create(name: str) -> None:
        api.core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": {
            "kubetune-test": "watch-deletions"}}, "data": {"k": "v"}})

    create("watch-kept")
    create("watch-deleted")
    listed = api.core.list_namespaced_config_map(NS, label_selector=selector)
    api.core.delete_namespaced_config_map("watch-deleted", NS)
    create("watch-added")
    try:
        events = watch_events(api.core.list_namespaced_config_map, NS, label_selector=selector,
                              resource_version=listed.metadata.resource_version)
    finally:
        for name in ("watch-kept", "watch-added"):
            api.core.delete_namespaced_config_map(name, NS)
    assert sorted(events) == [("ADDED", "watch-added"), ("DELETED", "watch-deleted")], events
