"""Pure builders: a FineTuneJob (dict) -> the ConfigMap, headless Service and Indexed Job it runs on.

No API calls here: reconcile.py creates what these return, tests compare them with golden files.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from kubetune import contract
from kubetune.footprint import Footprint
from kubetune.spec import FineTuneJob, quantity_value
from kubetune_operator.settings import Settings

CONTAINER = "trainer"
SPEC_KEY = "spec.yaml"
ATTEMPT_LABEL = "kubetune.io/attempt"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RUN_AS_USER = 1000  # the trainer image's user (Dockerfile: useradd --uid 1000)
# Reading a few MiB and a config takes a minute; the deadline also covers a cold pull of a multi-GB image.
PREFLIGHT_DEADLINE_SECONDS = 1800
# What `kubetune validate --deep` needs: transformers and a meta-device model, no GPU, no weights; on disk a
# config, a tokenizer and the first MiB of each data file.
PREFLIGHT_RESOURCES = {"requests": {"cpu": "500m", "memory": "2Gi", "ephemeral-storage": "1Gi"},
                       "limits": {"memory": "2Gi"}}
PREFLIGHT_DISK = "2Gi"
SHM_SHARE = 4  # /dev/shm defaults to a quarter of resources.memory
# No Istio sidecar: it would outlive the trainer (the Job never completes) and under STRICT mTLS refuse the
# operator's plain scrape of :9400. The label is Istio's current switch, the annotation its older one.
NO_SIDECAR = {"sidecar.istio.io/inject": "false"}
CONTAINER_SECURITY = {  # the restricted Pod Security Standard, container level
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def spec_configmap_name(name: str) -> str:
    return f"{name}-spec"


def service_name(name: str) -> str:
    return name


def preflight_job_name(name: str) -> str:
    return f"{name}-preflight"


def attempt_job_name(name: str, attempt: int) -> str:
    """One batch Job per gang attempt: a static rendezvous cannot take a replaced pod back (see reconcile)."""
    return f"{name}-{attempt}"


def master_address(name: str, attempt: int, namespace: str) -> str:
    """Index 0's stable DNS name: <job>-0.<subdomain>.<namespace>.svc (Indexed Job + headless Service)."""
    return f"{attempt_job_name(name, attempt)}-0.{service_name(name)}.{namespace}.svc"


def labels(ftj: dict[str, Any], component: str) -> dict[str, str]:
    name = ftj["metadata"]["name"]
    return {
        contract.LABEL_APP_NAME: contract.APP_NAME,
        contract.LABEL_APP_INSTANCE: name,
        contract.LABEL_APP_COMPONENT: component,
        contract.LABEL_APP_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_JOB_NAME: name,
        contract.LABEL_COMPONENT: component,
    }


def owner_reference(ftj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "name": ftj["metadata"]["name"],
        "uid": ftj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ftj: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ftj["metadata"]["namespace"],
        "labels": labels(ftj, component),
        "ownerReferences": [owner_reference(ftj)],
    }


def resolved_job(ftj: dict[str, Any]) -> FineTuneJob:
    """The validated model; raises pydantic's ValidationError (kubetune.jobfile turns it into field messages)."""
    meta = ftj["metadata"]
    return FineTuneJob.model_validate({
        "apiVersion": ftj.get("apiVersion"), "kind": ftj.get("kind"),
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace")}, "spec": ftj.get("spec"),
    })


def build_configmap(ftj: dict[str, Any]) -> dict[str, Any]:
    """The resolved spec (defaults filled in), mounted where `kubetune trainer` reads it."""
    job = resolved_job(ftj)
    document = job.model_dump(mode="json", by_alias=True, exclude={"status"}, exclude_none=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ftj, spec_configmap_name(job.metadata.name), "spec"),
        "data": {SPEC_KEY: yaml.safe_dump(document, sort_keys=False)},
    }


def build_service(ftj: dict[str, Any]) -> dict[str, Any]:
    """Headless: gives each indexed pod a stable DNS name for torchrun's static rendezvous."""
    name = ftj["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ftj, service_name(name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks meet before any readiness
            "selector": {contract.LABEL_JOB_NAME: name, contract.LABEL_COMPONENT: "trainer"},
            "ports": [
                {"name": "rendezvous", "port": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


def _writable_env() -> list[dict[str, Any]]:
    """Home, caches and temporary files on the work volume: any image runs as uid 1000 on a read-only root."""
    return [{"name": contract.ENV_HOME, "value": contract.WORK_DIR},
            {"name": contract.ENV_HF_HOME, "value": contract.HF_HOME_DIR},
            {"name": contract.ENV_TMPDIR, "value": contract.TMP_DIR}]


def _work_mounts() -> list[dict[str, Any]]:
    return [{"name": "work", "mountPath": contract.WORK_DIR},
            {"name": "work", "mountPath": contract.TMP_DIR, "subPath": "tmp"}]  # /tmp too: some code ignores TMPDIR


def _pull_secrets(job: FineTuneJob, settings: Settings | None) -> dict[str, Any]:
    names = dict.fromkeys([*(settings.image_pull_secrets if settings else ()), *job.spec.image_pull_secrets])
    return {"imagePullSecrets": [{"name": n} for n in names]} if names else {}


def grace_seconds(job: FineTuneJob, footprint: Footprint | None) -> int:
    """The pod's terminationGracePeriodSeconds: the spec's, else the trainer's budget for the estimated upload
    (the pre-flight's footprint) plus the margin. The trainer's budget (KUBETUNE_GRACE_SECONDS) is the margin less."""
    trainer = footprint.trainer_grace_seconds() if footprint else contract.DEFAULT_GRACE_SECONDS
    return job.spec.run_policy.termination_grace_period_seconds or trainer + contract.GRACE_MARGIN_SECONDS


def _mebibytes(value: float) -> str:
    return f"{max(1, math.ceil(value / 2**20))}Mi"


def _env(name: str, nodes: int, nproc: int, attempt: int, namespace: str, secret: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_MASTER_ADDR, "value": master_address(name, attempt, namespace)},
        {"name": contract.ENV_MASTER_PORT, "value": str(contract.DEFAULT_MASTER_PORT)},
        {"name": contract.ENV_NNODES, "value": str(nodes)},
        {"name": contract.ENV_NODE_RANK, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": contract.ENV_NPROC_PER_NODE, "value": str(nproc)},
        {"name": contract.ENV_SPEC_PATH, "value": contract.SPEC_MOUNT_PATH},
        {"name": contract.ENV_WORK_DIR, "value": contract.WORK_DIR},
        {"name": contract.ENV_METRICS_PORT, "value": str(contract.DEFAULT_METRICS_PORT)},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.TERMINATION_LOG},
        {"name": contract.ENV_JOB_NAME, "value": name},
        {"name": contract.ENV_NAMESPACE, "value": namespace},
    ]
    return env + _writable_env() + _credentials(secret)


def _container(job: FineTuneJob, image: str, attempt: int, namespace: str, grace: int,
               footprint: Footprint | None) -> dict[str, Any]:
    res = job.spec.resources
    nproc = max(res.gpus_per_node, 1)
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.guaranteed:  # limits = requests: Guaranteed QoS
        limits["cpu"] = res.cpu
    if res.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = res.gpus_per_node
    disk = res.ephemeral_storage or (f"{math.ceil(footprint.work_bytes() / 2**30)}Gi" if footprint else None)
    if disk:  # the scheduler finds a node with that much disk; under disk pressure the kubelet evicts others first
        requests["ephemeral-storage"] = disk
    env = _env(job.metadata.name, res.nodes, nproc, attempt, namespace, job.spec.storage.secret_ref)
    env += [{"name": contract.ENV_GRACE_SECONDS, "value": str(grace - contract.GRACE_MARGIN_SECONDS)},
            # Without a cpu limit there is no cgroup quota to read: threads from the request, as the trainer would.
            {"name": contract.ENV_OMP_THREADS, "value": str(max(1, math.ceil(quantity_value(res.cpu)) // nproc))}]
    env += _tracking_credentials(job.spec.tracking.mlflow.secret_ref if job.spec.tracking and job.spec.tracking.mlflow
                                 else None)
    return {
        "name": CONTAINER,
        "image": job.spec.image or image,
        "command": ["kubetune", "trainer"],
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": requests, "limits": limits},
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_MOUNT_PATH, "subPath": SPEC_KEY, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *_work_mounts(),
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_job(ftj: dict[str, Any], *, image: str, service_account: str, attempt: int = 0,
              active_deadline_seconds: int | None = None, settings: Settings | None = None,
              footprint: Footprint | None = None) -> dict[str, Any]:
    """The Indexed Job of one gang attempt: `nodes` pods, one failure fails them all (backoffLimit 0).

    active_deadline_seconds is what is left of runPolicy.activeDeadlineSeconds for this attempt; settings carry
    the chart's defaults for every job's pods; footprint is the pre-flight's estimate (preflight_footprint).
    """
    job = resolved_job(ftj)
    name, namespace = job.metadata.name, ftj["metadata"]["namespace"]
    res, policy = job.spec.resources, job.spec.run_policy
    grace = grace_seconds(job, footprint)
    pod_labels = {**labels(ftj, "trainer"), ATTEMPT_LABEL: str(attempt), **NO_SIDECAR}
    metadata = _metadata(ftj, attempt_job_name(name, attempt), "trainer")
    metadata["labels"][ATTEMPT_LABEL] = str(attempt)
    if policy.queue_name:
        metadata["labels"][contract.LABEL_QUEUE] = policy.queue_name
    pod_spec: dict[str, Any] = {
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,  # trainers never talk to the API
        "terminationGracePeriodSeconds": grace,
        "securityContext": dict(POD_SECURITY),
        **_pull_secrets(job, settings),
        "containers": [_container(job, image, attempt, namespace, grace, footprint)],
        "volumes": [
            {"name": "spec", "configMap": {"name": spec_configmap_name(name)}},
            # NCCL needs a bigger /dev/shm than a runtime's 64 MiB; sized, so that it fills up instead of the pod
            # being OOMKilled (memory-backed pages count in the memory limit).
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size or _mebibytes(
                quantity_value(res.memory) / SHM_SHARE)}},
            {"name": "work", "emptyDir": {"sizeLimit": res.ephemeral_storage} if res.ephemeral_storage else {}},
        ],
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = list(res.tolerations)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "backoffLimit": 0,  # the operator restarts the whole gang; the Job never replaces one pod
        # Kueue admits a queued Job by unsuspending it, so queued Jobs start suspended.
        "suspend": policy.suspend or bool(policy.queue_name),
        # The Job's Failed condition names the rule that matched ("... rule at index N"), and it outlives the
        # pods (the Job controller deletes them): the operator reads the cause from it (status.rule_cause).
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [contract.EXIT_BAD_INPUT]}},
                # Not Ignore: a replacement pod cannot join a static rendezvous, so a disruption ends the
                # attempt at once and the operator restarts the gang without spending runPolicy.backoffLimit.
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Exit 75: stopped after a checkpoint (SIGTERM from a node drain or a spot reclaim), also free.
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [contract.EXIT_RETRY]}},
                # Exit 3: trained, but not better than the base by evaluation.minImprovement: never retried.
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                 "values": [contract.EXIT_NOT_IMPROVED]}},
            ]
        },
        "template": {"metadata": {"labels": pod_labels, "annotations": dict(NO_SIDECAR)}, "spec": pod_spec},
    }
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def _credentials(secret: str | None) -> list[dict[str, Any]]:
    """S3 credentials only by reference: never in args, the ConfigMap or the status."""
    if not secret:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in (contract.SECRET_ACCESS_KEY_ID, contract.SECRET_SECRET_ACCESS_KEY)]


def _tracking_credentials(secret: str | None) -> list[dict[str, Any]]:
    """MLflow credentials by reference too; each key optional (a Secret holds a token or a user and password)."""
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in contract.MLFLOW_SECRET_KEYS] if secret else []


def build_preflight_job(ftj: dict[str, Any], *, image: str, service_account: str,
                        settings: Settings | None = None) -> dict[str, Any]:
    """A small CPU-only Job running `kubetune validate --deep` with the job's own credentials.

    It reaches storage, reads the first rows and the model's config, and estimates memory, so a broken job
    fails in seconds without holding a GPU; its log lines (FallbackToLogsOnError) name the field or file, and on
    success its termination message holds the footprint the trainer pods are sized from (preflight_footprint).
    It runs where the job may run (the job's scheduling fields, unless the chart sets the pre-flight's own).
    """
    job = resolved_job(ftj)
    name, res, policy = job.metadata.name, job.spec.resources, job.spec.run_policy
    container = {
        "name": "preflight",
        "image": job.spec.image or (settings.preflight_image if settings else "") or image,
        # Relative paths mean what they mean to the trainer: relative to the image's working directory.
        "command": ["kubetune", "validate", "--deep", "--relative-to", ".", contract.SPEC_MOUNT_PATH],
        "env": [{"name": contract.ENV_JOB_NAME, "value": name},
                {"name": contract.ENV_TERMINATION_LOG, "value": contract.TERMINATION_LOG},
                *_writable_env(), *_credentials(job.spec.storage.secret_ref)],
        "resources": PREFLIGHT_RESOURCES,
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_MOUNT_PATH, "subPath": SPEC_KEY, "readOnly": True},
            *_work_mounts(),
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "securityContext": dict(POD_SECURITY),
        **_pull_secrets(job, settings),
        "containers": [container],
        "volumes": [{"name": "spec", "configMap": {"name": spec_configmap_name(name)}},
                    {"name": "work", "emptyDir": {"sizeLimit": PREFLIGHT_DISK}}],
    }
    node_selector = (settings.preflight_node_selector if settings else None) or res.node_selector
    tolerations = (settings.preflight_tolerations if settings else None) or res.tolerations
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = list(tolerations)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    metadata = _metadata(ftj, preflight_job_name(name), "preflight")
    if policy.queue_name:  # Kueue admits it from the job's queue, like the trainers (and counts its quota)
        metadata["labels"][contract.LABEL_QUEUE] = policy.queue_name
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 0,
                 "activeDeadlineSeconds": PREFLIGHT_DEADLINE_SECONDS, "suspend": bool(policy.queue_name),
                 "template": {"metadata": {"labels": {**labels(ftj, "preflight"), **NO_SIDECAR},
                                           "annotations": dict(NO_SIDECAR)}, "spec": pod_spec}},
    }


def preflight_footprint(pods: list[dict[str, Any]]) -> Footprint | None:
    """What the succeeded pre-flight pod estimated (its termination message), for build_job's footprint."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            found = Footprint.from_termination(((status.get("state") or {}).get("terminated") or {}).get("message"))
            if found:
                return found
    return None
