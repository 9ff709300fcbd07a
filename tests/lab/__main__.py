"""The two-node demo: ``python -m tests.lab`` (as root; ``make demo`` installs what it needs).

Brings up the lab, lets lbwatch start haproxy and keepalived on both nodes, kills haproxy on the
MASTER with SIGKILL, shows the VIP moving to the peer and the node healing, then edits
haproxy.cfg on lb1 and shows lb2 serving the new config (and refusing a broken one), cuts VRRP
between the nodes (a split brain, which lbwatch resolves: lb2 stands down until VRRP is back),
then tears down.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.e2e.test_lab_notify import NOTIFY, subjects
from tests.e2e.test_lab_sync import local_result, peer_state, save_like_vim
from tests.lab.netlab import LB_ADDR, METRICS, PRIORITY, VIP, Lab, Node, haproxy_cfg
from tests.util import wait_for


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def both_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


def split_brain(lab: Lab, lb1: Node, lb2: Node) -> None:
    """VRRP cut: both MASTER; lbwatch resolves it; VRRP back: lb2 returns as BACKUP."""
    say("split brain: VRRP multicast cut on the bridge, unicast flows; both nodes MASTER")
    lab.set_vrrp(False)
    wait_for(lb2.has_vip, 15, interval=0.02, what="lb2 to take the VIP too")
    both = time.time()
    print(f"lb1 holds the VIP: {lb1.has_vip()}, lb2 holds the VIP: {lb2.has_vip()}")

    say("lbwatch resolves it over the peer link: lb2, VRRP's BACKUP, stands down (FAULT)")
    wait_for(lambda: lb1.has_vip() and not lb2.has_vip(), 20, interval=0.05,
             what="one holder")  # fmt: skip
    print(f"one holder, lb1, {time.time() - both:.1f} s after lb2 took the VIP too")
    for line in lb2.log_text().splitlines():
        if "standing down here" in line:
            print(f"  lb2: {line}")
    print(lb1.lbwatch_cli("status", "--cluster"))
    say("VRRP restored: lb2 hears lb1's advertisements again and comes back as BACKUP")
    lab.set_vrrp(True)

    def back() -> bool:
        doc = lb2.status()
        return doc is not None and not doc.standing_down

    wait_for(back, 20, what="lb2 back in VRRP")
    for line in lb2.log_text().splitlines():
        if "back in VRRP" in line:
            print(f"  lb2: {line}")


def main() -> int:
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces): run `sudo make demo`", file=sys.stderr)
        return 2
    prio = f"lb1 (VRRP priority {PRIORITY['lb1']}), lb2 ({PRIORITY['lb2']})"
    say(f"building the lab: {prio}, backend, client; VIP {VIP}")
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        maildir = lab.start_smtp_sink()
        lab.enable_sync()  # sshd on both nodes, each other's sync key confined to staging
        for node in (lb1, lb2):
            # keepalived reports its transitions to lbwatch's FIFO; lbwatch mails the backend's
            # SMTP server; haproxy.cfg is kept in sync between the nodes.
            # /metrics on each node's loopback too.
            node.write_configs(keepalived_notify="fifo", lbwatch_extra=NOTIFY + METRICS, sync=True)
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

        cfg = lb1.dir / "haproxy" / "haproxy.cfg"
        say("config sync: save haproxy.cfg on lb1 with X-Config v2")
        saved = time.time()
        save_like_vim(cfg, haproxy_cfg("v2"))
        wait_for(lambda: lab.client_fetch(LB_ADDR["lb2"])["config"] == "v2", 20, what="lb2 v2")
        print(f"lb2 serves X-Config v2 {time.time() - saved:.2f} s after the save (checked and")
        print("reloaded on lb1, pushed over ssh, checked and reloaded on lb2)")
        wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="in sync")
        print(lb1.lbwatch_cli("sync", "--status"))
        say("a broken edit on lb1 (`mode htp`): not reloaded, not pushed")
        cfg.write_text(haproxy_cfg("v3").replace("mode http", "mode htp"))
        wait_for(lambda: local_result(lb1) == "invalid", 10, what="refused")
        print(lb1.lbwatch_cli("sync", "--status", check=False))
        for node in (lb1, lb2):
            print(f"{node.name} serves X-Config {lab.client_fetch(LB_ADDR[node.name])['config']}")

        say("Prometheus's view: lb1's /metrics (its lbwatch_ series, those at 1 or counting)")
        for line in lb1.scrape().splitlines():
            if line.startswith("lbwatch_") and not line.endswith(" 0.0"):
                print(f"  {line}")
        say("the group as lb1's agent sees it (lbwatch status --cluster)")
        print(lb1.lbwatch_cli("status", "--cluster"))
        split_brain(lab, lb1, lb2)
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
