"""Namespaced mode: the chart with `rbac.scope: namespaced` gives the operator Roles in its namespaces only and
KUBETUNE_NAMESPACES; it handles FineTuneJobs there and leaves every other namespace alone (it could not act
there anyway: RBAC on the real API server would refuse it)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kubetune import contract
from kubetune.jobfile import job_document
from tests.operator_harness import NS, Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_operator import BASE, CPU, submit

UNWATCHED = "default"


@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {"rbac": {"scope": "namespaced", "namespaces": [NS]}}


def test_a_watched_namespace_is_handled_and_an_unwatched_one_left_alone(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    elsewhere = job_document("elsewhere", BASE)
    api.custom.create_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED,
                                               contract.PLURAL, elsewhere)
    try:
        submit(api, "watched", **CPU)
        wait_for("the trainer", lambda: trainer.started("watched-0-0"), operator=operator)
        trainer.exit("watched-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
        wait_for("Succeeded", lambda: api.status("watched").get("phase") == "Succeeded", operator=operator)
        time.sleep(2)  # two more refresh periods for the unwatched one
        ignored = api.custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED,
                                                          contract.PLURAL, "elsewhere")
        assert not ignored.get("status"), ignored["status"]
        assert api.batch.list_namespaced_job(UNWATCHED).items == []
        assert api.core.list_namespaced_config_map(UNWATCHED, label_selector=contract.LABEL_JOB_NAME).items == []
        assert "elsewhere" not in operator.tail()
    finally:
        api.custom.delete_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, UNWATCHED,
                                                   contract.PLURAL, "elsewhere")
