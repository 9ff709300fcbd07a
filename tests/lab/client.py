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
"""

from __future__ import annotations

import http.client
import json
import signal
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


def main() -> int:
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
