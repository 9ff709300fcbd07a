"""End to end: real keepalived reporting VRRP transitions to lbwatch (lb1 through its
notify_fifo, lb2 through both notify_fifo and `lbwatch notify` as its notify script), mail to a
real SMTP server on the backend host."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

from tests.e2e.test_lab import pytestmark as lab_marks
from tests.e2e.test_lab import services_up
from tests.lab.netlab import BACKEND, Lab
from tests.util import wait_for

pytestmark = lab_marks

NOTIFY = f"""
[notify]
retry_initial = 0.5
retry_max = 2.0

[notify.email]
host = "{BACKEND}"
port = 2525
security = "plain"
sender = "lbwatch@example.org"
to = ["ops@example.org"]
timeout = 3
"""


def subjects(maildir: Path) -> list[str]:
    out = []
    for path in sorted(maildir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        out.append(str(msg["Subject"]))
    return out


def test_failover_mails_the_new_master() -> None:
    """lb1 becomes MASTER (FIFO), haproxy dies there: lb1 mails its own alert, lb2 mails that
    it is MASTER now (FIFO and notify script: one mail), and lb1 mails again when it takes the
    VIP back; each transition once."""
    with Lab() as lab:
        maildir = lab.start_smtp_sink()
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lb1.write_configs(keepalived_notify="fifo", lbwatch_extra=NOTIFY)
        # lb2 gets every event twice, through the FIFO and through `lbwatch notify`.
        lb2.write_configs(keepalived_notify="both", lbwatch_extra=NOTIFY)
        for node in (lb1, lb2):
            node.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            first = "[lbwatch] lb1: VI_1 BACKUP -> MASTER (priority 100)"
            lb2_master = "[lbwatch] lb2: VI_1 BACKUP -> MASTER (priority 97)"
            wait_for(lambda: first in subjects(maildir), 20, what="lb1's MASTER mail")
            wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP")
            time.sleep(2)  # both nodes start as BACKUP and may both claim MASTER for a moment
            lb1_before = subjects(maildir).count(first)
            lb2_before = subjects(maildir).count(lb2_master)
            master = int(lb1.read("/run/haproxy.pid"))
            lb1.kill("haproxy")
            wait_for(
                lambda: subjects(maildir).count(lb2_master) == lb2_before + 1,
                20,
                what="lb2's MASTER mail",
            )
            alert = (
                f"[lbwatch] lb1: haproxy master {master} exited (pidfd); stopping keepalived"
                " so the VIP moves"
            )
            wait_for(lambda: alert in subjects(maildir), 10, what="lb1's alert")
            wait_for(
                lambda: subjects(maildir).count(first) == lb1_before + 1,
                30,
                what="lb1's MASTER mail after healing",
            )
            time.sleep(1)
            got = subjects(maildir)
            assert got.count(lb2_master) == lb2_before + 1  # once, though FIFO and script
            assert not [s for s in got if "BACKUP (priority" in s]  # not routed by default
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
            print("mail:", subjects(maildir))
