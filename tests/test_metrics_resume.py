"""kubetune_resumes_total through a real resume: `kubetune run` SIGTERMed after a checkpoint (exit 75, as a
preempted pod), then run again: the second run resumes and exports the counter at 1 with the job's labels."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

from kubetune import contract
from kubetune.jobfile import write_job
from kubetune.netutil import free_port
from kubetune.storage import Storage
from tests.trainer_runs import Trainer, checkpoint_root, gpt2_job, poll, run_checkpoints, split_instructions, wait

RESUMES = f'{contract.METRIC_RESUMES}{{job="resume-me",namespace="ml"}}'


def samples(url: str) -> dict[str, float]:
    """'name{labels}' -> value of every sample the endpoint serves now; empty while it is not up."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {key: float(value) for key, value in lines}


def test_a_resumed_run_exports_one_resume_with_the_jobs_labels(tmp_path: Path, tiny_gpt2: Path) -> None:
    data = split_instructions(tmp_path / "data")
    doc = gpt2_job("resume-me", tiny_gpt2, data, str(tmp_path / "out"), batch_size=8, epochs=2, every_steps=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"

    class Observed(Trainer):
        def env(self) -> dict[str, str]:
            return {**super().env(), contract.ENV_METRICS_PORT: str(port),
                    contract.ENV_NAMESPACE: "ml"}

    trainer = Observed(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state")
    first = trainer.start()
    storage, root = Storage(), checkpoint_root(doc)
    poll(lambda: bool(run_checkpoints(storage, root)) and samples(url).get(RESUMES) is not None, first)
    assert samples(url)[RESUMES] == 0  # a fresh run: exported from the start, at zero
    os.killpg(first.pid, signal.SIGTERM)
    assert wait(first, 60) == contract.EXIT_RETRY, trainer.log.read_text()[-3000:]

    second = trainer.start()
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 240
    while second.poll() is None and time.monotonic() < deadline:
        seen = samples(url) or seen
        if seen.get(RESUMES) == 1:
            break  # counted in setup, before the first step
        time.sleep(0.1)
    if second.poll() is None:  # finishing adds nothing to what the counter shows
        os.killpg(second.pid, signal.SIGTERM)
    wait(second, 60)
    log = trainer.log.read_text()
    assert "resumed from" in log, log[-3000:]
    assert seen.get(RESUMES) == 1, {k: v for k, v in seen.items() if "resume" in k or "state" in k}
