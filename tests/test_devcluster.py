"""The README's dev-cluster flow as a new user types it: `make cluster`, then its kubectl commands verbatim.

The commands come from the README's "A cluster on this machine" section: `kubectl apply` the example,
`kubectl get ftj -w` shows Progress and Loss moving, `kubectl wait --for=condition=Succeeded`, and the model
is where the `ls` line looks. The pods are the real `kubetune validate --deep` and `kubetune trainer`
(MiniLM, 16 LoRA steps); only the node's folder is a temporary one instead of the checkout.
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

from kubetune import contract
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
    export, apply, watch_line, wait_line, ls = readme_commands()
    assert export.startswith("export KUBECONFIG=") and "--validate=false" in apply and str(EXAMPLE.name) in apply
    node = tmp_path / "node"
    log = (tmp_path / "devcluster.log").open("w")
    cluster = subprocess.Popen([sys.executable, "-m", "tests.devcluster", "--state", str(tmp_path / "state"),
                                "--node", str(node)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        printed = _exported_kubeconfig(cluster, tmp_path)
        assert printed.endswith("/kubeconfig") and export.endswith("/kubeconfig")
        env = {**os.environ, "KUBECONFIG": printed}

        def kubectl(line: str) -> list[str]:
            words = shlex.split(line)
            assert words[0] == "kubectl", line
            return [str(binary("kubectl")), *words[1:]]

        applied = subprocess.run(kubectl(apply), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert applied.returncode == 0, applied.stderr
        watch = subprocess.Popen(kubectl(watch_line), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        waited = subprocess.run(kubectl(wait_line), cwd=ROOT, env=env, capture_output=True, text=True, timeout=660)
        time.sleep(1)  # the watch prints the last update
        watch.terminate()
        rows = watch.communicate(timeout=10)[0]
        got = subprocess.run(kubectl(f"kubectl get ftj {NAME} -o json"), env=env, capture_output=True, text=True)
        status = json.loads(got.stdout)["status"]
        assert waited.returncode == 0, f"{waited.stderr}\n{rows}\n{status}\n{_logs(tmp_path)}"
        # NAME PHASE PROGRESS LOSS AGE: Progress and Loss moved while it trained (scraped from the trainer).
        seen = [line.split() for line in rows.splitlines() if line.startswith(NAME)]
        full = [row for row in seen if len(row) == 5]
        assert any(0 < float(row[2]) < 100 for row in full), rows
        assert len({row[3] for row in full}) >= 2, rows
        assert seen[-1][1] == "Succeeded", rows
        steps = yaml.safe_load(EXAMPLE.read_text())["spec"]["hyperparameters"]["maxSteps"]
        assert status["progress"]["step"] == steps and status["metrics"]["testAccuracy"] > 0, status
        assert [c["status"] for c in status["conditions"] if c["type"] == "Validated"] == ["True"]  # pre-flight ran
        # The `ls` line's folder, on the node (this test's node folder stands for the checkout).
        output = node / shlex.split(ls)[1]
        manifest = json.loads((output / contract.MANIFEST_NAME).read_text())
        assert {"adapter/adapter_model.safetensors", contract.METRICS_FILE} <= {f["path"] for f in manifest["files"]}
    finally:
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(90) == 0, _logs(tmp_path)
        log.close()
    assert not list((node / "examples").glob(".*-spec.yaml")), "spec files of ended pods are left behind"


def _exported_kubeconfig(cluster: subprocess.Popen[str], tmp_path: Path) -> str:
    assert cluster.stdout is not None
    for line in cluster.stdout:  # the dev cluster prints it once everything is up
        if line.startswith("export KUBECONFIG="):
            return line.strip().split("=", 1)[1]
    raise AssertionError(f"the dev cluster ended before it was up:\n{_logs(tmp_path)}")


def _logs(tmp_path: Path) -> str:
    parts = [tmp_path / "devcluster.log", tmp_path / "state" / "operator.log",
             *sorted((tmp_path / "state" / "pods").glob("*/log"))]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in parts if p.exists())
