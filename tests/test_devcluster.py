"""The README's dev-cluster flow as a new user types it: `make cluster`, then its commands verbatim.

`make cluster` is the real control plane with two nodes and an S3 server (tests/devcluster.py); the README's
second block installs the chart with helm, creates the Secret, applies the example with the server's
validation on, watches it, waits for Succeeded, describes it, lists the pods, reads the trainer's log and uses
the model. The pods are the real `kubetune validate --deep` and `kubetune trainer` (MiniLM, 16 LoRA steps);
only the node's folder is a temporary one instead of the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.k8s_tools import binary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "devcluster-sentiment.yaml"
NAME = "devcluster-sentiment"


def readme_commands() -> list[str]:
    """The README section's second command block (the first is `make cluster`), comments dropped."""
    section = (ROOT / "README.md").read_text().split("## A cluster on this machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks[0].split()[:2] == ["make", "cluster"], blocks[0]
    return [line.split(" # ")[0].strip() for line in blocks[1].splitlines() if line.strip()]


def test_readme_dev_cluster_flow(tmp_path: Path) -> None:
    export, install, secret, apply, watch_line, wait_line, describe, pods, logs, predict = readme_commands()
    assert export.startswith("export KUBECONFIG=") and EXAMPLE.name in apply and "--validate" not in apply
    node = tmp_path / "node"
    log = (tmp_path / "devcluster.log").open("w")
    cluster = subprocess.Popen([sys.executable, "-m", "tests.devcluster", "--state", str(tmp_path / "state"),
                                "--node", str(node)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        printed = _exported_kubeconfig(cluster, tmp_path)
        assert printed.endswith("/kubeconfig") and export.endswith("/kubeconfig")
        env = {**os.environ, "KUBECONFIG": printed}

        def command(line: str) -> tuple[list[str], dict[str, str]]:
            words = shlex.split(line)
            assigned = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
            words = words[len(assigned):]
            tool = {"kubectl": binary("kubectl"), "helm": binary("helm")}.get(words[0])
            program = str(tool) if tool else str(ROOT / words[0])
            return [program, *words[1:]], {**env, **assigned}

        def run(line: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            argv, extra = command(line)
            done = subprocess.run(argv, cwd=ROOT, env=extra, capture_output=True, text=True, timeout=timeout)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}\n{_logs(tmp_path)}"
            return done

        assert "STATUS: deployed" in run(install).stdout
        run(secret)
        assert f"finetunejob.kubetune.io/{NAME} created" in run(apply).stdout
        argv, _ = command(watch_line)
        watch = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        waited = subprocess.run(command(wait_line)[0], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=660)
        time.sleep(1)  # the watch prints the last update
        watch.terminate()
        rows = watch.communicate(timeout=10)[0]
        got = run(f"kubectl get ftj {NAME} -o json")
        status = json.loads(got.stdout)["status"]
        assert waited.returncode == 0, f"{waited.stderr}\n{rows}\n{status}\n{_logs(tmp_path)}"
        # NAME PHASE PROGRESS LOSS AGE: the server's Table from the CRD's printer columns, moving while it trained.
        seen = [line.split() for line in rows.splitlines() if line.startswith(NAME)]
        full = [row for row in seen if len(row) == 5]
        assert any(0 < float(row[2]) < 100 for row in full), rows
        assert len({row[3] for row in full}) >= 2, rows
        assert seen[-1][1] == "Succeeded", rows
        steps = yaml.safe_load(EXAMPLE.read_text())["spec"]["hyperparameters"]["maxSteps"]
        assert status["progress"]["step"] == steps and status["metrics"]["testAccuracy"] > 0, status
        assert [c["status"] for c in status["conditions"] if c["type"] == "Validated"] == ["True"]  # pre-flight ran
        described = run(describe).stdout
        assert "Succeeded" in described and re.search(r"Normal\s+Running", described), described
        listed = run(pods).stdout
        assert re.search(rf"^{NAME}-preflight-\S+\s+0/1\s+Completed", listed, re.M), listed
        assert re.search(rf"^{NAME}-0-0-\S+\s+0/1\s+Completed", listed, re.M), listed
        assert "test" in run(logs).stdout.lower()  # the trainer's own summary of the test split
        predicted = run(predict, timeout=300).stdout
        assert re.search(r"positive|negative", predicted), predicted
    finally:
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(120) == 0, _logs(tmp_path)
        log.close()


def _exported_kubeconfig(cluster: subprocess.Popen[str], tmp_path: Path) -> str:
    assert cluster.stdout is not None
    for line in cluster.stdout:  # the dev cluster prints it once everything is up
        if line.startswith("export KUBECONFIG="):
            return line.strip().split("=", 1)[1]
    raise AssertionError(f"the dev cluster ended before it was up:\n{_logs(tmp_path)}")


def _logs(tmp_path: Path) -> str:
    state = tmp_path / "state"
    parts = [tmp_path / "devcluster.log", *sorted((state / "nodes" / "pods").glob("*/*.log"))]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in parts if p.exists())
