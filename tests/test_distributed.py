"""Two processes under torchrun (gloo, CPU) via `kubetune run --nproc-per-node 2`.

Model: the tiny GPT-2, full fine-tuning, fp32. 112 training examples = 7 whole global batches of 16 for both
1 x 16 and 2 x 8, so both runs take 7 steps per epoch and the same learning-rate schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.contract import (
    DEFAULT_GRACE_SECONDS,
    ENV_COLLECTIVE_TIMEOUT,
    ENV_IO_TIMEOUT,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_RETRY,
    MANIFEST_NAME,
)
from kubetune.jobfile import write_job
from kubetune.storage import Storage, join_uri
from kubetune.storage.manifest import verify_dir
from kubetune.train import checkpoint
from kubetune.train.batching import epoch_batches
from kubetune.train.checkpoint import checkpoint_name
from tests.trainer_runs import (
    KUBETUNE,
    RUN_TIMEOUT,
    SPLIT,
    Trainer,
    checkpoint_root,
    complete_checkpoints,
    gpt2_job,
    identity_root,
    losses,
    poll,
    processes_mentioning,
    read_output,
    run_checkpoints,
    split_instructions,
    storage_for,
    wait,
)

GLOBAL_BATCH, EPOCHS, EVERY = 16, 6, 3
TOTAL = SPLIT["train"] // GLOBAL_BATCH * EPOCHS  # 42
# 1 vs 2 processes: same global batch and schedule, but different batches (length-grouped, then sharded), as a
# different seed gives. Over seeds 1, 2, 3, 42 the test loss of 1- and 2-process runs spread over 0.023
# (|1 - 2 processes| at most 0.021 per seed) after learning ~0.9 from the base: 0.05 is twice that noise
# and still under 6% of what training changes.
TEST_LOSS_TOLERANCE = 0.05
RESUME_REL = 1e-5  # resumed vs uninterrupted, same process count: bit-identical in practice (observed 0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_instructions(tmp_path_factory.mktemp("data"))


def job_doc(name: str, model: Path, data: dict[str, Path], output: str, nproc: int, **spec: Any) -> dict[str, Any]:
    return gpt2_job(name, model, data, output, batch_size=GLOBAL_BATCH // nproc, epochs=EPOCHS, every_steps=EVERY,
                    **spec)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, data: dict[str, Path]) -> dict[str, Any]:
    """An uninterrupted 2 x 8 run."""
    root = tmp_path_factory.mktemp("two")
    doc = job_doc("two", tiny_gpt2, data, str(root / "out"), nproc=2)
    trainer = Trainer(write_job(doc, root / "job.yaml"), root / "state", nproc=2)
    code, out = trainer.run()
    assert code == EXIT_OK, out
    storage = Storage()
    return {"out": out, "doc": doc, "output": root / "out",
            "metrics": read_output(storage, str(root / "out"), "metrics.json", root / "fetched"),
            "run": read_output(storage, str(root / "out"), "run.json", root / "fetched")}


def test_two_processes_match_one_process_with_the_same_global_batch(
        two_processes: dict[str, Any], tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path]) -> None:
    doc = job_doc("one", tiny_gpt2, data, str(tmp_path / "out"), nproc=1)
    code, out = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == EXIT_OK, out
    one = read_output(Storage(), str(tmp_path / "out"), "metrics.json", tmp_path / "fetched")
    two = two_processes["metrics"]

    assert one["globalBatchSize"] == two["globalBatchSize"] == GLOBAL_BATCH
    assert one["steps"] == two["steps"] == TOTAL
    assert two_processes["run"]["hardware"]["worldSize"] == 2
    for metrics in (one, two):
        assert metrics["test"]["loss"] < metrics["baseTest"]["loss"] - 0.5, "the model must learn to be compared"
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], abs=TEST_LOSS_TOLERANCE)
    assert two["baseTest"]["loss"] == pytest.approx(one["baseTest"]["loss"], abs=1e-4)  # sharded eval sums right


def test_only_rank_0_writes_outputs_and_logs(two_processes: dict[str, Any]) -> None:
    output: Path = two_processes["output"]
    manifests = sorted(p.relative_to(output).as_posix() for p in output.rglob(MANIFEST_NAME))
    root = identity_root(Storage(), checkpoint_root(two_processes["doc"]))
    saved = complete_checkpoints(Storage(), root)
    folder = Path(root).relative_to(output).as_posix()
    assert manifests == sorted([MANIFEST_NAME] + [f"{folder}/{checkpoint_name(s)}/{MANIFEST_NAME}" for s in saved])
    verify_dir(output, json.loads((output / MANIFEST_NAME).read_text()), str(output))
    out: str = two_processes["out"]
    assert out.count("INFO model written to") == 1
    assert out.count(f"checkpoint {join_uri(root, checkpoint_name(TOTAL))}\n") == 1
    # Every rank's RNG state goes into the checkpoint, so each rank resumes its own dropout stream.
    state = checkpoint.load(Path(root) / checkpoint_name(saved[-1]))
    assert len(state["rng"]) == 2


def culprit_seed(count: int, batch_size: int, rank: int) -> tuple[int, int]:
    """A seed whose length-grouped order gives example 0 (made the longest) to `rank` after its first step."""
    lengths = [1] * count
    lengths[0] = count
    for seed in range(1, 1000):
        for step, batch in enumerate(epoch_batches(lengths, batch_size, seed, 0, 2, rank), start=1):
            if 0 in batch and step >= 2:
                return seed, step
    raise AssertionError("no such seed")


# A bug that strikes one process mid-run: rank 1's embedding raises on the one batch longer than {long} tokens
# (a tokenizer with ids beyond the embedding did this for real, until setup learned to refuse one up front).
FAULT = """
import os
if os.environ.get("RANK") == "1":
    import torch
    _forward = torch.nn.Embedding.forward
    def forward(self, input):
        if input.shape[-1] > {long}:
            raise IndexError("index out of range in self")
        return _forward(self, input)
    torch.nn.Embedding.forward = forward
"""


def test_a_failing_rank_fails_the_run_with_its_own_message(tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 alone fails in the forward of the batch holding the longest example (a fault injected through
    sitecustomize, which every torchrun worker imports); rank 0 waits in a collective."""
    rows = data["train"].read_text().splitlines()
    story = " ".join(["once upon a time"] * 150)  # the longest: 256 tokens (the model's positions), others < 200
    rows[0] = json.dumps({"prompt": "Tell a long story.", "completion": story})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAULT.format(long=200))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p))
    seed, step = culprit_seed(len(rows), 8, rank=1)
    doc = gpt2_job("crash", tiny_gpt2, {**data, "train": train}, str(tmp_path / "out"), batch_size=8, epochs=1,
                   every_steps=100, seed=seed)
    doc["spec"]["data"].update(maxSeqLength=1024, cleaning={"dedupe": False, "dropEmpty": False})
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state", nproc=2)
    monkeypatch.setenv(ENV_COLLECTIVE_TIMEOUT, "60")  # a bound in case the peer's exit went unnoticed
    started = time.monotonic()
    code, out = trainer.run(timeout=180)
    assert code == EXIT_FAILURE, out
    assert time.monotonic() - started < 120
    ranks = trainer.rank_results("crash")
    assert (ranks[1]["reason"], ranks[1]["step"]) == ("IndexError", step - 1), ranks
    result = trainer.result()
    assert (result["outcome"], result["reason"], result["exitCode"]) == ("Failed", "IndexError", EXIT_FAILURE)
    assert "index out of range" in result["message"]
    assert f"failed: {result['message']}" in out
    assert "ChildFailedError" not in out


# Rank 0 alone uploads slowly (a large checkpoint or merged model): every publish sleeps {seconds} s there.
SLOW_UPLOAD = """
import os, time
if os.environ.get("RANK") == "0":
    from kubetune.storage import Storage
    _publish = Storage.publish
    def publish(self, *args, **kwargs):
        time.sleep({seconds})
        return _publish(self, *args, **kwargs)
    Storage.publish = publish
"""


def test_the_other_ranks_wait_out_rank_0s_slow_uploads(tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25, item 3: rank 0's checkpoint and output uploads took longer than the collective timeout, so the
    waiting rank raised, torchrun killed rank 0 mid-upload, and every retry failed the same way. Collective
    timeout 15 s, each of rank 0's two publishes (the last checkpoint, the outputs) 20 s."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_UPLOAD.format(seconds=20))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv(ENV_COLLECTIVE_TIMEOUT, "15")
    doc = gpt2_job("slow", tiny_gpt2, data, str(tmp_path / "out"), batch_size=8, epochs=1, every_steps=100)
    doc["spec"]["hyperparameters"]["maxSteps"] = 2
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state", nproc=2)
    code, out = trainer.run(timeout=240)
    assert code == EXIT_OK, out
    assert out.count("INFO model written to") == 1
    assert trainer.result()["outcome"] == "Succeeded"


def test_bad_input_on_every_rank_exits_2_without_a_traceback(tmp_path: Path, tiny_gpt2: Path,
                                                             data: dict[str, Path]) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"no prompt here {i}"}) + "\n" for i in range(40)))
    doc = gpt2_job("bad", tiny_gpt2, {**data, "train": train}, str(tmp_path / "out"), batch_size=8, epochs=1,
                   every_steps=100)
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state", nproc=2)
    code, out = trainer.run(timeout=180)
    assert code == EXIT_BAD_INPUT, out
    result = trainer.result()
    assert (result["outcome"], result["reason"], result["exitCode"]) == ("Failed", "InvalidInput", EXIT_BAD_INPUT)
    assert str(train) in result["message"]
    assert f"failed: {result['message']}" in out
    assert "Traceback" not in out
    assert {r["exitCode"] for r in trainer.rank_results("bad").values()} == {EXIT_BAD_INPUT}




@pytest.mark.parametrize("where", [pytest.param("local", marks=pytest.mark.slow), "s3"])  # s3 covers local's path too
def test_sigterm_under_torchrun_checkpoints_on_every_rank_and_resumes(
        where: str, request: pytest.FixtureRequest, two_processes: dict[str, Any], tmp_path: Path, tiny_gpt2: Path,
        data: dict[str, Path]) -> None:
    extra: dict[str, Any] = {}
    if where == "s3":  # checkpoints at the default place, <output.uri>/checkpoints/
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/out/"
        extra["storage"] = {"endpoint": server.endpoint}
    else:
        output = str(tmp_path / "out")
    doc = job_doc("preempted", tiny_gpt2, data, output, nproc=2, **extra)
    job = write_job(doc, tmp_path / "job.yaml")
    storage, root = storage_for(doc), checkpoint_root(doc)

    first = Trainer(job, tmp_path / "pod-1", nproc=2)
    process = first.start()
    poll(lambda: bool(run_checkpoints(storage, root)), process, every=0.01 if where == "local" else 0.05)
    os.kill(process.pid, signal.SIGTERM)  # the pod's main process only: it must pass it on to the workers
    sent = time.monotonic()
    code = wait(process, DEFAULT_GRACE_SECONDS)
    assert time.monotonic() - sent < DEFAULT_GRACE_SECONDS
    assert code == EXIT_RETRY, first.log.read_text()
    assert processes_mentioning(str(first.state_dir)) == [], "workers outlived the launcher"

    result = first.result()
    assert (result["outcome"], result["exitCode"]) == ("Preempted", EXIT_RETRY)
    step = result["step"]
    assert step < TOTAL and result["lastCheckpoint"] == join_uri(identity_root(storage, root), checkpoint_name(step))
    assert run_checkpoints(storage, root)[-1] == step
    ranks = first.rank_results("preempted")
    assert sorted(ranks) == [0, 1]
    assert {(r["outcome"], r["lastCheckpoint"]) for r in ranks.values()} == {("Preempted", result["lastCheckpoint"])}
    assert first.log.read_text().count("WARNING SIGTERM: saved") == 1  # only rank 0 logs

    second = Trainer(job, tmp_path / "pod-2", nproc=2)
    code, out = second.run()
    assert code == EXIT_OK, out
    run = read_output(storage, output, "run.json", tmp_path / "fetched")
    assert run["resumedFrom"] == [result["lastCheckpoint"]]
    metrics = read_output(storage, output, "metrics.json", tmp_path / "fetched")
    reference = two_processes["metrics"]
    assert [s for s, _ in losses(metrics)] == list(range(1, TOTAL + 1))
    assert [v for _, v in losses(metrics)] == pytest.approx([v for _, v in losses(reference)], rel=RESUME_REL)
    assert metrics["test"]["loss"] == pytest.approx(reference["test"]["loss"], rel=RESUME_REL)


def test_pod_entrypoint_takes_its_topology_from_the_operator_env(
    tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path], two_processes: dict[str, Any]
) -> None:
    """`kubetune trainer` as a pod runs it: spec from KUBETUNE_SPEC_PATH, torchrun topology from env vars."""
    from kubetune.netutil import free_port

    doc = job_doc("pod", tiny_gpt2, data, str(tmp_path / "out"), nproc=2)
    spec_path = write_job(doc, tmp_path / "spec.yaml")
    trainer = Trainer(spec_path, tmp_path / "state", nproc=2)
    env = {**trainer.env(), "KUBETUNE_SPEC_PATH": str(spec_path), "NPROC_PER_NODE": "2", "NNODES": "1",
           "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    trainer.state_dir.mkdir(parents=True)
    done = subprocess.run([*KUBETUNE, "trainer"], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == EXIT_OK, done.stderr
    result = trainer.result()
    assert result["outcome"] == "Succeeded" and result["outputUri"] == str(tmp_path / "out")
    metrics = read_output(Storage(), str(tmp_path / "out"), "metrics.json", tmp_path / "fetched")
    # Same spec, same world size, fp32: the pod path is the `kubetune run --nproc-per-node 2` path.
    assert metrics["test"]["loss"] == pytest.approx(two_processes["metrics"]["test"]["loss"], rel=RESUME_REL)


@pytest.mark.parametrize("name", [ENV_COLLECTIVE_TIMEOUT, ENV_IO_TIMEOUT])
def test_a_timeout_that_is_not_a_number_is_bad_input(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read before the group is joined: exit 2 naming the variable, not a ValueError's traceback."""
    from kubetune.errors import UserError
    from kubetune.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(name, "soon")
    with pytest.raises(UserError, match=f"{name}: 'soon' is not a whole number of seconds"):
        distributed.init()
