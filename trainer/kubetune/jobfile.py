"""Read a FineTuneJob manifest and turn every schema problem into one line naming its field."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from kubetune.errors import UserError
from kubetune.spec import FineTuneJob


def field_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'data', 'split') -> 'spec.data.split'; list indices as [i]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec model a location points into: ('spec', 'method') -> MethodSpec."""
    model: type[BaseModel] | None = FineTuneJob
    for part in loc:
        if model is None or isinstance(part, int):
            return None
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        model = _nested_model(field.annotation)
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]  # `X | None` -> X
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _unknown_field(loc: tuple[int | str, ...]) -> str:
    """'unknown field', with the closest real name: learningrate -> learningRate, batch_size -> batchSize."""
    parent = _model_at(loc[:-1])
    name = str(loc[-1])
    if parent is None:
        return "unknown field"
    names = _names(parent)
    camel = to_camel(name)
    if camel in names and camel != name:
        return f"unknown field; did you mean {camel}? (fields are camelCase)"
    lowered = {n.lower(): n for n in names}
    close = lowered.get(name.lower()) or next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.6)), None)
    if close:
        return f"unknown field; did you mean {close}?"
    return f"unknown field (expected one of: {', '.join(names)})"


def _not_a_mapping(loc: tuple[int | str, ...], value: Any) -> str:
    """A scalar where an object belongs: show the shape, e.g. `method: {type: lora}`."""
    model = _model_at(loc)
    key = str(loc[-1]) if loc else "spec"
    if model is not None and "type" in model.model_fields and isinstance(value, str):
        return f"expected an object, not {value!r}; write `{key}: {{type: {value}}}`"
    fields = f" with fields {', '.join(_names(model))}" if model is not None else ""
    return f"expected an object{fields}, not {value!r}"


def describe(error: Any) -> str:
    loc = tuple(error["loc"])
    path = field_path(loc) or "(manifest)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = _unknown_field(loc)
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = _not_a_mapping(loc, error.get("input"))
    # Model-level rules name their own sub-field ("labels: ..."): attach it to the path.
    head, sep, rest = message.partition(": ")
    if sep and head.replace(".", "").isalnum() and " " not in head:
        if head.startswith(("evaluation.", "data.", "model.", "method.")) and path == "spec":
            return f"spec.{head}: {rest}"
        if "." not in head:
            return f"{path}.{head}: {rest}"
    return f"{path}: {message}"


def parse_job(document: Any, source: str = "manifest") -> FineTuneJob:
    if not isinstance(document, dict):
        raise UserError(f"{source}: expected a FineTuneJob mapping, got {type(document).__name__}")
    try:
        # Manifests use the camelCase names only: snake_case is rejected like any unknown field, with a hint.
        return FineTuneJob.model_validate(document, by_name=False)
    except ValidationError as exc:
        problems = [describe(e) for e in exc.errors()]
        raise UserError("\n".join(f"{source}: {p}" for p in problems)) from None


def load_job(path: str | Path) -> FineTuneJob:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if len(documents) != 1:
        raise UserError(f"{path}: expected exactly one YAML document, found {len(documents)}")
    return parse_job(documents[0], str(path))


def job_document(name: str, spec: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A FineTuneJob as a plain dict, `overrides` deep-merged into `spec`: for scripts, tests and benchmarks."""
    merged = json.loads(json.dumps(spec))  # a deep copy: callers reuse their base spec
    _deep_merge(merged, overrides or {})
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": merged}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def write_job(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
