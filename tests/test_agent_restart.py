"""An operator's `systemctl restart haproxy` under a real agent: real haproxy on loopback, the
stand-in keepalived, and a stand-in systemctl (tests/fakesystemctl.py) that starts and stops
haproxy for real and shows its unit as systemd 252 does. The agent runs with haproxy's default
commands (systemctl's) in a mount namespace of its own where /run/systemd/system exists, so
that it takes systemd to be running and asks it about each exit of haproxy's master.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests import fakesystemctl
from tests.conftest import needs
from tests.test_agent import Rig
from tests.util import wait_for

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")
pytestmark = [
    needs("haproxy", "start-stop-daemon", "unshare", "mount"),
    root_only,
    pytest.mark.usefixtures("subreaper"),
]

# /run/systemd/system in the agent's own mount namespace: sd_booted(3) says yes there.
SYSTEMD_HOST = (
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    "{ mount -t tmpfs tmpfs /run/systemd || mount -t tmpfs tmpfs /run; } 2>/dev/null && "
    'mkdir -p /run/systemd/system && exec "$@"',
    "sh",
)  # fmt: skip
GRACE = 3.0


@pytest.fixture
def unit_rig(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """Both services up under an agent that manages haproxy through its (faked) unit."""
    argv = ["haproxy", "-W", "-D", "-f", str(rig.cfg_file), "-p", str(rig.ha_pid)]
    bin_dir = fakesystemctl.install(rig.tmp / "systemd", argv, rig.ha_pid)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    rig.write_config(ha_commands="", policy=f"restart_grace = {GRACE}")
    rig.start(prefix=SYSTEMD_HOST)
    wait_for(rig.both_up, 15, what="both services up")
    yield rig


def systemctl(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's systemctl (the stand-in), outside the agent's namespace."""
    return subprocess.run(
        [sys.executable, fakesystemctl.__file__, str(rig.tmp / "systemd"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_operator_restart_keeps_keepalived(unit_rig: Rig) -> None:
    """`systemctl restart haproxy`: the agent asks systemd, hears of the restart job and keeps
    keepalived running while the new master comes up and passes its probe; nothing is stopped
    or started by the agent."""
    rig = unit_rig
    ka, old = rig.pid("fakeka"), rig.pid("haproxy")
    assert ka and old
    before = len(rig.text())
    out = systemctl(rig, "restart", "haproxy")
    assert out.returncode == 0, out.stderr
    new = rig.pid("haproxy")
    assert new not in (None, old)
    wait_for(lambda: f"haproxy is back: master {new}" in rig.text(), 10, what="back")
    text = rig.text()[before:]
    said = f"haproxy master {old} exited (pidfd); asking systemd whether it is restarting haproxy"
    assert said in text
    assert "ask haproxy done in " in text and " (job 7 " in text
    assert "systemd is restarting haproxy: keepalived keeps running for up to 3 s" in text
    assert "exited; keepalived kept running" in text
    lines = text.splitlines()
    assert not [line for line in lines if "; stopping keepalived" in line], lines
    assert not [line for line in lines if "; starting haproxy (attempt" in line], lines
    assert rig.pid("fakeka") == ka
    actions = [a.action for a in rig.doc().recent_actions]
    assert actions[-1] == "ask haproxy" and "stop keepalived" not in actions


def test_restart_whose_haproxy_fails_its_probe_stops_keepalived_after_the_grace(
    unit_rig: Rig,
) -> None:
    """The restarted haproxy runs but fails its probe (its monitor frontend went): keepalived
    keeps running for restart_grace from the exit, then is stopped, saying why; a restart with
    the probe passing again brings keepalived back."""
    rig = unit_rig
    old = rig.pid("haproxy")
    good = rig.cfg_file.read_text()
    rig.cfg_file.write_text(good.split("frontend monitor")[0])
    before = len(rig.text())
    assert systemctl(rig, "restart", "haproxy").returncode == 0
    restarted = time.monotonic()
    why = (
        f"haproxy master {old} exited (pidfd) and systemd's restart of haproxy brought no "
        f"healthy haproxy within restart_grace ({GRACE:g} s); stopping keepalived so the VIP moves"
    )
    wait_for(lambda: why in rig.text(), GRACE + 10, what="the stop after the grace")
    # The exit came before the restart returned (its 0.3 s of start-up after it).
    assert time.monotonic() - restarted >= GRACE - 0.5
    assert "health check failing" in rig.text()[before:]
    wait_for(lambda: rig.pid("fakeka") is None, 10, what="keepalived stopped")
    rig.cfg_file.write_text(good)
    assert systemctl(rig, "restart", "haproxy").returncode == 0
    wait_for(rig.both_up, 20, what="both up again")


def test_crash_stops_keepalived_at_once(unit_rig: Rig) -> None:
    """A crash, which Restart= would bring back: keepalived is stopped as soon as systemd has
    answered, in the words of any crash, and everything comes back."""
    rig = unit_rig
    ka, old = rig.pid("fakeka"), rig.pid("haproxy")
    assert systemctl(rig, "crash").returncode == 0
    said = f"haproxy master {old} exited (pidfd); stopping keepalived so the VIP moves"
    wait_for(lambda: said in rig.text(), 10, what="keepalived stopped")
    assert "ask haproxy done in " in rig.text()
    assert "systemd is restarting" not in rig.text()
    wait_for(
        lambda: rig.pid("fakeka") not in (None, ka) and rig.both_up(),
        20,
        what="keepalived back with haproxy",
    )


def test_stop_stops_keepalived(unit_rig: Rig) -> None:
    """`systemctl stop haproxy`: keepalived is stopped, as before."""
    rig = unit_rig
    old = rig.pid("haproxy")
    assert systemctl(rig, "stop", "haproxy").returncode == 0
    said = f"haproxy master {old} exited (pidfd); stopping keepalived so the VIP moves"
    wait_for(lambda: said in rig.text(), 10, what="keepalived stopped")
