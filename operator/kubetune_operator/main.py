"""`kubetune operator`: run kopf with the handlers and the settings from the environment."""

from __future__ import annotations

import kopf

from kubetune_operator import handlers, settings


def run() -> int:
    config = settings.load()
    kopf.configure(verbose=False)
    kopf.run(
        registry=kopf.get_default_registry(),
        standalone=True,  # no kopf peering: replicas elect a leader on a Lease (runtime.py, leader.py)
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )
    assert handlers  # imported for its @kopf decorators
    return 0
