"""`kubetune compare OUTPUT...` (issue 29, item 7): finished runs side by side from their own run.json and
metrics.json. The runs are two trials of test_sweep_local.py's grid sweep (run once per session): they differ in
their learning rate (and output), read the same data, and reached different metrics."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from kubetune import contract
from kubetune.cli import main
from tests.test_sweep_local import SweepRun, grid_sweep


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, reviews_subset: Path) -> SweepRun:
    found = grid_sweep(tmp_path_factory, minilm_path, reviews_subset)
    assert found.code == contract.EXIT_OK, found.stdout + found.stderr
    return found


def compare(*outputs: Path | str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "400")  # no cell folded over two lines
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["compare", *map(str, outputs)])
    return code, stdout.getvalue(), stderr.getvalue()


def row(text: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_compare_shows_what_differs_the_data_and_the_metrics_side_by_side(grid: SweepRun) -> None:
    names = ["grid-0", "grid-1"]
    code, text, errors = compare(*(grid.out / name for name in names))
    assert code == contract.EXIT_OK, errors
    files = [grid.trial_files(name) for name in names]
    metrics, runs = [f[0] for f in files], [f[1] for f in files]
    assert row(text, "job") == names
    rates = [r["spec"]["hyperparameters"]["learningRate"] for r in runs]
    assert rates[0] != rates[1]
    assert row(text, "spec.hyperparameters.learningRate") == [f"{rate:.4g}" for rate in rates]
    assert row(text, "spec.output.uri") == [r["spec"]["output"]["uri"] for r in runs]  # differs: shown
    assert row(text, "spec.hyperparameters.maxSteps") == ["8", "8"]  # equal, but always shown
    assert "spec.data.maxSeqLength" not in text  # equal and not among the always-shown: left out
    # The data each read: the same file, by its sha256 and rows.
    shas = [r["data"]["files"][0]["sha256"] for r in runs]
    assert shas[0] == shas[1]
    assert row(text, "data train (sha256, rows)") == [f"{shas[0][:12]} ({runs[0]['data']['files'][0]['rows']})"] * 2
    # The metrics each reached, from its own metrics.json.
    assert row(text, "best validation") == [f"eval_loss {m['bestMetric']:.4g}" for m in metrics]
    assert row(text, "test accuracy") == [f"{m['test']['accuracy']:.4g}" for m in metrics]
    assert row(text, "test loss") == [f"{m['test']['loss']:.4g}" for m in metrics]
    assert row(text, "steps (best step)") == [f"{m['steps']} ({m['bestStep']})" for m in metrics]


def test_compare_refuses_an_output_that_is_not_a_finished_run(grid: SweepRun, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text, errors = compare(grid.out / "grid-0", empty)
    assert code == contract.EXIT_BAD_INPUT and f"{empty}: no readable run.json" in errors, errors
    assert "not a finished kubetune output" in errors and text == ""
    # run.json alone is not enough: a run that has not written its metrics is not finished either.
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(grid.out / "grid-0" / contract.RUN_FILE, half / contract.RUN_FILE)
    code, text, errors = compare(half, grid.out / "grid-1")
    assert code == contract.EXIT_BAD_INPUT and f"{half}: no readable metrics.json" in errors, errors
    # Nor is a sweep's summary, nor a folder that is not there.
    for path in (grid.out / "summary", tmp_path / "missing"):
        code, _, errors = compare(grid.out / "grid-0", path)
        assert code == contract.EXIT_BAD_INPUT and str(path) in errors, errors
    assert json.loads((grid.out / "grid-0" / contract.RUN_FILE).read_text())["job"] == "grid-0"  # untouched
