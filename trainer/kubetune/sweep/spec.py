"""The FineTuneSweep API (kubetune.io/v1alpha1) as pydantic models, checked up front like a FineTuneJob.

A sweep is a FineTuneJob template, the template fields to search (`parameters`), what to optimise (`objective`)
and how (`algorithm`, `seed`, `maxTrials`, `parallelism`, `earlyStopping`). Each trial is the template with the
trial's values set, its evaluation.metric set to the objective's, and its outputs under <output.uri>/<trial>/.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kubetune import contract
from kubetune.errors import UserError
from kubetune.jobfile import describe, field_path
from kubetune.spec import (
    CAUSAL_LM_METRICS,
    CLASSIFICATION_METRICS,
    LOWER_IS_BETTER,
    PREFERENCE_METRICS,
    FineTuneJobSpec,
    Metadata,
    Resource,
    _Spec,
)
from kubetune.storage import join_uri

# Template sections a sweep may search; within them every scalar field but the two below.
SEARCHED_SECTIONS = ("model", "method", "data", "hyperparameters", "evaluation", "resources", "runPolicy")
# evaluation.metric is the objective's; priorityClassName is for the admission policy to judge, not a search; a
# suspended trial would hold the sweep.
NOT_SEARCHED = ("evaluation.metric", "resources.priorityClassName", "runPolicy.suspend")
MAX_TRIALS = 1000  # trial names are <sweep>-<index>: index below 1000 keeps them within FineTuneJob's 52
MAX_NAME_LENGTH = 48
CURVE_POINTS = 200  # validation values kept per trial in status (etcd objects stay small)


def _leaf(annotation: Any) -> type[BaseModel] | str | None:
    """A nested model, the scalar kind ('int', 'float', 'str', 'bool'), or None for lists and maps."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = [_leaf(a) for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    if origin is Literal:
        return "str"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation)


def _paths(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        kind = _leaf(info.annotation)
        if isinstance(kind, type):
            found.update(_paths(kind, path + "."))
        elif kind is not None:
            found[path] = kind
    return found


SEARCHABLE: dict[str, str] = {p: k for p, k in _paths(FineTuneJobSpec).items()
                              if p.split(".")[0] in SEARCHED_SECTIONS and p not in NOT_SEARCHED}


def produced_metrics(template: FineTuneJobSpec) -> tuple[str, ...]:
    """The validation metrics a job of this task and method reports."""
    if template.method.type == "dpo":
        return PREFERENCE_METRICS
    return CLASSIFICATION_METRICS if template.model.task == "sequence-classification" else CAUSAL_LM_METRICS


class ParameterSpec(_Spec):
    path: str = Field(description="The template field to search, e.g. hyperparameters.learningRate or method.lora.r.",
                      json_schema_extra={"enum": list(sorted(SEARCHABLE))})
    values: list[Any] | None = Field(default=None, min_length=1, description="Choices to search (a list); "
                                     "or give min and max.", json_schema_extra={"maxItems": 100})
    min: float | None = Field(default=None, allow_inf_nan=False, description="Lowest value of a range.")
    max: float | None = Field(default=None, allow_inf_nan=False, description="Highest value of a range.")
    scale: Literal["linear", "log"] = Field(default="linear", description="log samples a range evenly in its "
                                            "logarithm (learning rates); needs min above 0.")
    type: Literal["float", "int"] = Field(default="float", description="float or int values from a range.")

    @field_validator("path")
    @classmethod
    def _searchable(cls, value: str) -> str:
        if value not in SEARCHABLE:
            close = difflib.get_close_matches(value, SEARCHABLE, n=1)
            hint = f"did you mean {close[0]}?" if close else "e.g. hyperparameters.learningRate or method.lora.r"
            raise ValueError(f"{value!r} is not a searchable field of the FineTuneJob spec ({hint}; "
                             "`kubectl explain fts.spec.parameters.path` lists them)")
        return value

    @model_validator(mode="after")
    def _values_or_range(self) -> ParameterSpec:
        ranged = self.min is not None or self.max is not None
        if (self.values is None) == (not ranged):
            raise ValueError("values: give a list of values, or min and max (not both)")
        if self.values is not None:
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError("values: each value once")
            return self
        if self.min is None or self.max is None:
            raise ValueError(f"{'max' if self.max is None else 'min'}: a range needs both min and max")
        if self.min >= self.max:
            raise ValueError(f"min: {self.min:g} must be below max {self.max:g}")
        if self.scale == "log" and self.min <= 0:
            raise ValueError(f"min: scale log needs min above 0, not {self.min:g}")
        if self.type == "int" and not (self.min.is_integer() and self.max.is_integer()):
            raise ValueError("type: int needs whole numbers for min and max")
        if self.type == "float" and SEARCHABLE[self.path] == "int":
            raise ValueError(f"type: {self.path} takes whole numbers: set type int")
        return self

    def bounds(self) -> list[Any]:
        """The values to check against the template: every choice, or both ends of the range."""
        if self.values is not None:
            return self.values
        assert self.min is not None and self.max is not None
        return [int(self.min), int(self.max)] if self.type == "int" else [self.min, self.max]


class ObjectiveSpec(_Spec):
    metric: str | None = Field(default=None, description="Validation metric to optimise (eval_loss, eval_accuracy, "
                               "...); default the template's evaluation.metric. The test split stays untouched "
                               "until the winner is chosen.")
    goal: Literal["minimize", "maximize"] | None = Field(
        default=None, description="minimize or maximize; default minimize for eval_loss and eval_perplexity, "
        "maximize for the others.")


class EarlyStoppingSpec(_Spec):
    type: Literal["median"] = Field(default="median", description="median: stop a trial whose best validation "
                                    "value so far is worse than the median of completed trials at the same step.")
    startup_trials: int = Field(default=2, ge=1, le=1000, description="Completed trials before any is stopped.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps a trial runs before it may be stopped.")


class FineTuneSweepSpec(_Spec):
    template: FineTuneJobSpec = Field(description="The FineTuneJob spec each trial starts from.")
    parameters: list[ParameterSpec] = Field(min_length=1, description="Template fields to search.",
                                            json_schema_extra={"maxItems": 32})
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="What the search optimises.")
    algorithm: Literal["grid", "random", "tpe"] = Field(
        default="tpe", description="grid: every combination of the values in order; random: independent draws; "
        "tpe: Optuna's Tree-structured Parzen Estimator, guided by the finished trials.")
    seed: int = Field(default=42, description="Seed of the search: the same seed picks the same trials.")
    max_trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS, description="Trials to run; default the "
                                   "grid's size for grid, 10 otherwise (a grid runs at most its size).")
    parallelism: int = Field(default=1, ge=1, le=100, description="Trials running at once.")
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop trials that are doing worse than the others (needs "
        "template.evaluation.everySteps: trials are compared at the same step).")

    @model_validator(mode="after")
    def _consistent(self) -> FineTuneSweepSpec:
        paths = [p.path for p in self.parameters]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"parameters: {', '.join(twice)} searched twice")
        produced = produced_metrics(self.template)
        if self.objective_metric() not in produced:
            raise ValueError(f"objective.metric: {self.objective_metric()!r} is not a validation metric this "
                             f"template produces (one of {', '.join(produced)})")
        if self.algorithm == "grid":
            ranged = [i for i, p in enumerate(self.parameters) if p.values is None]
            if ranged:
                raise ValueError(f"parameters[{ranged[0]}].values: grid searches lists of values, not ranges")
        if self.early_stopping is not None and self.template.evaluation.every_steps is None:
            raise ValueError("earlyStopping: trials are compared at the same step: set "
                             "template.evaluation.everySteps")
        return self

    def objective_metric(self) -> str:
        return self.objective.metric or self.template.evaluation.metric

    def goal(self) -> str:
        return self.objective.goal or ("minimize" if self.objective_metric() in LOWER_IS_BETTER else "maximize")

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the parameters' values, in order (grid only)."""
        choices = [[(p.path, v) for v in p.values or []] for p in self.parameters]
        return [dict(combo) for combo in itertools.product(*choices)]

    def trial_count(self) -> int:
        if self.algorithm == "grid":
            return min(len(self.grid()), self.max_trials or MAX_TRIALS)
        return self.max_trials or 10


class FineTuneSweep(Resource):
    kind: Literal["FineTuneSweep"]
    spec: FineTuneSweepSpec

    @field_validator("metadata")
    @classmethod
    def _short_name(cls, value: Metadata) -> Metadata:
        if len(value.name) > MAX_NAME_LENGTH:
            raise ValueError(f"name: at most {MAX_NAME_LENGTH} characters (trials are named <sweep>-<index>)")
        return value


@dataclass
class Sweep:
    """A checked sweep and its template as written (defaults left to each trial's own validation)."""

    resource: FineTuneSweep
    template: dict[str, Any]

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    @property
    def spec(self) -> FineTuneSweepSpec:
        return self.resource.spec

    def trial_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def trial_spec(self, index: int, parameters: dict[str, Any]) -> dict[str, Any]:
        """The template with the trial's values, judged on the objective, writing under <output.uri>/<trial>/."""
        spec = copy.deepcopy(self.template)
        for path, value in parameters.items():
            _set(spec, path, value)
        name = self.trial_name(index)
        _set(spec, "evaluation.metric", self.spec.objective_metric())
        _set(spec, "output.uri", join_uri(spec["output"]["uri"], name) + "/")
        if (spec.get("checkpoint") or {}).get("uri"):
            _set(spec, "checkpoint.uri", join_uri(spec["checkpoint"]["uri"], name) + "/")
        if (spec.get("tracking") or {}).get("mlflow"):  # the trials are child runs of one parent run
            _set(spec, "tracking.mlflow.parentRunName", self.name)
        return spec


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _locate(error: dict[str, Any]) -> str:
    """jobfile.describe, with a model rule's own sub-field ("objective.metric: ...") joined to the sweep's path."""
    text = describe(error)
    path = field_path(tuple(error["loc"]))
    if not text.startswith(f"{path}: "):
        return text  # describe joined it already
    head, sep, rest = text[len(path) + 2:].partition(": ")
    if sep and " " not in head and (path in ("spec", "spec.template") or path.startswith("spec.parameters")):
        return f"{path}.{head}: {rest}"
    return text


def parse_sweep(document: Any, source: str = "manifest") -> Sweep:
    """Schema and cross-field checks, then every value of every parameter tried on the template."""
    if not isinstance(document, dict):
        raise UserError(f"{source}: expected a FineTuneSweep mapping, got {type(document).__name__}")
    try:
        resource = FineTuneSweep.model_validate(document, by_name=False)
    except ValidationError as exc:
        raise UserError("\n".join(f"{source}: {_locate(e)}" for e in exc.errors())) from None  # type: ignore[arg-type]
    sweep = Sweep(resource, copy.deepcopy(document["spec"]["template"]))
    problems = []
    for i, parameter in enumerate(resource.spec.parameters):
        for j, value in enumerate(parameter.bounds()):
            where = f"spec.parameters[{i}].{'values' if parameter.values is not None else 'min/max'}"
            where += f"[{j}]" if parameter.values is not None else ""
            try:
                FineTuneJobSpec.model_validate(sweep.trial_spec(0, {parameter.path: value}), by_name=False)
            except ValidationError as exc:
                reasons = "; ".join(describe(e) for e in exc.errors())
                problems.append(f"{source}: {where}: {parameter.path} = {value!r}: {reasons}")
    if problems:
        raise UserError("\n".join(problems))
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if len(documents) != 1:
        raise UserError(f"{path}: expected exactly one YAML document, found {len(documents)}")
    return parse_sweep(documents[0], str(path))


def finite(value: Any) -> float | None:
    """A metric value the API server and the search accept: a finite float, else None."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


SWEEP_API_VERSION = f"{contract.API_GROUP}/{contract.API_VERSION}"
