"""Ctrl-C and SIGTERM to `kubetune run` as a user (or a kubelet) sends them: real processes, real signals.

Every stop ends with a checkpoint and one line saying how to continue, no training process outlives
`kubetune run`, and KUBETUNE_GRACE_SECONDS bounds the whole shutdown, torchrun's included.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.contract import EXIT_INTERRUPTED, EXIT_OK, EXIT_RETRY
from kubetune.jobfile import write_job
from kubetune.storage import Storage, join_uri
from kubetune.train.checkpoint import checkpoint_name
from tests.trainer_runs import (
    SPLIT,
    Trainer,
    checkpoint_root,
    gpt2_job,
    identity_root,
    poll,
    processes_mentioning,
    run_checkpoints,
    split_instructions,
    wait,
)

BATCH, EPOCHS = 8, 4
STOP_LINE = re.compile(r"^interrupted at step (\d+); checkpoint saved; run the same command to resume$", re.M)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_instructions(tmp_path_factory.mktemp("data"))


def start(tmp_path: Path, model: Path, data: dict[str, Path], nproc: int, **env: str) -> tuple[Trainer, Any, dict]:
    doc = gpt2_job("stop-me", model, data, str(tmp_path / "out"), batch_size=BATCH // nproc, epochs=EPOCHS,
                   every_steps=2)
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state", nproc=nproc)
    os.environ.update(env)
    try:
        process = trainer.start()
    finally:
        for name in env:
            os.environ.pop(name)
    return trainer, process, doc




# Two processes: the group signal path is the SIGTERM test's below, which runs both in the default run.
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ctrl_c_saves_a_checkpoint_and_prints_one_line(nproc: int, tmp_path: Path, tiny_gpt2: Path,
                                                       data: dict[str, Path]) -> None:
    trainer, process, doc = start(tmp_path, tiny_gpt2, data, nproc)
    storage, root = Storage(), checkpoint_root(doc)
    poll(lambda: bool(run_checkpoints(storage, root)), process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the terminal signals the whole foreground group
    code = wait(process, 60)
    out = trainer.log.read_text()
    assert code == EXIT_INTERRUPTED, out
    assert processes_mentioning(str(trainer.state_dir)) == [], "a training process outlived kubetune run"
    assert len(STOP_LINE.findall(out)) == 1, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    step = int(STOP_LINE.search(out).group(1))  # type: ignore[union-attr]
    assert 0 < step < SPLIT["train"] // BATCH * EPOCHS
    assert run_checkpoints(storage, root)[-1] == step
    result = trainer.result()
    assert (result["outcome"], result["exitCode"], result["step"]) == ("Interrupted", EXIT_INTERRUPTED, step)

    if nproc == 1:  # "run the same command to resume" is true
        code, out = Trainer(trainer.job, tmp_path / "state", nproc=nproc).run()
        assert code == EXIT_OK, out
        assert f"resumed from {join_uri(identity_root(storage, root), checkpoint_name(step))} at step {step}" in out


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_the_process_group_exits_75_and_leaves_no_process(nproc: int, tmp_path: Path, tiny_gpt2: Path,
                                                                     data: dict[str, Path]) -> None:
    """`kill -TERM -<pgid>` (timeout(1), docker stop through a shell): every process of the group gets it."""
    trainer, process, doc = start(tmp_path, tiny_gpt2, data, nproc)
    storage, root = Storage(), checkpoint_root(doc)
    poll(lambda: bool(run_checkpoints(storage, root)), process)
    os.killpg(process.pid, signal.SIGTERM)
    code = wait(process, 60)
    out = trainer.log.read_text()
    assert code == EXIT_RETRY, out
    assert processes_mentioning(str(trainer.state_dir)) == [], "a training process outlived kubetune run"
    assert "Traceback" not in out, out
    result = trainer.result()
    assert (result["outcome"], result["exitCode"]) == ("Preempted", EXIT_RETRY)
    assert run_checkpoints(storage, root)[-1] == result["step"]
    time.sleep(1)  # nothing left behind may rewrite the result afterwards
    assert trainer.result() == result


def test_sigterm_while_starting_up_exits_75_not_143(tmp_path: Path, tiny_gpt2: Path, data: dict[str, Path]) -> None:
    trainer, process, _ = start(tmp_path, tiny_gpt2, data, 1)
    time.sleep(0.5)  # still importing or loading: no training step yet
    os.kill(process.pid, signal.SIGTERM)
    code = wait(process, 60)
    assert code == EXIT_RETRY, trainer.log.read_text()
    assert "Traceback" not in trainer.log.read_text()


def test_grace_seconds_bound_the_shutdown_when_a_rank_is_stuck(tmp_path: Path, tiny_gpt2: Path,
                                                               data: dict[str, Path]) -> None:
    """Rank 1 frozen (SIGSTOP): rank 0 cannot finish the checkpoint, so it gives up and torchrun kills
    rank 1, both within KUBETUNE_GRACE_SECONDS, not after torchrun's default 30 s."""
    grace = 6
    trainer, process, doc = start(tmp_path, tiny_gpt2, data, 2, KUBETUNE_GRACE_SECONDS=str(grace))
    storage, root = Storage(), checkpoint_root(doc)
    poll(lambda: bool(run_checkpoints(storage, root)), process)
    workers = [pid for pid in processes_mentioning(str(trainer.state_dir))
               if "-m kubetune.train.worker" in _cmdline(pid) and "torchrun" not in _cmdline(pid)]
    assert len(workers) == 2
    rank1 = next(pid for pid in workers if "RANK=1\0" in _environ(pid))
    os.kill(rank1, signal.SIGSTOP)
    os.kill(process.pid, signal.SIGTERM)
    sent = time.monotonic()
    code = wait(process, 60)
    took = time.monotonic() - sent
    out = trainer.log.read_text()
    assert code == EXIT_RETRY, out
    assert took < grace + 3, f"the shutdown took {took:.1f} s with a {grace} s grace period"
    assert processes_mentioning(str(trainer.state_dir)) == [], "the frozen rank outlived kubetune run"
    assert f"no checkpoint within 80% of the {grace} s grace period" in out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""
