"""`kubetune compare OUTPUT...`: finished runs side by side from their own run.json and metrics.json (local folders
or s3:// outputs), so what changed between runs shows without MLflow: the spec fields that differ, the data each
read (sha256 and rows), and the metrics each reached."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kubetune import contract
from kubetune.errors import UserError
from kubetune.spec import StorageSpec
from kubetune.storage import Storage, join_uri

ALWAYS = ("model.uri", "method.type", "hyperparameters.learningRate", "hyperparameters.batchSize",
          "hyperparameters.epochs", "hyperparameters.maxSteps", "hyperparameters.seed")  # shown even when equal
PACKAGES = ("kubetune", "torch", "transformers", "peft")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay whole (targetModules, labels)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else key))
    return flat


def read_run(uri: str, storage: Storage, cache: Path) -> dict[str, Any]:
    """A finished output's run.json and metrics.json; bad input when it has none."""
    found: dict[str, Any] = {"uri": uri}
    for name, key in ((contract.RUN_FILE, "run"), (contract.METRICS_FILE, "metrics")):
        try:
            path = storage.fetch(join_uri(uri, name), cache / name)
            found[key] = json.loads(path.read_text())
        except (OSError, ValueError, UserError) as exc:
            raise UserError(f"{uri}: no readable {name} ({exc}): not a finished kubetune output") from None
    return found


def rows(runs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one value per run): spec fields that differ (and a few always), data, metrics, environment."""
    specs = [flatten(r["run"].get("spec") or {}) for r in runs]
    keys = sorted({k for s in specs for k in s})
    out: list[tuple[str, list[str]]] = [("job", [str(r["run"].get("job")) for r in runs])]
    for key in keys:
        values = [_text(s.get(key)) for s in specs]
        if key in ALWAYS or len(set(values)) > 1:
            out.append((f"spec.{key}", values))
    splits = sorted({f["split"] for r in runs for f in r["run"].get("data", {}).get("files") or []})
    for split in splits:
        out.append((f"data {split} (sha256, rows)", [_files(r, split) for r in runs]))
    out.append(("data rows kept / read", [f"{r['run'].get('data', {}).get('rowsKept')} / "
                                          f"{r['run'].get('data', {}).get('rowsRead')}" for r in runs]))
    out.append(("split sizes", [_text(r["run"].get("data", {}).get("splitSizes")) for r in runs]))
    out.append(("steps (best step)", [f"{r['metrics'].get('steps')} ({r['metrics'].get('bestStep')})" for r in runs]))
    out.append(("best validation", [f"{r['metrics'].get('metric')} {_text(r['metrics'].get('bestMetric'))}"
                                    for r in runs]))
    tests = sorted({k for r in runs for k, v in (r["metrics"].get("test") or {}).items() if isinstance(v, int | float)})
    for name in tests:
        out.append((f"test {name}", [_text((r["metrics"].get("test") or {}).get(name)) for r in runs]))
    out.append(("quality (base -> tuned)", [_quality(r["metrics"].get("quality")) for r in runs]))
    for package in PACKAGES:
        out.append((f"package {package}", [_text((r["run"].get("packages") or {}).get(package)) for r in runs]))
    out.append(("hardware", [_text({k: v for k, v in (r["run"].get("hardware") or {}).items()
                                    if k in ("device", "precision", "worldSize")}) for r in runs]))
    out.append(("finished", [_text(r["run"].get("finishedAt")) for r in runs]))
    return out


def _files(run: dict[str, Any], split: str) -> str:
    files = [f for f in run["run"].get("data", {}).get("files") or [] if f.get("split") == split]
    return ", ".join(f"{str(f.get('sha256'))[:12]} ({f.get('rows')})" for f in files) or "-"


def _quality(verdict: dict[str, Any] | None) -> str:
    if not verdict or verdict.get("tuned") is None:
        return "-"
    return f"{verdict['metric']} {_text(verdict.get('base'))} -> {_text(verdict['tuned'])}"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return "-" if value is None else str(value)


def compare(outputs: list[str], endpoint: str | None = None, region: str = "us-east-1") -> int:
    storage = Storage(StorageSpec(endpoint=endpoint, region=region))
    with tempfile.TemporaryDirectory(prefix="kubetune-compare-") as tmp:
        runs = [read_run(uri, storage, Path(tmp) / str(i)) for i, uri in enumerate(outputs)]
    table = Table(title="runs side by side (rows that differ in bold)")
    table.add_column("")
    for index, run in enumerate(runs):
        table.add_column(f"{index + 1}: {run['uri']}", overflow="fold")
    for label, values in rows(runs):
        differs = len(runs) > 1 and len(set(values)) > 1
        table.add_row(label, *values, style="bold" if differs else None)
    Console().print(table)
    return contract.EXIT_OK
