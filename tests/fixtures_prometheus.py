"""A real Prometheus server (Debian package `prometheus`) on loopback, scraping every second.

`make test` / `.ci/run` install the package when it is missing; tests that need it fail with that hint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.netutil import free_port

INSTALL_HINT = "install it with `apt-get install -y --no-install-recommends prometheus` (make test does)"


def prometheus_binary(name: str = "prometheus") -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return found


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the vector's samples (or [] for an empty result)."""
        data = self.api("query", query=expr, time=at)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data["result"]]
        return result

    def targets_up(self) -> dict[str, str]:
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}


def start_prometheus(tmp: Path, targets: dict[str, list[str]], interval: str = "1s") -> Prometheus:
    """Start prometheus scraping each {scrape job: [host:port, ...]}; honor_labels keeps our job/namespace labels."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": name, "honor_labels": True, "scrape_timeout": interval,
                            "static_configs": [{"targets": hosts}]} for name, hosts in targets.items()],
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_prometheus(server)
            raise AssertionError(f"prometheus did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_prometheus(server: Prometheus) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """start(targets) -> Prometheus; every server started is stopped at the end of the module."""
    started: list[Prometheus] = []

    def start(targets: dict[str, list[str]]) -> Prometheus:
        server = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_prometheus(server)
