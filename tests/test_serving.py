"""spec.deploy.kserve -> the KServe InferenceService for merged/, against a golden file.

Regenerate after an intended change: KUBETUNE_UPDATE_GOLDEN=1 pytest tests/test_serving.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kubetune.errors import UserError
from kubetune.jobfile import job_document, parse_job
from kubetune_operator import serving
from kubetune_operator.builders import resolved_job

GOLDEN = Path(__file__).parent / "golden" / "inferenceservice.yaml"
BASE = {
    "model": {"uri": "s3://models/minilm/", "task": "sequence-classification", "labels": ["negative", "positive"]},
    "data": {"train": "s3://data/reviews/train.jsonl"},
    "output": {"uri": "s3://models-out/reviews/"},
}


def ftj(**spec: object) -> dict[str, object]:
    doc = job_document("reviews", BASE, spec)
    doc["metadata"].update(namespace="ml", uid="3f0e8c52-0000-4000-8000-000000000042")
    return doc


def test_inference_service_matches_golden() -> None:
    doc = ftj(deploy={"kserve": {"serviceAccountName": "s3-reader", "gpus": 1, "memory": "8Gi", "minReplicas": 1}})
    built = serving.inference_service(doc, resolved_job(doc))
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        GOLDEN.write_text(yaml.safe_dump(built, sort_keys=False))
    assert built == yaml.safe_load(GOLDEN.read_text())
    predictor = built["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://models-out/reviews/merged"
    assert built["metadata"]["ownerReferences"][0]["uid"] == doc["metadata"]["uid"]


def test_no_deploy_no_service_and_causal_lm_generates() -> None:
    assert serving.inference_service(ftj(), resolved_job(ftj())) is None
    doc = ftj(model={"uri": "s3://models/gpt/", "task": "causal-lm", "labels": None}, deploy={"kserve": {}})
    args = serving.inference_service(doc, resolved_job(doc))["spec"]["predictor"]["model"]["args"]
    assert "--task=text_generation" in args


def test_serving_a_lora_job_needs_merged_weights() -> None:
    doc = ftj(output={"uri": "s3://models-out/reviews/", "mergeAdapter": False}, deploy={"kserve": {}})
    with pytest.raises(UserError, match=r"deploy\.kserve"):
        parse_job(doc, "job.yaml")


def test_the_inference_service_has_its_own_name_and_fits_knatives_host_label() -> None:
    """Issue 26: KServe's Serverless mode makes a Service of the InferenceService's name (the rendezvous
    Service has the job's), and Knative's `<name>-predictor-<namespace>` host label must fit 63 characters."""
    doc = ftj(deploy={"kserve": {}})
    built = serving.inference_service(doc, resolved_job(doc))
    assert built is not None and built["metadata"]["name"] == "reviews-model"
    assert serving.name_problem("a" * 40, "ml") is None  # 40 + 6 + 11 + 2 = 59
    problem = serving.name_problem("a" * 44, "ml-team")  # 44 + 6 + 11 + 7 = 68
    assert problem is not None and problem.startswith("metadata.name:") and "by 5" in problem
