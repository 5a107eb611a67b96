"""Scrape rank 0's /metrics (Prometheus text) into status.progress and status.metrics."""

from __future__ import annotations

import math
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubetune import contract

SCRAPE_TIMEOUT_SECONDS = 2.0
DIGITS = 4  # status.metrics and the LOSS column: 0.6559, not 0.6558552384376526
# Trainer gauge -> status.metrics key (the chosen eval metric is added by its own name).
METRICS = {contract.METRIC_TRAIN_LOSS: "trainLoss", contract.METRIC_EVAL_LOSS: "evalLoss"}


# Pod IPs are reached directly: an HTTP(S)_PROXY from the environment (a corporate proxy) must not carry scrapes.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(url: str) -> str | None:
    """The exposition text, or None when the endpoint is not up (yet): progress is best effort."""
    try:
        with _DIRECT.open(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
            return str(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def parse(text: str, job: str, namespace: str) -> tuple[dict[str, Any], dict[str, float]]:
    """(progress, metrics) from this job's series; series of other jobs or per-rank ones are ignored."""
    values: dict[str, float] = {}
    evals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if not math.isfinite(sample.value):
                continue  # a NaN loss is no loss to show (and the API server refuses NaN)
            if labels.get("job", job) != job or labels.get("namespace", namespace) != namespace:
                continue
            if sample.name == contract.METRIC_EVAL and "metric" in labels:
                if not labels["metric"].startswith(("test_", "train_")):  # validation only: tests come at the end
                    evals[labels["metric"]] = float(sample.value)
            elif "rank" not in labels or labels["rank"] == "0":
                values.setdefault(sample.name, float(sample.value))
    progress: dict[str, Any] = {}
    if contract.METRIC_STEP in values:
        progress["step"] = int(values[contract.METRIC_STEP])
    if contract.METRIC_TOTAL_STEPS in values:
        progress["totalSteps"] = int(values[contract.METRIC_TOTAL_STEPS])
    if contract.METRIC_EPOCH in values:
        progress["epoch"] = round(values[contract.METRIC_EPOCH], 3)
    if contract.METRIC_PROGRESS in values:
        progress["percent"] = round(100.0 * values[contract.METRIC_PROGRESS], 1)
    elif progress.get("totalSteps"):
        progress["percent"] = round(100.0 * progress.get("step", 0) / progress["totalSteps"], 1)
    if contract.METRIC_ETA in values:
        progress["etaSeconds"] = round(values[contract.METRIC_ETA], 1)
    metrics = {key: round(values[name], DIGITS) for name, key in METRICS.items() if name in values}
    for name, value in evals.items():
        metrics[_camel(name if name.startswith("eval") else f"eval_{name}")] = round(value, DIGITS)
    return progress, metrics


def final_metrics(final: dict[str, Any]) -> dict[str, float]:
    """status.metrics from the trainer's final figures (its termination message): the last train loss and the
    last validation row, named as the scrape names them."""
    metrics: dict[str, float] = {}
    if isinstance(final.get("trainLoss"), int | float):
        metrics["trainLoss"] = round(final["trainLoss"], DIGITS)
    for name, value in (final.get("validation") or {}).items():
        if isinstance(value, int | float) and math.isfinite(value):
            metrics[_camel(name)] = round(value, DIGITS)
    return metrics


def _camel(name: str) -> str:
    """eval_accuracy -> evalAccuracy (status keys are camelCase like the rest of the API)."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)
