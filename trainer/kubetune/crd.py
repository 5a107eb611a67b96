"""Generate the FineTuneJob CustomResourceDefinition from the pydantic spec model.

`kubetune crd > crds/finetunejob.yaml`; tests/test_crd.py fails when the committed file drifts.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune import contract
from kubetune.spec import FineTuneJobSpec

# Cross-field rules the API server enforces itself (CEL), mirroring the pydantic validators.
CEL_RULES = [
    {
        "rule": "self.model.task != 'sequence-classification' || "
        "(has(self.model.labels) && size(self.model.labels) >= 2)",
        "message": "model.labels: sequence-classification needs at least 2 labels",
    },
    {
        "rule": "self.model.task != 'causal-lm' || !has(self.model.labels) || size(self.model.labels) == 0",
        "message": "model.labels: only sequence-classification takes labels",
    },
    {
        "rule": "!has(self.method) || !has(self.method.type) || self.method.type != 'partial' || "
        "has(self.method.partial)",
        "message": "method.partial: method.type=partial needs partial.trainLastLayers or partial.trainModules",
    },
    {
        "rule": "!has(self.data.split) || (has(self.data.split.train) && has(self.data.split.validation) && "
        "has(self.data.split.test) && self.data.split.train + self.data.split.validation + "
        "self.data.split.test > 0.999999 && self.data.split.train + self.data.split.validation + "
        "self.data.split.test < 1.000001)",
        "message": "data.split: fractions must sum to 1.0",
    },
]

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state, written by the operator.",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed", "Suspended"]},
        "conditions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "progress": {
            "type": "object",
            "properties": {
                "step": {"type": "integer"},
                "totalSteps": {"type": "integer"},
                "epoch": {"type": "number"},
                "percent": {"type": "number"},
                "etaSeconds": {"type": "number"},
            },
        },
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
        "restarts": {"type": "integer"},
        "lastCheckpoint": {"type": "string"},
        "outputUri": {"type": "string"},
        "failure": {
            "type": "object",
            "properties": {
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "exitCode": {"type": "integer"},
            },
        },
        "observedGeneration": {"type": "integer", "format": "int64"},
    },
}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs, turn `anyOf [X, null]` into nullable X, drop what Kubernetes rejects."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = dict(defs[node["$ref"].split("/")[-1]])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _structural(target, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        merged = dict(options[0]) if len(options) == 1 else {"x-kubernetes-int-or-string": True}
        merged.update({k: v for k, v in node.items() if k != "anyOf"})
        if len(options) < len(node["anyOf"]):
            merged["nullable"] = True
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("properties",):
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        elif key == "additionalProperties" and value is False:
            continue  # structural schemas prune unknown fields; the pydantic model rejects them
        elif key == "additionalProperties" and value is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def spec_schema() -> dict[str, Any]:
    schema = FineTuneJobSpec.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})
    structural = _structural(schema, defs)
    structural["description"] = "What to fine-tune, on which data, how, and where the result goes."
    structural["x-kubernetes-validations"] = CEL_RULES
    return structural


def build_crd() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent", "description": "percent"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{contract.PLURAL}.{contract.API_GROUP}"},
        "spec": {
            "group": contract.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": contract.KIND,
                "plural": contract.PLURAL,
                "singular": contract.SINGULAR,
                "shortNames": [contract.SHORT_NAME],
                "categories": ["all", "kubetune"],
            },
            "versions": [
                {
                    "name": contract.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "FineTuneJob fine-tunes a pre-trained model and stores the result.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from trainer/kubetune/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
