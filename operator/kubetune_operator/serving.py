"""Pure builder: a succeeded FineTuneJob with spec.deploy.kserve -> a KServe InferenceService for merged/.

The Hugging Face serving runtime loads the merged model straight from object storage; reconcile creates
this only after the job has Succeeded, owned by the FineTuneJob so deleting the job removes the service.
"""

from __future__ import annotations

from typing import Any

from kubetune import contract
from kubetune.spec import FineTuneJob
from kubetune.storage import join_uri
from kubetune_operator.builders import _metadata

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
INFERENCE_SERVICE = "InferenceService"
INFERENCE_SERVICES = "inferenceservices"
# The Hugging Face runtime's names for our two tasks.
HF_TASKS = {"sequence-classification": "sequence_classification", "causal-lm": "text_generation"}
HOST_LABEL_LIMIT = 63  # Knative names the predictor's host <service>-predictor-<namespace>: one DNS label


def service_name(name: str) -> str:
    """Not the job's own name: KServe's Serverless mode makes a Service of the InferenceService's name, and the
    job's rendezvous Service has that one."""
    return f"{name}-model"


def name_problem(name: str, namespace: str) -> str | None:
    host = f"{service_name(name)}-predictor-{namespace}"
    if len(host) <= HOST_LABEL_LIMIT:
        return None
    return (f"metadata.name: with spec.deploy.kserve, KServe's host label {host!r} is {len(host)} characters, over "
            f"{HOST_LABEL_LIMIT}: shorten the name (or the namespace) by {len(host) - HOST_LABEL_LIMIT}")


def inference_service(ftj: dict[str, Any], job: FineTuneJob) -> dict[str, Any] | None:
    kserve = job.spec.deploy.kserve if job.spec.deploy else None
    if kserve is None:
        return None
    name = ftj["metadata"]["name"]
    resources: dict[str, Any] = {"requests": {"cpu": kserve.cpu, "memory": kserve.memory},
                                 "limits": {"memory": kserve.memory}}
    if kserve.gpus:
        resources["limits"]["nvidia.com/gpu"] = kserve.gpus
    predictor: dict[str, Any] = {
        "model": {
            "modelFormat": {"name": "huggingface"},
            "storageUri": join_uri(job.spec.output.uri, contract.MERGED_DIR),
            # The plain transformers backend: the vLLM one needs a GPU and serves causal LMs only.
            "args": [f"--model_name={name}", f"--task={HF_TASKS[job.spec.model.task]}", "--backend=huggingface"],
            "resources": resources,
        },
    }
    if kserve.service_account_name:
        predictor["serviceAccountName"] = kserve.service_account_name
    if kserve.min_replicas is not None:
        predictor["minReplicas"] = kserve.min_replicas
    return {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
        "kind": INFERENCE_SERVICE,
        "metadata": _metadata(ftj, service_name(name), "serving"),
        "spec": {"predictor": predictor},
    }


def url_and_ready(isvc: dict[str, Any]) -> tuple[str | None, bool]:
    """What KServe's controller reports: status.url (or status.address.url) and the Ready condition."""
    status = isvc.get("status") or {}
    url = status.get("url") or (status.get("address") or {}).get("url")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return url, ready
