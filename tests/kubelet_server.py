"""The node agent's network side: the kubelet's log endpoint for the API server, and pod-IP port forwarding.

`kubectl logs` asks the API server, which asks the node at its InternalIP and kubelet port for
`/containerLogs/<namespace>/<pod>/<container>`, presenting the API server's client certificate. Pod IPs are
loopback addresses; each declared containerPort on a pod IP forwards to the port its process was given
(tests/pod_process.py says why).
"""

from __future__ import annotations

import asyncio
import http.server
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# (namespace, pod, container, previous) -> the log file, and whether its container still runs.
LogLookup = Callable[[str, str, str, bool], tuple[Path, bool] | None]


class LogServer:
    def __init__(self, cert: Path, key: Path, ca: Path, lookup: LogLookup) -> None:
        lookup_ = lookup

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:  # the API server's requests are not news
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                segments = parts.path.strip("/").split("/")
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                if len(segments) != 4 or segments[0] != "containerLogs":
                    self.send_error(404)
                    return
                found = lookup_(segments[1], segments[2], segments[3], query.get("previous") == "true")
                if found is None:
                    self.send_error(404, f"container {segments[3]} of pod {segments[1]}/{segments[2]} not found")
                    return
                path, running = found
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self._send(path, query, running)

            def _send(self, path: Path, query: dict[str, str], running: bool) -> None:
                data = path.read_bytes() if path.exists() else b""
                if "tailLines" in query:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) else b""
                if "limitBytes" in query:
                    data = data[:int(query["limitBytes"])]
                self.wfile.write(data)
                if query.get("follow") != "true" or not running:
                    return
                offset = path.stat().st_size if path.exists() else 0
                while True:  # follow until the container ends or the reader goes away
                    time.sleep(0.2)
                    found = lookup_(*self._key(), False)
                    with path.open("rb") as log:
                        log.seek(offset)
                        more = log.read()
                    offset += len(more)
                    try:
                        if more:
                            self.wfile.write(more)
                            self.wfile.flush()
                    except OSError:
                        return
                    if found is None or not found[1]:
                        return

            def _key(self) -> tuple[str, str, str]:
                segments = urlsplit(self.path).path.strip("/").split("/")
                return segments[1], segments[2], segments[3]

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(ca))
        context.verify_mode = ssl.CERT_REQUIRED  # only the API server (a client certificate of this CA) asks
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="kubelet-logs", daemon=True)

    def start(self) -> LogServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PortForwarder:
    """Listeners on `pod_ip:containerPort` that pipe each connection to `127.0.0.1:<process port>`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.servers: dict[str, list[asyncio.Server]] = {}
        self.thread = threading.Thread(target=self.loop.run_forever, name="pod-network", daemon=True)
        self.thread.start()

    def open(self, pod_ip: str, ports: dict[int, int]) -> None:
        async def listen() -> list[asyncio.Server]:
            servers = []
            for declared, actual in ports.items():
                async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: int = actual) -> None:
                    await _forward(reader, writer, to)

                servers.append(await asyncio.start_server(pipe, pod_ip, declared, reuse_address=True))
            return servers

        self.servers[pod_ip] = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)

    def close(self, pod_ip: str) -> None:
        async def shut(servers: list[asyncio.Server]) -> None:
            for server in servers:
                server.close()

        servers = self.servers.pop(pod_ip, [])
        if servers:
            asyncio.run_coroutine_threadsafe(shut(servers), self.loop).result(10)

    def stop(self) -> None:
        for pod_ip in list(self.servers):
            self.close(pod_ip)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()  # nothing listens yet: the caller sees a reset, as with a closed port
        return

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))
