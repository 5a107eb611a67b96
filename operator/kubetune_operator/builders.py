"""Pure builders: a FineTuneJob (dict) -> the ConfigMap, headless Service and Indexed Job it runs on.

No API calls here: reconcile.py creates what these return, tests compare them with golden files.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune import contract
from kubetune.spec import FineTuneJob

CONTAINER = "trainer"
SPEC_KEY = "spec.yaml"
ATTEMPT_LABEL = "kubetune.io/attempt"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
GRACE_MARGIN_SECONDS = 15  # beyond the trainer's own budget: torchrun forwarding SIGTERM and process exit
RUN_AS_USER = 1000  # the trainer image's user (Dockerfile: useradd --uid 1000)
PREFLIGHT_DEADLINE_SECONDS = 600  # reading a few MiB and a config: minutes at most, even on a slow link
# What `kubetune validate --deep` needs: transformers and a meta-device model, no GPU, no weights.
PREFLIGHT_RESOURCES = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
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
        {"name": contract.ENV_GRACE_SECONDS, "value": str(contract.DEFAULT_GRACE_SECONDS)},
    ]
    return env + _credentials(secret)


def _container(job: FineTuneJob, image: str, attempt: int, namespace: str) -> dict[str, Any]:
    res = job.spec.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = res.gpus_per_node
    return {
        "name": CONTAINER,
        "image": job.spec.image or image,
        "command": ["kubetune", "trainer"],
        "env": _env(job.metadata.name, res.nodes, max(res.gpus_per_node, 1), attempt, namespace,
                    job.spec.storage.secret_ref),
        "ports": [
            {"name": "metrics", "containerPort": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": requests, "limits": limits},
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_MOUNT_PATH, "subPath": SPEC_KEY, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "work", "mountPath": contract.WORK_DIR},
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_job(ftj: dict[str, Any], *, image: str, service_account: str, attempt: int = 0,
              active_deadline_seconds: int | None = None) -> dict[str, Any]:
    """The Indexed Job of one gang attempt: `nodes` pods, one failure fails them all (backoffLimit 0).

    active_deadline_seconds is what is left of runPolicy.activeDeadlineSeconds for this attempt.
    """
    job = resolved_job(ftj)
    name, namespace = job.metadata.name, ftj["metadata"]["namespace"]
    res, policy = job.spec.resources, job.spec.run_policy
    pod_labels = {**labels(ftj, "trainer"), ATTEMPT_LABEL: str(attempt)}
    metadata = _metadata(ftj, attempt_job_name(name, attempt), "trainer")
    metadata["labels"][ATTEMPT_LABEL] = str(attempt)
    if policy.queue_name:
        metadata["labels"][contract.LABEL_QUEUE] = policy.queue_name
    pod_spec: dict[str, Any] = {
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,  # trainers never talk to the API
        "terminationGracePeriodSeconds": contract.DEFAULT_GRACE_SECONDS + GRACE_MARGIN_SECONDS,
        "securityContext": dict(POD_SECURITY),
        "containers": [_container(job, image, attempt, namespace)],
        "volumes": [
            {"name": "spec", "configMap": {"name": spec_configmap_name(name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and dataloader workers need a big /dev/shm
            {"name": "work", "emptyDir": {}},
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
            ]
        },
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
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


def build_preflight_job(ftj: dict[str, Any], *, image: str, service_account: str) -> dict[str, Any]:
    """A small CPU-only Job running `kubetune validate --deep` with the job's own credentials.

    It reaches storage, reads the first rows and the model's config, and estimates memory, so a broken job
    fails in seconds without holding a GPU; its log lines (FallbackToLogsOnError) name the field or file.
    """
    job = resolved_job(ftj)
    name = job.metadata.name
    container = {
        "name": "preflight",
        "image": job.spec.image or image,
        # Relative paths mean what they mean to the trainer: relative to the image's working directory.
        "command": ["kubetune", "validate", "--deep", "--relative-to", ".", contract.SPEC_MOUNT_PATH],
        "env": [{"name": contract.ENV_JOB_NAME, "value": name}, *_credentials(job.spec.storage.secret_ref)],
        "resources": PREFLIGHT_RESOURCES,
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_MOUNT_PATH, "subPath": SPEC_KEY, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "securityContext": dict(POD_SECURITY),
        "containers": [container],
        "volumes": [{"name": "spec", "configMap": {"name": spec_configmap_name(name)}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(ftj, preflight_job_name(name), "preflight"),
        "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 0,
                 "activeDeadlineSeconds": PREFLIGHT_DEADLINE_SECONDS,
                 "template": {"metadata": {"labels": labels(ftj, "preflight")}, "spec": pod_spec}},
    }
