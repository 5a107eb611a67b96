"""Generate the FineTuneJob CustomResourceDefinition from the pydantic spec model.

`kubetune crd > crds/finetunejob.yaml`; tests/test_crd.py fails when the committed file drifts.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune import contract
from kubetune.spec import (
    CAUSAL_LM_METRICS,
    CLASSIFICATION_METRICS,
    PREFERENCE_METRICS,
    FineTuneJobSpec,
    RunPolicySpec,
)
from kubetune.sweep.spec import MAX_NAME_LENGTH as SWEEP_NAME_LENGTH
from kubetune.sweep.spec import FineTuneSweepSpec

# Cross-field rules the API server enforces itself (CEL), mirroring the pydantic validators.
# has() guards keep each rule meaningful on objects the API server has not defaulted (and in tests).
DPO = "has(self.method) && has(self.method.type) && self.method.type == 'dpo'"  # method.type defaults to lora
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
        "rule": "!has(self.method) || !has(self.method.partial) || has(self.method.partial.trainLastLayers) != "
        "(has(self.method.partial.trainModules) && size(self.method.partial.trainModules) > 0)",
        "message": "method.partial: set exactly one of trainLastLayers or trainModules",
    },
    {
        "rule": "!has(self.data.split) || (has(self.data.split.train) && has(self.data.split.validation) && "
        "has(self.data.split.test) && self.data.split.train + self.data.split.validation + "
        "self.data.split.test > 0.999999 && self.data.split.train + self.data.split.validation + "
        "self.data.split.test < 1.000001)",
        "message": "data.split: fractions must sum to 1.0",
    },
    {
        "rule": "!has(self.evaluation) || !has(self.evaluation.metric) || self.evaluation.metric in "
        f"({DPO} ? " + repr(list(PREFERENCE_METRICS)) + " : "
        "(self.model.task == 'causal-lm' ? " + repr(list(CAUSAL_LM_METRICS)) + " : "
        + repr(list(CLASSIFICATION_METRICS)) + "))",
        "message": "evaluation.metric: must be one of " + ", ".join(CLASSIFICATION_METRICS)
        + " (sequence-classification), " + ", ".join(CAUSAL_LM_METRICS) + " (causal-lm) or "
        + ", ".join(PREFERENCE_METRICS) + " (method.type dpo)",
    },
    {
        "rule": "self.model.task == 'causal-lm' || !has(self.data.packing) || !self.data.packing",
        "message": "data.packing: only causal-lm packs examples",
    },
    {
        "rule": f"!({DPO}) || self.model.task == 'causal-lm'",
        "message": "method.type: dpo tunes causal LMs (model.task causal-lm)",
    },
    {
        "rule": f"!({DPO}) || !has(self.data.packing) || !self.data.packing",
        "message": "data.packing: dpo keeps each chosen/rejected pair whole in one micro-batch",
    },
    {
        "rule": "!has(self.evaluation) || !has(self.evaluation.minImprovement) || has(self.data.test) || "
        "!has(self.data.split) || !has(self.data.split.test) || self.data.split.test > 0.0",
        "message": "evaluation.minImprovement: the gate compares base and fine-tuned on the test split: give "
        "data.test or a data.split.test above 0",
    },
    {
        # method.type defaults to lora, so an absent type counts as lora here; qlora is LoRA on a 4-bit base.
        "rule": "!has(self.deploy) || !has(self.deploy.kserve) || !has(self.output.mergeAdapter) || "
        "self.output.mergeAdapter || (has(self.method) && has(self.method.type) && "
        "!(self.method.type in ['lora', 'qlora']) && !(self.method.type == 'dpo' && (!has(self.method.dpo) || "
        "!has(self.method.dpo.weights) || self.method.dpo.weights == 'lora')))",
        "message": "deploy.kserve: serving needs merged/: set output.mergeAdapter to true",
    },
    {
        # resources.gpusPerNode defaults to 1.
        "rule": "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || "
        "!has(self.resources) || !has(self.resources.gpusPerNode) || self.resources.gpusPerNode > 0",
        "message": "method.type: qlora runs on CUDA GPUs only: resources.gpusPerNode must be 1 or more",
    },
]

# Child names (<name>-<attempt>-<index> pod hostnames, the Service) must stay DNS-1035 labels of 63 or fewer.
MAX_NAME_LENGTH = 52
NAME_RULE = {
    "rule": f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= "
    f"{MAX_NAME_LENGTH}",
    "message": f"metadata.name: must start with a letter, hold only lowercase letters, digits and '-', and be "
    f"at most {MAX_NAME_LENGTH} characters (the operator derives pod and Service names from it)",
}


def immutable_rule() -> dict[str, str]:
    """Once the job has started (status.startTime set), spec may change only in runPolicy.suspend."""
    def same(path: str) -> str:
        return f"(has(self.{path}) == has(oldSelf.{path}) && (!has(self.{path}) || self.{path} == oldSelf.{path}))"

    def same_policy(field: str) -> str:
        """runPolicy itself may appear or go (suspend alone is added to a job that had no runPolicy)."""
        new, old = (f"(has({o}.spec.runPolicy) && has({o}.spec.runPolicy.{field}))" for o in ("self", "oldSelf"))
        return f"({new} == {old} && (!{new} || self.spec.runPolicy.{field} == oldSelf.spec.runPolicy.{field}))"

    fields = [f.alias or n for n, f in FineTuneJobSpec.model_fields.items() if n != "run_policy"]
    policy = [f.alias or n for n, f in RunPolicySpec.model_fields.items() if n != "suspend"]
    checks = [same(f"spec.{f}") for f in fields] + [same_policy(p) for p in policy]
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || (" + " && ".join(checks) + ")",
        "message": "spec is immutable once the job has started, except runPolicy.suspend: "
        "delete and recreate the FineTuneJob to change it",
    }


def _condition_schema() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "description": "A metav1.Condition: lastTransitionTime moves only when status flips.",
        "required": ["type", "status"],
        "properties": {
            "type": {**text, "description": "Created, Validated, Running, Succeeded, Failed, Suspended, "
                     "Restarting, Stalled."},
            "status": {**text, "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
            "reason": {**text, "description": "One CamelCase word for machines."},
            "message": {**text, "description": "What happened, for people."},
            "lastTransitionTime": {**text, "format": "date-time", "description": "When status last flipped."},
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "metadata.generation this condition was set for."},
        },
    }


def _number(description: str) -> dict[str, Any]:
    return {"type": "number", "description": description}


STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state, written by the operator.",
    "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed", "Suspended"],
                  "description": "Pending, Running, Succeeded, Failed or Suspended."},
        "conditions": {"type": "array", "items": _condition_schema(), "description": "Conditions by type.",
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        "progress": {
            "type": "object",
            "description": "Training progress read from the rank-0 trainer's metrics endpoint.",
            "properties": {
                "step": {"type": "integer", "description": "Optimizer updates done."},
                "totalSteps": {"type": "integer", "description": "Optimizer updates planned."},
                "epoch": _number("Epochs done (fractional)."),
                "percent": _number("step / totalSteps in percent."),
                "etaSeconds": _number("Estimated seconds to the end of training."),
            },
        },
        "metrics": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "Latest metrics: trainLoss, evalLoss, the chosen eval metric, test metrics."},
        "startTime": {"type": "string", "format": "date-time", "description": "When the first pods were created."},
        "completionTime": {"type": "string", "format": "date-time", "description": "When the job finished."},
        "restarts": {"type": "integer", "description": "Gang restarts so far (every cause)."},
        "attempt": {"type": "integer", "description": "Index of the current gang attempt (its Job is <name>-<n>)."},
        "budgetUsed": {"type": "integer", "description": "Restarts counted against runPolicy.backoffLimit."},
        "gpuSeconds": _number("GPU-seconds held across all attempts: what the job cost."),
        "attemptGpuSeconds": {"type": "object", "additionalProperties": {"type": "number"},
                              "description": "GPU-seconds per attempt (kept when an old attempt's pods are gone)."},
        "lastStepTime": {"type": "string", "format": "date-time",
                         "description": "When progress.step last moved (drives the Stalled condition)."},
        "inferenceService": {
            "type": "object",
            "description": "The KServe InferenceService serving merged/ (spec.deploy.kserve).",
            "properties": {
                "name": {"type": "string", "description": "Its name (in the job's namespace)."},
                "url": {"type": "string", "description": "Where it answers, once KServe reports it."},
                "ready": {"type": "boolean", "description": "Whether KServe reports it Ready."},
            },
        },
        "dryRun": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                   "description": "A dry run's report: throughput, estimated full-job seconds, peak memory, "
                   "loss trend."},
        "lastCheckpoint": {"type": "string", "description": "URI of the newest complete checkpoint."},
        "quality": {
            "type": "object",
            "description": "The fine-tuned model against the base on the test split, for one metric.",
            "properties": {
                "metric": {"type": "string", "description": "The metric compared (evaluation.metric, or loss)."},
                "base": _number("The base model's value."),
                "tuned": _number("The fine-tuned model's value."),
                "delta": _number("tuned - base."),
                "improved": {"type": "boolean", "description": "Beats the base (by evaluation.minImprovement)."},
                "minImprovement": _number("evaluation.minImprovement, when set."),
            },
        },
        "outputUri": {"type": "string", "description": "Where the fine-tuned model was written."},
        "failure": {
            "type": "object",
            "description": "Why the job failed.",
            "properties": {
                "reason": {"type": "string", "description": "InvalidInput, OOMKilled, ImagePullBackOff, "
                           "ErrImagePull, Unschedulable, DeadlineExceeded, BackoffLimitExceeded, Preempted, "
                           "TrainerError."},
                "message": {"type": "string", "description": "What to fix, naming the field or file."},
                "exitCode": {"type": "integer", "description": "The trainer's exit code, when it had one."},
            },
        },
        "observedGeneration": {"type": "integer", "format": "int64",
                               "description": "metadata.generation the status was derived from."},
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
    # runPolicy always present, with its defaults: `kubectl patch` of runPolicy.suspend onto a job created
    # without runPolicy would otherwise add backoffLimit's default too, which the immutability rule refuses.
    structural["properties"]["runPolicy"]["default"] = {}
    # Label names are unique: the API server checks a set list itself.
    structural["properties"]["model"]["properties"]["labels"]["x-kubernetes-list-type"] = "set"
    return structural


def build_crd() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent",
         "description": "Training progress in percent."},
        {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss",
         "description": "Latest train loss."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Improved", "type": "string", "priority": 1,  # kubectl get ftj -o wide
         "jsonPath": '.status.conditions[?(@.type=="Improved")].status',
         "description": "Whether the fine-tuned model beat the base on the test split (the Improved condition)."},
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
                            "x-kubernetes-validations": [NAME_RULE, immutable_rule()],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1."},
                                "kind": {"type": "string", "description": "FineTuneJob."},
                                # The API server takes no more than the type here (no description either).
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


# ---- FineTuneSweep ---------------------------------------------------------------------------------------------
def _sweep_rules() -> list[dict[str, str]]:
    """The sweep model's cross-field checks, for the API server (each trial is still a FineTuneJob checked whole)."""
    template_dpo = DPO.replace("self.", "self.template.")
    produced = (f"({template_dpo} ? {list(PREFERENCE_METRICS)!r} : (self.template.model.task == 'causal-lm' ? "
                f"{list(CAUSAL_LM_METRICS)!r} : {list(CLASSIFICATION_METRICS)!r}))")
    return [
        {"rule": f"!has(self.objective) || !has(self.objective.metric) || self.objective.metric in {produced}",
         "message": "objective.metric: not a validation metric the template produces (" + ", ".join(
             CLASSIFICATION_METRICS) + " for sequence-classification, " + ", ".join(CAUSAL_LM_METRICS)
         + " for causal-lm, " + ", ".join(PREFERENCE_METRICS) + " for method.type dpo)"},
        {"rule": "!has(self.algorithm) || self.algorithm != 'grid' || self.parameters.all(p, !has(p.min))",
         "message": "parameters: grid searches lists of values, not ranges"},
        {"rule": "!has(self.earlyStopping) || (has(self.template.evaluation) && "
         "has(self.template.evaluation.everySteps))",
         "message": "earlyStopping: trials are compared at the same step: set template.evaluation.everySteps"},
        {"rule": "self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
         "message": "parameters: each path once"},
    ]


# values holds any scalar (preserve-unknown-fields), which CEL cannot name: its rules are the operator's (Failed,
# InvalidSpec); these are the range's.
PARAMETER_RULES = [
    {"rule": "has(self.min) == has(self.max)", "message": "min, max: a range needs both"},
    {"rule": "!has(self.min) || !has(self.max) || self.min < self.max", "message": "min: must be below max"},
    {"rule": "!has(self.scale) || self.scale != 'log' || !has(self.min) || self.min > 0.0",
     "message": "min: scale log needs min above 0"},
]


def _sweep_status() -> dict[str, Any]:
    number, integer, text = {"type": "number"}, {"type": "integer"}, {"type": "string"}
    values = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    fields: dict[str, Any] = {
            "name": {**text, "description": "The trial's FineTuneJob (<sweep>-<index>)."},
            "index": {**integer, "description": "Order in which the search asked for it."},
            "parameters": {**values, "description": "The values this trial searched: {path: value}."},
            "state": {**text, "enum": ["Running", "Succeeded", "Failed", "Pruned"],
                      "description": "Running, Succeeded, Failed or Pruned (stopped by the median rule)."},
            "objective": {**number, "description": "Best validation value of the objective's metric."},
            "steps": {**integer, "description": "Optimizer updates run."},
            "gpuSeconds": {**number, "description": "GPU-seconds the trial held."},
            "curve": {"type": "array", "items": {"type": "array", "items": number},
                      "description": "[step, value] of the objective at each validation seen."},
            "outputUri": {**text, "description": "Where the trial's model was written."},
            "test": {"type": "object", "additionalProperties": number,
                     "description": "Test-split metrics of a succeeded trial."},
            "message": {**text, "description": "Why it was pruned or failed."},
    }
    trial = {"type": "object", "properties": fields}
    best = {"type": "object", "description": "The winner: its parameters, objective, test metrics and model.",
            "properties": {k: fields[k] for k in ("name", "parameters", "objective", "steps", "outputUri", "test")}}
    return {
        "type": "object",
        "description": "Observed state, written by the operator.",
        "properties": {
            "phase": {**text, "enum": ["Pending", "Running", "Succeeded", "Failed"],
                      "description": "Pending, Running, Succeeded or Failed."},
            "conditions": STATUS_SCHEMA["properties"]["conditions"],
            "metric": {**text, "description": "The objective's metric."},
            "goal": {**text, "description": "minimize or maximize."},
            "trialCount": {**integer, "description": "Trials started so far."},
            "running": {**integer, "description": "Trials running now."},
            "trials": {"type": "array", "items": trial, "description": "Every trial, in the order asked."},
            "best": best,
            "startTime": {**text, "format": "date-time", "description": "When the first trial was created."},
            "completionTime": {**text, "format": "date-time", "description": "When the sweep finished."},
            "observedGeneration": {**integer, "format": "int64",
                                   "description": "metadata.generation the status was derived from."},
        },
    }


def sweep_spec_schema() -> dict[str, Any]:
    schema = FineTuneSweepSpec.model_json_schema(by_alias=True)
    structural = _structural(schema, schema.pop("$defs", {}))
    structural["description"] = "A FineTuneJob template, the fields to search, the objective and the search."
    structural["properties"]["template"] = {**spec_schema(), "description": "The FineTuneJob spec each trial "
                                            "starts from (outputs go under <output.uri>/<trial>/)."}
    parameter = structural["properties"]["parameters"]["items"]
    parameter["properties"]["values"]["items"] = {"x-kubernetes-preserve-unknown-fields": True,
                                                  "description": "A value of the field's type."}
    parameter["x-kubernetes-validations"] = PARAMETER_RULES
    structural["x-kubernetes-validations"] = _sweep_rules()
    return structural


def build_sweep_crd() -> dict[str, Any]:
    columns = [
        {"name": "Trials", "type": "integer", "jsonPath": ".status.trialCount", "description": "Trials started."},
        {"name": "Running", "type": "integer", "jsonPath": ".status.running", "description": "Trials running."},
        {"name": "Best", "type": "number", "jsonPath": ".status.best.objective",
         "description": "The best trial's objective."},
        {"name": "Metric", "type": "string", "jsonPath": ".status.metric", "description": "The objective's metric."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    name_rule = {"rule": f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) "
                 f"<= {SWEEP_NAME_LENGTH}",
                 "message": f"metadata.name: must start with a letter, hold only lowercase letters, digits and '-', "
                 f"and be at most {SWEEP_NAME_LENGTH} characters (trials are named <sweep>-<index>)"}
    crd = build_crd()
    crd["metadata"]["name"] = f"{contract.SWEEP_PLURAL}.{contract.API_GROUP}"
    crd["spec"]["names"] = {"kind": contract.SWEEP_KIND, "plural": contract.SWEEP_PLURAL,
                            "singular": contract.SWEEP_SINGULAR, "shortNames": [contract.SWEEP_SHORT_NAME],
                            "categories": ["all", "kubetune"]}
    version = crd["spec"]["versions"][0]
    version["additionalPrinterColumns"] = columns
    root = version["schema"]["openAPIV3Schema"]
    root["description"] = "FineTuneSweep searches a FineTuneJob's hyperparameters: one FineTuneJob per trial."
    root["x-kubernetes-validations"] = [name_rule]
    root["properties"].update(kind={"type": "string", "description": "FineTuneSweep."}, spec=sweep_spec_schema(),
                              status=_sweep_status())
    return crd


def sweep_crd_yaml() -> str:
    header = "# Generated by `kubetune crd --kind FineTuneSweep` from trainer/kubetune/sweep/spec.py. Do not edit.\n"
    return header + yaml.safe_dump(build_sweep_crd(), sort_keys=False, width=100)
