"""Checkpoints and automatic resume: a killed or preempted run must end as the uninterrupted one does.

Runs are `kubetune run` subprocesses of the tiny GPT-2 (full fine-tuning, fp32). Resume tolerance: losses
relative 1e-5. fp32 on CPU with the same thread count is deterministic, and a checkpoint restores weights,
optimizer, scheduler, RNG and data position, so resumed losses are bit-identical in practice (observed
difference 0.0, with bf16 autocast as well); the small tolerance only allows for a different math library.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.contract import DEFAULT_GRACE_SECONDS, EXIT_OK, EXIT_RETRY, MANIFEST_NAME
from kubetune.jobfile import write_job
from kubetune.storage import Storage, join_uri
from kubetune.train import checkpoint
from kubetune.train.checkpoint import STATE_FILE, checkpoint_name
from tests.trainer_runs import (
    SPLIT,
    Trainer,
    checkpoint_root,
    complete_checkpoints,
    gpt2_job,
    identity_root,
    losses,
    poll,
    read_output,
    run_checkpoints,
    split_instructions,
    step_of,
    storage_for,
    wait,
)

BATCH, EPOCHS, EVERY, KEEP = 4, 2, 5, 3
STEPS_PER_EPOCH = SPLIT["train"] // BATCH  # 28
TOTAL = STEPS_PER_EPOCH * EPOCHS  # 56 steps: a kill after the first checkpoint (step 5) lands mid-run
REL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_instructions(tmp_path_factory.mktemp("data"))


def job_doc(name: str, model: Path, data: dict[str, Path], output: str, **spec: Any) -> dict[str, Any]:
    return gpt2_job(name, model, data, output, batch_size=BATCH, epochs=EPOCHS, every_steps=EVERY,
                    keep_last=KEEP, **spec)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, data: dict[str, Path]) -> dict[str, Any]:
    """The uninterrupted run every resumed run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    doc = job_doc("reference", tiny_gpt2, data, str(root / "out"))
    trainer = Trainer(write_job(doc, root / "job.yaml"), root / "state")
    code, out = trainer.run()
    assert code == EXIT_OK, out
    metrics = read_output(Storage(), str(root / "out"), "metrics.json", root / "fetched")
    assert metrics["steps"] == TOTAL
    assert metrics["test"]["loss"] < metrics["baseTest"]["loss"] - 0.5  # it learns: losses are worth comparing
    return {"metrics": metrics, "checkpoints": root / "out" / "checkpoints"}


def assert_same_training(metrics: dict[str, Any], expected: dict[str, Any]) -> None:
    got, want = losses(metrics), losses(expected)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, TOTAL + 1))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=REL)
    assert metrics["steps"] == expected["steps"] == TOTAL
    assert [v["eval_loss"] for v in metrics["validation"]] == pytest.approx(
        [v["eval_loss"] for v in expected["validation"]], rel=REL)
    assert metrics["test"]["loss"] == pytest.approx(expected["test"]["loss"], rel=REL)


# -- finding the checkpoint to resume from (unit level, local and S3) ------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    if request.param == "local":
        return Storage(), str(tmp_path / "ckpt")
    bucket = request.getfixturevalue("s3_bucket")
    storage: Storage = request.getfixturevalue("s3_storage")
    return storage, f"s3://{bucket}/ckpt/"


def save_fake(storage: Storage, root: str, step: int, staging: Path, keep_last: int = 10) -> str:
    return checkpoint.save(storage, root, {"step": step, "weights": torch.full((256,), float(step))}, staging,
                           keep_last)


def flip_bytes(storage: Storage, uri: str, scratch: Path) -> None:
    """Corrupt a stored file in place, same size: only the sha256 can tell."""
    path = storage.fetch(uri, scratch)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if uri.startswith("s3://"):
        storage.s3().upload_file(path, uri)


def test_find_latest_skips_incomplete_then_corrupt(store: tuple[Storage, str], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    storage, root = store
    for step in (10, 20, 30):
        save_fake(storage, root, step, tmp_path / "staging")
    found = checkpoint.find_latest(storage, root, tmp_path / "dest-1")
    assert found is not None and found[0] == join_uri(root, checkpoint_name(30))

    caplog.set_level(logging.WARNING, logger="kubetune.checkpoint")
    storage.delete(join_uri(root, checkpoint_name(30), MANIFEST_NAME))
    found = checkpoint.find_latest(storage, root, tmp_path / "dest-2")
    assert found is not None and found[0] == join_uri(root, checkpoint_name(20))
    assert "skipping incomplete checkpoint" in caplog.text

    flip_bytes(storage, join_uri(root, checkpoint_name(20), STATE_FILE), tmp_path / "scratch")
    found = checkpoint.find_latest(storage, root, tmp_path / "dest-3")
    assert found is not None and found[0] == join_uri(root, checkpoint_name(10))
    assert "skipping corrupt checkpoint" in caplog.text and "sha256 mismatch" in caplog.text
    assert checkpoint.load(found[1])["weights"].eq(10.0).all()

    storage.delete(join_uri(root, checkpoint_name(10), MANIFEST_NAME))
    assert checkpoint.find_latest(storage, root, tmp_path / "dest-4") is None


def test_a_checkpoint_is_memory_mapped_not_read_into_each_rank(tmp_path: Path) -> None:
    """Issue 25, item 12: every DDP rank read the whole state.pt into its own memory; mapped, a node's ranks
    share the file's pages. Rewriting the checkpoint meanwhile replaces the file, so the mapping stays whole."""
    storage = Storage()
    uri = save_fake(storage, str(tmp_path / "ckpt"), 10, tmp_path / "staging")
    state = checkpoint.load(Path(uri))
    mapped = Path("/proc/self/maps").read_text()
    assert str(Path(uri) / STATE_FILE) in mapped
    rewritten = {"step": 10, "weights": torch.full((256,), 99.0)}  # the same step saved again: same path
    checkpoint.save(storage, str(tmp_path / "ckpt"), rewritten, tmp_path / "staging", 10)
    # Renamed over, never truncated under the mapping: the loaded tensors keep what was loaded.
    assert state["weights"].eq(10.0).all() and checkpoint.load(Path(uri))["weights"].eq(99.0).all()


def test_only_keep_last_complete_checkpoints_are_kept(store: tuple[Storage, str], tmp_path: Path) -> None:
    storage, root = store
    save_fake(storage, root, 10, tmp_path / "staging", keep_last=2)
    # A half-written older checkpoint (crash during upload) and a newer one that may still be uploading.
    for step in (15, 50):
        folder = tmp_path / "partial" / checkpoint_name(step)
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_bytes(b"partial")
        uri = join_uri(root, checkpoint_name(step))
        if uri.startswith("s3://"):
            storage.s3().upload_tree(folder, uri)
        else:
            shutil.copytree(folder, uri)
    for step in (20, 30, 40):
        save_fake(storage, root, step, tmp_path / "staging", keep_last=2)
    names = storage.list_prefixes(root)
    assert names == [checkpoint_name(s) for s in (30, 40, 50)]
    assert complete_checkpoints(storage, root) == [30, 40]


# -- end to end: kill, preempt, damage -------------------------------------------------------------------------


@pytest.mark.parametrize("where", [pytest.param("local", marks=pytest.mark.slow), "s3"])  # s3 covers local's path too
def test_resume_after_sigkill_matches_uninterrupted_run(where: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path],
                                                        reference: dict[str, Any]) -> None:
    extra: dict[str, Any] = {}
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        output, root = f"s3://{bucket}/out/", f"s3://{bucket}/ckpt/"
        extra["storage"] = {"endpoint": server.endpoint}
    else:
        output, root = str(tmp_path / "out"), str(tmp_path / "ckpt")
    doc = job_doc("killed", tiny_gpt2, data, output, checkpoint_uri=root, **extra)
    job = write_job(doc, tmp_path / "job.yaml")
    storage = storage_for(doc)

    first = Trainer(job, tmp_path / "pod-1")
    process = first.start()
    poll(lambda: bool(run_checkpoints(storage, root)), process, every=0.01 if where == "local" else 0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole tree, no chance to clean up
    process.wait()
    assert storage.read_manifest(output) is None, "the run finished before the kill; make it longer"
    saved = run_checkpoints(storage, root)
    assert saved and saved[-1] < TOTAL

    second = Trainer(job, tmp_path / "pod-2")  # a rescheduled pod: the same spec, an empty local disk
    code, out = second.run()
    assert code == EXIT_OK, out
    assert "resumed from" in out
    run = read_output(storage, output, "run.json", tmp_path / "fetched")
    assert run["resumedFrom"] == [join_uri(identity_root(storage, root), checkpoint_name(saved[-1]))]
    assert_same_training(read_output(storage, output, "metrics.json", tmp_path / "fetched"), reference["metrics"])


@pytest.mark.slow  # the default run has it under torchrun (test_distributed) and through kubetune run (metrics_resume)
def test_sigterm_mid_epoch_checkpoints_exits_for_retry_and_resumes(tmp_path: Path, tiny_gpt2: Path,
                                                                   data: dict[str, Path],
                                                                   reference: dict[str, Any]) -> None:
    output = str(tmp_path / "out")
    doc = job_doc("preempted", tiny_gpt2, data, output)
    job = write_job(doc, tmp_path / "job.yaml")
    storage, root = Storage(), checkpoint_root(doc)

    first = Trainer(job, tmp_path / "pod-1")
    process = first.start()
    poll(lambda: bool(run_checkpoints(storage, root)), process)
    os.kill(process.pid, signal.SIGTERM)  # as the kubelet does: the container's main process only
    sent = time.monotonic()
    code = wait(process, DEFAULT_GRACE_SECONDS)
    assert time.monotonic() - sent < DEFAULT_GRACE_SECONDS
    assert code == EXIT_RETRY, first.log.read_text()
    assert "preempted: SIGTERM" in first.log.read_text()

    result = first.result()
    assert (result["outcome"], result["reason"], result["exitCode"]) == ("Preempted", "Preempted", EXIT_RETRY)
    step = result["step"]
    assert step % STEPS_PER_EPOCH > 0 and step < TOTAL, "SIGTERM should land in the middle of an epoch"
    # No work lost: the checkpoint is at the step where it stopped, complete, with the position in the data.
    assert result["lastCheckpoint"] == join_uri(identity_root(storage, root), checkpoint_name(step))
    assert run_checkpoints(storage, root)[-1] == step
    state = checkpoint.load(Path(result["lastCheckpoint"]))
    assert state["step"] == step
    assert (state["train_state"]["epoch"], state["train_state"]["samples_in_epoch"]) == (
        step // STEPS_PER_EPOCH, step % STEPS_PER_EPOCH * BATCH)  # the position in examples, whole batches of 4
    assert storage.read_manifest(output) is None

    second = Trainer(job, tmp_path / "pod-2")
    code, out = second.run()
    assert code == EXIT_OK, out
    assert second.result()["outcome"] == "Succeeded"
    run = read_output(storage, output, "run.json", tmp_path / "fetched")
    assert run["resumedFrom"] == [result["lastCheckpoint"]]
    assert_same_training(read_output(storage, output, "metrics.json", tmp_path / "fetched"), reference["metrics"])


def test_restart_skips_incomplete_and_corrupt_checkpoints(tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path],
                                                          reference: dict[str, Any]) -> None:
    """The finished reference's checkpoints, newest without manifest, next corrupt: resume from the third."""
    storage, ckpt = Storage(), str(tmp_path / "ckpt")
    shutil.copytree(reference["checkpoints"], ckpt)  # another checkpoint.uri: the same training identity
    root = identity_root(storage, ckpt)
    steps = complete_checkpoints(storage, root)
    assert len(steps) == KEEP and steps[-1] == TOTAL
    oldest, middle, newest = steps
    (Path(root) / checkpoint_name(newest) / MANIFEST_NAME).unlink()
    flip_bytes(storage, join_uri(root, checkpoint_name(middle), STATE_FILE), tmp_path / "scratch")

    output = str(tmp_path / "out")
    doc = job_doc("damaged", tiny_gpt2, data, output, checkpoint_uri=ckpt)
    code, out = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == EXIT_OK, out
    assert f"skipping incomplete checkpoint {join_uri(root, checkpoint_name(newest))}" in out
    assert "skipping corrupt checkpoint" in out and "sha256 mismatch" in out
    run = read_output(storage, output, "run.json", tmp_path / "fetched")
    assert [step_of(uri) for uri in run["resumedFrom"]] == [oldest]
    assert oldest < TOTAL
    assert_same_training(read_output(storage, output, "metrics.json", tmp_path / "fetched"), reference["metrics"])


def test_a_checkpoint_from_another_kubetune_version_is_ignored_not_a_crash(
        tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path], reference: dict[str, Any]) -> None:
    """An earlier trainer kept the data position as `batch_in_epoch`; resuming such a checkpoint crashed with a
    TypeError on every retry. Now it is set aside with a warning and the run starts over (same losses)."""
    storage, ckpt = Storage(), str(tmp_path / "ckpt")
    shutil.copytree(reference["checkpoints"], ckpt)
    root = identity_root(storage, ckpt)
    oldest, *newer = complete_checkpoints(storage, root)
    for step in newer:
        shutil.rmtree(Path(root) / checkpoint_name(step))
    state = checkpoint.load(Path(root) / checkpoint_name(oldest))
    earlier = dict(state["train_state"])
    earlier["batch_in_epoch"] = earlier.pop("samples_in_epoch") // BATCH
    checkpoint.save(storage, root, {**state, "train_state": earlier}, tmp_path / "staging", KEEP)  # manifest too

    output = str(tmp_path / "out")
    doc = job_doc("upgraded", tiny_gpt2, data, output, checkpoint_uri=ckpt)
    code, out = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == EXIT_OK, out
    assert "written by another kubetune version" in out and "batch_in_epoch" in out and "Traceback" not in out
    assert read_output(storage, output, "run.json", tmp_path / "fetched")["resumedFrom"] == []
    assert_same_training(read_output(storage, output, "metrics.json", tmp_path / "fetched"), reference["metrics"])
