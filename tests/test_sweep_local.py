"""`kubetune sweep FILE` (issue 29, item 4), the local side: trials of MiniLM + LoRA on the sample reviews, run as
users run them, through kubetune.cli.main. A grid of three learning rates picks the trial whose own metrics.json
has the best validation loss and leaves sweep.json and its PNG; a random sweep with the same seed picks the same
trials twice; the median rule stops a trial with an awful learning rate before its last step and nothing of it is
published; bad sweeps are refused with exit 2, naming the field, before anything is written.

The trials are tiny (64 tokens, 16 a batch, 2 to 12 steps) and the grid sweep runs once per session: it is
test_compare.py's pair of finished runs too (`grid_sweep`)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune import contract
from kubetune.cli import main
from kubetune.jobfile import write_job
from kubetune.sweep import search
from kubetune.sweep.local import SUMMARY_DIR
from kubetune.sweep.spec import parse_sweep
from tests.fixtures_models import classification_job

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID_RATES = [1e-4, 3e-3, 3e-2]
GRID_STEPS = 8
PRUNE_STEPS = 12
LR = "hyperparameters.learningRate"


@dataclass
class SweepRun:
    """One `kubetune sweep` and what it left."""

    code: int
    stdout: str
    stderr: str
    folder: Path  # the manifest, its state dir (state/) and the template's output.uri (out/)

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def summary(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads((self.out / SUMMARY_DIR / contract.SWEEP_FILE).read_text())
        return found

    def trial_files(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A trial's own metrics.json and run.json, from its output <output.uri>/<trial>/."""
        folder = self.out / name
        return (json.loads((folder / contract.METRICS_FILE).read_text()),
                json.loads((folder / contract.RUN_FILE).read_text()))


def template(model: Path, data: Path, out: Path, steps: int, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob spec a trial trains in seconds; `spec` merges in."""
    defaults: dict[str, Any] = {"data": {"maxSeqLength": 64}, "hyperparameters": {"maxSteps": steps, "batchSize": 16}}
    for key, value in spec.items():
        defaults[key] = {**defaults.get(key, {}), **value}
    found = classification_job("template", model, data, out, **defaults)["spec"]
    found["output"]["mergeAdapter"] = False  # the adapter is enough here
    return found


def sweep_document(name: str, template_spec: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": name},
            "spec": {"template": template_spec, **spec}}


def run_sweep(document: dict[str, Any], folder: Path, *options: str) -> SweepRun:
    """`kubetune sweep` in this process (its trials are processes of their own), its output captured; the state
    dir and a wide console (tables unwrapped) for this call only."""
    manifest = write_job(document, folder / "sweep.yaml")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(contract.ENV_STATE_DIR, str(folder / "state"))
        patch.setenv("COLUMNS", "240")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["sweep", str(manifest), *options])
    return SweepRun(code, stdout.getvalue(), stderr.getvalue(), folder)


_GRID: list[SweepRun] = []


def grid_sweep(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path) -> SweepRun:
    """The grid of three learning rates, run once per session (this module's tests and test_compare.py's)."""
    if not _GRID:
        folder = tmp_path_factory.mktemp("grid-sweep")
        spec = template(model, data, folder / "out", GRID_STEPS, evaluation={"everySteps": 2})
        _GRID.append(run_sweep(sweep_document("grid", spec, algorithm="grid",
                                              parameters=[{"path": LR, "values": GRID_RATES}]), folder))
    return _GRID[0]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, reviews_subset: Path) -> SweepRun:
    return grid_sweep(tmp_path_factory, minilm_path, reviews_subset)


def test_a_grid_sweep_picks_the_trial_with_the_best_validation_metric(grid: SweepRun) -> None:
    assert grid.code == contract.EXIT_OK, grid.stdout + grid.stderr
    summary = grid.summary
    assert summary["objective"] == {"metric": "eval_loss", "goal": "minimize"}  # the template's evaluation.metric
    assert summary["algorithm"] == "grid" and summary["maxTrials"] == 3
    trials = summary["trials"]
    assert [t["name"] for t in trials] == ["grid-0", "grid-1", "grid-2"]
    assert [t["parameters"] for t in trials] == [{LR: rate} for rate in GRID_RATES]  # every value, in order
    # Each trial judged from its own files: the lowest validation loss it reached, at every evaluation.
    best_loss = {}
    for trial in trials:
        metrics, run = grid.trial_files(trial["name"])
        assert trial["state"] == "Succeeded", trial
        assert run["spec"]["hyperparameters"]["learningRate"] == trial["parameters"][LR]  # the trial's value applied
        assert run["spec"]["evaluation"]["metric"] == "eval_loss"
        losses = [row["eval_loss"] for row in metrics["validation"]]
        assert [row["step"] for row in metrics["validation"]] == list(range(2, GRID_STEPS + 1, 2))
        best_loss[trial["name"]] = min(losses)
        assert trial["objective"] == min(losses) == metrics["bestMetric"]
        assert trial["curve"] == [[row["step"], row["eval_loss"]] for row in metrics["validation"]]
        assert trial["steps"] == metrics["steps"] == GRID_STEPS
        assert trial["outputUri"] == f"{grid.out / trial['name']}/"
    assert len(set(best_loss.values())) == 3, best_loss  # three different results: the pick means something
    winner = min(best_loss, key=lambda name: best_loss[name])
    best = summary["best"]
    assert best["name"] == winner and best["objective"] == best_loss[winner]
    assert best["parameters"] == next(t["parameters"] for t in trials if t["name"] == winner)
    assert best["outputUri"] == f"{grid.out / winner}/" and (grid.out / winner / contract.MANIFEST_NAME).is_file()
    metrics, _ = grid.trial_files(winner)
    assert best["test"]["accuracy"] == metrics["test"]["accuracy"]  # the winner's test metrics, from its run
    # The summary: sweep.json beside a real PNG, published like a model (manifest.json last).
    summary_dir = grid.out / SUMMARY_DIR
    assert (summary_dir / contract.SWEEP_PLOT).read_bytes()[:8] == PNG_MAGIC
    assert (summary_dir / contract.MANIFEST_NAME).is_file()
    # The printed table marks the winner, and the last line names it.
    assert f"{winner} *" in grid.stdout
    assert all(f"{name} *" not in grid.stdout for name in best_loss if name != winner)
    assert f"best: {winner} eval_loss {best_loss[winner]:.4g}" in grid.stdout


def test_a_random_sweep_with_the_same_seed_picks_the_same_trials(tmp_path: Path, minilm_path: Path,
                                                                 reviews_subset: Path) -> None:
    ranged = {"path": LR, "min": 1e-4, "max": 1e-2, "scale": "log"}
    picks = []
    for folder, options in ((tmp_path / "first", ()), (tmp_path / "second", ("--parallel", "2"))):
        spec = template(minilm_path, reviews_subset, folder / "out", 2)
        document = sweep_document("rand", spec, algorithm="random", seed=7, maxTrials=2, parameters=[ranged])
        run = run_sweep(document, folder, *options)
        assert run.code == contract.EXIT_OK, run.stdout + run.stderr
        trials = run.summary["trials"]
        assert [t["state"] for t in trials] == ["Succeeded", "Succeeded"]
        for trial in trials:  # the value drawn is the value each trial trained with
            _, trial_run = run.trial_files(trial["name"])
            assert trial_run["spec"]["hyperparameters"]["learningRate"] == trial["parameters"][LR]
        picks.append([t["parameters"] for t in trials])
    first, second = picks
    assert first == second  # in turn or two at once, the same seed, the same draws
    rates = [p[LR] for p in first]
    assert rates[0] != rates[1] and all(1e-4 <= r <= 1e-2 for r in rates)
    # The draws follow from the seed and the trials recorded, nothing else: asked again from the records (as an
    # operator restarted mid-sweep would), the same answer; another seed, another draw.
    sweep = parse_sweep(document).spec
    records = [{"name": f"rand-{i}", "index": i, "parameters": p, "state": "Succeeded", "objective": 0.5}
               for i, p in enumerate(first)]
    assert search.next_parameters(sweep, []) == first[0]
    assert search.next_parameters(sweep, records[:1]) == first[1]
    other = parse_sweep({**document, "spec": {**document["spec"], "seed": 8}}).spec
    assert search.next_parameters(other, []) != first[0]


def test_the_median_rule_stops_a_trial_with_an_awful_learning_rate(tmp_path: Path, minilm_path: Path,
                                                                  reviews_subset: Path) -> None:
    # The trial's own early stopping off: only the sweep's median rule may end it before its last step.
    spec = template(minilm_path, reviews_subset, tmp_path / "out", PRUNE_STEPS,
                    evaluation={"everySteps": 2, "earlyStoppingPatience": 0})
    document = sweep_document("prune", spec, algorithm="grid", parameters=[{"path": LR, "values": [1e-3, 1.0]}],
                              earlyStopping={"type": "median", "startupTrials": 1})
    run = run_sweep(document, tmp_path)
    assert run.code == contract.EXIT_OK, run.stdout + run.stderr
    good, bad = run.summary["trials"]
    assert good["state"] == "Succeeded" and good["steps"] == PRUNE_STEPS
    assert bad["state"] == "Pruned", bad
    assert "worse than the median" in bad["message"]
    assert bad.get("objective") is None
    assert 0 < bad["steps"] < PRUNE_STEPS  # stopped before its last step
    assert bad["curve"] and all(value > max(v for _, v in good["curve"]) for _, value in bad["curve"])
    # The steps it ran are the ones its SIGTERM checkpoint holds; no model, no metrics of it published.
    saved = [int(p.name.rsplit("-", 1)[1]) for p in (run.out / bad["name"]).glob("checkpoints/*/checkpoint-*")]
    assert saved and max(saved) == bad["steps"]
    assert not (run.out / bad["name"] / contract.MANIFEST_NAME).exists()
    assert not (run.out / bad["name"] / contract.METRICS_FILE).exists()
    assert not (run.out / bad["name"] / "adapter").exists()
    assert run.summary["best"]["name"] == good["name"]
    assert f"{bad['name']}: Pruned" in run.stdout


def _unknown_path(spec: dict[str, Any]) -> None:
    spec["parameters"][0] = {"path": "hyperparameters.learningRat", "values": [1e-3]}


def _min_above_max(spec: dict[str, Any]) -> None:
    spec["parameters"][0] = {"path": LR, "min": 1e-2, "max": 1e-3}
    spec["algorithm"] = "random"


def _metric_not_produced(spec: dict[str, Any]) -> None:
    spec["objective"] = {"metric": "eval_perplexity"}  # a causal LM's, not a classifier's


def _no_trials(spec: dict[str, Any]) -> None:
    spec["maxTrials"] = 0


def _value_the_template_refuses(spec: dict[str, Any]) -> None:
    spec["parameters"][0]["values"] = [1e-3, 5.0]  # learningRate is at most 1


@pytest.mark.parametrize(("spoil", "field", "says"), [
    (_unknown_path, "spec.parameters[0].path", "did you mean hyperparameters.learningRate"),
    (_min_above_max, "spec.parameters[0].min", "must be below max"),
    (_metric_not_produced, "spec.objective.metric", "'eval_perplexity' is not a validation metric"),
    (_no_trials, "spec.maxTrials", "greater than or equal to 1"),
    (_value_the_template_refuses, "spec.parameters[0].values[1]", "learningRate = 5.0"),
], ids=["unknown-path", "min-above-max", "metric-not-produced", "max-trials-0", "value-out-of-range"])
def test_bad_sweeps_are_refused_naming_the_field(tmp_path: Path, spoil: Any, field: str, says: str) -> None:
    spec = template(Path("/no/model"), Path("/no/data.jsonl"), tmp_path / "out", 2)  # never read: refused first
    document = sweep_document("bad", spec, algorithm="grid", parameters=[{"path": LR, "values": [1e-3, 3e-3]}])
    spoiled = copy.deepcopy(document)
    spoil(spoiled["spec"])
    run = run_sweep(spoiled, tmp_path)
    assert run.code == contract.EXIT_BAD_INPUT, run.stdout + run.stderr
    assert f"sweep.yaml: {field}: " in run.stderr and says in run.stderr, run.stderr
    assert not run.out.exists() and not (tmp_path / "state").exists()  # nothing written, no trial started
    assert "started" not in run.stdout
