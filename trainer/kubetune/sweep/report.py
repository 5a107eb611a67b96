"""What a sweep leaves: sweep.json (every trial and the winner), a PNG of the objective per trial and of the
validation curves, and the table printed as trials finish."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from kubetune import contract
from kubetune.sweep.spec import Sweep

log = logging.getLogger("kubetune.sweep")
BEST_FIELDS = ("name", "parameters", "objective", "steps", "outputUri", "test")


def best_of(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """status.best / sweep.json's best: the winner's parameters, objective, test metrics and output."""
    return None if record is None else {k: record[k] for k in BEST_FIELDS if record.get(k) is not None}


def summary(sweep: Sweep, records: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    spec = sweep.spec
    return {"name": sweep.name, "objective": {"metric": spec.objective_metric(), "goal": spec.goal()},
            "algorithm": spec.algorithm, "seed": spec.seed, "maxTrials": spec.trial_count(),
            "trials": records, "best": best_of(best)}


def save(folder: Path, result: dict[str, Any]) -> list[Path]:
    """sweep.json, and its PNG where matplotlib is installed (the trainer extra has it)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / contract.SWEEP_FILE]
    written[0].write_text(json.dumps(result, indent=2))
    try:
        written.append(plot(folder / contract.SWEEP_PLOT, result))
    except ImportError:
        log.warning("no %s: matplotlib is not installed (pip install kubetune[trainer])", contract.SWEEP_PLOT)
    return written


def plot(path: Path, result: dict[str, Any]) -> Path:
    """Left: each trial's objective (pruned and failed trials marked); right: every trial's validation curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in pods or CI
    from matplotlib import pyplot as plt

    metric = result["objective"]["metric"]
    best = (result.get("best") or {}).get("name")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for record in result["trials"]:
        value = record.get("objective")
        if value is None and record.get("curve"):
            value = record["curve"][-1][1]  # a pruned trial: where it was stopped
        if value is not None:
            colour = {"Pruned": "tab:orange", "Failed": "tab:red"}.get(record["state"], "tab:blue")
            left.scatter(record["index"], value, color="tab:green" if record["name"] == best else colour,
                         marker="x" if record["state"] != "Succeeded" else "o", zorder=3)
        steps = [s for s, _ in record.get("curve") or []]
        values = [v for _, v in record.get("curve") or []]
        if steps:
            right.plot(steps, values, marker="o" if len(steps) < 30 else None, label=record["name"],
                       linestyle="--" if record["state"] == "Pruned" else "-",
                       linewidth=2 if record["name"] == best else 1)
    left.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial (green: best, x: pruned or failed)")
    right.set(xlabel="step", ylabel=metric, title="validation curves (dashed: pruned)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if len(result["trials"]) <= 12:
        right.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table(result: dict[str, Any]) -> Table:
    """Every trial, best first; the winner marked."""
    metric, goal = result["objective"]["metric"], result["objective"]["goal"]
    paths = sorted({p for r in result["trials"] for p in r.get("parameters", {})})
    view = Table(title=f"{result['name']}: {metric} ({goal})")
    for column in ["trial", "state", *paths, metric, "steps"]:
        view.add_column(column, justify="right" if column not in ("trial", "state") else "left")
    sign = 1 if goal == "minimize" else -1
    ordered = sorted(result["trials"], key=lambda r: (r.get("objective") is None, sign * (r.get("objective") or 0)))
    best = (result.get("best") or {}).get("name")
    for record in ordered:
        name = f"{record['name']} *" if record["name"] == best else record["name"]
        view.add_row(name, record["state"], *(_value(record.get("parameters", {}).get(p)) for p in paths),
                     _value(record.get("objective")), _value(record.get("steps")))
    return view


def row(record: dict[str, Any], metric: str) -> str:
    """One line as a trial finishes."""
    parameters = ", ".join(f"{p}={_value(v)}" for p, v in record.get("parameters", {}).items())
    line = f"{record['name']}: {record['state']}  {parameters}  {metric} {_value(record.get('objective'))}"
    return line + (f"  ({record['message']})" if record.get("message") else "")
