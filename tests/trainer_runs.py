"""Helpers for tests that run the trainer as users and pods do: `kubetune run` in a subprocess.

The tiny GPT-2 (full fine-tuning, fp32) is the model: a step takes milliseconds, it clearly learns,
and fp32 on a fixed thread count makes a resumed run reproduce the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.contract import CHECKPOINT_PREFIX, MANIFEST_NAME
from kubetune.samples import INSTRUCTIONS, sample_path
from kubetune.spec import StorageSpec
from kubetune.storage import Storage, join_uri
from tests.fixtures_models import causal_job

_SCRIPT = Path(sys.executable).parent / "kubetune"
# The console script beside this interpreter (the venv's), else the same entry point through -c.
KUBETUNE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-c",
                                                     "import sys; from kubetune.cli import main; sys.exit(main())"]
RUN_TIMEOUT = 300  # seconds; a hung run fails the test instead of the suite
SPLIT = {"train": 112, "validation": 25, "test": 26}  # 112 = 7 x 16: whole batches for 1 x 16 and 2 x 8


def split_instructions(dest: Path, sample: str = INSTRUCTIONS) -> dict[str, Path]:
    """Fixed train/validation/test files from the instruction samples, or another sample file of at least as
    many rows (the preference pairs): no random split in the way."""
    lines = sample_path(sample).read_text().splitlines()
    assert len(lines) >= sum(SPLIT.values()), f"the {sample} samples shrank"
    dest.mkdir(parents=True, exist_ok=True)
    files, start = {}, 0
    for part, count in SPLIT.items():
        files[part] = dest / f"{part}.jsonl"
        files[part].write_text("\n".join(lines[start : start + count]) + "\n")
        start += count
    return files


def gpt2_job(name: str, model: Path, data: dict[str, Path], output: str, *, batch_size: int, epochs: int,
             every_steps: int, checkpoint_uri: str | None = None, keep_last: int = 2, seed: int = 42,
             **spec: Any) -> dict[str, Any]:
    doc = causal_job(
        name, model, data["train"], output,
        method={"type": "full"},
        # Unpacked: these runs count steps as examples / batch size (packing's resume: tests/test_packing.py).
        data={"validation": str(data["validation"]), "test": str(data["test"]), "maxSeqLength": 128,
              "packing": False},
        hyperparameters={"learningRate": 2e-3, "batchSize": batch_size, "epochs": epochs, "maxSteps": None,
                         "precision": "fp32", "seed": seed},
        checkpoint={"uri": checkpoint_uri, "everySteps": every_steps, "keepLast": keep_last},
        **spec,
    )
    if checkpoint_uri is None:
        del doc["spec"]["checkpoint"]["uri"]
    return doc


@dataclass
class Trainer:
    """One `kubetune run` of a manifest, with its own state dir and termination log."""

    job: Path
    state_dir: Path
    nproc: int = 1

    @property
    def termination_log(self) -> Path:
        return self.state_dir / "termination-log"

    @property
    def log(self) -> Path:
        return self.state_dir / "run.log"

    def env(self) -> dict[str, str]:
        # One thread per process: steps this small gain nothing from more, and a busy machine stalls them.
        return {**os.environ, "HF_HUB_OFFLINE": "1", "KUBETUNE_STATE_DIR": str(self.state_dir),
                "KUBETUNE_TERMINATION_LOG": str(self.termination_log), "OMP_NUM_THREADS": "1"}

    def command(self) -> list[str]:
        return [*KUBETUNE, "run", str(self.job), "--nproc-per-node", str(self.nproc)]

    def start(self) -> subprocess.Popen[bytes]:
        """In its own session, as a pod's process tree; output to a file so no pipe can block it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def run(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
        """Run to the end; returns (exit code, this run's output)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        process = self.start()
        wait(process, timeout)
        return process.returncode, self.log.read_bytes()[offset:].decode(errors="replace")

    def result(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.termination_log.read_text())
        return loaded

    def rank_results(self, name: str) -> dict[int, dict[str, Any]]:
        folder = self.state_dir / "runs" / name / "results"
        results = [json.loads(p.read_text()) for p in folder.glob("rank-*.json")]
        return {r["rank"]: r for r in results}


def wait(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"kubetune run did not finish within {timeout:.0f} s") from None


def poll(condition: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float = 120,
         every: float = 0.01) -> None:
    """Wait until condition() holds while the process still runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(every)


def storage_for(doc: dict[str, Any]) -> Storage:
    return Storage(StorageSpec(endpoint=doc["spec"].get("storage", {}).get("endpoint")))


def checkpoint_root(doc: dict[str, Any]) -> str:
    spec = doc["spec"]
    uri: str = spec["checkpoint"].get("uri") or join_uri(spec["output"]["uri"], "checkpoints")
    return uri


def complete_checkpoints(storage: Storage, root: str) -> list[int]:
    """Steps of the checkpoints under root that have their manifest."""
    names = [n for n in storage.list_prefixes(root) if n.startswith(CHECKPOINT_PREFIX)]
    return sorted(int(n[len(CHECKPOINT_PREFIX):]) for n in names
                  if storage.read_manifest(join_uri(root, n)) is not None)


def run_checkpoints(storage: Storage, root: str) -> list[int]:
    """Steps of the complete checkpoints a job wrote: they live in <root>/<identity>/ (kubetune.train.identity)."""
    return sorted(step for name in storage.list_prefixes(root) for step in complete_checkpoints(storage,
                                                                                              join_uri(root, name)))


def identity_root(storage: Storage, root: str) -> str:
    """The one identity prefix below a job's checkpoint root (one training input ran there)."""
    names = storage.list_prefixes(root)
    assert len(names) == 1, f"expected one training identity under {root}, found {names}"
    return join_uri(root, names[0])


def read_output(storage: Storage, output_uri: str, name: str, dest: Path) -> dict[str, Any]:
    """metrics.json / run.json of a finished run (the output must be complete: manifest present)."""
    assert storage.read_manifest(output_uri) is not None, f"{output_uri}: no {MANIFEST_NAME}, run not finished"
    path = storage.fetch(join_uri(output_uri, name), dest)
    loaded: dict[str, Any] = json.loads((path if path.is_file() else path / name).read_text())
    return loaded


def step_of(checkpoint_uri: str) -> int:
    return int(checkpoint_uri.rstrip("/").rsplit("-", 1)[-1])


def losses(metrics: dict[str, Any]) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in metrics["trainLoss"]]


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions text (a run's state dir is in every worker's)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids
