"""Adversarial tests of the sync fixes after the first review (commits 1cfa40a..b64494c): the
peers' status deciding delivery (``classify``), a first-start node trusting its peers'
counters, the learned counters, and a staged version deferred while haproxy.cfg is being
written (a read lease, fcntl F_SETLEASE).

Each test here that fails shows a break of a promise (see the report on branch ``adv9b``); none
is marked xfail on purpose. Nodes are real sync jobs on the real filesystem with the real
``haproxy -c``, built with the helpers of tests/test_adversarial_sync_rule.py; peer links are
real ``PeerLink`` threads over ``FakeCarrier`` (a peer's staging directory on the local disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lbwatch.loop import Selector
from lbwatch.services import CommandResult, run_command
from lbwatch.sync import apply, peerstatus
from lbwatch.sync.peers import PeerLink, PeerState, PeerView
from lbwatch.sync.peerstatus import STATUS, FileStatus, Held
from lbwatch.sync.receive import ApplySettings
from lbwatch.sync.service import SyncService
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import MAX_AHEAD, MAX_COUNTER, Version
from tests.conftest import needs
from tests.fakes import Expectations, FakeCarrier, config
from tests.test_adversarial_sync_rule import (
    CHECK,
    UNIT,
    Box,
    _base,
    _sha,
    box,
    deliver,
    forge,
    in_step,
    join,
    operator_saves,
    text,
    wall,
)
from tests.util import confined, wait_for

pytestmark = needs("haproxy")


def _service(tmp_path: Path, name: str = "lb1", again: bool = False) -> tuple[SyncService, Box]:
    """A real sync service for node ``name`` (no peers configured: links are made by hand);
    ``again``: built anew on the same files and state (a restart, a SIGHUP rebuild)."""
    root = tmp_path / name
    live = root / "etc" / UNIT
    if not again:
        (root / "etc").mkdir(parents=True)
        live.write_text(_base())
    cfg = config(
        agent={"node_name": name, "state_dir": str(root / "state"), "run_dir": str(root / "run")},
        haproxy={"pidfile": str(tmp_path / "none.pid"), "find_without_pidfile": False},
        sync={"enabled": True, "config": str(live), "check": CHECK},
    )
    svc = SyncService(cfg, Selector(), name, lambda *_: None, lambda: None, lambda _: None)
    return svc, join(tmp_path, Box(name, svc.ctx, Expectations()))


def _forged_status(staging: Path, counter: int) -> None:
    """A peer's status file whose current version claims edit ``counter`` (a peer in a bad
    state, or a status file written by someone holding its sync key)."""
    staging.mkdir(parents=True, exist_ok=True)
    current = Held(file=UNIT, origin="lb3", counter=counter, edited_ns=1, digest="f" * 64)
    entry = FileStatus(result="current", current=current, at=1.0)
    (staging / STATUS).write_bytes(peerstatus.render({UNIT: entry}))


# ---------------------------------------------------------------------------------------------
# The read lease behind ``being_written``


def test_a_save_opened_while_the_lease_is_held_does_not_kill_the_agent(tmp_path: Path) -> None:
    """``being_written`` takes a read lease on haproxy.cfg for an instant; an editor opening the
    file for writing in that instant makes the kernel send the lease holder SIGIO, whose
    default action ends the process, so lbwatch must survive it."""
    live = tmp_path / UNIT
    live.write_text(_base())
    probe = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lbwatch.fsutil import being_written\n"
        "end = time.monotonic() + 4\n"
        "n = 0\n"
        "while time.monotonic() < end:\n"
        "    being_written(Path(sys.argv[1]))\n"
        "    n += 1\n"
        "print(n)\n"
    )
    # Positive control: with nobody opening the file, the lease checks run to the end.
    quiet = subprocess.run(
        [sys.executable, "-c", probe.replace("+ 4", "+ 0.3"), str(live)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert quiet.returncode == 0 and int(quiet.stdout) > 0, quiet
    checker = subprocess.Popen([sys.executable, "-c", probe, str(live)], stdout=subprocess.PIPE)
    try:
        opens = 0
        end = time.monotonic() + 6
        # An editor (or scp, cp) opening haproxy.cfg for writing now and then, as saves do.
        while checker.poll() is None and time.monotonic() < end:
            os.close(os.open(live, os.O_WRONLY))
            opens += 1
        rc = checker.wait(timeout=30)
    finally:
        if checker.poll() is None:
            checker.kill()
            checker.wait(timeout=10)
        assert checker.stdout is not None
        checker.stdout.close()
    assert rc == 0, (
        f"the process checking being_written() ended with "
        f"{signal.Signals(-rc).name if rc < 0 else rc} after {opens} opens for writing "
        "(a read lease's break sends its holder SIGIO, and lbwatch has no handler for it)"
    )


def test_a_staged_version_does_not_wait_forever_on_a_writer_that_never_saves(
    tmp_path: Path,
) -> None:
    """A process that keeps haproxy.cfg open for writing without ever changing it (a log
    shipper opened it O_RDWR, a stuck editor) refuses the read lease for good: the peer's
    version is deferred at every ask (the rescan's, once a second) and never applied, while
    the sender shows the peer pending and only DEBUG lines say why."""
    node, peer = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(node, peer)
    # Positive control: with no writer, the peer's version is applied at the first ask.
    assert operator_saves(peer, text("first")).result == "applied"
    first = deliver(peer, node)
    assert first.received is not None and first.received.result == "applied"
    assert operator_saves(peer, text("second")).result == "applied"
    theirs = peer.current
    assert theirs is not None
    with node.live.open("ab"):  # open for writing, never written
        asks = []
        content = peer.ctx.ledger.content(UNIT)
        assert content is not None
        (node.ctx.staging / theirs.staged_name()).write_bytes(content)
        for _ in range(10):  # ten rescans' asks
            out = apply.apply_staged(node.ctx, wall())
            asks.append(None if out is None or out.received is None else out.received.result)
            if asks[-1] is not None:
                break
    assert node.current == theirs, (
        f"the peer's version is still waiting after {len(asks)} asks ({asks}) although the "
        "live file is the recorded version and nobody has written to it"
    )


# ---------------------------------------------------------------------------------------------
# Counters learned from the peers' status files


def test_a_counter_read_once_in_a_status_is_not_learned_again_on_every_view(
    tmp_path: Path,
) -> None:
    """A peer's status showing a counter far beyond the bound (a peer in a bad state) is
    learned from the link's view, which keeps the last counter read, so each later view of
    that peer (pending, peer-newer on every edit) shows it again; lb1's real edits must still
    be taken by lb2, which was in step and took each one (once, a figure learned on every view
    ran lb1's counter further ahead at each edit until lb2 refused its edits as
    implausible)."""
    svc, lb1 = _service(tmp_path)
    try:
        lb2 = box(tmp_path, "lb2")
        in_step(lb1, lb2)
        odd = tmp_path / "lb3-staging"
        _forged_status(odd, MAX_COUNTER)
        views: list[PeerView] = []
        link = PeerLink(Peer("lb3", "192.0.2.3"), FakeCarrier(odd), 0.5, 0.05, 0.2, views.append)
        link.start()
        results = []
        try:
            for i in range(4):
                out = operator_saves(lb1, text(f"edit {i}"))
                assert out.result == "applied" and out.version is not None
                svc._local_done(out)
                fed = len(views)
                link.set_target(out.version, lb1.ctx.ledger.content_path(out.version), True)
                wait_for(
                    lambda v=out.version: (
                        link.view().target == v and link.view().state is PeerState.PEER_NEWER
                    ),
                    10,
                    what="lb3's status read",
                )
                for view in views[fed:]:  # what the loop does with the link's reports
                    svc._peer_changed(view)
                got = deliver(lb1, lb2)
                assert got.received is not None
                results.append((out.version.counter, got.received.result))
        finally:
            link.stop()
        assert all(r == "applied" for _, r in results), (
            f"lb1's real edits as lb2 (in step, took each one) judged them: {results}; "
            f"one status figure ({MAX_COUNTER}) was learned on each of {len(views)} views"
        )
    finally:
        svc.close()


def _restarted_new_node_edit(tmp_path: Path, restart: bool) -> str:
    """lb2 holds the group's version, numbered past MAX_AHEAD by earlier claims the group
    took (lb2 and lb3, one claim after the other). lb1 lost its state directory (its live file
    is the group's version): lbwatch adopts it, is restarted (or rebuilt by a SIGHUP) when
    ``restart``, reads lb2's status, and the operator edits on top of the group's version.
    What lb2 does with that edit."""
    lb2, lb3 = box(tmp_path, "lb2"), box(tmp_path, "lb3")
    in_step(lb2, lb3)
    for step in range(1, 4):  # claims within the bound, taken by the group one after the other
        forge(lb2, text(f"the group's version {step}"), lb2.ctx.ledger.seen(UNIT) + MAX_AHEAD)
        got = apply.apply_staged(lb2.ctx, wall())
        assert got is not None and got.received is not None, step
        assert got.received.result in ("applied", "same"), got.received.message
        spread = deliver(lb2, lb3)
        assert spread.received is not None and spread.received.result == "applied", step
    group = lb2.current
    assert group is not None and group.counter > 2 * MAX_AHEAD
    svc, lb1 = _service(tmp_path)
    try:
        lb1.live.write_text(text("the group's version 3"))
        adopted = apply.reconcile(lb1.ctx)
        assert adopted.result == "adopted"
        svc._local_done(adopted)
        if restart:
            svc.close()
            svc, lb1 = _service(tmp_path, again=True)
            again = apply.reconcile(lb1.ctx)
            assert again.result == "unchanged"
            svc._local_done(again)
        target = lb1.current
        assert target is not None
        views: list[PeerView] = []
        link = PeerLink(
            Peer("lb2", "192.0.2.2"), FakeCarrier(lb2.ctx.staging), 0.5, 0.05, 0.2, views.append
        )
        link.start()
        try:
            link.set_target(target, lb1.ctx.ledger.content_path(target))
            wait_for(lambda: link.view().state is PeerState.IN_SYNC, 10, what="lb2 in sync")
        finally:
            link.stop()
        for view in views:
            svc._peer_changed(view)
        mine = operator_saves(lb1, text("the operator's edit on lb1"))
        assert mine.result == "applied" and mine.version is not None
        out = deliver(lb1, lb2)
        assert out.received is not None
        return f"{out.received.result} (edit {mine.version.counter}, group {group.counter})"
    finally:
        svc.close()


def test_a_node_that_lost_its_state_still_trusts_its_peers_after_a_restart(
    tmp_path: Path,
) -> None:
    """The README: a node that lost its state "takes the counters its peers' status files show
    as they are, until it records an edit or a version of its own"; but the trust lives only
    in the service object, so after a restart or a SIGHUP rebuild (its only history still the
    first-start adoption) it learns half the bound per read, and the operator's edit made on
    the group's version loses to that version on the peers."""
    # Positive control: without the restart, the edit wins on lb2.
    assert _restarted_new_node_edit(tmp_path / "kept", False).startswith("applied ")
    said = _restarted_new_node_edit(tmp_path / "restarted", True)
    assert said.startswith("applied "), f"after a restart lb2 judged lb1's edit: {said}"


# ---------------------------------------------------------------------------------------------
# Installs through a symlinked haproxy.cfg


def _reload_fails() -> CommandResult:
    return run_command(["false"], 10)


def _failed_reload_through_link(tmp_path: Path, target_deleted: bool) -> Box:
    """haproxy.cfg is a symlink to the file configuration management writes; when
    ``target_deleted`` that file was deleted (a deleted config, which the next version puts
    back). A peer's version arrives and its reload fails, so the install is undone."""
    node = box(tmp_path, "lb1")
    real = tmp_path / "lb1" / "managed" / UNIT
    real.parent.mkdir()
    real.write_text(_base())
    node.live.unlink()
    node.live.symlink_to(real)
    assert apply.reconcile(node.ctx).result == "adopted"
    if target_deleted:
        real.unlink()
    failing = ApplySettings(CHECK, _reload_fails, 3, 30, confined())
    node = Box(node.name, dataclasses.replace(node.ctx, settings=failing), node.expect)
    theirs = text("the peer's version")
    v = Version(UNIT, "lb2", 5, 1, _sha(theirs.encode()))
    (node.ctx.staging / v.staged_name()).write_text(theirs)
    out = apply.apply_staged(node.ctx, wall())
    assert out is not None and out.received is not None
    assert out.received.result == "reload-failed", out.received.message
    return node


def test_undoing_an_install_through_a_dangling_symlink_keeps_the_link(tmp_path: Path) -> None:
    """ "A symlinked haproxy.cfg stays a link": undoing an install that created the link's
    deleted target (``Installed.previous`` None) unlinks the live path, which is the symlink,
    and leaves the refused config in the target, where the operator's tools write."""
    # Positive control: with the target in place, the undone install leaves the link.
    kept = _failed_reload_through_link(tmp_path / "control", target_deleted=False)
    assert kept.live.is_symlink()
    node = _failed_reload_through_link(tmp_path / "deleted", target_deleted=True)
    real = tmp_path / "deleted" / "lb1" / "managed" / UNIT
    assert node.live.is_symlink(), (
        f"the symlink {node.live} was removed by the undo; its target "
        f"{'still holds the refused config' if real.exists() else 'is gone'}"
    )


# ---------------------------------------------------------------------------------------------
# A peer-newer peer "will push it"


def test_a_node_that_lost_its_state_with_an_older_file_is_brought_in_line(
    tmp_path: Path,
) -> None:
    """README: "A node that lost its state directory ... is brought in line by whichever node
    holds the winner"; a node whose state was wiped and whose haproxy.cfg is an older file
    (rebuilt from an image) adopts it, its link finds lb1 holding a later version and pushes
    nothing ("peer-newer: it will push it"), but lb1's link to it settled in-sync long ago and
    never looks again: the two serve different configs until the next edit."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    assert operator_saves(lb1, text("the group's version")).result == "applied"
    group = lb1.current
    assert group is not None
    views1: list[PeerView] = []
    to_lb2 = FakeCarrier(lb2.ctx.staging)
    link1 = PeerLink(Peer("lb2", "192.0.2.2"), to_lb2, 0.5, 0.05, 0.2, views1.append)
    views2: list[PeerView] = []
    link2 = PeerLink(
        Peer("lb1", "192.0.2.1"), FakeCarrier(lb1.ctx.staging), 0.5, 0.05, 0.2, views2.append
    )
    link1.start()
    link2.start()
    try:
        # Positive control: lb1's link delivers its edit, lb2 takes it.
        link1.set_target(group, lb1.ctx.ledger.content_path(group), fresh=True)
        wait_for(lambda: bool(to_lb2.pushed), 10, what="lb1's push")
        got = apply.apply_staged(lb2.ctx, wall())
        assert got is not None and got.received is not None
        assert got.received.result == "applied"
        wait_for(lambda: link1.view().state is PeerState.IN_SYNC, 10, what="lb2 in sync")
        # lb2 loses its state directory; its haproxy.cfg is the older file of its image.
        for f in sorted((lb2.ctx.ledger.dir).iterdir()):
            f.unlink()
        lb2.live.write_text(_base())
        adopted = apply.reconcile(lb2.ctx)
        assert adopted.result == "adopted" and adopted.version is not None
        link2.set_target(adopted.version, lb2.ctx.ledger.content_path(adopted.version))
        wait_for(lambda: link2.view().state is PeerState.PEER_NEWER, 10, what="lb2's link")
        # What brings lb2 in line is lb1's link pushing again; give it ten retry_max.
        pushes = len(to_lb2.pushed)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(to_lb2.pushed) > pushes, 2, what="lb1 pushing to lb2 again")
        if any("@" in p.name for p in lb2.ctx.staging.iterdir()):
            apply.apply_staged(lb2.ctx, wall())
    finally:
        link1.stop()
        link2.stop()
    assert lb2.live.read_text() == text("the group's version"), (
        f"lb2 still serves its older file: its link to lb1 says {link2.view().state.value}, "
        f"lb1's link to lb2 says {link1.view().state.value} ({to_lb2.pushed})"
    )
