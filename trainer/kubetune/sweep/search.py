"""The search, ask-and-tell with Optuna over a study rebuilt from the trials recorded so far.

A trial record is what status.trials and sweep.json hold: {name, index, parameters, state, objective, steps,
gpuSeconds, curve [[step, value]...], outputUri, test, message}. Nothing lives only in memory: the study is
rebuilt from the records before every decision, and trial i is asked with a sampler seeded by (seed, i), so a
restarted controller asks the same question and gets the same answer, and a sweep with the same seed picks the
same trials.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from kubetune.sweep.spec import CURVE_POINTS, FineTuneSweepSpec, ParameterSpec

FINAL_STATES = ("Succeeded", "Failed", "Pruned")
log = logging.getLogger("kubetune.sweep")


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial asked is noise in our logs
    return optuna


def _distribution(parameter: ParameterSpec) -> Any:
    distributions = _optuna().distributions
    if parameter.values is not None:
        return distributions.CategoricalDistribution(parameter.values)
    low, high, log_scale = parameter.min, parameter.max, parameter.scale == "log"
    if parameter.type == "int":
        return distributions.IntDistribution(int(low), int(high), log=log_scale)  # type: ignore[arg-type]
    return distributions.FloatDistribution(low, high, log=log_scale)


def _seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % 2**32


def study(spec: FineTuneSweepSpec, records: list[dict[str, Any]], sampler: Any = None) -> Any:
    """An in-memory study holding every recorded trial: finished ones with their objective, running ones with the
    validation values seen so far."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    built = optuna.create_study(direction=spec.goal(), sampler=sampler)
    distributions = {p.path: _distribution(p) for p in spec.parameters}
    for record in sorted(records, key=lambda r: r["index"]):
        done = record["state"] == "Succeeded" and record.get("objective") is not None
        states = {"Pruned": state.PRUNED, "Failed": state.FAIL}
        built.add_trial(optuna.trial.create_trial(
            state=state.COMPLETE if done else states.get(record["state"], state.RUNNING),
            value=record["objective"] if done else None,
            params={p: record["parameters"][p] for p in distributions if p in record["parameters"]},
            distributions={p: d for p, d in distributions.items() if p in record["parameters"]},
            intermediate_values={int(s): float(v) for s, v in record.get("curve") or []}))
    return built


def next_parameters(spec: FineTuneSweepSpec, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The parameters of trial len(records), or None when the sweep has asked for all its trials."""
    index = len(records)
    if index >= spec.trial_count():
        return None
    if spec.algorithm == "grid":  # every combination, in order: nothing to sample
        return spec.grid()[index]
    optuna = _optuna()
    if spec.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=_seed(spec.seed, index))
    else:  # TPE after a few random trials; constant_liar keeps parallel trials apart
        startup = max(2, min(10, spec.trial_count() // 3))
        sampler = optuna.samplers.TPESampler(seed=_seed(spec.seed, index), n_startup_trials=startup,
                                             constant_liar=spec.parallelism > 1)
    trial = study(spec, records, sampler).ask({p.path: _distribution(p) for p in spec.parameters})
    return {p.path: _plain(trial.params[p.path]) for p in spec.parameters}


def _plain(value: Any) -> Any:
    """numpy scalars (Optuna's draws) as the JSON numbers status and sweep.json hold."""
    return value.item() if hasattr(value, "item") else value


def observe(record: dict[str, Any], step: int | None, value: float | None, every: int | None) -> bool:
    """Record a validation value seen at `step`; True when the curve grew. The value belongs to the last evaluation
    at or before step (evaluations run every `every` steps): a value that has not changed since the last one seen is
    that same evaluation, seen again."""
    if step is None or value is None:
        return False
    curve = record.setdefault("curve", [])
    at = step - step % every if every else step
    if curve and (curve[-1][1] == value or curve[-1][0] >= at):
        return False
    curve.append([at, value])
    del curve[:-CURVE_POINTS]
    return True


def best_value(spec: FineTuneSweepSpec, values: list[float]) -> float | None:
    if not values:
        return None
    return min(values) if spec.goal() == "minimize" else max(values)


def should_prune(spec: FineTuneSweepSpec, records: list[dict[str, Any]], record: dict[str, Any]) -> str | None:
    """Why the median rule stops this running trial now, or None."""
    rule, curve = spec.early_stopping, record.get("curve") or []
    if rule is None or not curve:
        return None
    others = [r for r in records if r["name"] != record["name"]]
    built = study(spec, others)
    trial = study(spec, [{**record, "state": "Running"}]).trials[0]
    pruner = _optuna().pruners.MedianPruner(n_startup_trials=rule.startup_trials, n_warmup_steps=rule.warmup_steps)
    if not pruner.prune(built, trial):
        return None
    step = curve[-1][0]
    at_step = [dict(r["curve"]).get(step) for r in others if r["state"] == "Succeeded" and r.get("curve")]
    median = statistics.median(v for v in at_step if v is not None)
    best = best_value(spec, [v for _, v in curve])
    return (f"{spec.objective_metric()} {best:.4g} by step {step} is worse than the median {median:.4g} of the "
            f"completed trials at that step")


def best_trial(spec: FineTuneSweepSpec, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The succeeded trial with the best objective (the earlier one on a tie)."""
    done = [r for r in records if r["state"] == "Succeeded" and r.get("objective") is not None]
    if not done:
        return None
    sign = 1 if spec.goal() == "minimize" else -1
    return min(done, key=lambda r: (sign * r["objective"], r["index"]))
