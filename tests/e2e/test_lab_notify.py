"""End to end: real keepalived reporting VRRP transitions to lbwatch (lb1 through its
notify_fifo, lb2 through both notify_fifo and `lbwatch notify` as its notify script), mail to a
real SMTP server on the backend host."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

from pydantic import TypeAdapter

from lbwatch.doctor.checks import Finding
from tests.e2e.test_lab import pytestmark as lab_marks
from tests.e2e.test_lab import services_up
from tests.lab.netlab import PRIORITY, Lab, Node, notify_toml
from tests.util import wait_for

pytestmark = lab_marks

NOTIFY = notify_toml()


def subjects(maildir: Path) -> list[str]:
    out = []
    for path in sorted(maildir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        out.append(str(msg["Subject"]))
    return out


def settled_backup(node: Node) -> bool:
    """``node`` holds no VIP, lbwatch last read BACKUP on keepalived's FIFO, and nothing waits
    in its spool. The FIFO, not the notify script: keepalived forks one script per transition
    and they may reach lbwatch out of order (SCRIPT BACKUP, then SCRIPT MASTER, was seen in CI)."""
    states = re.findall(r'keepalived: INSTANCE "VI_1" (\w+)', node.log_text())
    spool = node.dir / "state" / "spool"
    return not node.has_vip() and states[-1:] == ["BACKUP"] and not list(spool.glob("*.json"))


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
            first = f"[lbwatch] lb1: VI_1 BACKUP -> MASTER (priority {PRIORITY['lb1']})"
            lb2_master = f"[lbwatch] lb2: VI_1 BACKUP -> MASTER (priority {PRIORITY['lb2']})"
            wait_for(lambda: first in subjects(maildir), 20, what="lb1's MASTER mail")
            wait_for(lb1.has_vip, 20, what="lb1 to hold the VIP")
            # Both nodes start as BACKUP and lb2 may claim MASTER for a moment before lb1's
            # first advert: the baseline is taken once lb2 is BACKUP again, all its mail sent.
            wait_for(lambda: settled_backup(lb2), 20, what="lb2 settled as BACKUP")
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
            # A mark through lb2's FIFO: lb2 sends in order, so a duplicate of its MASTER
            # mail (the notify script's copy) would come before it.
            lb2.lbwatch_cli("notify", "GROUP", "MARK", "FAULT", "0")
            wait_for(lambda: any("MARK" in s for s in subjects(maildir)), 20, what="the mark")
            got = subjects(maildir)
            assert got.count(lb2_master) == lb2_before + 1  # once, though FIFO and script
            assert not [s for s in got if "BACKUP (priority" in s]  # not routed by default
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
            print("mail:", subjects(maildir))


def test_keepalived_first_at_boot_each_transition_mailed_once() -> None:
    """As at boot, keepalived runs before lbwatch: its notify script finds no agent and spools
    the MASTER mail, and keepalived also leaves the line in its notify_fifo. When lbwatch
    starts and reads it, the MASTER is mailed once; an event after start comes after it."""
    with Lab() as lab:
        maildir = lab.start_smtp_sink()
        lb1 = lab.nodes["lb1"]
        lb1.write_configs(keepalived_notify="both", lbwatch_extra=NOTIFY)
        spool = lb1.dir / "state" / "spool"
        lb1.start_haproxy()
        lb1.start_keepalived()
        wait_for(lb1.has_vip, 20, what="lb1 MASTER with keepalived alone")
        # Positive control: the script did spool the MASTER mail while no agent ran.
        wait_for(lambda: list(spool.glob("*.email.json")), 10, what="the spooled MASTER")
        master = f"[lbwatch] lb1: VI_1 MASTER (priority {PRIORITY['lb1']})"
        try:
            lb1.start_lbwatch()
            wait_for(lambda: services_up(lb1), 20, what="lbwatch up")
            wait_for(lambda: master in subjects(maildir), 20, what="the MASTER mail")
            wait_for(lambda: 'keepalived: INSTANCE "VI_1" MASTER' in lb1.log_text(), 10)
            # An event after start: sent after anything queued before it.
            lb1.lbwatch_cli("notify", "GROUP", "MARK", "FAULT", "0")
            wait_for(lambda: any("MARK" in s for s in subjects(maildir)), 20, what="the mark")
            # Once, from the spool (the FIFO's copy would read "BACKUP -> MASTER").
            assert [s for s in subjects(maildir) if "VI_1" in s] == [master]

            # keepalived made this FIFO (it started first), and makes it anew at each reload:
            # lbwatch follows it, and keepalived's next transition is heard, with no alarm.
            lb1.run("kill", "-HUP", lb1.read("/run/keepalived.pid").strip())
            wait_for(lambda: "notify FIFO /run/keepalived-lbwatch.fifo reopened" in
                     lb1.log_text(), 10, what="lbwatch on keepalived's new FIFO")  # fmt: skip
            link_flap_heard(lab, lb1)
            # keepalived holds the FIFO lbwatch reads (doctor's look at its open files).
            assert [f.level for f in fifo_findings(lb1)] == ["ok"]
            assert "writes a FIFO at" not in lb1.log_text()
            assert "does not have /run/keepalived-lbwatch.fifo open" not in lb1.log_text()
        finally:
            print(f"----- lbwatch log of lb1 -----\n{lb1.log_text()}")
            print("mail:", subjects(maildir))


def link_flap_heard(lab: Lab, node: Node) -> None:
    """The node's link down, then up: lbwatch hears keepalived's FAULT on the FIFO, and the
    node is MASTER again."""
    fault = 'keepalived: INSTANCE "VI_1" FAULT'
    heard = node.log_text().count(fault)
    lab.ip(node.name, "link", "set", "eth0", "down")
    wait_for(lambda: node.log_text().count(fault) > heard, 10,
             what="lbwatch to hear keepalived's FAULT")  # fmt: skip
    lab.ip(node.name, "link", "set", "eth0", "up")
    wait_for(node.has_vip, 20, what=f"{node.name} MASTER again")


def fifo_findings(node: Node) -> list[Finding]:
    """doctor's findings on ``node`` about the FIFO keepalived holds open."""
    out = node.lbwatch_cli("doctor", "--json", check=False)
    found = TypeAdapter(list[Finding]).validate_json(out)
    return [f for f in found if f.area == "keepalived" and f.what.startswith("keepalived (pid")]


def test_doctor_finds_keepalived_writing_a_removed_fifo() -> None:
    """The real keepalived holds the FIFO lbwatch reads (ok); once the FIFO is removed and
    lbwatch has made a new one, keepalived still writes the old one, and doctor says so with
    the fix; after keepalived's reload (SIGHUP, as `systemctl reload` sends) it holds the new
    one, and its lines reach lbwatch again (without the reload, the FAULT of a link down is
    never heard: tried, the wait times out)."""
    with Lab() as lab:
        lb1 = lab.nodes["lb1"]
        lb1.write_configs(keepalived_notify="fifo")
        lb1.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1), 20, what="lb1 up")
            wait_for(lb1.has_vip, 20, what="lb1 MASTER")
            ka = int(lb1.read("/run/keepalived.pid"))
            said = [(f.level, f.what) for f in fifo_findings(lb1)]
            assert said == [("ok", f"keepalived (pid {ka}) writes the FIFO lbwatch reads")]

            lb1.run("rm", "/run/keepalived-lbwatch.fifo")
            wait_for(lambda: "notify FIFO /run/keepalived-lbwatch.fifo reopened" in
                     lb1.log_text(), 10, what="lbwatch's new FIFO")  # fmt: skip
            found = fifo_findings(lb1)
            assert [f.level for f in found] == ["error"], found
            assert "has been removed or replaced since it opened it" in found[0].what
            assert found[0].fix is not None and "reload keepalived" in found[0].fix

            lb1.run("kill", "-HUP", str(ka))
            wait_for(lambda: [f.level for f in fifo_findings(lb1)] == ["ok"], 20,
                     what="doctor to find keepalived on the new FIFO")  # fmt: skip
            assert int(lb1.read("/run/keepalived.pid")) == ka  # reloaded, not restarted
            # Its transitions reach lbwatch again: the link down and up is FAULT, then MASTER.
            link_flap_heard(lab, lb1)
        finally:
            print(f"----- lbwatch log of lb1 -----\n{lb1.log_text()}")
