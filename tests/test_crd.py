"""The CRD on its own terms: CEL rules run with a real CEL implementation, examples against its own schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubetune.crd import NAME_RULE, build_crd, immutable_rule
from kubetune.jobfile import job_document
from kubetune.spec import FineTuneJob

ROOT = Path(__file__).resolve().parent.parent
VERSION = build_crd()["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_RULES = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]

BASE = {
    "model": {"uri": "s3://models/x/", "task": "sequence-classification", "labels": ["a", "b"]},
    "data": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/x/"},
}
# name -> (spec overrides, valid?) : each invalid one breaks exactly one pydantic cross-field rule.
SAMPLES: dict[str, tuple[dict[str, Any], bool]] = {
    "valid": ({}, True),
    "causal-lm": ({"model": {"task": "causal-lm", "labels": None}, "evaluation": {"metric": "eval_perplexity"}},
                  True),
    "partial-last-layers": ({"method": {"type": "partial", "partial": {"trainLastLayers": 2}}}, True),
    "one-label": ({"model": {"labels": ["a"]}}, False),
    "no-labels": ({"model": {"labels": None}}, False),
    "labels-on-causal-lm": ({"model": {"task": "causal-lm"}}, False),
    "partial-missing": ({"method": {"type": "partial"}}, False),
    "partial-both": ({"method": {"type": "partial", "partial": {"trainLastLayers": 2, "trainModules": ["x"]}}},
                     False),
    "split-sum": ({"data": {"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}}, False),
    "metric-wrong-task": ({"evaluation": {"metric": "eval_perplexity"}}, False),
    "metric-wrong-task-lm": ({"model": {"task": "causal-lm", "labels": None},
                              "evaluation": {"metric": "eval_accuracy"}}, False),
    "packing-classification": ({"data": {"packing": True}}, False),
    "packing-off-classification": ({"data": {"packing": False}}, True),
    "packing-causal-lm": ({"model": {"task": "causal-lm", "labels": None}, "data": {"packing": True},
                           "evaluation": {"metric": "eval_perplexity"}}, True),
    "serve-lora-merged": ({"deploy": {"kserve": {}}}, True),
    "serve-full-unmerged": ({"method": {"type": "full"}, "output": {"mergeAdapter": False},
                             "deploy": {"kserve": {}}}, True),
    "serve-lora-unmerged": ({"output": {"mergeAdapter": False}, "deploy": {"kserve": {}}}, False),
}


def _without_nulls(value: Any) -> Any:
    """The API server drops null fields of non-nullable properties; CEL then sees them as absent."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def sample_spec(name: str, defaulted: bool) -> dict[str, Any]:
    spec = job_document("x", BASE, SAMPLES[name][0])["spec"]
    spec = _without_nulls(spec)
    if defaulted:  # the API server fills in defaults before it runs the rules: do the same for the split
        spec.setdefault("data", {}).setdefault("split", {"train": 0.7, "validation": 0.15, "test": 0.15})
    return spec


def evaluate(rule: str, activation: dict[str, Any]) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


def test_every_rule_compiles() -> None:
    env = celpy.Environment()
    for rule in [*SPEC_RULES, *SCHEMA["x-kubernetes-validations"]]:
        env.compile(rule["rule"])
        assert rule["message"]


@pytest.mark.parametrize("defaulted", [False, True])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_cel_rules_agree_with_the_pydantic_model(name: str, defaulted: bool) -> None:
    spec = sample_spec(name, defaulted)
    verdicts = {r["message"]: evaluate(r["rule"], {"self": spec}) for r in SPEC_RULES}
    try:
        FineTuneJob.model_validate(job_document("x", spec))
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    assert pydantic_ok == SAMPLES[name][1], "the sample itself is wrong"
    failed = [m for m, ok in verdicts.items() if not ok]
    assert (not failed) == pydantic_ok, f"{name}: CEL rejected {failed}, pydantic ok={pydantic_ok}"
    if not pydantic_ok:
        assert len(failed) == 1, failed


@pytest.mark.parametrize(("name", "ok"), [("reviews-sentiment", True), ("a", True), ("9lives", False),
                                          ("Upper", False), ("x" * 53, False), ("trailing-", False)])
def test_name_rule(name: str, ok: bool) -> None:
    assert evaluate(NAME_RULE["rule"], {"self": {"metadata": {"name": name}}}) is ok


def test_spec_is_immutable_once_started_except_suspend() -> None:
    rule = immutable_rule()["rule"]
    old = job_document("x", BASE, {"runPolicy": {"suspend": False, "backoffLimit": 3}})
    started = {**old, "status": {"startTime": "2026-01-01T00:00:00Z"}}
    changed = copy.deepcopy(started)
    changed["spec"]["data"]["train"] = "s3://data/other.jsonl"
    suspended = copy.deepcopy(started)
    suspended["spec"]["runPolicy"]["suspend"] = True
    retries = copy.deepcopy(started)
    retries["spec"]["runPolicy"]["backoffLimit"] = 9
    image = copy.deepcopy(started)
    image["spec"]["image"] = "other:1"
    assert evaluate(rule, {"self": changed, "oldSelf": old})  # not started yet: anything goes
    assert evaluate(rule, {"self": suspended, "oldSelf": started})
    assert not evaluate(rule, {"self": changed, "oldSelf": started})
    assert not evaluate(rule, {"self": retries, "oldSelf": started})
    assert not evaluate(rule, {"self": image, "oldSelf": started})  # an optional field appearing counts


def _json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (what a CRD holds) -> JSON Schema draft 4: `nullable` becomes a null type."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)  # the API server prunes unknown fields: treat them as errors
    return out


VALIDATOR = jsonschema.Draft4Validator(_json_schema(SCHEMA))


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]
        assert not errors, errors


@pytest.mark.parametrize(("override", "field"), [
    ({"method": {"type": "dora"}}, "method.type"),
    ({"hyperparameters": {"batchSize": 0}}, "hyperparameters.batchSize"),
    ({"resources": {"gpusPerNode": -1}}, "resources.gpusPerNode"),
    ({"data": {"split": {"train": 0}}}, "data.split.train"),
    ({"hyperparameters": {"lr": 1}}, "hyperparameters"),
])
def test_schema_rejects_bad_values(override: dict[str, Any], field: str) -> None:
    errors = list(VALIDATOR.iter_errors(job_document("x", BASE, override)))
    assert any(".".join(map(str, e.path)).endswith(field) for e in errors), [e.message for e in errors]


def _undescribed(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, child in node.get("properties", {}).items():
        here = f"{path}.{name}"
        if "description" not in child:
            missing.append(here)
        missing += _undescribed(child, here)
        if "items" in child:
            missing += _undescribed(child["items"], here + "[]")
    return missing


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    assert _undescribed(SCHEMA, "") == []


def test_names_columns_and_status() -> None:
    names = build_crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and "kubetune" in names["categories"]
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == ["Phase", "Progress", "Loss", "Age"]
    assert VERSION["subresources"] == {"status": {}}
    status = SCHEMA["properties"]["status"]["properties"]
    assert {"gpuSeconds", "restarts", "failure", "progress", "conditions"} <= set(status)
