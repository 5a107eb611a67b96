"""A checkpoint belongs to one exact training input; a finished rerun does nothing; early-stopping ties.

Runs are in-process `kubetune run`s of the tiny GPT-2 (full fine-tuning, fp32, 7 steps of 16).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.cli import main
from kubetune.jobfile import parse_job, write_job
from kubetune.storage import Storage
from kubetune.train import identity
from kubetune.train.outputs import model_card
from kubetune.train.progress import Progress
from kubetune.train.recipe import FineTuneRecipe
from tests.fixtures_models import causal_job, classification_job
from tests.trainer_runs import SPLIT, gpt2_job, split_instructions

STEPS = SPLIT["train"] // 16  # 7


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))


def job_doc(tiny_gpt2: Path, data: dict[str, Path], out: Path) -> dict[str, Any]:
    return gpt2_job("identity", tiny_gpt2, data, str(out), batch_size=16, epochs=1, every_steps=3)


def run(doc: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> str:
    assert main(["run", str(write_job(doc, tmp_path / "job.yaml"))]) == 0
    captured = capfd.readouterr()
    return captured.out + captured.err


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file below root with its sha256 and modification time: 'rewrites nothing' means equal snapshots."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def identity_folders(checkpoints: Path) -> list[Path]:
    return sorted(p for p in checkpoints.iterdir() if p.is_dir())


def read(out: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / name).read_text())
    return loaded


def test_changed_data_trains_afresh_beside_the_old_checkpoints_and_each_resumes_its_own(
        tmp_path: Path, tiny_gpt2: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data, out = split_instructions(tmp_path / "data"), tmp_path / "out"
    doc = job_doc(tiny_gpt2, data, out)
    run(doc, tmp_path, capfd)
    [old] = identity_folders(out / "checkpoints")
    old_files = snapshot(old)
    assert sorted({name.split("/")[0] for name in old_files}) == ["checkpoint-00000006", "checkpoint-00000007"]

    original = data["train"].read_bytes()
    extra = "".join(json.dumps({"prompt": f"Name a prime above {n}.", "completion": f"{n + 1}"}) + "\n"
                    for n in (10, 12, 16, 18, 22, 28))
    data["train"].write_text(original.decode() + extra)  # the user adds six rows and reruns the same manifest
    log = run(doc, tmp_path, capfd)
    assert "resumed from" not in log
    assert read(out, "run.json")["resumedFrom"] == []
    assert read(out, "metrics.json")["steps"] == 8  # 118 rows: every step trained on the new data
    assert snapshot(old) == old_files  # neither resumed, pruned nor overwritten
    new = next(p for p in identity_folders(out / "checkpoints") if p != old)
    new_files = snapshot(new)

    data["train"].write_bytes(original)  # back to the first data: its own finished checkpoint is still there
    log = run(doc, tmp_path, capfd)
    final = str(old / "checkpoint-00000007")
    assert f"resumed from {final} at step {STEPS}" in log
    assert read(out, "run.json")["resumedFrom"] == [final]
    assert read(out, "metrics.json")["steps"] == STEPS
    assert snapshot(old) == old_files and snapshot(new) == new_files


def test_finished_run_rerun_does_nothing_unless_its_output_is_damaged(
        tmp_path: Path, tiny_gpt2: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data, out = split_instructions(tmp_path / "data"), tmp_path / "out"
    doc = job_doc(tiny_gpt2, data, out)
    run(doc, tmp_path, capfd)
    before = snapshot(out)

    log = run(doc, tmp_path, capfd)
    assert log.count(f"already finished at step {STEPS}; outputs verified, nothing to do") == 1
    assert "resumed from" not in log and "model written to" not in log
    assert snapshot(out) == before  # outputs and checkpoints: not one byte or timestamp changed

    (out / "README.md").write_text("edited by hand\n")
    log = run(doc, tmp_path, capfd)
    assert "already finished" not in log and "does not match its manifest.json" in log
    assert f"resumed from {identity_folders(out / 'checkpoints')[0] / 'checkpoint-00000007'}" in log
    assert (out / "README.md").read_text() != "edited by hand\n"
    assert read(out, "metrics.json")["steps"] == STEPS
    assert Storage().read_manifest(str(out)) is not None


def test_identity_is_the_content_and_the_fields_that_shape_training(tmp_path: Path, tiny_gpt2: Path) -> None:
    data = split_instructions(tmp_path / "data")
    files = [{"split": "train", "sha256": "a" * 64}]

    def digest(doc: dict[str, Any], model: str = "m", data_files: list[dict[str, Any]] = files, world: int = 1) -> str:
        return identity.digest(identity.training_identity(parse_job(doc), model, data_files, world))

    base = job_doc(tiny_gpt2, data, tmp_path / "out")
    same = [
        gpt2_job("other-name", tiny_gpt2, data, str(tmp_path / "elsewhere"), batch_size=16, epochs=1, every_steps=9,
                 keep_last=5),
        {**base, "spec": {**base["spec"], "data": {**base["spec"]["data"], "train": "/moved/train.jsonl"}}},
    ]
    assert {digest(doc) for doc in same} == {digest(base)}
    changed = [
        digest(base, model="another model"),
        digest(base, data_files=[{"split": "train", "sha256": "b" * 64}]),
        digest(base, world=2),
        digest(gpt2_job("identity", tiny_gpt2, data, str(tmp_path / "out"), batch_size=16, epochs=1, every_steps=3,
                        seed=7)),
    ]
    assert len({digest(base), *changed}) == 5


def test_early_stopping_ties_go_to_the_lower_loss_then_the_later_step(tmp_path: Path) -> None:
    doc = classification_job("ties", "/model", "/train.jsonl", tmp_path / "out",
                             evaluation={"metric": "eval_accuracy", "earlyStoppingPatience": 2})
    recipe = FineTuneRecipe(parse_job(doc), tmp_path / "work")
    recipe.validation_set = [{"input_ids": [0], "labels": [0]}]
    recipe.model = torch.nn.Linear(1, 1)
    scripted = iter([(0.50, 0.70), (1.00, 0.40), (1.00, 0.30), (1.00, 0.30), (1.00, 0.35), (1.00, 0.31)])
    recipe._evaluate = lambda examples: dict(zip(("accuracy", "loss"), next(scripted), strict=True))  # type: ignore
    progress = Progress(10, 0, enabled=False)
    best = []
    for step in range(1, 7):
        recipe.state.step = step
        with torch.no_grad():
            recipe.model.weight.fill_(step)  # so the kept weights tell which step they are from
        recipe._validate(progress)
        best.append(recipe.state.best_step)
        if recipe.state.stopped_early:
            break
    # 2 and 3: better; 4 ties 3 exactly (the later wins, patience runs on); 5 worse loss: stop.
    assert best == [1, 2, 3, 4, 4]
    assert recipe.state.stopped_early and recipe.best_weights is not None
    assert recipe.best_weights["weight"].item() == 4.0

    metrics = {"trainableParameters": 1, "totalParameters": 2, "bestStep": 4, "steps": 5}
    run = {"data": {}, "hardware": {}}
    card = model_card(parse_job(doc).model_dump(mode="json", by_alias=True), metrics, run, ["merged"])
    assert "Ties on the metric go to the lower validation loss, then to the later step." in card


def test_fields_that_do_not_shape_training_leave_the_identity_alone() -> None:
    """evaluation.minImprovement (a gate on the result) and the dpo-only fields are not part of a non-dpo job's
    identity: adding them must not orphan the checkpoints every job already had (the digest is the one kubetune
    computed before they existed), nor may setting the gate retrain."""
    doc = causal_job("x", "s3://models/a/", "s3://data/t.jsonl", "s3://out/x/")
    gated = causal_job("x", "s3://models/a/", "s3://data/t.jsonl", "s3://out/x/", evaluation={"minImprovement": 0.5})
    digests = {identity.digest(identity.training_identity(parse_job(d), "m", [], 1)) for d in (doc, gated)}
    assert digests == {"f738a4df887f3ab8"}
