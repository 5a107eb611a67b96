"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Every replica watches and keeps its state warm; only the holder of the Lease runs passes. A replica takes the
Lease when it is free or its holder has not renewed it for `lease_seconds`, renews it every `renew_seconds`,
and stops leading as soon as a renewal fails (another replica may take over after the lease runs out). Writes
carry the Lease's resourceVersion, so two replicas can never both take it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubetune.operator")


def _micro(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: kubernetes.client.ApiClient, namespace: str, name: str, identity: str,
                 on_change: Callable[[bool], None], lease_seconds: int = 15, renew_seconds: float = 5.0) -> None:
        self.leases = kubernetes.client.CoordinationV1Api(client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.on_change, self.lease_seconds, self.renew_seconds = on_change, lease_seconds, renew_seconds
        self.leading = False
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubetune-leader", daemon=True)

    def start(self) -> LeaderElector:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        if self.leading:
            self._release()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                leading = self._try()
            except Exception as exc:  # the API server away: whoever cannot renew must not go on leading
                log.warning("leader election: %s", exc)
                leading = False
            if leading != self.leading:
                self.leading = leading
                log.info("leader election: %s %s", self.identity, "leads" if leading else "stands by")
                self.on_change(leading)
            self.stop_event.wait(self.renew_seconds)

    def _body(self, now: datetime, acquired: str | None, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": acquired or _micro(now), "renewTime": _micro(now), "leaseTransitions": transitions}

    def _try(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.leases.create_namespaced_lease(self.namespace, {
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._body(now, None, 0)})
            return True
        spec = lease.spec
        renewed = spec.renew_time
        expired = renewed is None or (now - renewed).total_seconds() > (spec.lease_duration_seconds or 0)
        if spec.holder_identity not in (self.identity, None, "") and not expired:
            return False
        mine = spec.holder_identity == self.identity
        acquired = _micro(spec.acquire_time) if mine and spec.acquire_time else None
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._body(now, acquired, transitions)}
        try:
            self.leases.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False  # another replica wrote it first
            raise
        return True

    def _release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once rather than after it expires."""
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                self.leases.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            log.warning("leader election: could not release the lease: %s", exc.reason)
