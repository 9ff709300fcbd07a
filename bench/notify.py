"""Notification benchmark: a line written to the agent's notify FIFO -> the message accepted by a
real SMTP server (aiosmtpd) on loopback, through the running agent (FIFO read, routing, spool
write with fsync, sender thread, SMTP). Baseline in the same run: smtplib sending the same kind
of message straight to the same server, the floor for any agent.

    sudo .venv/bin/python bench/notify.py --runs 50 --burst 300
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbwatch.notify.fifo import write_line
from tests.conftest import SmtpSink, free_port
from tests.test_agent import Rig
from tests.util import wait_for


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(0.9 * (len(xs) - 1))]
    return (
        f"median {statistics.median(xs) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
        f"max {xs[-1] * 1000:.1f} ms"
    )


def direct(sink: SmtpSink, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = f"direct {i}", "lb@example.org", "ops@example.org"
        msg.set_content("baseline")
        before = len(sink.messages)
        t0 = time.time()
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
            smtp.send_message(msg)
        wait_for(lambda n=before: len(sink.messages) > n, 5)
        out.append(sink.accepted_at[-1] - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--burst", type=int, default=300)
    args = parser.parse_args()
    sink = SmtpSink(free_port())
    sink.start()
    rig = Rig(Path(tempfile.mkdtemp(prefix="lbwatch-bench-")))
    rig.write_config(
        notify="spool_max = 100000",
        extra=f"""
[notify.email]
host = "127.0.0.1"
port = {sink.port}
security = "plain"
sender = "lb@example.org"
to = ["ops@example.org"]
""",
    )
    try:
        baseline = direct(sink, args.runs)
        sink.messages.clear()
        sink.accepted_at.clear()
        rig.start()
        wait_for(rig.both_up, 20, what="agent ready")
        fifo = rig.tmp / "run" / "keepalived.fifo"
        latencies = []
        for i in range(args.runs):
            before = len(sink.messages)
            t0 = time.time()
            # A new instance each time: no duplicate suppression, no flap digest.
            assert write_line(fifo, f'INSTANCE "VI_{i}" MASTER 100')
            wait_for(lambda n=before: len(sink.messages) > n, 10, interval=0.001)
            latencies.append(sink.accepted_at[-1] - t0)
        before = len(sink.messages)
        t0 = time.time()
        for i in range(args.burst):
            while not write_line(fifo, f'INSTANCE "BURST_{i}" MASTER 100'):
                time.sleep(0.001)  # pipe full: the agent drains it
        wait_for(lambda: len(sink.messages) >= before + args.burst, 120, interval=0.01)
        burst_time = sink.accepted_at[-1] - t0
    finally:
        rig.close()
        sink.stop()
    print(f"notify benchmark: {args.runs} single events, a burst of {args.burst}")
    print()
    print("| path | FIFO line (or send) -> accepted by SMTP |")
    print("|---|---|")
    print(f"| smtplib straight to the server (floor) | {ms(baseline)} |")
    print(f"| lbwatch: FIFO -> route -> spool (fsync) -> sender -> SMTP | {ms(latencies)} |")
    print()
    ratio = statistics.median(latencies) / statistics.median(baseline)
    print(
        f"lbwatch / direct median latency: {ratio:.1f}x "
        f"(+{(statistics.median(latencies) - statistics.median(baseline)) * 1000:.1f} ms)"
    )
    print(
        f"throughput: {args.burst} messages in {burst_time:.2f} s = "
        f"{args.burst / burst_time:.0f} messages/s (each fsynced into the spool; one SMTP "
        "connection kept through the burst)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
