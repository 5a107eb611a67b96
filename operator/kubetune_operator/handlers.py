"""kopf handlers, each a one-line delegate (`kopf run -m kubetune_operator.handlers` works too)."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune import contract
from kubetune_operator.runtime import RUNTIME
from kubetune_operator.sweeps import SWEEPS


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    RUNTIME.start(settings)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    RUNTIME.shutdown()


@kopf.on.event(contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
def finetunejob_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    RUNTIME.on_event(event, body)


@kopf.on.event(contract.API_GROUP, contract.API_VERSION, contract.SWEEP_PLURAL)
def finetunesweep_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    SWEEPS.on_sweep(event, body)


@kopf.on.event(contract.API_GROUP, contract.API_VERSION, contract.PLURAL, labels={contract.LABEL_SWEEP: kopf.PRESENT})
def trial_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    SWEEPS.on_trial(event, body)


@kopf.on.probe(id="refresh")
def refresh_probe(**_: Any) -> dict[str, Any]:
    return RUNTIME.healthy()
