"""The two-node demo: ``python -m tests.lab`` (as root; ``make demo`` installs what it needs).

Brings up the lab, lets lbwatch start haproxy and keepalived on both nodes, kills haproxy on the
MASTER with SIGKILL, shows the VIP moving to the peer and the node healing, then tears down.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.e2e.test_lab_notify import NOTIFY, subjects
from tests.lab.netlab import VIP, Lab, Node
from tests.util import wait_for


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def both_up(node: Node) -> bool:
    s = node.status()
    return bool(s.get("ready")) and all(v["running"] for v in s["services"].values())


def main() -> int:
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces): run `sudo make demo`", file=sys.stderr)
        return 2
    say("building the lab: lb1 (VRRP priority 100), lb2 (97), backend, client; VIP " + VIP)
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        maildir = lab.start_smtp_sink()
        for node in (lb1, lb2):
            # keepalived reports its transitions to lbwatch's FIFO; lbwatch mails the backend's
            # SMTP server.
            node.write_configs(keepalived_notify="fifo", lbwatch_extra=NOTIFY)
            node.start_lbwatch()
        say("lbwatch started on both nodes with nothing running; it reconciles")
        wait_for(lambda: both_up(lb1) and both_up(lb2), 30, what="both nodes up")
        wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP")
        print(lb1.lbwatch_cli("status"))
        print(lb2.lbwatch_cli("status"))
        status, served_by = lab.client_get()
        say(f"client -> http://{VIP}/ : HTTP {status} served by {served_by}")

        say("kill -9 haproxy (master and workers) on lb1, the MASTER")
        with lab.client_watch("lb2", 20) as watch:
            assert watch.stdout is not None
            watch.stdout.readline()
            killed = time.time()
            pids = lb1.kill("haproxy")
            print(f"killed host PIDs {pids}")
            result = json.loads(watch.stdout.readline())
        if result["first_ok"] is None:
            print("no HTTP 200 through lb2 within 20 s", file=sys.stderr)
            return 1
        say(f"first HTTP 200 through the VIP from lb2 after {result['first_ok'] - killed:.3f} s")
        print(f"lb2 holds the VIP: {lb2.has_vip()}")

        say("lb1 heals: haproxy restarted, then keepalived; lb1 preempts the VIP back")
        wait_for(lambda: both_up(lb1), 30, what="lb1 healed")
        wait_for(lb1.has_vip, 30, what="lb1 to hold the VIP again")
        status, served_by = lab.client_get()
        print(f"client -> http://{VIP}/ : HTTP {status} served by {served_by}")
        print(lb1.lbwatch_cli("status"))
        say("lbwatch's log on lb1")
        print(lb1.log_text())
        say("mail received by the SMTP server on the backend host")
        for subject in subjects(maildir):
            print(f"  {subject}")
        say("tearing down")
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
