"""The shipped systemd unit: `systemd-analyze verify` accepts it without a single complaint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "lbwatch.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def verify(text: str, tmp_path: Path) -> str:
    # verify checks that ExecStart exists: point it at this checkout's lbwatch.
    lbwatch = Path(sys.executable).with_name("lbwatch")
    unit = tmp_path / "lbwatch.service"
    unit.write_text(text.replace("/usr/local/bin/lbwatch", str(lbwatch)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if str(unit) in line)


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """No warning about any line of the unit."""
    assert verify(UNIT.read_text(), tmp_path) == ""


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt Type= is reported."""
    bad = UNIT.read_text().replace("Type=notify\n", "Type=notifyy\n")
    assert "Failed to parse service type" in verify(bad, tmp_path)


def test_unit_has_what_the_agent_relies_on() -> None:
    """Type=notify with a watchdog, SIGHUP reload, restart always, state directories."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=10s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "RuntimeDirectory=lbwatch",
        "StateDirectory=lbwatch",
    ):
        assert f"\n{line}\n" in text
