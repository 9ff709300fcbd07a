"""Notification benchmark: a line written to the agent's notify FIFO -> the message accepted by a
real SMTP server (aiosmtpd) on loopback, through the running agent (FIFO read, routing, spool
write with fsync, sender thread, SMTP). Baseline in the same run: smtplib sending the same kind
of message straight to the same server on a new connection, the floor for any agent. lbwatch is
measured twice: with a new SMTP connection for each message (`keep_open = 0`, as for the first
mail after a quiet hour: a failover), and with the connection kept (the default, 30 s).

    sudo .venv/bin/python bench/notify.py --runs 200 --burst 300
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
    p90, p99 = xs[int(0.9 * (len(xs) - 1))], xs[int(0.99 * (len(xs) - 1))]
    return (
        f"median {statistics.median(xs) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms"
    )


def direct(sink: SmtpSink, i: int) -> float:
    """One message straight to the server on a new connection: seconds to acceptance."""
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = f"direct {i}", "lb@example.org", "ops@example.org"
    msg.set_content("baseline")
    before = len(sink.messages)
    t0 = time.time()
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
        smtp.send_message(msg)
    wait_for(lambda: len(sink.messages) > before, 5)
    return sink.accepted_at[-1] - t0


def through_agent(sink: SmtpSink, fifo: Path, name: str) -> float:
    """One FIFO line through the running agent: seconds to acceptance."""
    before = len(sink.messages)
    t0 = time.time()
    # A new instance each time: no duplicate suppression, no flap digest.
    assert write_line(fifo, f'INSTANCE "{name}" MASTER 100')
    wait_for(lambda: len(sink.messages) > before, 10, interval=0.001)
    return sink.accepted_at[-1] - t0


def run_agent(
    sink: SmtpSink, keep_open: float, runs: int, burst: int, baseline: list[float]
) -> tuple[list[float], float]:
    """Singles (each after the previous was accepted, a direct send between them for the
    baseline), then a burst: (latencies, burst seconds)."""
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
keep_open = {keep_open}
""",
    )
    try:
        rig.start()
        wait_for(rig.both_up, 20, what="agent ready")
        fifo = rig.tmp / "run" / "keepalived.fifo"
        latencies = []
        for i in range(runs):
            baseline.append(direct(sink, i))
            latencies.append(through_agent(sink, fifo, f"VI_{i}"))
        before = len(sink.messages)
        t0 = time.time()
        for i in range(burst):
            while not write_line(fifo, f'INSTANCE "BURST_{i}" MASTER 100'):
                time.sleep(0.001)  # pipe full: the agent drains it
        wait_for(lambda: len(sink.messages) >= before + burst, 120, interval=0.01)
        return latencies, sink.accepted_at[-1] - t0
    finally:
        rig.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--burst", type=int, default=300)
    args = parser.parse_args()
    sink = SmtpSink(free_port())
    sink.start()
    baseline: list[float] = []
    try:
        fresh, _ = run_agent(sink, 0, args.runs, 0, baseline)
        kept, burst_time = run_agent(sink, 30, args.runs, args.burst, baseline)
    finally:
        sink.stop()
    print(f"notify benchmark: {args.runs} single events per agent, a burst of {args.burst}")
    print()
    print("| path | FIFO line (or send) -> accepted by SMTP |")
    print("|---|---|")
    print(f"| smtplib straight to the server, new connection (floor) | {ms(baseline)} |")
    print(f"| lbwatch, new connection per message (keep_open = 0) | {ms(fresh)} |")
    print(f"| lbwatch, connection kept (keep_open = 30, default) | {ms(kept)} |")
    print()
    floor = statistics.median(baseline)
    for what, xs in (("new connection", fresh), ("kept connection", kept)):
        med = statistics.median(xs)
        print(
            f"lbwatch ({what}) / direct median latency: {med / floor:.1f}x "
            f"(+{(med - floor) * 1000:.1f} ms)"
        )
    print(
        f"throughput: {args.burst} messages in {burst_time:.2f} s = "
        f"{args.burst / burst_time:.0f} messages/s (each fsynced into the spool; one SMTP "
        "connection kept through the burst)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
