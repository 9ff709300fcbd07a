"""The sync jobs against a real haproxy in master-worker mode: the checker, the reload and its
confirmation by new workers, roll-back, start-up reconcile and newest-staged-wins."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from lbwatch.config import HaproxyCfg
from lbwatch.events import Outcome
from lbwatch.procs import identify
from lbwatch.services import reload_haproxy
from lbwatch.sync import apply, peerstatus
from lbwatch.sync.apply import Context
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.ledger import Ledger
from lbwatch.sync.peerstatus import STATUS
from lbwatch.sync.receive import ApplySettings
from lbwatch.sync.versions import Version
from tests.conftest import fill, free_port, haproxy_config, needs, reap, start_haproxy
from tests.fakes import Expectations
from tests.test_procs import accepts
from tests.util import confined, unconfined, wait_for

pytestmark = [needs("haproxy"), pytest.mark.usefixtures("subreaper")]
CHECK = ["haproxy", "-c", "-f", "{file}"]


@dataclass
class Node:
    ctx: Context
    cfg: HaproxyCfg
    port: int
    expect: Expectations

    @property
    def live(self) -> Path:
        return self.ctx.files.config

    def workers(self) -> frozenset[int]:
        return identify(self.cfg).children

    def serves(self) -> bool:
        return accepts(self.port)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    etc, staging = tmp_path / "etc", tmp_path / "staging"
    etc.mkdir()
    staging.mkdir()
    port, monitor = free_port(), free_port()
    live = haproxy_config(etc / "haproxy.cfg", port, monitor)
    pidfile = tmp_path / "haproxy.pid"
    master = start_haproxy(live, pidfile, tmp_path / "haproxy.log")
    cfg = HaproxyCfg(
        pidfile=pidfile,
        find_without_pidfile=False,
        reload=["kill", "-USR2", str(master.pid)],
    )
    wait_for(lambda: identify(cfg).children, 5)
    wait_for(lambda: accepts(monitor), 5)
    expect = Expectations()
    ctx = Context(
        "lb1",
        FileSet(live),
        staging,
        Ledger(tmp_path / "state"),
        ApplySettings(CHECK, functools.partial(reload_haproxy, cfg, 10, 3), 3, 30, confined()),
        expect,
    )
    yield Node(ctx, cfg, port, expect)
    for pid in [master.pid, *identify(cfg).children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    master.wait(5)
    reap()


def test_first_start_adopts_the_live_file(node: Node) -> None:
    """Nothing recorded yet: the live file becomes the current version, with the file's mtime
    as its edit time, and the peer-readable status says so."""
    out = apply.reconcile(node.ctx)
    assert out.result == "adopted" and out.version is not None
    assert out.version.edited_ns == node.live.stat().st_mtime_ns
    assert node.ctx.ledger.content("haproxy.cfg") == node.live.read_bytes()
    status = peerstatus.parse((node.ctx.staging / STATUS).read_bytes())["haproxy.cfg"]
    assert status.current is not None and status.current.digest == out.version.digest
    assert apply.reconcile(node.ctx).result == "unchanged"


def test_valid_edit_is_reloaded_confirmed_and_recorded(node: Node) -> None:
    """A valid edit: haproxy gets new workers (the confirmation), the version is recorded."""
    apply.reconcile(node.ctx)
    before = node.workers()
    node.live.write_text(node.live.read_text() + "\n# edited\n")
    out = apply.apply_local(node.ctx, 5)
    assert out.result == "applied", out.message
    assert out.message.startswith("valid and reloaded (new worker(s) ")
    assert node.workers() - before
    assert out.version == node.ctx.ledger.current("haproxy.cfg")
    assert out.version is not None and (out.version.origin, out.version.edited_ns) == ("lb1", 5)


def test_invalid_edit_keeps_the_running_config(node: Node) -> None:
    """An invalid edit: no reload, nothing recorded, and the message names the line."""
    first = apply.reconcile(node.ctx).version
    before = node.workers()
    node.live.write_text(node.live.read_text().replace("mode http", "mode htp"))
    out = apply.apply_local(node.ctx, 5)
    assert out.result == "invalid"
    assert "haproxy.cfg:" in out.message and "htp" in out.message
    assert node.workers() == before and node.serves()
    assert node.ctx.ledger.current("haproxy.cfg") == first


def test_reload_that_does_not_take_is_rolled_back(node: Node) -> None:
    """A config that passes `haproxy -c` but cannot load (its port is taken): no new worker
    appears, so the previous version goes back, is reloaded, and the refused file is kept."""
    apply.reconcile(node.ctx)
    good = node.live.read_bytes()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        extra = f"frontend clash\n    bind 127.0.0.1:{taken}\n\n"
        node.live.write_text(
            node.live.read_text().replace("frontend monitor", extra + "frontend monitor")
        )
        out = apply.apply_local(node.ctx, 5)
    assert out.result == "reload-failed"
    assert "reload not confirmed" in out.message and "restored and reloaded" in out.message
    assert node.live.read_bytes() == good
    assert list(node.live.parent.glob("haproxy.cfg.lbwatch-failed-*"))
    assert node.expect.accepted[-1] == (node.live, hashlib.sha256(good).hexdigest())
    wait_for(node.serves, 5, what="haproxy serving after the roll-back")


def test_a_checked_edit_is_handed_over_before_haproxy_reloads_it(node: Node) -> None:
    """push_after = "check": the edit is recorded and told once it passed the check, while
    haproxy still runs the old workers (the peers get it during the local reload); the
    outcome, after the reload, names the same version."""
    apply.reconcile(node.ctx)
    before = node.workers()
    node.live.write_text(node.live.read_text() + "\n# edited\n")
    told: list[tuple[Version, frozenset[int], Version | None]] = []
    out = apply.apply_local(
        node.ctx, 5, lambda v: told.append((v, node.workers(), node.ctx.ledger.current(v.file)))
    )
    assert out.result == "applied", out.message
    [(version, workers, recorded)] = told
    assert workers == before  # not reloaded yet
    assert recorded == version == out.version
    assert version.digest == hashlib.sha256(node.live.read_bytes()).hexdigest()
    assert node.workers() - before  # reloaded since


def test_a_failed_reload_after_the_hand_over_gives_the_previous_version_back(
    node: Node,
) -> None:
    """The edit went to the peers before its reload, which fails: what is restored here
    becomes a version of its own, newer than the failed one, so the peers go back too."""
    apply.reconcile(node.ctx)
    good = node.live.read_bytes()
    told: list[Version] = []
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        extra = f"frontend clash\n    bind 127.0.0.1:{blocker.getsockname()[1]}\n\n"
        node.live.write_text(
            node.live.read_text().replace("frontend monitor", extra + "frontend monitor")
        )
        out = apply.apply_local(node.ctx, 5, told.append)
    assert out.result == "reload-failed" and "the peers given it back too" in out.message
    [failed] = told
    assert failed.digest != hashlib.sha256(good).hexdigest()
    back = out.version
    assert back is not None and back.key() > failed.key()
    assert back.digest == hashlib.sha256(good).hexdigest()
    assert node.ctx.ledger.current("haproxy.cfg") == back
    assert node.ctx.ledger.content("haproxy.cfg") == good == node.live.read_bytes()
    wait_for(node.serves, 5, what="haproxy serving after the roll-back")


def test_a_full_staging_disk_fails_no_job(
    node: Node, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peers' status file cannot be written (the staging directory's disk is full): the
    start-up reconcile and an edit still go through, the edit reloaded and recorded, and the
    log says once per write what could not be written (it was a traceback, and an edit handed
    over early was recorded but never reloaded)."""
    ctx = dataclasses.replace(node.ctx, staging=small_disk)
    fill(small_disk)
    assert apply.reconcile(ctx).result == "adopted"
    before = node.workers()
    node.live.write_text(node.live.read_text() + "\n# edited\n")
    told: list[Version] = []
    out = apply.apply_local(ctx, 5, told.append)
    assert out.result == "applied", out.message
    assert node.workers() - before
    assert told == [out.version] == [ctx.ledger.current("haproxy.cfg")]
    assert caplog.text.count("cannot write") == 3  # the reconcile, the edit twice


def test_newest_staged_version_wins(node: Node) -> None:
    """Two versions staged while the node was busy: only the newest is applied, the older one
    is dropped unapplied."""
    apply.reconcile(node.ctx)
    base = node.live.read_text()
    staged = []
    for counter, tag in ((2, "older"), (3, "newer")):
        content = (base + f"\n# {tag}\n").encode()
        v = Version("haproxy.cfg", "lb2", counter, 1, hashlib.sha256(content).hexdigest())
        (node.ctx.staging / v.staged_name()).write_bytes(content)
        staged.append(v)
    out = apply.apply_staged(node.ctx, 0)
    assert out is not None and out.superseded == 1 and out.received is not None
    assert out.received.result == "applied", out.received.message
    assert node.live.read_text().endswith("# newer\n")
    assert node.ctx.ledger.current("haproxy.cfg") == staged[1]
    assert not [p for p in node.ctx.staging.iterdir() if "@" in p.name]
    assert apply.apply_staged(node.ctx, 0) is None


def test_reload_with_haproxy_not_running_is_deferred(tmp_path: Path) -> None:
    """No haproxy to reload: the new file takes effect at its next start; that is not a failure."""
    cfg = HaproxyCfg(pidfile=tmp_path / "none.pid", find_without_pidfile=False, reload=["false"])
    res = reload_haproxy(cfg, 5, 1)
    assert res.outcome is Outcome.OK and "not running" in res.detail
    assert not res.reloaded


def test_reload_is_claimed_only_when_haproxy_reloaded(node: Node, tmp_path: Path) -> None:
    """A valid edit says "reloaded" when haproxy's new workers confirm it, and with no haproxy
    running says it takes effect at the next start instead; both are recorded as applied."""
    apply.reconcile(node.ctx)
    res = node.ctx.settings.reload()
    assert res.outcome is Outcome.OK and res.reloaded, res.detail
    gone = HaproxyCfg(pidfile=tmp_path / "none.pid", find_without_pidfile=False, reload=["false"])
    settings = ApplySettings(
        CHECK, functools.partial(reload_haproxy, gone, 5, 1), 3, 30, confined()
    )
    ctx = replace(node.ctx, settings=settings)
    node.live.write_text(node.live.read_text() + "\n# edited while haproxy is down\n")
    out = apply.apply_local(ctx, 7)
    assert out.result == "applied"
    assert out.message == "valid; haproxy not running, takes effect at its next start"
    status = peerstatus.parse((ctx.staging / STATUS).read_bytes())["haproxy.cfg"]
    assert status.message == out.message


def _stage(node: Node, text: str, counter: int, origin: str = "lb2") -> Version:
    content = text.encode()
    v = Version("haproxy.cfg", origin, counter, 1, hashlib.sha256(content).hexdigest())
    (node.ctx.staging / v.staged_name()).write_bytes(content)
    return v


def _private(live: Path) -> None:
    live.chmod(0o640)
    os.chown(live, 65534, 4)


def _lost(node: Node, origin: str) -> Path:
    """The operator's edit that lost, kept beside the live file as private as it."""
    (path,) = node.live.parent.glob(f"haproxy.cfg.lbwatch-lost-{origin}-*")
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 4, 0o640), "as private as live"
    return path


def _theirs_kept(node: Node, origin: str) -> Path:
    """A peer's version that lost, kept in staging's .kept (never beside the live file), root's
    alone."""
    assert not list(node.live.parent.glob(f"haproxy.cfg.lbwatch-lost-{origin}-*"))
    (path,) = (node.ctx.staging / ".kept").glob(f"haproxy.cfg.lbwatch-lost-{origin}-*")
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    return path


def test_staged_version_applies_when_nothing_was_edited(node: Node) -> None:
    """Positive control: the live file is the recorded version, so a newer staged version is
    installed and reloaded, with no operator's edit to keep."""
    apply.reconcile(node.ctx)
    theirs = _stage(node, node.live.read_text() + "\n# theirs\n", 5)
    out = apply.apply_staged(node.ctx, 0)
    assert out is not None and out.received is not None and out.received.result == "applied"
    assert out.local is None and out.lost_local is None
    assert node.ctx.ledger.current("haproxy.cfg") == theirs


def test_unrecorded_edit_is_taken_first_and_wins(node: Node) -> None:
    """An operator's save not yet taken by lbwatch, and a staged version from lb2 with a
    higher counter: the edit becomes a version that counts lb2's as seen, so it wins; lb2's is
    kept in staging's .kept, root's alone, and reported as kept-local."""
    apply.reconcile(node.ctx)
    _private(node.live)
    mine = node.live.read_text() + "\n# operator's edit on lb1\n"
    node.live.write_text(mine)
    theirs = _stage(node, node.live.read_text() + "\n# lb2's version\n", 7)
    out = apply.apply_staged(node.ctx, 10**18)
    assert out is not None and out.local is not None and out.received is not None
    assert out.local.result == "applied", out.local.message
    assert out.received.result == "kept-local", out.received.message
    assert node.live.read_text() == mine
    current = node.ctx.ledger.current("haproxy.cfg")
    assert current is not None and current.origin == "lb1" and current.counter == theirs.counter + 1
    assert "lb2's version" in _theirs_kept(node, "lb2").read_text()


def test_invalid_unrecorded_edit_loses_and_is_kept(node: Node) -> None:
    """An operator's save that is invalid cannot win: the staged version is installed, and the
    operator's text is kept as a lost copy (as private as the live file) and named."""
    apply.reconcile(node.ctx)
    _private(node.live)
    broken = node.live.read_text().replace("mode http", "mode htp")
    node.live.write_text(broken)
    theirs = node.live.read_text().replace("mode htp", "mode http") + "\n# lb2\n"
    _stage(node, theirs, 3)
    out = apply.apply_staged(node.ctx, 0)
    assert out is not None and out.local is not None and out.local.result == "invalid"
    assert out.received is not None and out.received.result == "applied", out.received.message
    assert node.live.read_text() == theirs
    assert out.lost_local is not None and _lost(node, "lb1").read_text() == broken
    assert out.lost_local == _lost(node, "lb1").name


def test_save_during_the_check_of_a_staged_version_is_not_overwritten(
    node: Node, tmp_path: Path
) -> None:
    """The operator saves while the staged version is being checked: the install notices the
    live file no longer holds the recorded version, undoes nothing it did not do, and decides
    again with the save as a local edit, which wins."""
    apply.reconcile(node.ctx)
    saved = node.live.read_text() + "\n# saved during the check\n"
    once = tmp_path / "saved-once"
    script = tmp_path / "check.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e {once} ] && [ "$1" != {node.live} ]; then\n'
        f"  touch {once}\n"
        f"  printf '%s' '{saved}' > {node.live}.tmp && mv {node.live}.tmp {node.live}\n"
        "fi\n"
        'exec haproxy -c -f "$1"\n'
    )
    script.chmod(0o755)
    # The checker saves the file itself: it must run unconfined to write the live file.
    settings = replace(node.ctx.settings, check=[str(script), "{file}"], confine=unconfined())
    ctx = replace(node.ctx, settings=settings)
    _stage(node, node.live.read_text() + "\n# lb2's version\n", 4)
    out = apply.apply_staged(ctx, 0)
    assert once.exists(), "the save happened during the staged check"
    assert node.live.read_text() == saved
    assert out is not None and out.local is not None and out.local.result == "applied"
    assert out.received is not None and out.received.result == "kept-local"
    assert _theirs_kept(node, "lb2")


def test_a_reload_haproxy_ignored_is_asked_once_more(node: Node, tmp_path: Path) -> None:
    """haproxy 2.6 ignores a USR2 that lands while it is still settling: with no new worker
    halfway through the confirmation wait, the reload is asked once more, and confirmed (here
    the first ask is dropped on purpose)."""
    master = identify(node.cfg).main
    assert master is not None
    asked = tmp_path / "asked"
    script = tmp_path / "reload.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"echo x >> {asked}\n"
        f'[ "$(wc -l < {asked})" -ge 2 ] && kill -USR2 {master.pid}\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    cfg = node.cfg.model_copy(update={"reload": [str(script)]})
    res = reload_haproxy(cfg, 10, 3)
    assert res.outcome is Outcome.OK and res.reloaded, res.detail
    assert len(asked.read_text().splitlines()) == 2
