"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

The binaries are built from the k8s.io/kubernetes Go module by tests/k8s-binaries/build.sh (cached outside the
clone by version; only the first build on a machine is long). Everything runs as this user's processes with
its state in one folder: certificates made here (tests/pki.py), RBAC and the Node authorizer on, the usual
admission plugins plus NodeRestriction and OwnerReferencesPermissionEnforcement, an audit log of every request
(who asked for what, and what the server answered). Nodes come from the node agent (tests/kubelet.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.netutil import free_port
from tests.pki import Pki, b64

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "tests" / "k8s-binaries" / "build.sh"
BIN_VARIABLE = "KUBETUNE_K8S_BIN"  # a folder that already holds the four binaries: skips build.sh
ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_RANGE = "10.96.0.0/16"
ADMISSION = ("NamespaceLifecycle", "LimitRanger", "ServiceAccount", "NodeRestriction", "PodSecurity", "Priority",
             "DefaultTolerationSeconds", "ResourceQuota", "OwnerReferencesPermissionEnforcement",
             "MutatingAdmissionWebhook", "ValidatingAdmissionPolicy", "ValidatingAdmissionWebhook")
# Every request at Metadata level (user, verb, resource, name, response code), once it has been answered
# (ResponseStarted for watches, which are answered for minutes).
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}
ADMIN = "kubetune-admin"


# A command prefix: SIGTERM to the command when the thread that started it dies, so a killed test run leaves
# no control plane or pod behind (Linux's PR_SET_PDEATHSIG, kept across exec; setpriv is util-linux's).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]


def binaries() -> Path:
    """The folder with etcd and the Kubernetes binaries: $KUBETUNE_K8S_BIN, else build (or reuse) them."""
    given = os.environ.get(BIN_VARIABLE)
    if given:
        return Path(given)
    if shutil.which("go") is None:
        raise RuntimeError(f"Go is needed once to build the Kubernetes test binaries ({BUILD_SCRIPT}); "
                           f"or set {BIN_VARIABLE} to a folder holding them")
    done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class AuditEvent:
    user: str
    groups: tuple[str, ...]
    verb: str
    group: str
    resource: str  # with "/subresource" when there is one
    namespace: str | None
    name: str | None
    code: int
    uri: str
    user_agent: str


class ControlPlane:
    def __init__(self, workdir: Path, bin_dir: Path | None = None,
                 extra_args: dict[str, list[str]] | None = None) -> None:
        """extra_args: more flags per component (the scale benchmark raises the controllers' API rate limits)."""
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.extra_args = extra_args or {}
        self.apiserver_args: list[str] = []
        self.kubeconfig = workdir / "kubeconfig"
        self.audit_log = workdir / "audit.log"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.pki: Pki | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> ControlPlane:
        self.bin_dir = self.bin_dir or binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki = Pki(self.workdir / "pki")
        self.port = free_port()
        serving = pki.issue("apiserver", "kube-apiserver", hosts=(
            "127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local", "10.96.0.1"))
        to_kubelets = pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))
        self.write_kubeconfig(self.kubeconfig, ADMIN, ("system:masters",))
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        deadline = time.monotonic() + timeout
        self._start_etcd(deadline)
        self.apiserver_args = [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
            # The `kubernetes` Service cannot list a loopback address as its endpoint: no reconciler.
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}", f"--client-ca-file={pki.ca}",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}", f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--authorization-mode=Node,RBAC", f"--enable-admission-plugins={','.join(ADMISSION)}",
            f"--kubelet-client-certificate={to_kubelets[0]}", f"--kubelet-client-key={to_kubelets[1]}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=500", "--profiling=false", *self.extra_args.get("kube-apiserver", []),
        ]
        self._start("kube-apiserver", self.apiserver_args)
        self._wait("kube-apiserver", f"{self.url}/readyz", deadline)
        controller_port, scheduler_port = free_port(), free_port()
        self._start("kube-controller-manager", [
            *self._component_kubeconfig("kube-controller-manager", "system:kube-controller-manager"),
            "--bind-address=127.0.0.1", f"--secure-port={controller_port}", "--leader-elect=false",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca}", f"--service-cluster-ip-range={SERVICE_RANGE}", "--profiling=false",
            *self.extra_args.get("kube-controller-manager", []),
        ])
        self._start("kube-scheduler", [
            *self._component_kubeconfig("kube-scheduler", "system:kube-scheduler"),
            "--bind-address=127.0.0.1", f"--secure-port={scheduler_port}", "--leader-elect=false",
            "--profiling=false", *self.extra_args.get("kube-scheduler", []),
        ])
        self._wait("kube-controller-manager", f"https://127.0.0.1:{controller_port}/healthz", deadline)
        self._wait("kube-scheduler", f"https://127.0.0.1:{scheduler_port}/healthz", deadline)
        return self

    @contextlib.contextmanager
    def apiserver_down(self, timeout: float = 60) -> Iterator[None]:
        """The API server killed for the block, as a crash or a node loss would (every watch drops), then started
        again on the same port and store."""
        process = self.processes.pop("kube-apiserver")
        process.kill()
        process.wait(30)
        try:
            yield
        finally:
            self._start("kube-apiserver", self.apiserver_args)
            self._wait("kube-apiserver", f"{self.url}/readyz", time.monotonic() + timeout)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def _start_etcd(self, deadline: float) -> None:
        self.etcd_port, peer = free_port(), free_port()
        self._start("etcd", [
            "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",  # a throwaway test store: no fsync per write (much faster on shared disks)
            "--log-level=warn",
        ])
        self._wait("etcd", f"http://127.0.0.1:{self.etcd_port}/health", deadline)

    def _start(self, name: str, args: list[str]) -> None:
        assert self.bin_dir is not None
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen([*DIE_WITH_PARENT, str(self.bin_dir / name), *args],
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, name: str, url: str, deadline: float) -> None:
        context = self.ssl_context()
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited {self.processes[name].returncode}:\n{self.log(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready at {url} in time:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # ---- clients ------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the CA and presents the admin certificate (components answer health checks to anyone)."""
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.folder / f"{ADMIN}.crt"), str(self.pki.folder / f"{ADMIN}.key"))
        context.check_hostname = False  # components serve self-signed certificates of their own
        context.verify_mode = ssl.CERT_NONE
        return context

    def write_kubeconfig(self, path: Path, user: str, groups: tuple[str, ...] = (), namespace: str = "default"
                         ) -> Path:
        """A kubeconfig for `user` in `groups`: a client certificate from this cluster's CA, inlined."""
        assert self.pki is not None
        cert, key = self.pki.issue(user.replace(":", "_"), user, groups)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kubetune",
            "clusters": [{"name": "kubetune", "cluster": {"server": self.url,
                                                          "certificate-authority-data": b64(self.pki.ca)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "kubetune", "context": {"cluster": "kubetune", "user": user,
                                                          "namespace": namespace}}],
        }))
        return path

    def _component_kubeconfig(self, name: str, user: str) -> list[str]:
        path = self.write_kubeconfig(self.workdir / f"{name}.kubeconfig", user)
        return [f"--kubeconfig={path}", f"--authentication-kubeconfig={path}", f"--authorization-kubeconfig={path}"]

    # ---- the audit log --------------------------------------------------------------------------------
    def audit(self, since: int = 0) -> tuple[list[AuditEvent], int]:
        """Requests the API server answered, from byte offset `since` of its audit log; and the new offset."""
        if not self.audit_log.exists():
            return [], since
        with self.audit_log.open("rb") as log:
            log.seek(since)
            data = log.read()
        end = data.rfind(b"\n") + 1
        return list(_events(data[:end])), since + end


def _events(data: bytes) -> Iterator[AuditEvent]:
    for line in data.splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # /version, /healthz, discovery
        if event.get("stage") == "ResponseComplete" and event.get("verb") == "watch":
            continue  # a watch was counted when it started (ResponseStarted)
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        user = event.get("impersonatedUser") or event["user"]
        yield AuditEvent(user["username"], tuple(user.get("groups") or ()), event["verb"], ref.get("apiGroup", ""),
                         resource, ref.get("namespace"), ref.get("name"),
                         int((event.get("responseStatus") or {}).get("code") or 0), event.get("requestURI", ""),
                         event.get("userAgent", ""))
