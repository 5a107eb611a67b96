"""Bad input: one clear message naming the field or file, exit 2, no traceback, nothing that looks complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from kubetune.jobfile import write_job
from tests.fixtures_models import classification_job


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))


def _rows(n: int, labels: tuple[str, ...] = ("negative", "positive")) -> str:
    words = ["fine", "broken", "lovely", "awful", "okay", "superb", "dull", "sturdy", "flimsy", "handy"]
    return "".join(json.dumps({"text": f"item {i} is {words[i % 10]} {words[(i * 7) % 10]}", "label": labels[i % 2]})
                   + "\n" for i in range(n))


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _not_a_model(tmp_path: Path) -> Path:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hello": "world"}')
    return folder


def _damaged_copy(tmp_path: Path, doc: dict[str, Any]) -> None:
    """The job's model folder copied with its weights cut in half, as a partial upload leaves them."""
    folder = tmp_path / "damaged-model"
    shutil.copytree(doc["spec"]["model"]["uri"], folder, ignore=shutil.ignore_patterns("__pycache__"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    doc["spec"]["model"]["uri"] = str(folder)


# Each case: (what it changes, the text the message must contain).
CASES: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "unknown field": (lambda t, d: d["spec"]["data"].update(textFeild="text"), "spec.data.textFeild: unknown field"),
    "wrong type": (lambda t, d: d["spec"]["hyperparameters"].update(batchSize="big"),
                   "spec.hyperparameters.batchSize"),
    "out of range": (lambda t, d: d["spec"]["method"].update(lora={"r": 0}), "spec.method.lora.r"),
    "split sum": (lambda t, d: d["spec"]["data"].update(split={"train": 0.8, "validation": 0.3, "test": 0.1}),
                  "spec.data.split: fractions must sum to 1.0"),
    "missing data file": (lambda t, d: d["spec"]["data"].update(train=str(t / "nope.jsonl")),
                          "spec.data.train"),
    "not the declared format": (lambda t, d: d["spec"]["data"].update(
        train=str(_write(t, "garbage.jsonl", bytes(range(256)) * 20))), "garbage.jsonl"),
    "label outside labels": (lambda t, d: d["spec"]["data"].update(
        train=str(_write(t, "odd.jsonl", _rows(60, ("negative", "neutral"))))), "neutral"),
    "empty after cleaning": (lambda t, d: d["spec"]["data"].update(
        train=str(_write(t, "empty.jsonl", '{"text": "  ", "label": "positive"}\n' * 5))), "empty"),
    "class left out of test": (lambda t, d: d["spec"]["data"].update(
        train=str(_write(t, "rare.jsonl", _rows(40, ("negative", "negative")) + _rows(2)[:0]
                         + json.dumps({"text": "the only good one", "label": "positive"}) + "\n"))),
        "spec.data.split"),
    "model folder not a model": (lambda t, d: d["spec"]["model"].update(uri=str(_not_a_model(t))),
                                 "spec.model.uri"),
    "damaged weights": (_damaged_copy, "model.safetensors is damaged or incomplete"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_clear_message(tmp_path: Path, minilm_path: Path, case: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    change, expected = CASES[case]
    out = tmp_path / "out"
    doc = classification_job("bad", minilm_path, _write(tmp_path, "train.jsonl", _rows(60)), out)
    change(tmp_path, doc)
    code = main(["run", str(write_job(doc, tmp_path / "job.yaml"))])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert expected in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (out / "manifest.json").exists()


def test_validate_reports_every_problem_at_once(tmp_path: Path) -> None:
    doc = classification_job("Bad_Name", "/models/x", "/data/x.jsonl", "out",
                             hyperparameters={"batchSize": 0, "learningRate": -1},
                             data={"split": {"train": 0.5, "validation": 0.1, "test": 0.1}, "colour": "red"})
    path = write_job(doc, tmp_path / "job.yaml")
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    for field in ("metadata.name", "spec.hyperparameters.batchSize", "spec.hyperparameters.learningRate",
                  "spec.data.colour: unknown field"):
        assert field in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_accepts_a_good_manifest_and_checks_local_files(tmp_path: Path, minilm_path: Path) -> None:
    train = _write(tmp_path, "train.jsonl", _rows(10))
    good = write_job(classification_job("good", minilm_path, train, tmp_path / "out"), tmp_path / "good.yaml")
    assert main(["validate", str(good)]) == 0
    missing = write_job(classification_job("gone", minilm_path, tmp_path / "gone.jsonl", "out"), tmp_path / "m.yaml")
    assert main(["validate", str(missing)]) == 2


def test_unreadable_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    bad = _write(tmp_path, "bad.yaml", "spec: [unclosed")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "absent.yaml: file not found" in err and "not valid YAML" in err
