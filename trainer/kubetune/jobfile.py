"""Read a FineTuneJob manifest and turn every schema problem into one line naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.errors import UserError
from kubetune.spec import FineTuneJob


def field_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'data', 'split') -> 'spec.data.split'; list indices as [i]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(error: Any) -> str:
    path = field_path(tuple(error["loc"])) or "(manifest)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
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
        return FineTuneJob.model_validate(document)
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
