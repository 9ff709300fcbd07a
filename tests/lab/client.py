"""The lab's client, run inside the client namespace.

``once URL TIMEOUT``: one GET, prints {"status": N, "lb": X-LB, "config": X-Config,
"map": X-Map}.
``watch URL LB LIMIT [HEADER [TIMEOUT]]``: GET every ~5 ms (timeout 100 ms unless TIMEOUT
seconds) until a 200 comes
with HEADER (default X-LB) equal to LB; prints {"first_ok": wall time, "lb": LB, "tries": N,
"began": wall time the answered GET began, "before": [began, seconds] of the GET before it},
or {"first_ok": null} after LIMIT seconds. "before" tells a GET that waited out its timeout
(sent while the VIP's address led nowhere) from one refused at once.
``sample URL SECONDS``: GET every ~5 ms (timeout 0.5 s) for SECONDS; prints {"sampling": true}
at once, then {"answers": {"STATUS X-LB": count, ...}, "total": N, "first_other": wall time of
the first answer unlike the first one, or null}.
``probe URL SECONDS``: GET every ~5 ms (timeout 0.25 s) for SECONDS or until SIGTERM;
prints {"probing": true} at once, then one line per change of answer, {"t": wall time the
first probe with the new answer began, "status": N or 0, "lb": X-LB, "n": probes so far, "ok":
200s so far}, and at the end {"end": wall time, "n": N, "ok": M}: outages can be timed from
the changes alone.
``stream KIND URL OUT [TIMEOUT [PACE]]``: GET every PACE seconds (0.01) until SIGTERM,
appending one line per GET to the file OUT: "BEGAN ENDED OUTCOME X-LB CONN" (wall times;
CONN "new" or "reused"). KIND "new": a new TCP connection per GET; "keepalive": one HTTP/1.1
connection kept for every GET, replaced only when the server closes it (see ``Kept``).
OUTCOME: "ok" (a 200), "retried" (a 200 on a new connection after the kept one turned out
closed by the server, RFC 9112 9.3.1), or the failure: "status:N", "reset", "timeout",
"refused", "empty" (closed with no reply), "error:NAME". TIMEOUT (1.0 s) bounds the connect
and each read.
"""

from __future__ import annotations

import errno
import http.client
import json
import select
import signal
import socket
import sys
import time
from urllib.parse import urlsplit


def get(url: str, timeout: float, header: str = "X-LB") -> tuple[int, str]:
    status, headers = fetch(url, timeout)
    return status, headers.get(header.lower(), "")


def fetch(url: str, timeout: float) -> tuple[int, dict[str, str]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    except (OSError, http.client.HTTPException):
        # Refused, timed out, or cut mid-response by the kill: not served.
        return 0, {}
    finally:
        conn.close()


def sample(url: str, seconds: float) -> int:
    answers: dict[str, int] = {}
    first = ""
    first_other = None
    print(json.dumps({"sampling": True}), flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, lb = get(url, 0.5)
        key = f"{status} {lb}"
        answers[key] = answers.get(key, 0) + 1
        if not first:
            first = key
        elif key != first and first_other is None:
            first_other = time.time()
        time.sleep(0.005)
    total = sum(answers.values())
    print(json.dumps({"answers": answers, "total": total, "first_other": first_other}), flush=True)
    return 0


def probe(url: str, seconds: float) -> int:
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    print(json.dumps({"probing": True}), flush=True)
    deadline = time.monotonic() + seconds
    last: tuple[int, str] | None = None
    n = ok = 0
    while time.monotonic() < deadline and not stop:
        began = time.time()
        answer = get(url, 0.25)
        n += 1
        ok += answer[0] == 200
        if answer != last:
            last = answer
            line = {"t": began, "status": answer[0], "lb": answer[1], "n": n, "ok": ok}
            print(json.dumps(line), flush=True)
        time.sleep(0.005)
    print(json.dumps({"end": time.time(), "n": n, "ok": ok}), flush=True)
    return 0


def failure(exc: BaseException) -> str:
    """A GET's failure in one word (``stream``'s OUTCOME)."""
    if isinstance(exc, http.client.RemoteDisconnected):  # EOF before any byte of a reply
        return "empty"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"error:{errno.errorcode.get(exc.errno, exc.errno)}"
    return f"error:{type(exc).__name__}"


class Kept:
    """One HTTP/1.1 connection reused for every GET, as a browser or an HTTP library keeps
    one: replaced when the server closed it (a FIN seen before the next request, or a reply
    saying ``Connection: close``), or after a failure. A GET sent on a reused connection that
    the server turns out to have closed gracefully, with no byte of reply (EOF), is sent once
    more on a new connection, as RFC 9112 9.3.1 lets a client do for an idempotent request:
    counted as "retried", apart from failures. A reset is a failure, whatever the connection.
    """

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _closed_by_server(self) -> bool:
        """The kept socket is readable while no request is out: the server's FIN (or data it
        had no reason to send): not reusable (urllib3's ``is_connection_dropped`` alike)."""
        sock = self.conn.sock if self.conn is not None else None
        if sock is None:
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def _get(self) -> tuple[int, str]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self.conn.request("GET", self.path)
        resp = self.conn.getresponse()
        resp.read()
        if resp.will_close:
            self._drop()
        return resp.status, resp.getheader("X-LB", "")

    def get(self) -> tuple[str, str, str]:
        """(OUTCOME, X-LB, CONN) of one GET."""
        if self.conn is not None and self._closed_by_server():
            self._drop()
        conn = "new" if self.conn is None else "reused"
        try:
            status, lb = self._get()
        except http.client.RemoteDisconnected:
            self._drop()
            if conn == "new":
                return "empty", "", conn
            try:  # closed gracefully under the request: once more, on a new connection
                status, lb = self._get()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                return failure(exc), "", "new"
            return ("retried" if status == 200 else f"status:{status}"), lb, "new"
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            return failure(exc), "", conn
        return ("ok" if status == 200 else f"status:{status}"), lb, conn


def fresh(host: str, port: int, path: str, timeout: float) -> tuple[str, str, str]:
    """(OUTCOME, X-LB, "new") of one GET on a connection of its own."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return failure(exc), "", "new"
    finally:
        conn.close()
    return (
        ("ok" if resp.status == 200 else f"status:{resp.status}"),
        resp.getheader("X-LB", ""),
        "new",
    )


def stream(kind: str, url: str, out: str, timeout: float, pace: float) -> int:
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    parts = urlsplit(url)
    host, port, path = parts.hostname or "", parts.port or 80, parts.path or "/"
    kept = Kept(host, port, path, timeout) if kind == "keepalive" else None
    with open(out, "a", buffering=1) as log:
        while not stop:
            began = time.time()
            outcome, lb, conn = kept.get() if kept else fresh(host, port, path, timeout)
            log.write(f"{began:.6f} {time.time():.6f} {outcome} {lb or '-'} {conn}\n")
            time.sleep(pace)
    return 0


def main() -> int:
    if sys.argv[1] == "stream":
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
        pace = float(sys.argv[6]) if len(sys.argv) > 6 else 0.01
        return stream(sys.argv[2], sys.argv[3], sys.argv[4], timeout, pace)
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "once":
        status, h = fetch(url, float(sys.argv[3]))
        out = {"status": status, "lb": h.get("x-lb", ""), "config": h.get("x-config", "")}
        print(json.dumps({**out, "map": h.get("x-map", "")}))
        return 0
    if mode == "sample":
        return sample(url, float(sys.argv[3]))
    if mode == "probe":
        return probe(url, float(sys.argv[3]))
    want, limit = sys.argv[3], float(sys.argv[4])
    header = sys.argv[5] if len(sys.argv) > 5 else "X-LB"
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 0.1
    deadline = time.monotonic() + limit
    tries = 0
    before: list[float] = []
    print(json.dumps({"watching": True}), flush=True)
    while time.monotonic() < deadline:
        tries += 1
        began = time.time()
        status, lb = get(url, timeout, header)
        if status == 200 and lb == want:
            out = {"first_ok": time.time(), "lb": lb, "tries": tries, "began": began}
            print(json.dumps({**out, "before": before}), flush=True)
            return 0
        before = [began, time.time() - began]
        time.sleep(0.005)
    print(json.dumps({"first_ok": None, "tries": tries}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
