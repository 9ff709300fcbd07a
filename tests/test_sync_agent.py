"""Config sync in the real agent (tests/test_agent.py's rig: real haproxy, real CLI), without
the lab: versions "from peers" are dropped into staging as rsync would leave them, and the peers
configured are closed ports on loopback, so no push ever lands."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import psutil
import pytest

from lbwatch.procs import read_pidfile
from lbwatch.statusdoc import SyncReport, SyncView
from lbwatch.sync.versions import Version
from tests.conftest import free_port, needs
from tests.test_agent import Rig
from tests.util import wait_for

pytestmark = [needs("haproxy", "start-stop-daemon"), pytest.mark.usefixtures("subreaper")]


def start_syncing(rig: Rig, control_dir: Path, extra: str = "") -> None:
    """The rig's agent with [sync] on, reloading its haproxy with SIGUSR2 to the master."""
    q = json.dumps
    rig.write_config(
        extra=f"""
[sync]
enabled = true
config = {q(str(rig.cfg_file))}
control_dir = {q(str(control_dir))}
ssh_key = {q(str(rig.tmp / "no-such-key"))}
known_hosts = {q(str(rig.tmp / "known_hosts"))}
{extra}"""
    )
    reload = f"reload = ['sh', '-c', 'kill -USR2 \"$(cat {rig.ha_pid})\"']"
    text = rig.config.read_text().replace(
        "command_timeout = 5\n\n[haproxy.health]",
        f"command_timeout = 5\n{reload}\n\n[haproxy.health]",
        1,
    )
    rig.config.write_text(text)
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    wait_for(
        lambda: (sync := sync_part(rig)) is not None and sync.current is not None,
        15,
        what="the start-up sync job",
    )


def sync_part(rig: Rig) -> SyncView | None:
    """The status document's sync part; None until the agent has written one."""
    doc = rig.status()
    return doc.sync if doc is not None else None


def local_result(rig: Rig) -> str | None:
    """What the last local sync job came to; None before there is one."""
    sync = sync_part(rig)
    return sync.local.result if sync is not None and sync.local is not None else None


def workers(rig: Rig) -> set[int]:
    master = read_pidfile(rig.ha_pid)
    assert master is not None
    return {c.pid for c in psutil.Process(master).children()}


def status(rig: Rig, *more: str) -> tuple[int, str]:
    out = rig.cli("sync", "--status", *more)
    return out.returncode, out.stdout


def stage(rig: Rig, content: bytes, origin: str, counter: int) -> Version:
    """A version as a peer's push leaves it: written under a temporary name, then renamed."""
    v = Version("haproxy.cfg", origin, counter, time.time_ns(), hashlib.sha256(content).hexdigest())
    staging = rig.tmp / "state" / "incoming"
    tmp = staging / f".{v.staged_name()}.Xy12Zw"
    tmp.write_bytes(content)
    tmp.rename(staging / v.staged_name())
    return v


def test_sync_status_follows_the_live_file(rig: Rig, control_dir: Path) -> None:
    """No peers: `sync --status` exits 0 while the live file is fine, 1 once an edit is invalid
    or the file is deleted, 0 again after a valid edit; `sync --now` on unchanged content
    reloads nothing and says so."""
    start_syncing(rig, control_dir)
    assert status(rig)[0] == 0
    before = workers(rig)
    out = rig.cli("sync", "--now", "--wait", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    said = "pushed on request (sync --now), nothing reloaded: same content"
    assert f"local     applied: {said}" in out.stdout
    assert f"<6>{rig.cfg_file}: {said}; pushing to peers" in rig.text()
    assert "valid and reloaded" not in rig.text()
    assert workers(rig) == before  # really nothing reloaded

    good = rig.cfg_file.read_text()
    rig.cfg_file.write_text(good.replace("mode http", "mode htp", 1))
    wait_for(lambda: local_result(rig) == "invalid", 10, what="invalid edit")
    code, text = status(rig)
    assert code == 1 and "INVALID" in text
    code, text = status(rig, "--json")
    doc = SyncReport.model_validate_json(text)
    assert code == 1 and doc.ok is False and doc.exit == 1
    assert [p.split(":")[0] for p in doc.problems] == [f"{rig.cfg_file} INVALID"]

    rig.cfg_file.unlink()
    wait_for(lambda: local_result(rig) == "deleted", 10, what="deletion seen")
    code, text = status(rig)
    assert code == 1 and "DELETED" in text

    rig.cfg_file.write_text(good + "\n# fixed\n")
    wait_for(lambda: local_result(rig) == "applied", 10, what="valid edit")
    sync = sync_part(rig)
    assert sync is not None and sync.local is not None
    assert sync.local.message.startswith("valid and reloaded (new worker(s) ")
    assert status(rig)[0] == 0


def test_received_versions_are_delivered_on_and_staging_is_swept(
    rig: Rig, control_dir: Path
) -> None:
    """Two peers that cannot be reached: not in sync while the version is this node's own, and
    still not once a version from lb2 is installed here: every node delivers what it holds, so
    the links now work on lb2's version and `sync --status` says they do not hold it yet.
    Litter in staging goes after the grace period; the status file and the receivers' limits
    stay, and those limits are written again when removed."""
    closed = free_port()
    peers = ", ".join(
        f'{{ name = "{n}", host = "127.0.0.1", port = {closed}, user = "nobody" }}'
        for n in ("lb2", "lb3")
    )
    start_syncing(rig, control_dir, f"peers = [{peers}]\nstaging_grace = 0.5\nretry_max = 1")
    wait_for(
        lambda: (sync := sync_part(rig)) is not None and sync.peers["lb2"].state == "unreachable",
        20,
        what="unreachable",
    )
    code, text = status(rig)
    assert code == 1 and "UNREACHABLE" in text

    content = rig.cfg_file.read_bytes() + b"\n# edited on lb2\n"
    v2 = stage(rig, content, "lb2", 7)

    def delivering(version: Version) -> bool:
        sync = sync_part(rig)
        return (
            sync is not None
            and sync.current is not None
            and all(p.target == sync.current for p in sync.peers.values())
            and (sync.current.origin, sync.current.counter) == (version.origin, version.counter)
        )

    wait_for(lambda: delivering(v2), 20, what="the links delivering lb2's version")
    assert rig.cfg_file.read_bytes() == content
    code, text = status(rig, "--json")
    doc = SyncReport.model_validate_json(text)
    assert code == 1 and doc.ok is False
    assert {p.sync for p in doc.peers.values()} == {"not-in-sync"}
    sync = sync_part(rig)
    assert sync is not None and sync.received is not None
    received = sync.received.message
    assert received.startswith("installed and reloaded (new worker(s) "), received
    assert "from lb2" in status(rig)[1]

    staging = rig.tmp / "state" / "incoming"
    litter = [staging / "junk", staging / ".haproxy.cfg.Ab12Cd"]
    for path in litter:
        path.write_text("left behind")
    wait_for(lambda: not any(p.exists() for p in litter), 10, what="litter removed")
    assert (staging / "status.json").exists()
    assert "staging: removed junk: unchanged for over 0.5 s" in rig.text()
    # What the receivers may take stays, and is written again if it goes.
    said = staging / ".receiver" / "limits.json"
    assert json.loads(said.read_bytes())["unit"] == "haproxy.cfg"
    said.unlink()
    wait_for(said.exists, 10, what="the receivers' limits written again")
