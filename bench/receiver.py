"""What lbwatch's receiver (``lbwatch receive``, the sync key's forced command) costs: the
resident memory of N receivers at once, and the time it takes to answer a push, measured over
pipes (no ssh, so the figure is the receiver's own work: framing, hashing, the checks, the
write and the link into staging).

    .venv/bin/python bench/receiver.py                  # --sessions 8 --pushes 400
    .venv/bin/python bench/receiver.py --sessions 40    # the review's forty at once
    PYTHONPATH=/tmp/lbwatch-main .venv/bin/python bench/receiver.py --plain   # another tree

Each receiver is started as sshd starts it (``SSH_ORIGINAL_COMMAND=lbwatch-sync 1``), with
``--peer`` unless ``--plain`` (a tree whose receiver has no ``--peer``), one after another;
those refused (past the key's sessions) end at once. The staging directory gets the document
the agent writes for its receivers (``.receiver/limits.json``, default limits; ignored by a
receiver older than it). RSS is ``ps -o rss`` of the receivers that took their session; push
times are the median and 90th percentile of ``--pushes`` PUTs of a 3 KB version on one
session.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENT = b"global\n    maxconn 100\n" + b"# padding to a small config's size\n" * 90


def staged_name(content: bytes, counter: int) -> str:
    digest = hashlib.sha256(content).hexdigest()
    return f"haproxy.cfg@lb1@c{counter}@1700000000000000000@{digest}"


def start(staging: Path, plain: bool) -> subprocess.Popen[bytes] | None:
    """A receiver that took its session, or None when it refused it (and ended)."""
    env = {**os.environ, "SSH_ORIGINAL_COMMAND": "lbwatch-sync 1"}
    peer = [] if plain else ["--peer", "lb1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbwatch", "receive", *peer, str(staging)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=staging.parent,  # not this tree: PYTHONPATH chooses the lbwatch measured
    )
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().startswith(b"LBWATCH-SYNC 1 "):
        return proc
    proc.wait(10)
    proc.stdin.close()
    proc.stdout.close()
    return None


def rss_kib(pids: list[int]) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(x) for x in out.split()]


def push_times(proc: subprocess.Popen[bytes], pushes: int, staging: Path) -> list[float]:
    assert proc.stdin is not None and proc.stdout is not None
    times = []
    for i in range(pushes):
        content = CONTENT + b"# %d\n" % i
        name = staged_name(content, i + 1)
        request = f"PUT {name} {len(content)}\n".encode() + content
        started = time.perf_counter()
        proc.stdin.write(request)
        proc.stdin.flush()
        answer = proc.stdout.readline()
        times.append(time.perf_counter() - started)
        if answer != b"OK\n":
            raise SystemExit(f"push {i}: {answer!r}")
        (staging / name).unlink()  # as the sync job takes it: staging stays small
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8, help="sessions started (one key's)")
    ap.add_argument("--pushes", type=int, default=400)
    ap.add_argument("--plain", action="store_true", help="no --peer (an older receiver)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lbwatch-bench-") as tmp:
        staging = Path(tmp) / "staging"
        (staging / ".receiver").mkdir(parents=True)
        limits = {"lbwatch-receiver": 1, "unit": "haproxy.cfg"}  # the default limits
        (staging / ".receiver" / "limits.json").write_text(json.dumps(limits))
        started = [start(staging, args.plain) for _ in range(args.sessions)]
        procs = [p for p in started if p is not None]
        try:
            rss = rss_kib([p.pid for p in procs])
            times = push_times(procs[0], args.pushes, staging)
        finally:
            for p in procs:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.close()
                p.wait(10)
                p.stdout.close()
    ms = sorted(t * 1000 for t in times)
    print(
        f"{args.sessions} sessions asked, {len(procs)} taken: RSS {sum(rss) / 1024:.1f} MiB in "
        f"all, {statistics.median(rss) / 1024:.1f} MiB each (median)"
    )
    print(
        f"push of {len(CONTENT)} bytes, {len(ms)} times: median {statistics.median(ms):.3f} ms, "
        f"p90 {ms[int(len(ms) * 0.9)]:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
