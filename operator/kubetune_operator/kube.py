"""The few Kubernetes API calls the operator makes, through the official `kubernetes` client.

Everything is plain dicts in and out; 409 on create means "already there", 404 on read means "absent".
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from kubetune import contract
from kubetune_operator import metrics
from kubetune_operator.status import now_iso

MERGE_PATCH = "application/merge-patch+json"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"
ACCOUNT_SECONDS = 60.0


def owner_uids(obj: dict[str, Any]) -> set[str]:
    return {ref.get("uid", "") for ref in obj["metadata"].get("ownerReferences") or []}


def server_message(exc: ApiException) -> str:
    """The API server's own words (its Status message), else the HTTP reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def load_client(pool_size: int = 16) -> kubernetes.client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(configuration)


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self._accounts: dict[tuple[str, str], tuple[bool, float]] = {}  # (namespace, name) -> (exists, when)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            metrics.api_error(str(exc.status))
            raise
        except OSError as exc:  # urllib3 wraps connection problems in OSError subclasses
            metrics.api_error(type(exc).__name__)
            raise

    def _sanitized(self, obj: Any) -> dict[str, Any]:
        value: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return value

    # ---- FineTuneJobs ---------------------------------------------------------------------------
    def _get_custom(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A custom object, None when it (or its resource) is not there."""
        try:
            found: dict[str, Any] = self._call(self.custom.get_namespaced_custom_object, group, version, namespace,
                                               plural, name)
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_custom(contract.API_GROUP, contract.API_VERSION, contract.PLURAL, namespace, name)

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """The object as the server stored it after the patch."""
        written: dict[str, Any] = self._call(
            self.custom.patch_namespaced_custom_object_status, contract.API_GROUP, contract.API_VERSION, namespace,
            contract.PLURAL, name, {"status": status}, _content_type=MERGE_PATCH)
        return written

    def delete_ftj(self, namespace: str, name: str) -> None:
        try:
            self._call(self.custom.delete_namespaced_custom_object, contract.API_GROUP, contract.API_VERSION,
                       namespace, contract.PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ---- children -------------------------------------------------------------------------------
    def create(self, obj: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """Create-if-missing: ("created", the stored object), ("exists", None) when it is there already with the
        same owner, or ("stale", None) for a leftover of an earlier object of the same name that the garbage
        collector has not removed yet."""
        namespace, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
        create, read = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "Job": (self.batch.create_namespaced_job, None)}[kind]
        try:
            stored = self._sanitized(self._call(create, namespace, obj))
        except ApiException as exc:
            if exc.status != 409:
                raise
            if kind == "Job":
                return "stale", None  # this job's own Jobs were all in what the pass read: this one is older
            try:
                found = self._sanitized(self._call(read, name, namespace))
            except ApiException as gone:
                if gone.status == 404:
                    return "stale", None  # deleted meanwhile: the next pass creates it
                raise
            return ("exists" if owner_uids(found) & owner_uids(obj) else "stale"), None
        metrics.child_created(kind)
        return "created", {**stored, "kind": kind}

    def service_account_exists(self, namespace: str, name: str) -> bool:
        """Asked once a minute per namespace at most: a thousand jobs submitted at once need one answer."""
        key, now = (namespace, name), time.monotonic()
        known = self._accounts.get(key)
        if known is not None and now - known[1] < ACCOUNT_SECONDS:
            return known[0]
        try:
            self._call(self.core.read_namespaced_service_account, name, namespace)
            exists = True
        except ApiException as exc:
            if exc.status != 404:
                raise
            exists = False
        self._accounts[key] = (exists, now)
        return exists

    def failed_creates(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        """The Job controller's FailedCreate Events for one Job (a pod refused by quota or Pod Security)."""
        found = self._call(self.core.list_namespaced_event, namespace,
                           field_selector=f"involvedObject.uid={uid},reason=FailedCreate")
        return [self._sanitized(e) for e in found.items]

    def create_inference_service(self, obj: dict[str, Any]) -> bool | None:
        """Create-if-missing a KServe InferenceService: True created, False already there, None when the
        cluster has no KServe (404 on its resource)."""
        from kubetune_operator import serving

        try:
            self._call(self.custom.create_namespaced_custom_object, serving.KSERVE_GROUP, serving.KSERVE_VERSION,
                       obj["metadata"]["namespace"], serving.INFERENCE_SERVICES, obj)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status == 404:
                return None
            raise
        metrics.child_created(serving.INFERENCE_SERVICE)
        return True

    def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService, None when it (or KServe) is gone."""
        from kubetune_operator import serving

        return self._get_custom(serving.KSERVE_GROUP, serving.KSERVE_VERSION, serving.INFERENCE_SERVICES,
                                namespace, name)

    def list_jobs(self, namespace: str, name: str) -> list[dict[str, Any]]:
        found = self._call(self.batch.list_namespaced_job, namespace,
                           label_selector=f"{contract.LABEL_JOB_NAME}={name}")
        return [self._sanitized(j) for j in found.items]

    def list_pods(self, namespace: str, name: str, component: str | None = "trainer") -> list[dict[str, Any]]:
        selector = f"{contract.LABEL_JOB_NAME}={name}" + (f",{contract.LABEL_COMPONENT}={component}" if component
                                                          else "")
        found = self._call(self.core.list_namespaced_pod, namespace, label_selector=selector)
        return [self._sanitized(p) for p in found.items]

    def workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]] | None:
        """Kueue's Workloads of one Job; None when Kueue's API is not there (or not granted to the operator)."""
        try:
            found = self._call(self.custom.list_namespaced_custom_object, KUEUE_GROUP, KUEUE_VERSION, namespace,
                               "workloads", label_selector=f"{KUEUE_GROUP}/job-uid={job_uid}")
        except ApiException as exc:
            if exc.status in (403, 404):
                return None
            raise
        items: list[dict[str, Any]] = found["items"]
        return items

    def patch_workload(self, namespace: str, name: str, active: bool) -> None:
        self._call(self.custom.patch_namespaced_custom_object, KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads",
                   name, {"spec": {"active": active}}, _content_type=MERGE_PATCH)

    def delete_job(self, namespace: str, name: str) -> None:
        """Deleted with its pods (background propagation); already gone is fine."""
        try:
            self._call(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._call(self.batch.patch_namespaced_job, name, namespace, patch, _content_type=MERGE_PATCH)

    def event(self, ftj: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> None:
        """A core/v1 Event on the FineTuneJob (what `kubectl describe ftj` shows)."""
        meta = ftj["metadata"]
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND,
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message if len(message) <= 1024 else message[:1020] + " ...",
            "firstTimestamp": now_iso(now), "lastTimestamp": now_iso(now), "count": 1,
            "source": {"component": contract.MANAGED_BY}, "reportingComponent": contract.MANAGED_BY,
        }
        with contextlib.suppress(ApiException):  # an event lost is not worth failing the pass that wrote status
            self._call(self.core.create_namespaced_event, meta["namespace"], body)
