"""The systemd tier: lbwatch as users run it. Two nodes booted by systemd 252, Debian's
haproxy.service (Type=notify, -Ws, Restart=always) and keepalived.service (Type=notify,
--dont-fork, no Restart=) unchanged, lbwatch installed from its .deb with apt and run by the
shipped unit, config/lbwatch.toml with node values and every optional feature on (probe, mail
with the password from LoadCredential=, a webhook, config sync, the cluster watch, /metrics and
the node_exporter textfile). Every start, stop and reload is systemctl's.

The tests share one lab and run in this file's order; each leaves it as it found it (VI_1 on lb1,
VI_2 on lb2, every daemon up), the journal check comes after the faults, the package's upgrade
and removal last.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time

import pytest

from tests.lab.syslab import (
    TEXTFILE,
    VIP,
    VIP2,
    SysLab,
    SysNode,
    mails,
)
from tests.systemd.conftest import Probe, probing, skip_marks
from tests.util import wait_for

pytestmark = skip_marks()


def masters(node: SysNode) -> list[int]:
    """haproxy master processes on the node: those whose parent is its PID 1."""
    return [p.pid for p in node.live("haproxy") if p.ppid() == node.init_pid]


def nrestarts(node: SysNode, unit: str = "lbwatch") -> int:
    return int(node.prop(unit, "NRestarts"))


def agent(node: SysNode) -> int:
    pid = node.main_pid("lbwatch")
    assert pid, f"{node.name}: lbwatch has no main process"
    return pid


def shipped_unit(syslab: SysLab) -> str:
    tar = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(syslab.deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        member = t.extractfile("./lib/systemd/system/lbwatch.service")
        assert member is not None
        return member.read().decode()


def test_boot_to_ready(syslab: SysLab) -> None:
    """Each node: the unit enabled and active after READY=1, no restart, the shipped unit file
    unchanged, both daemons under their own units, each VIP on its MASTER, served."""
    for node in syslab.sysnodes.values():
        assert node.systemctl("is-enabled", "lbwatch").strip() == "enabled"
        assert node.prop("lbwatch", "ActiveState") == "active"
        assert node.prop("lbwatch", "SubState") == "running"
        assert nrestarts(node) == 0
        assert node.prop("lbwatch", "FragmentPath") == "/lib/systemd/system/lbwatch.service"
        assert node.read("/lib/systemd/system/lbwatch.service") == shipped_unit(syslab)
        assert (
            not node.prop("lbwatch", "DropInPaths")
            .replace("/etc/systemd/system/lbwatch.service.d/credential.conf", "")
            .strip()
        )
        doc = node.doc()
        assert doc.ready
        assert doc.services["haproxy"].pid == int(node.prop("haproxy", "MainPID"))
        assert doc.services["keepalived"].pid == int(node.prop("keepalived", "MainPID"))
        started = node.journal("-u", "lbwatch", "-o", "cat")
        assert "Started lbwatch.service" in started, started
    assert syslab.holder(VIP) == "lb1" and syslab.holder(VIP2) == "lb2"
    assert syslab.client_get() == (200, "lb1")


def test_sync_setup_in_either_order(syslab: SysLab) -> None:
    """`lbwatch sync setup --install` on lb1 ran before lb2's agent had made its staging: it
    succeeded (exit 0), saying what lb2 still lacked, not blaming sshd; lb2's, run after, found
    lb1 set up for sync and nothing missing there."""
    first = syslab.setup_said["lb1"]
    assert "sshd" not in first.split("checking")[-1], first
    assert "WARN" in first and "[sync]" in first, first
    assert "ERROR" not in syslab.setup_said["lb2"], syslab.setup_said["lb2"]


def test_haproxy_kill9_moves_the_vip_and_the_node_heals(syslab: SysLab) -> None:
    """kill -9 of haproxy (master and workers) on lb1: the VIP moves to lb2 at once; systemd's
    Restart=always and lbwatch's `systemctl start haproxy` end as one master; lb1 takes VI_1
    back."""
    lb1 = syslab.sysnodes["lb1"]
    ka = lb1.main_pid("keepalived")
    with probing(syslab) as probe:
        killed = time.time()
        assert lb1.kill("haproxy")
        wait_for(lambda: syslab.holder(VIP) == "lb2", 10, what="VI_1 on lb2")
        moved = time.time()
        syslab.wait_healthy(60)
        healed = time.time()
    assert probe.served_by == {"lb1", "lb2"}, probe.changes
    assert len(masters(lb1)) == 1, [p.cmdline() for p in lb1.live("haproxy")]
    assert masters(lb1)[0] == lb1.main_pid("haproxy")
    assert lb1.main_pid("keepalived") != ka  # stopped so the VIP moved, started again
    since = f"@{int(killed)}"
    asked = [x for x in lb1.journal("-u", "lbwatch", "--since", since).splitlines()
             if "ask haproxy done in" in x]  # fmt: skip
    assert asked and not [x for x in asked if "by systemctl" in x], asked  # the private socket
    # keepalived got SIGTERM from lbwatch, then `systemctl stop`: to systemd, a clean stop.
    assert lb1.prop("keepalived", "Result") == "success"
    assert "Failed with result" not in lb1.journal("-u", "keepalived", "--since", since)
    print(
        f"haproxy kill -9: VIP on lb2 {moved - killed:.2f} s later, back {healed - killed:.2f}"
        f" s later; {probe.failed} of {probe.n} GETs failed, outages {probe.outages()}"
    )


def test_operator_restart_after_a_crash_keeps_the_vip(syslab: SysLab) -> None:
    """`systemctl restart haproxy` after a crash that systemd's Restart= healed: NRestarts still
    counts that restart (only a start of another kind resets it, and that start is the one being
    asked about), yet the restart is read as the operator's and the VIP stays on lb1."""
    lb1 = syslab.sysnodes["lb1"]
    if nrestarts(lb1, "haproxy") == 0:  # the scenario needs a crash behind it
        assert lb1.kill("haproxy")
        wait_for(lambda: syslab.holder(VIP) == "lb2", 10, what="VI_1 on lb2")
        syslab.wait_healthy(60)
    assert nrestarts(lb1, "haproxy") > 0
    keepalived, old = lb1.main_pid("keepalived"), lb1.main_pid("haproxy")
    since = time.time()
    with probing(syslab) as probe:
        lb1.systemctl("restart", "haproxy")
        wait_for(lambda: lb1.main_pid("haproxy") not in (0, old), 20, what="a new master")
        wait_for(lambda: syslab.client_get(0.5) == (200, "lb1"), 30, what="lb1 serving")
    asked = [x for x in lb1.journal("-u", "lbwatch", "--since", f"@{int(since)}").splitlines()
             if "ask haproxy done in" in x]  # fmt: skip
    assert probe.served_by == {"lb1"}, (probe.changes, asked)
    assert lb1.main_pid("keepalived") == keepalived, asked


def test_keepalived_kill9_is_restarted(syslab: SysLab) -> None:
    """kill -9 of keepalived on lb1 (no Restart= in its unit): lbwatch starts it again with
    systemctl and lb1 is MASTER of VI_1 again."""
    lb1 = syslab.sysnodes["lb1"]
    old = lb1.main_pid("keepalived")
    killed = time.time()
    assert lb1.kill("keepalived")
    wait_for(lambda: lb1.main_pid("keepalived") not in (0, old), 20, what="a new keepalived")
    back = time.time()
    syslab.wait_healthy(60)
    assert "keepalived" in lb1.journal("-u", "lbwatch", "--since", f"@{int(killed)}")
    print(f"keepalived kill -9: started again by lbwatch {back - killed:.2f} s later")


# systemd refuses a sixth start of a unit within 10 s (DefaultStartLimitBurst=5,
# DefaultStartLimitIntervalSec=10s): the operator's restarts are paced under it.
RESTART_PACE = 2.5


def restart_haproxy(syslab: SysLab, times: int) -> Probe:
    """`systemctl restart haproxy` on lb1 ``times`` times, RESTART_PACE apart and each once lb1
    serves again: what the client saw."""
    lb1 = syslab.sysnodes["lb1"]
    lb1.systemctl("reset-failed", "haproxy")  # earlier starts (the kill -9 test) not counted
    with probing(syslab, 120) as probe:
        for _ in range(times):
            began = time.monotonic()
            old = lb1.main_pid("haproxy")
            lb1.systemctl("restart", "haproxy")
            wait_for(lambda o=old: lb1.main_pid("haproxy") not in (0, o), 20, what="new master")
            wait_for(lambda: syslab.client_get(0.5) == (200, "lb1"), 30, what="lb1 serving")
            wait_for(lambda b=began: time.monotonic() - b >= RESTART_PACE, 5, what="the pace")
    return probe


def test_operator_restart_of_haproxy_costs_what_it_costs_without_lbwatch(
    syslab: SysLab,
) -> None:
    """An operator's `systemctl restart haproxy` with lbwatch running (on_haproxy_restart
    "ensure", the default): keepalived is left alone, so the VIP stays on lb1 and the client
    loses no more GETs than to the same restarts with lbwatch stopped."""
    lb1 = syslab.sysnodes["lb1"]
    keepalived = lb1.main_pid("keepalived")
    with_lbwatch = restart_haproxy(syslab, 3)
    assert lb1.main_pid("keepalived") == keepalived
    assert with_lbwatch.served_by == {"lb1"}, with_lbwatch.changes
    lb1.systemctl("stop", "lbwatch")
    try:
        without = restart_haproxy(syslab, 3)
    finally:
        lb1.systemctl("start", "lbwatch")
    syslab.wait_healthy(30)
    cost = {"with": sum(with_lbwatch.outages()), "without": sum(without.outages())}
    print(
        f"3 x systemctl restart haproxy: without a 200 {cost['with']:.3f} s with lbwatch, "
        f"{cost['without']:.3f} s without; GETs failed {with_lbwatch.failed} of "
        f"{with_lbwatch.n} with, {without.failed} of {without.n} without"
    )
    # Time without an answer is the cost (a GET refused during the restart fails in a
    # millisecond, one sent while the VIP moves waits out its timeout, so failed GETs count
    # the probe's pace more than the outage). A VIP that moved would cost ~0.8 s a restart.
    assert cost["with"] <= 1.5 * cost["without"] + 0.1, cost


@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_agent_death_does_not_move_the_vip(syslab: SysLab, how: str) -> None:
    """lbwatch killed (-9), or frozen (SIGSTOP: the watchdog ends it): systemd starts it again,
    and it takes over the running daemons without moving any VIP or restarting anything."""
    lb1 = syslab.sysnodes["lb1"]
    pid, restarts = agent(lb1), nrestarts(lb1)
    daemons = (lb1.main_pid("haproxy"), lb1.main_pid("keepalived"))
    with probing(syslab, 90) as probe:
        hit = time.time()
        lb1.systemctl("kill", "--signal", "SIGKILL" if how == "kill9" else "SIGSTOP", "lbwatch")
        wait_for(lambda: nrestarts(lb1) > restarts, 40, interval=0.1, what="lbwatch restarted")
        back = time.time()
        wait_for(lambda: lb1.prop("lbwatch", "ActiveState") == "active", 30, what="READY")
        ready = time.time()
        syslab.wait_healthy(30)
    assert agent(lb1) != pid
    assert (lb1.main_pid("haproxy"), lb1.main_pid("keepalived")) == daemons
    assert probe.served_by == {"lb1"} and probe.failed == 0, probe.changes
    if how == "sigstop":
        said = lb1.journal("-u", "lbwatch", "--since", f"@{int(hit)}", "-o", "cat")
        assert "Watchdog timeout" in said, said
    print(
        f"agent {how}: restarted {back - hit:.2f} s, READY {ready - hit:.2f} s later; "
        f"{probe.n} GETs, none failed"
    )


def write_config(node: SysNode, text: str) -> None:
    node.put("/etc/lbwatch/lbwatch.toml", text)


def test_bad_config_is_not_restarted_and_says_why(syslab: SysLab) -> None:
    """A broken lbwatch.toml and `systemctl restart lbwatch`: the unit stays failed (exit 2,
    RestartPreventExitStatus=), the daemons and VIPs stay, one line at priority err says why;
    fixed and restarted, it runs again."""
    lb2 = syslab.sysnodes["lb2"]
    good = lb2.read("/etc/lbwatch/lbwatch.toml")
    daemons = (lb2.main_pid("haproxy"), lb2.main_pid("keepalived"))
    since = int(time.time())
    write_config(lb2, good.replace("scan_interval = 1.0", "scan_interval = -3"))
    try:
        lb2.systemctl("restart", "lbwatch", check=False)
        wait_for(lambda: lb2.prop("lbwatch", "ActiveState") == "failed", 20, what="failed")
        assert lb2.prop("lbwatch", "ExecMainStatus") == "2"
        restarts = nrestarts(lb2)
        time.sleep(3)  # RestartSec=2s has passed: no restart may follow
        assert nrestarts(lb2) == restarts and lb2.prop("lbwatch", "ActiveState") == "failed"
        errs = lb2.journal("-u", "lbwatch", "-p", "err", "--since", f"@{since}", "-o", "cat")
        ours = [ln for ln in errs.splitlines() if "scan_interval" in ln]
        assert len(ours) == 1, errs
        assert "agent.scan_interval" in ours[0] or "scan_interval" in ours[0]
        assert (lb2.main_pid("haproxy"), lb2.main_pid("keepalived")) == daemons
        assert syslab.holder(VIP2) == "lb2"
    finally:
        write_config(lb2, good)
        lb2.systemctl("restart", "lbwatch")
    syslab.wait_healthy(30)


def test_reload_good_and_bad(syslab: SysLab) -> None:
    """`systemctl reload lbwatch` (SIGHUP): a good edit is taken whole, [agent] log_level
    included; a broken file is reported at err and the running config kept; the agent's PID
    never changes."""
    lb2 = syslab.sysnodes["lb2"]
    good = lb2.read("/etc/lbwatch/lbwatch.toml")
    pid = agent(lb2)
    since = int(time.time())
    extra = "192.0.2.102"
    edited = good.replace('log_level = "info"', 'log_level = "warning"').replace(
        f'vips = ["{VIP2}"]', f'vips = ["{VIP2}", "{extra}"]'
    )
    assert edited.count(extra) == 1 and 'log_level = "warning"' in edited

    def said(priority: str = "info") -> str:
        return lb2.journal("-u", "lbwatch", "-p", priority, "--since", f"@{since}", "-o", "cat")

    try:
        write_config(lb2, edited)
        lb2.systemctl("reload", "lbwatch")
        wait_for(lambda: extra in lb2.doc().vrrp["VI_2"].vips, 20, what="the edit taken")
        # Taken at "warning": the reload's own info line is not written.
        assert "configuration reloaded" not in said(), said()
        write_config(lb2, good.replace("[agent]", "[agent]\nno_such_key = 1"))
        lb2.systemctl("reload", "lbwatch")
        wait_for(lambda: "no_such_key" in said("err"), 20, what="the bad reload said at err")
        assert lb2.prop("lbwatch", "ActiveState") == "active"
        assert extra in lb2.doc().vrrp["VI_2"].vips  # the running config kept
    finally:
        write_config(lb2, good)
        lb2.systemctl("reload", "lbwatch")
    wait_for(lambda: "configuration reloaded" in said(), 20, what="the good file back, at info")
    assert extra not in lb2.doc().vrrp["VI_2"].vips
    assert agent(lb2) == pid
    syslab.wait_healthy(30)


def test_stop_leaves_the_daemons(syslab: SysLab) -> None:
    """`systemctl stop lbwatch`: haproxy, keepalived and the VIPs stay as they are."""
    lb1 = syslab.sysnodes["lb1"]
    daemons = (lb1.main_pid("haproxy"), lb1.main_pid("keepalived"))
    with probing(syslab) as probe:
        lb1.systemctl("stop", "lbwatch")
        assert lb1.prop("lbwatch", "ActiveState") == "inactive"
        assert (lb1.main_pid("haproxy"), lb1.main_pid("keepalived")) == daemons
        assert syslab.holder(VIP) == "lb1"
        lb1.systemctl("start", "lbwatch")
    assert probe.served_by == {"lb1"} and probe.failed == 0, probe.changes
    assert (lb1.main_pid("haproxy"), lb1.main_pid("keepalived")) == daemons
    syslab.wait_healthy(30)


def test_config_sync_reloads_the_peer_through_systemctl(syslab: SysLab) -> None:
    """An edit of haproxy.cfg on lb1 reaches lb2 and is served there after `systemctl reload
    haproxy` (same master, new workers), on both nodes."""
    lb1, lb2 = syslab.sysnodes["lb1"], syslab.sysnodes["lb2"]
    masters_before = {n.name: n.main_pid("haproxy") for n in (lb1, lb2)}
    since = int(time.time())
    cfg = lb1.read("/etc/haproxy/haproxy.cfg").replace('X-Config "v1"', 'X-Config "v2"')
    assert 'X-Config "v2"' in cfg
    start = time.time()
    lb1.write("/etc/haproxy/haproxy.cfg", cfg)
    for addr in ("192.0.2.11", "192.0.2.12"):
        wait_for(
            lambda a=addr: syslab.client_fetch(a)["config"] == "v2", 30, what=f"{addr} serving v2"
        )
    took = time.time() - start
    for node in (lb1, lb2):
        assert node.main_pid("haproxy") == masters_before[node.name]
        said = node.journal("-u", "haproxy", "--since", f"@{since}", "-o", "cat")
        assert "Reloaded haproxy.service" in said or "Reloading" in said, said
    assert lb2.read("/etc/haproxy/haproxy.cfg") == cfg
    print(f"config sync: lb1's edit served by both nodes {took:.2f} s later")


def test_vrrp_transitions_are_mailed_through_the_fifo(syslab: SysLab) -> None:
    """keepalived's notify_fifo (no notify script is configured) -> lbwatch -> mail, through the
    SMTP server that wants the password LoadCredential= gave, and the webhook: the MASTER
    transitions of the faults above, lb2 taking VI_1 among them."""
    assert syslab.maildir is not None
    conf = syslab.sysnodes["lb1"].read("/etc/keepalived/keepalived.conf")
    assert "notify_fifo" in conf and "notify " not in conf.replace("notify_fifo", "")
    wanted = "lb2: VI_1 BACKUP -> MASTER"
    wait_for(lambda: any(wanted in m for m in mails(syslab.maildir)), 20, what="the mail")
    hooks = [json.loads(p.read_text()) for p in sorted(syslab.hookdir.glob("*.json"))]
    assert any(wanted in h.get("text", "") for h in hooks), hooks


def test_metrics_listen_and_textfile(syslab: SysLab) -> None:
    """Both metrics outputs of the example work under the unit's sandbox."""
    for node in syslab.sysnodes.values():
        said: list[str] = []

        def scraped(n: SysNode = node, out: list[str] = said) -> bool:
            out[:] = [n.scrape()]
            return "lbwatch_agent_up 1.0" in out[0]

        # (Once a scrape here answered with nothing at all: waited for, and said if it stays.)
        wait_for(scraped, 20, what=f"{node.name}'s /metrics")
        # The textfile is rewritten at least once a minute; it must be there and fresh.
        path = node.root / TEXTFILE.lstrip("/")
        wait_for(lambda p=path: p.exists() and time.time() - p.stat().st_mtime < 70, 70,
                 what=f"{node.name}'s {TEXTFILE}")  # fmt: skip
        assert "lbwatch_agent_up 1.0" in path.read_text()


DENIALS = re.compile(
    r"EPERM|EACCES|EROFS|Errno (1|13|30)\]|Permission denied|Operation not permitted|"
    r"Read-only file system|Traceback|audit"
)


def test_journal_has_no_sandbox_denial(syslab: SysLab) -> None:
    """Over the whole run so far (every fault above included), lbwatch's journal says no
    EPERM, EACCES, EROFS and no traceback: the sandbox lets it do all the example asks."""
    for node in syslab.sysnodes.values():
        said = node.journal("-u", "lbwatch", "-o", "cat")
        bad = [ln for ln in said.splitlines() if DENIALS.search(ln)]
        assert not bad, f"{node.name}:\n" + "\n".join(bad)
        doctor = node.cli("doctor", check=False)
        assert "ERROR" not in doctor, doctor


def test_package_upgrade_under_a_running_service(syslab: SysLab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """apt installs N+1 over N while lbwatch runs: the agent is restarted on the new files
    (postinst's try-restart), haproxy, keepalived and the VIPs are left alone."""
    lb1 = syslab.sysnodes["lb1"]
    old_version = lb1.run("dpkg-query", "-W", "-f", "${Version}", "lbwatch")
    newer = next_version(syslab, tmp_path, old_version)
    pid = agent(lb1)
    daemons = (lb1.main_pid("haproxy"), lb1.main_pid("keepalived"))
    with probing(syslab) as probe:
        syslab.apt_install(lb1, newer)
        wait_for(lambda: lb1.prop("lbwatch", "ActiveState") == "active", 30, what="active")
        syslab.wait_healthy(30)
    assert lb1.run("dpkg-query", "-W", "-f", "${Version}", "lbwatch") == old_version + "+lab1"
    assert agent(lb1) != pid
    assert (lb1.main_pid("haproxy"), lb1.main_pid("keepalived")) == daemons
    assert probe.served_by == {"lb1"} and probe.failed == 0, probe.changes


def next_version(syslab: SysLab, tmp_path, version: str):  # type: ignore[no-untyped-def]
    """The package of this checkout as version VERSION+lab1 (N+1)."""
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-R", str(syslab.deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(
        re.sub(r"(?m)^Version: .*$", f"Version: {version}+lab1", control.read_text())
    )
    out = tmp_path / f"lbwatch_{version}+lab1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_package_removal_under_a_running_service(syslab: SysLab) -> None:
    """apt removes lbwatch while it runs: prerm stops it, haproxy, keepalived and the VIPs
    stay; purge takes its state."""
    lb2 = syslab.sysnodes["lb2"]
    daemons = (lb2.main_pid("haproxy"), lb2.main_pid("keepalived"))
    lb2.run("apt-get", "remove", "-y", "-q", "lbwatch", timeout=300)
    assert lb2.prop("lbwatch", "LoadState") == "not-found"
    # Nothing of the package runs on: neither the agent nor lb1's sync receivers here.
    left = [p.cmdline() for p in lb2.procs() if p.cmdline()[:1] == ["/opt/lbwatch/bin/python"]]
    assert not left, left
    assert (lb2.main_pid("haproxy"), lb2.main_pid("keepalived")) == daemons
    assert syslab.holder(VIP2) == "lb2" and syslab.holder(VIP) == "lb1"
    lb2.run("apt-get", "purge", "-y", "-q", "lbwatch", timeout=300)
    assert not (lb2.root / "var/lib/lbwatch").exists()
