"""One pod on a test node: its volumes, environment and ports, and each container as a local process.

Containers are the one thing here that is not real: an image is a local folder whose `bin/` leads PATH (the
kubetune images are this virtual environment), with the image's ENTRYPOINT, CMD, WORKDIR and ENV given by the
node's image table. The rest follows what a kubelet does, with three differences, each for a reason:
- volumes are folders under the pod's own folder; env values and command arguments that name a mount path are
  rewritten to that folder (a process cannot see another filesystem). The one exception is a projected
  service-account token, bound at its real path in a private mount namespace: client libraries read it from
  /var/run/secrets/kubernetes.io/serviceaccount and nothing moves that;
- pods share the machine's network. Each pod gets its own loopback address as pod IP; each declared
  containerPort is given a free port of the machine, env values naming the declared port are rewritten to it,
  and the pod IP's containerPort forwards to it (tests/kubelet_server.py), so `podIP:containerPort` reaches the
  process as it would on a cluster. A `<hostname>.<subdomain>.<namespace>.svc` name in an env value becomes
  the named pod's IP (there is no cluster DNS);
- resource limits are not enforced and processes run as the node agent's user.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.netutil import free_port
from tests.control_plane import DIE_WITH_PARENT

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MESSAGE_LIMIT = 4096  # a kubelet keeps at most 4096 bytes of a termination message
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048  # FallbackToLogsOnError
TOKEN_SECONDS = 3607  # what the ServiceAccount admission plugin asks for
DNS_NAME = re.compile(r"^([a-z0-9-]+)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?$")
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Image:
    """What the node runs for an image: PATH entries that come first, ENTRYPOINT, CMD, WORKDIR and ENV."""

    path: tuple[Path, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)


class NotReady(Exception):
    """A container that cannot start (yet): the `waiting` reason and message a kubelet would report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class PodApi:
    """What a pod's set-up reads through its node's identity (the Node authorizer allows just these)."""

    def __init__(self, core: Any, client: Any, resolve_pod_ip: Callable[[str, str, str], str | None]) -> None:
        self.core, self.client, self.resolve_pod_ip = core, client, resolve_pod_ip

    def _read(self, kind: str, read: Callable[..., Any], name: str, namespace: str, optional: bool) -> dict[str, str]:
        from kubernetes.client.rest import ApiException

        try:
            found = read(name, namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            if exc.status == 404:
                raise NotReady("CreateContainerConfigError", f'{kind} "{name}" not found') from exc
            raise
        data = dict(found.data or {})
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return data

    def configmap(self, name: str, namespace: str, optional: bool = False) -> dict[str, str]:
        return self._read("configmap", self.core.read_namespaced_config_map, name, namespace, optional)

    def secret(self, name: str, namespace: str, optional: bool = False) -> dict[str, str]:
        return self._read("secret", self.core.read_namespaced_secret, name, namespace, optional)

    def token(self, pod: dict[str, Any], audience: str | None, seconds: int) -> str:
        meta = pod["metadata"]
        body = {"spec": {"audiences": [audience] if audience else None, "expirationSeconds": seconds,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                            "uid": meta["uid"]}}}
        made = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName") or "default", meta["namespace"], body)
        return str(made.status.token)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    started: str
    log: Path
    termination_log: Path | None
    policy: str


class PodRun:
    """Set-up, processes and tear-down of one pod bound to this node."""

    def __init__(self, pod: dict[str, Any], folder: Path, images: Callable[[str], Image | None], api: PodApi,
                 pod_ip: str, node_dir: Path, api_address: tuple[str, int]) -> None:
        self.pod, self.folder, self.images, self.api = pod, folder, images, api
        self.pod_ip, self.node_dir, self.api_address = pod_ip, node_dir, api_address
        self.meta, self.spec = pod["metadata"], pod["spec"]
        self.namespace, self.name = self.meta["namespace"], self.meta["name"]
        self.ports: dict[int, int] = {}  # declared containerPort -> the machine's port the process gets
        self.volumes: dict[str, Path] = {}
        self.processes: dict[str, Process] = {}
        self.token_refresh: float | None = None
        self.prepared = False

    # ---- set-up ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Volumes and ports; raises NotReady with the kubelet's reason when something is missing."""
        if self.spec.get("initContainers"):
            raise NotReady("CreateContainerError", "init containers are not run by the test node agent")
        for container in self.spec["containers"]:
            if self.images(container["image"]) is None:
                raise NotReady("ErrImagePull", f'failed to pull and unpack image "{container["image"]}": '
                               "not found in the node's image table")
        self.folder.mkdir(parents=True, exist_ok=True)
        for volume in self.spec.get("volumes") or []:
            self.volumes[volume["name"]] = self._volume(volume)
        for container in self.spec["containers"]:
            for port in container.get("ports") or []:
                self.ports.setdefault(int(port["containerPort"]), free_port())
        self.prepared = True

    def _volume(self, volume: dict[str, Any]) -> Path:
        local = self.folder / "volumes" / volume["name"]
        local.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return local  # sizeLimit and medium are not enforced
        sources = [volume] if "projected" not in volume else volume["projected"].get("sources") or []
        for source in sources:
            files = self._files(source)
            for relative, content in files.items():
                target = local / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        return local

    def _files(self, source: dict[str, Any]) -> dict[str, str]:
        """The files one configMap, secret, downwardAPI or serviceAccountToken source contributes."""
        if "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind]
            name = ref.get("name") or ref.get("secretName")
            read = self.api.configmap if kind == "configMap" else self.api.secret
            data = read(name, self.namespace, bool(ref.get("optional")))
            items = ref.get("items")
            return {i["path"]: data[i["key"]] for i in items} if items else dict(data)
        if "downwardAPI" in source:
            return {i["path"]: self._field(i["fieldRef"]["fieldPath"]) for i in source["downwardAPI"].get("items")
                    or [] if "fieldRef" in i}
        if "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            seconds = int(ref.get("expirationSeconds") or TOKEN_SECONDS)
            self.token_refresh = seconds * 0.8
            return {ref["path"]: self.api.token(self.pod, ref.get("audience"), seconds)}
        if "hostPath" in source or "persistentVolumeClaim" in source:
            raise NotReady("CreateContainerConfigError", "only configMap, secret, emptyDir, downwardAPI and "
                           "projected volumes are mounted by the test node agent")
        return {}

    def refresh_tokens(self) -> None:
        """Rewrite projected tokens (a kubelet renews them at 80% of their life)."""
        for volume in self.spec.get("volumes") or []:
            for source in (volume.get("projected") or {}).get("sources") or []:
                if "serviceAccountToken" in source:
                    for relative, content in self._files(source).items():
                        (self.volumes[volume["name"]] / relative).write_text(content)

    def _mounts(self, container: dict[str, Any]) -> dict[str, Path]:
        """Container path -> local path of every volume mount (subPath inside the volume)."""
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            local = self.volumes[mount["name"]]
            mounts[mount["mountPath"]] = local / mount["subPath"] if mount.get("subPath") else local
        return mounts

    @staticmethod
    def _local(value: str, mounts: Mapping[str, Path]) -> str:
        for mount in sorted(mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                return str(mounts[mount]) + value[len(mount):]
        return value

    def _field(self, path: str) -> str:
        meta, status = self.meta, self.pod.get("status") or {}
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
                  "spec.nodeName": self.spec.get("nodeName", ""), "spec.serviceAccountName":
                  self.spec.get("serviceAccountName", ""), "status.podIP": self.pod_ip, "status.podIPs": self.pod_ip,
                  "status.hostIP": status.get("hostIP", "127.0.0.1")}
        if path in simple:
            return str(simple[path])
        for kind in ("annotations", "labels"):
            prefix = f"metadata.{kind}['"
            if path.startswith(prefix):
                return str((meta.get(kind) or {}).get(path[len(prefix):-2], ""))
        raise NotReady("CreateContainerConfigError", f"fieldRef {path} is not supported by the test node agent")

    def _env(self, container: dict[str, Any], image: Image, mounts: Mapping[str, Path]) -> dict[str, str]:
        env = dict(image.env)
        env["PATH"] = os.pathsep.join([*map(str, image.path), env.get("PATH", os.environ.get("PATH", ""))])
        env.update(HOME=os.environ.get("HOME", str(self.folder)), HOSTNAME=self.spec.get("hostname") or self.name,
                   KUBERNETES_SERVICE_HOST=self.api_address[0], KUBERNETES_SERVICE_PORT=str(self.api_address[1]))
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                env.update({prefix + k: v for k, v in self.api.configmap(ref["name"], self.namespace,
                                                                         bool(ref.get("optional"))).items()})
            if "secretRef" in source:
                ref = source["secretRef"]
                env.update({prefix + k: v for k, v in self.api.secret(ref["name"], self.namespace,
                                                                      bool(ref.get("optional"))).items()})
        for item in container.get("env") or []:
            value = self._env_value(item, env)
            if value is not None:
                env[item["name"]] = self._network(self._local(value, mounts))
        return env

    def _env_value(self, item: dict[str, Any], env: Mapping[str, str]) -> str | None:
        if "valueFrom" not in item:
            # $(VAR) refers to a variable defined before it; $$ escapes.
            return VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), str(item.get("value", "")))
        source = item["valueFrom"]
        if "fieldRef" in source:
            return self._field(source["fieldRef"]["fieldPath"])
        for kind, read in (("configMapKeyRef", self.api.configmap), ("secretKeyRef", self.api.secret)):
            if kind in source:
                ref = source[kind]
                data = read(ref["name"], self.namespace, bool(ref.get("optional")))
                if ref["key"] not in data and not ref.get("optional"):
                    raise NotReady("CreateContainerConfigError", f"couldn't find key {ref['key']} in "
                                   f"{'ConfigMap' if kind.startswith('config') else 'Secret'} "
                                   f"{self.namespace}/{ref['name']}")
                return data.get(ref["key"])
        if "resourceFieldRef" in source:
            return "0"  # limits are not enforced here
        return None

    def _network(self, value: str) -> str:
        """Declared ports become the ports the processes got; a pod's DNS name becomes its IP."""
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        found = DNS_NAME.match(value)
        if found and found.group(3) == self.namespace:
            ip = self.api.resolve_pod_ip(found.group(3), found.group(1), found.group(2))
            if ip is None:
                raise NotReady("CreateContainerConfigError", f"{value}: no such pod has an IP yet")
            return ip
        return value

    # ---- processes ------------------------------------------------------------------------------------
    def start(self, container: dict[str, Any], restart: int = 0) -> Process:
        image = self.images(container["image"])
        assert image is not None, "prepare() checks images"
        mounts = self._mounts(container)
        env = self._env(container, image, mounts)
        # Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD), args replace CMD.
        args: list[str] = container.get("args") or ([] if container.get("command") else list(image.cmd))
        command = [*(container.get("command") or image.entrypoint), *args]
        if not command:
            raise NotReady("CreateContainerError", "no command specified")
        command = [self._local(VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), arg), mounts)
                   for arg in command]
        command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
        workdir = container.get("workingDir")
        cwd = Path(self._local(workdir, mounts)) if workdir else (image.workdir or self.node_dir)
        cwd.mkdir(parents=True, exist_ok=True)
        termination = container.get("terminationMessagePath") or "/dev/termination-log"
        termination_log = self.folder / f"{container['name']}.termination-log"
        termination_log.write_text("")
        env = {k: self._local(v, {termination: termination_log}) for k, v in env.items()}
        token = next((path for path in mounts if path == SERVICE_ACCOUNT_DIR), None)
        if token is not None:  # see the module docstring: bound at its real path, for this process only
            Path(SERVICE_ACCOUNT_DIR).mkdir(parents=True, exist_ok=True)
            command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                       'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(mounts[token]), token, *command]
        log = self.folder / f"{container['name']}.log"
        if restart:  # the previous run's log is what `kubectl logs --previous` shows
            shutil.copyfile(log, log.with_suffix(".previous.log"))
        with log.open("wb") as out:
            popen = subprocess.Popen([*DIE_WITH_PARENT, *command], cwd=cwd, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(container["name"], popen, now(), log, termination_log,
                          container.get("terminationMessagePolicy") or "File")
        self.processes[container["name"]] = process
        return process

    @staticmethod
    def exit_code(process: Process) -> int:
        code = process.popen.returncode
        return 128 - code if code < 0 else code  # killed by a signal: runtimes report 128 + its number

    @staticmethod
    def termination_message(process: Process, code: int) -> str:
        message = ""
        if process.termination_log is not None and process.termination_log.exists():
            message = process.termination_log.read_text(errors="replace")[:MESSAGE_LIMIT]
        if not message.strip() and code != 0 and process.policy == "FallbackToLogsOnError":
            lines = process.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            message = "\n".join(lines)[-LOG_TAIL_BYTES:]
        return message

    @staticmethod
    def stop(process: Process, grace: float) -> None:
        """SIGTERM to the whole process group, the grace period, then SIGKILL (as a container runtime does)."""
        if process.popen.poll() is not None:
            return
        try:
            os.killpg(process.popen.pid, signal.SIGTERM)
            process.popen.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait(10)
        except ProcessLookupError:
            process.popen.wait(10)
