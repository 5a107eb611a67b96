"""The metrics endpoint's own process: serves the latest snapshot the trainer pushed, whatever the trainer does.

A thread inside the trainer starves while the trainer holds the GIL (imports of C extensions, pickling a
checkpoint): measured scrapes took over a second during setup on a busy 2-core machine. This process has its
own interpreter and imports only the standard library, so a scrape is answered at once.

Protocol on stdin: "<size>\\n" then <size> bytes of exposition text, repeatedly; EOF (the trainer exited or
stopped) ends the process. The first line on stdout is "ok" once the port is bound, else "error <why>".
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4


def serve(port: int, addr: str) -> int:
    latest = [b""]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = latest[0]
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # no access log on the trainer's stderr
            pass

    # The pod's SIGTERM reaches the whole process group: keep serving while the trainer checkpoints.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server = ThreadingHTTPServer((addr, port), Handler)
    except OSError as exc:
        print(f"error {exc.strerror or exc}", flush=True)
        return 1
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-metrics", daemon=True).start()
    print("ok", flush=True)
    source = sys.stdin.buffer
    while True:
        header = source.readline()
        if not header.strip():
            break
        body = source.read(int(header))
        if len(body) < int(header):
            break
        latest[0] = body
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), sys.argv[2]))
