"""The demo on nodes as users run them: ``python -m tests.lab.sysdemo`` (as root; ``make
demo-systemd`` installs what it needs and builds the package).

Two nodes booted by systemd, Debian's haproxy and keepalived units, lbwatch installed from its
.deb with apt and configured from the example config, then the story of ``make demo``: the VIP
moving when haproxy is killed on the MASTER and coming back, an operator's `systemctl restart
haproxy`, a config edit on lb1 served by lb2, mail through keepalived's FIFO, and what journald
and `lbwatch status` say.
"""

from __future__ import annotations

import os
import sys
import time

from tests.e2e.test_lab_notify import subjects
from tests.lab.netlab import LB_ADDR
from tests.lab.syslab import VIP, VIP2, SysLab
from tests.systemd.conftest import fresh_deb, probing
from tests.util import wait_for


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("the lab needs root: run `sudo make demo-systemd`", file=sys.stderr)
        return 2
    deb = fresh_deb()
    say(f"booting lb1 and lb2 with systemd (containers on this host's root); package {deb.name}")
    began = time.monotonic()
    with SysLab(deb) as lab:
        lb1, lb2 = lab.sysnodes["lb1"], lab.sysnodes["lb2"]
        print(f"both nodes at multi-user.target {time.monotonic() - began:.1f} s after the start")
        lab.start_sinks()
        say("on each node: apt install ./lbwatch.deb, node values in /etc/lbwatch/lbwatch.toml,")
        print("   the SMTP password as a credential, lbwatch sync setup, systemctl enable --now")
        lab.install()
        lab.wait_healthy(60)
        print(f"VI_1 ({VIP}) on {lab.holder(VIP)}, VI_2 ({VIP2}) on {lab.holder(VIP2)}")
        print(lb1.systemctl("status", "lbwatch", "--lines=0", check=False))
        print(lb1.cli("status"))

        say("kill -9 haproxy (master and workers) on lb1, the MASTER of VI_1")
        with probing(lab) as probe:
            killed = time.time()
            lb1.kill("haproxy")
            wait_for(lambda: lab.holder(VIP) == "lb2", 10, what="VI_1 on lb2")
            print(f"VI_1 on lb2 {time.time() - killed:.2f} s after the kill")
            lab.wait_healthy(60)
            print(f"lb1 healed and holds VI_1 again {time.time() - killed:.2f} s after the kill")
        print(
            f"client: {probe.failed} of {probe.n} GETs failed; served by {sorted(probe.served_by)}"
        )
        print(
            lb1.journal(
                "-u",
                "lbwatch",
                "-u",
                "haproxy",
                "--since",
                f"@{int(killed)}",
                "-o",
                "short-precise",
            )
        )

        say("an operator runs `systemctl restart haproxy` on lb1")
        keepalived = lb1.main_pid("keepalived")
        with probing(lab) as probe:
            lb1.systemctl("restart", "haproxy")
            lab.wait_healthy(60)
        moved = "stayed on lb1" if probe.served_by == {"lb1"} else "moved and came back"
        kept = "untouched" if lb1.main_pid("keepalived") == keepalived else "restarted"
        print(
            f"client: {probe.failed} of {probe.n} GETs failed; the VIP {moved}; keepalived {kept}"
        )

        say("config sync: lb1's haproxy.cfg edited (X-Config v2)")
        cfg = lb1.read("/etc/haproxy/haproxy.cfg").replace('X-Config "v1"', 'X-Config "v2"')
        saved = time.time()
        lb1.write("/etc/haproxy/haproxy.cfg", cfg)
        wait_for(lambda: lab.client_fetch(LB_ADDR["lb2"])["config"] == "v2", 30, what="lb2 v2")
        print(
            f"lb2 serves v2 {time.time() - saved:.2f} s after the save, after `systemctl reload"
            " haproxy` there:"
        )
        print(lb2.journal("-u", "haproxy", "--since", f"@{int(saved)}", "-o", "short-precise"))

        say("mail received by the SMTP server on the backend host (keepalived's FIFO -> lbwatch)")
        assert lab.maildir is not None
        for subject in subjects(lab.maildir):
            print(f"  {subject}")
        say("lbwatch's journal on lb1 at warning and above")
        print(lb1.journal("-u", "lbwatch", "-p", "warning", "-o", "short-precise"))
        say("tearing down")
    print(f"done in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
