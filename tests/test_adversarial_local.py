"""What an unprivileged local user can do to a running agent (the threat model's "local user"
line): read its status and scrape its metrics, and nothing else. The agent runs as root, as the
unit runs it, with config sync on, the notify FIFO and a metrics listener; a user (``nobody``)
then tries each of lbwatch's files a forged write could steer: the FIFO keepalived's
transitions come through, the notification spool, the pause flag, staging, the receivers'
limits, the status file the CLI reads."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, needs
from tests.unitproc import Unit
from tests.util import wait_for

PROBE = """
import json, os, sys
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        if name == "fifo":
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        elif os.path.isdir(path):
            with open(os.path.join(path, "forged"), "wb") as f:
                f.write(b"x")
        else:
            with open(path, "ab") as f:
                f.write(b"x")
        out[name] = "written"
    except OSError as exc:
        out[name] = exc.strerror
out["status readable"] = json.load(open(sys.argv[2]))["agent"]["node"]
print(json.dumps(out))
"""


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory other users may walk into (pytest's own tmp is root's alone, which would
    refuse everything for the wrong reason)."""
    where = Path(tempfile.mkdtemp(prefix="lbwatch-local-", dir="/var/tmp"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where)


@needs("setpriv")
@pytest.mark.skipif(os.geteuid() != 0, reason="the agent runs as root, the user as nobody")
def test_a_local_user_reads_and_scrapes_and_writes_nothing(root: Path) -> None:
    """Positive control first: nobody reads status.json and scrapes /metrics. Then each file
    and directory of lbwatch's that steers it refuses nobody's write: the notify FIFO, the
    spool, the state directory (the pause flag), staging, the receivers' limits, status.json."""
    unit = Unit(root)
    port = free_port()
    unit.write_config()
    unit.config.write_text(
        unit.config.read_text()
        + f"""
[sync]
enabled = true
config = "{root / "haproxy.cfg"}"

[metrics]
listen = "127.0.0.1:{port}"
"""
    )
    (root / "haproxy.cfg").write_text("global\n")
    unit.start()
    try:
        unit.wait_started(30)
        run, state = root / "run", root / "state"
        wait_for((state / "incoming").is_dir, 10, what="staging")
        targets = {
            "fifo": run / "keepalived.fifo",
            "spool": state / "spool",
            "state (pause flag)": state,
            "staging": state / "incoming",
            "status.json": run / "status.json",
        }
        limits = state / "incoming" / ".receiver"
        if limits.exists():
            targets["receivers' limits"] = limits
        for path in targets.values():
            assert path.exists(), path
        # Not urllib.request.urlopen: its opener, cached for the whole test run, would keep the
        # proxy settings of the moment (tests/test_health.py sets its own later).
        scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        scrape.request("GET", "/metrics")
        body = scrape.getresponse().read()
        scrape.close()
        assert b"lbwatch_agent_up" in body  # a local user may scrape
        probe = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                # The system's Python: a pyenv one may be readable by root alone.
                shutil.which("python3", path="/usr/bin:/bin") or sys.executable,
                "-c",
                PROBE,
                json.dumps({k: str(v) for k, v in targets.items()}),
                str(run / "status.json"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
        )
        assert probe.returncode == 0, probe.stderr
        said = json.loads(probe.stdout)
        assert said.pop("status readable")  # the status is for anyone to read
        assert said == dict.fromkeys(targets, "Permission denied"), said
    finally:
        unit.close()
