"""Issue 28, item 7: a trainer pod reports outputUri and lastCheckpoint as absolute locations.

In a pod the spec's relative paths resolve against the working directory (the dev cluster's is examples/);
the termination message must name places that work from anywhere, e.g. the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from kubetune import contract
from kubetune.jobfile import write_job
from tests.fixtures_models import causal_job
from tests.trainer_runs import KUBETUNE, split_instructions


def test_a_pod_reports_absolute_locations_for_relative_paths(tmp_path: Path, tiny_gpt2: Path) -> None:
    root = tmp_path / "repo"
    split_instructions(root / "data")
    shutil.copytree(tiny_gpt2, root / "model")
    doc = causal_job("relative", "../model", "../data/train.jsonl", "../out/relative", method={"type": "full"},
                     data={"validation": "../data/validation.jsonl", "test": "../data/test.jsonl", "packing": False},
                     hyperparameters={"maxSteps": 2, "precision": "fp32"})
    spec = write_job(doc, root / "examples" / "job.yaml")
    log = tmp_path / "termination-log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", contract.ENV_TERMINATION_LOG: str(log),
           contract.ENV_WORK_DIR: str(tmp_path / "work"), contract.ENV_METRICS_PORT: "0"}
    done = subprocess.run([*KUBETUNE, "trainer", "--spec", str(spec)], cwd=spec.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(log.read_text())
    assert result["outputUri"] == str(root / "out" / "relative")
    assert result["lastCheckpoint"].startswith(str(root / "out" / "relative" / contract.CHECKPOINTS_DIR) + "/")
    assert Path(result["lastCheckpoint"], contract.MANIFEST_NAME).is_file()  # it names a real checkpoint
