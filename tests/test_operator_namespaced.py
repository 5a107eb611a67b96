"""Namespaced mode: with KUBETUNE_NAMESPACES the operator handles FineTuneJobs in those namespaces only.

The real operator process (kopf lists and watches Namespaces in this mode; tests/fixtures_k8s.py mends
kmock's parsing of `/api/v1/namespaces` for it) against the emulated API; the test plays the Job controller.
"""

from __future__ import annotations

import json
import time

import pytest

from kubetune import contract
from kubetune.jobfile import job_document
from tests.operator_harness import NS, Api, Operator, wait_for
from tests.test_operator import BASE, submit

pytestmark = pytest.mark.plays_controller
UNWATCHED = "default"


@pytest.fixture(scope="module")
def operator_env(operator_env: dict[str, str]) -> dict[str, str]:
    return {**operator_env, "KUBETUNE_NAMESPACES": NS}


def test_a_watched_namespace_is_handled_and_an_unwatched_one_left_alone(api: Api, operator: Operator) -> None:
    elsewhere = job_document("elsewhere", BASE)
    api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED,
                                               contract.PLURAL, elsewhere)
    submit(api, "watched")
    wait_for("Job watched-0", lambda: api.job("watched-0"), operator=operator)
    [pod] = api.start_pods("watched-0")
    api.terminate(pod, 0, json.dumps({"outcome": "Succeeded", "exitCode": 0}), reason="Completed")
    api.finish_job("watched-0", "Complete")
    wait_for("Succeeded", lambda: api.status("watched").get("phase") == "Succeeded", operator=operator)
    time.sleep(2)  # two more refresh periods for the unwatched one
    ignored = api.custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED,
                                                      contract.PLURAL, "elsewhere")
    assert "status" not in ignored or not ignored["status"], ignored["status"]
    assert api.batch.list_namespaced_job(UNWATCHED).items == []
    assert api.core.list_namespaced_config_map(UNWATCHED).items == []
    assert "elsewhere" not in operator.tail()
    api.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED, contract.PLURAL,
                                               "elsewhere")
