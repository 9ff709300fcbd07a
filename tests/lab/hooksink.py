"""The lab's webhook receiver: every POST on ADDRESS:PORT is answered 200 and its body written to
DIR as <n>.json. Prints "ready" once listening.

Usage: python hooksink.py ADDRESS PORT DIR
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    directory = Path(".")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with LOCK:
            count = len(list(self.directory.glob("*.json"))) + 1
            (self.directory / f"{count:05d}.json").write_bytes(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet: the lab reads the bodies, not access logs."""


def main() -> int:
    Handler.directory = Path(sys.argv[3])
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
