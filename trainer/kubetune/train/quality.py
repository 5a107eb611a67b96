"""The quality gate: the fine-tuned model against its base on the test split, for one chosen metric.

Torch-free: `kubetune run` and the termination message use it too.
"""

from __future__ import annotations

import math
from typing import Any

from kubetune.spec import FineTuneJobSpec

LOWER_IS_BETTER = ("loss", "perplexity")


def quality_metric(spec: FineTuneJobSpec) -> str:
    """The test metric the gate compares: what evaluation.metric selects, accuracy where that is a loss
    (a classifier's users judge it by its answers), preference accuracy for preference tuning."""
    if spec.method.type == "dpo":
        return "preference_accuracy"
    metric = spec.evaluation.metric.removeprefix("eval_")
    if spec.model.task == "sequence-classification" and metric == "loss":
        return "accuracy"
    return metric


def compare(metric: str, base: dict[str, Any] | None, tuned: dict[str, Any] | None,
            min_improvement: float | None) -> dict[str, Any] | None:
    """{metric, base, tuned, delta (tuned - base), higherIsBetter, improved, minImprovement}; None without both
    test results. improved: beats the base by at least minImprovement, or at all when it is unset."""
    before, after = (base or {}).get(metric), (tuned or {}).get(metric)
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return None
    higher = metric not in LOWER_IS_BETTER
    gain = (after - before) if higher else (before - after)
    improved = gain >= min_improvement if min_improvement is not None else gain > 0
    return {"metric": metric, "base": float(before), "tuned": float(after), "delta": float(after - before),
            "higherIsBetter": higher, "improved": bool(improved),
            "minImprovement": min_improvement}


def describe(quality: dict[str, Any]) -> str:
    """One line with both numbers and the difference: `test accuracy: base 0.5300 -> fine-tuned 0.8500 (+0.3200)`."""
    return (f"test {quality['metric']}: base {quality['base']:.4f} -> fine-tuned {quality['tuned']:.4f} "
            f"({quality['delta']:+.4f}, {'higher' if quality['higherIsBetter'] else 'lower'} is better)")


def not_improved_message(quality: dict[str, Any], report_uri: str) -> str:
    """Why nothing was published: both numbers, the field, and where the report went."""
    needed = quality["minImprovement"]
    direction = "above" if quality["higherIsBetter"] else "below"
    return (f"spec.evaluation.minImprovement: the fine-tuned model does not beat the base by {needed:g}: "
            f"{describe(quality)}; it needed to be at least {needed:g} {direction} the base. Nothing was published; "
            f"the report and curves are in {report_uri}")


def warning(quality: dict[str, Any]) -> str | None:
    """The CLI's warning when an ungated model is not better than its base (None when it is)."""
    if quality["improved"] or quality["minImprovement"] is not None:
        return None
    return (f"warning: the fine-tuned model is not better than its base ({describe(quality)}); it was published "
            "anyway: set spec.evaluation.minImprovement to publish only a better model")


def finite_numbers(quality: dict[str, Any]) -> dict[str, Any]:
    """For the termination message: the API server refuses NaN and Infinity, so such numbers are left out."""
    return {k: v for k, v in quality.items() if not (isinstance(v, float) and not math.isfinite(v))}
