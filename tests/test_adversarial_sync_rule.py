"""Adversarial tests of issue 9's sync rule (commits 60bb0b3, bb750e3): Lamport edit counters,
bounded claims, nodes delivering what they hold, an operator's edit taken before a staged
version, guarded installs and kept copies.

Each test here that fails shows a break of one of the issue's promises (see the report on
branch ``adv9``); none is marked xfail on purpose. The nodes are real sync jobs (``apply``) on
the real filesystem with the real ``haproxy -c`` checker; where a reload is not what a test is
about it is ``true`` (a reload that succeeds), as in tests/test_sync_receive.py. Delivering a
version between two nodes is what a peer link does: the sender's recorded copy lands in the
receiver's staging directory under the version's name, and the receiver's staged job runs.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbwatch.loop import Selector
from lbwatch.services import CommandResult, run_command
from lbwatch.sync import apply
from lbwatch.sync.apply import Context, StagedOutcome
from lbwatch.sync.fileset import FileSet, install_all, pack
from lbwatch.sync.install import Kept, LiveChanged, kept
from lbwatch.sync.ledger import Ledger
from lbwatch.sync.peers import PeerLink, PeerState
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.service import SyncService
from lbwatch.sync.transport import Peer
from lbwatch.sync.versions import MAX_AHEAD, MAX_COUNTER, Version
from tests.conftest import free_port, needs
from tests.fakes import Expectations, FakeCarrier, config
from tests.util import confined, wait_for

pytestmark = needs("haproxy")
CHECK = ["haproxy", "-c", "-f", "{file}"]
UNIT = "haproxy.cfg"
# Every node starts from the same config text (the ports are only named, never bound here).
PORTS = (free_port(), free_port())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reload_ok() -> CommandResult:
    return run_command(["true"], 10)


@dataclass
class Box:
    """One node: its live file, staging directory, ledger and sync context."""

    name: str
    ctx: Context
    expect: Expectations

    @property
    def live(self) -> Path:
        return self.ctx.files.config

    @property
    def current(self) -> Version | None:
        return self.ctx.ledger.current(self.ctx.files.unit)


# Each test's nodes, by the directory they were made in. A node asks the others what they hold
# (``Context.ask_peers``) as the service does: a real PeerLink reads each one's status file,
# over FakeCarrier (their staging directories on the local disk).
_GROUPS: dict[Path, dict[str, Box]] = {}


def join(group: Path, node: Box) -> Box:
    """``node`` is one of ``group``'s from now on: the others ask it, it asks them."""
    _GROUPS.setdefault(group, {})[node.name] = node
    return node


def ask_peers(group: Path, name: str) -> int:
    """What ``name``'s peers in ``group`` hold now, by their status files (0: nothing)."""
    held = []
    for other in _GROUPS.get(group, {}).values():
        if other.name != name:
            carrier = FakeCarrier(other.ctx.staging)
            link = PeerLink(Peer(other.name, "192.0.2.9"), carrier, 1, 1, 1, lambda _: None)
            held.append(link.held_now(UNIT))
    return max((c for c in held if c is not None), default=0)


def box(tmp_path: Path, name: str, keep: int = 3) -> Box:
    """A node holding the common start-up config, nothing recorded yet; one of the group of
    nodes made in ``tmp_path``."""
    root = tmp_path / name
    (root / "etc").mkdir(parents=True)
    (root / "staging").mkdir()
    live = root / "etc" / UNIT
    live.write_text(_base())
    expect = Expectations()
    ctx = Context(
        name,
        FileSet(live),
        root / "staging",
        Ledger(root / "state"),
        ApplySettings(CHECK, _reload_ok, keep, 30, confined()),
        expect,
        ask_peers=lambda: ask_peers(tmp_path, name),
    )
    return join(tmp_path, Box(name, ctx, expect))


def text(tag: str) -> str:
    """A valid config that differs from the start-up one by a comment."""
    return _base() + f"# {tag}\n"


def _base() -> str:
    return f"""global
    log stderr format raw local0 err

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend web
    bind 127.0.0.1:{PORTS[0]}
    http-request return status 200 content-type text/plain string ok

frontend monitor
    bind 127.0.0.1:{PORTS[1]}
    monitor-uri /health
"""


def operator_saves(node: Box, content: str) -> apply.LocalOutcome:
    """The operator saves the live file and the watcher's local job takes it."""
    node.live.write_text(content)
    return apply.apply_local(node.ctx, wall())


_WALL = [1_700_000_000 * 10**9]


def wall() -> int:
    """A wall clock that moves forward one second per reading (ties only, see versions)."""
    _WALL[0] += 10**9
    return _WALL[0]


def deliver(src: Box, dst: Box) -> StagedOutcome:
    """What ``src``'s peer link does for ``dst``: push its current version; then ``dst``'s
    staged job."""
    v = src.current
    content = src.ctx.ledger.content(src.ctx.files.unit)
    assert v is not None and content is not None
    (dst.ctx.staging / v.staged_name()).write_bytes(content)
    out = apply.apply_staged(dst.ctx, wall())
    assert out is not None
    return out


def deliver_as_link(src: Box, dst: Box) -> StagedOutcome:
    """What ``src``'s peer link does until the peer settles: a version refused as claiming too
    much is not settled, so it is pushed again (each refusal raises what the peer has seen);
    at most five times here."""
    for _ in range(5):
        out = deliver(src, dst)
        if out.received is None or out.received.result != "implausible":
            return out
    return out


def forge(dst: Box, content: str, counter: int, origin: str = "mallory") -> Version:
    """Someone holding a sync key pushes a version with any name into ``dst``'s staging."""
    data = content.encode()
    v = Version(UNIT, origin, counter, 4_102_444_800 * 10**9, _sha(data))
    (dst.ctx.staging / v.staged_name()).write_bytes(data)
    return v


def in_step(*nodes: Box) -> Version:
    """Every node starts from the same file; the first records it, the others take it from
    it, as a running group does."""
    first, *rest = nodes
    assert apply.reconcile(first.ctx).result == "adopted"
    for node in rest:
        assert apply.reconcile(node.ctx).result == "adopted"
        deliver(first, node)
    v = first.current
    assert v is not None
    return v


# ---------------------------------------------------------------------------------------------
# Kept copies and undoing installs


def test_a_failed_reload_with_backups_zero_puts_the_previous_config_back(tmp_path: Path) -> None:
    """``[sync] backups = 0`` is allowed (``ge=0``). A received version whose reload fails is
    undone: the previous haproxy.cfg must be live again, as it is with backups kept (positive
    control). With no backup kept, ``install`` reports ``backup=None``, which ``restore_all``
    takes for "the file did not exist", and it deletes the live haproxy.cfg."""
    for keep in (1, 0):
        node = box(tmp_path, f"keep{keep}", keep=keep)
        before = node.live.read_bytes()
        new = text("theirs").encode()
        v = Version(UNIT, "lb2", 2, 2, _sha(new))
        staged = node.ctx.staging / v.staged_name()
        staged.write_bytes(new)
        settings = ApplySettings(CHECK, lambda: run_command(["false"], 10), keep, 30, confined())
        rec = receive(staged, node.ctx.files, None, 0, settings, node.expect)
        assert rec.result == "reload-failed"
        assert "previous config restored" in rec.message
        assert node.live.exists(), f"backups={keep}: the live haproxy.cfg was deleted"
        assert node.live.read_bytes() == before, f"backups={keep}"


def test_a_bundle_install_undone_mid_way_with_backups_zero_leaves_no_file_deleted(
    tmp_path: Path,
) -> None:
    """A bundle (haproxy.cfg and a map) is installed; the map goes first, then haproxy.cfg is
    found saved by the operator since the judgment (``LiveChanged``), so the map's install is
    undone. Undone must mean the previous map is back (positive control: backups = 1); with
    backups = 0 the map haproxy.cfg uses is deleted instead, so the next reload fails."""
    for keep in (1, 0):
        etc = tmp_path / f"keep{keep}"
        etc.mkdir()
        cfg, amap = etc / "haproxy.cfg", etc / "a.map"
        cfg.write_text(text("recorded"))
        amap.write_text("old\n")
        guard = {cfg: _sha(cfg.read_bytes()), amap: _sha(amap.read_bytes())}
        cfg.write_text(text("operator's save after the judgment"))
        incoming = {amap: b"new\n", cfg: text("theirs").encode()}
        with pytest.raises(LiveChanged):
            install_all(incoming, keep, Expectations(), guard)
        assert cfg.read_text() == text("operator's save after the judgment")
        assert amap.exists(), f"backups={keep}: the map was deleted by the undo"
        assert amap.read_text() == "old\n", f"backups={keep}: mixed bundle left live"


# ---------------------------------------------------------------------------------------------
# Bounded claims: what the bound does to nodes that are honestly in step


def test_a_claim_within_the_bound_does_not_split_lagging_peers(tmp_path: Path) -> None:
    """A claim within the bound is documented as harmless ("it spreads like any version, and
    the next real edit, on any node, takes a higher counter and wins"). lb1 and lb2 are in
    step, except that lb2 has not yet received lb1's last edit (one counter behind). Someone
    with a sync key pushes lb1 a version at lb1's seen + MAX_AHEAD: lb1 takes it (within the
    bound). lb1 delivers it to lb2, which refuses it (one beyond *its* bound), so it does not
    spread; and the next real edit, on lb2, is kept-local by lb1 instead of winning: lb2's
    operator's edit is lost to the forged version on lb1 (promise 2)."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    # lb1's last edit, still on its way to lb2 (the peer link's push is superseded below).
    assert operator_saves(lb1, text("lb1's last edit")).result == "applied"
    seen1 = lb1.ctx.ledger.seen(UNIT)
    forge(lb1, text("forged"), seen1 + MAX_AHEAD)
    taken = apply.apply_staged(lb1.ctx, wall())
    assert taken is not None and taken.received is not None
    assert taken.received.result == "applied", "control: within lb1's bound, the claim is taken"
    spread = deliver_as_link(lb1, lb2)
    assert spread.received is not None
    refused = spread.received.result
    # The next real edit, on lb2, made after lb2 received (and refused) the claim.
    mine = operator_saves(lb2, text("edit on lb2 after the claim"))
    assert mine.result == "applied"
    out = deliver_as_link(lb2, lb1)
    assert out.received is not None
    assert out.received.result == "applied", (
        f"lb2 {refused} the claim lb1 holds ({spread.received.message}); lb2's later real edit "
        f"(counter {mine.version.counter if mine.version else '?'}) then lost on lb1: "
        f"{out.received.result}: {out.received.message}"
    )


def test_a_node_that_lost_its_state_is_brought_in_line_after_a_claim(tmp_path: Path) -> None:
    """The commit says a node that lost its state is brought in line by whoever holds the
    winner. After one claim within the bound has been taken by the group (counters now past
    MAX_AHEAD, which the bound allows), a node whose state directory was wiped (or a new node)
    starts from counter 1 and refuses the group's version as implausible, forever: the sender's
    link settles on REJECTED and never pushes it again."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    for n in range(3):  # the group has made a few edits
        assert operator_saves(lb1, text(f"edit {n}")).result == "applied"
        deliver_as_link(lb1, lb2)
    forge(lb1, text("claimed"), lb1.ctx.ledger.seen(UNIT) + MAX_AHEAD)
    taken = apply.apply_staged(lb1.ctx, wall())
    assert taken is not None and taken.received is not None
    assert taken.received.result == "applied"
    # Control: lb2, in step, takes it.
    ok = deliver_as_link(lb1, lb2)
    assert ok.received is not None and ok.received.result == "applied"
    # lb3 joins (or lb2's state directory is wiped) with its own file.
    lb3 = box(tmp_path, "lb3")
    lb3.live.write_text(text("lb3's file before it joined"))
    assert apply.reconcile(lb3.ctx).result == "adopted"
    out = deliver_as_link(lb1, lb3)
    assert out.received is not None
    assert out.received.result == "applied", (
        f"the group's version is {out.received.result} by the new node: {out.received.message}"
    )


def test_refused_claims_do_not_make_a_real_edit_implausible_to_in_step_peers(
    tmp_path: Path,
) -> None:
    """A claim beyond the bound is refused and "counts for half the bound". Counted on every
    refusal, two forged pushes (claiming the maximum counter, each refused in its own job)
    raise lb1's counter by a whole bound: lb1's next real edit then claims more than MAX_AHEAD
    beyond lb2, which was in step with lb1 and saw neither forgery, and lb2 refuses it
    (promise 2: a later local edit still wins and is pushed). One refused forgery is the
    positive control."""
    for forgeries in (1, 2):
        lb1, lb2 = box(tmp_path / str(forgeries), "lb1"), box(tmp_path / str(forgeries), "lb2")
        in_step(lb1, lb2)
        for n in range(forgeries):
            forge(lb1, text(f"forged {n}"), MAX_COUNTER - n)
            out = apply.apply_staged(lb1.ctx, wall())
            assert out is not None and out.received is not None
            assert out.received.result == "implausible"
        mine = operator_saves(lb1, text("real edit on lb1 after the forgeries"))
        assert mine.result == "applied" and mine.version is not None
        taken = deliver_as_link(lb1, lb2)
        assert taken.received is not None
        assert taken.received.result == "applied", (
            f"after {forgeries} refused forgeries lb1's real edit (counter "
            f"{mine.version.counter}) is {taken.received.result} by lb2: "
            f"{taken.received.message}"
        )


def test_forgeries_waiting_in_staging_do_not_make_a_real_edit_implausible(
    tmp_path: Path,
) -> None:
    """``apply.seen`` counts every version waiting in staging, a refused one for half the bound
    each: two forged versions pushed into lb1's staging while its slot is busy make the
    operator's edit, taken before them, claim a whole bound beyond lb2, which refuses it."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    forge(lb1, text("forged 0"), MAX_COUNTER)
    forge(lb1, text("forged 1"), MAX_COUNTER - 1)
    mine = operator_saves(lb1, text("real edit on lb1"))
    assert mine.result == "applied" and mine.version is not None
    for staged in lb1.ctx.staging.glob(UNIT + "@mallory@*"):
        staged.unlink()  # whatever lb1 does with the forgeries, lb2 never sees them
    out = deliver(lb1, lb2)
    assert out.received is not None
    assert out.received.result == "applied", (
        f"lb1's real edit (counter {mine.version.counter}) is {out.received.result} by lb2: "
        f"{out.received.message}"
    )


def test_a_forged_newest_version_does_not_make_a_real_one_dropped(tmp_path: Path) -> None:
    """Versions staged together: all but the newest by the rule are dropped unapplied. A forged
    version claiming the maximum counter sorts newest, so lb2's real edit staged beside it is
    dropped, then the forgery is refused: lb1 ends up holding neither (positive control: lb2's
    edit staged alone is applied)."""
    lb1, lb2 = box(tmp_path, "lb1"), box(tmp_path, "lb2")
    in_step(lb1, lb2)
    assert operator_saves(lb2, text("lb2's real edit")).result == "applied"
    theirs = lb2.current
    assert theirs is not None
    (lb1.ctx.staging / theirs.staged_name()).write_bytes(text("lb2's real edit").encode())
    forge(lb1, text("forged"), MAX_COUNTER)
    out = apply.apply_staged(lb1.ctx, wall())
    assert out is not None and out.received is not None
    assert out.received.result == "applied", out.received.message
    staged = [p.name for p in lb1.ctx.staging.iterdir() if "@" in p.name]
    assert not [n for n in staged if "@mallory@" in n], "the forgery is refused and removed"
    assert lb1.current == theirs or theirs.staged_name() in staged, (
        f"lb2's real edit was dropped because a refused forgery sorted after it "
        f"({out.superseded} dropped)"
    )


# ---------------------------------------------------------------------------------------------
# Counters after lost state, relays and `sync --now`


def _link(peer: Box, views: list, carrier: FakeCarrier | None = None) -> PeerLink:
    return PeerLink(
        Peer(peer.name, "192.0.2.1"),
        carrier or FakeCarrier(peer.ctx.staging),
        0.3,
        0.05,
        0.2,
        views.append,
    )


def test_a_relayed_version_older_than_the_peers_is_not_pushed_as_a_conflict(
    tmp_path: Path,
) -> None:
    """Three nodes. lb1's operator saves twice in quick succession (V1, then V2). lb2 has taken
    V1; lb3 already holds V2 (lb1's push of V1 to lb3 was superseded by V2). lb2 now delivers
    what it holds, V1, to lb3, whose status shows V2, lb1's own later edit: V1 is pushed, lb3
    keeps it as a "lost" copy and reports a conflict ("edit ... on lb1 lost to this node's later
    edit"), though nobody's edit was lost and lb3 made none. A node must not push a version
    to a peer whose status shows one newer by the rule."""
    lb1, lb2, lb3 = box(tmp_path, "lb1"), box(tmp_path, "lb2"), box(tmp_path, "lb3")
    in_step(lb1, lb2, lb3)
    assert operator_saves(lb1, text("V1")).result == "applied"
    deliver(lb1, lb2)
    assert operator_saves(lb1, text("V2")).result == "applied"
    deliver(lb1, lb3)
    v1 = lb2.current
    assert v1 is not None and v1.origin == "lb1"
    views: list = []
    carrier = FakeCarrier(lb3.ctx.staging)
    link = _link(lb3, views, carrier)
    link.start()
    try:
        # What lb2's service does when V1 became its current (received: not fresh).
        link.set_target(v1, lb2.ctx.ledger.content_path(v1), fresh=False)
        wait_for(
            lambda: link.view().state not in (PeerState.IDLE, PeerState.CHECKING),
            10,
            what="lb2's link to lb3 concluded",
        )
    finally:
        link.stop()
    if any("@" in p.name for p in lb3.ctx.staging.iterdir()):
        out = apply.apply_staged(lb3.ctx, wall())
        assert out is not None and out.received is not None
        assert out.received.result != "kept-local", out.received.message
    assert carrier.pushed == [], "lb2 pushed V1 to lb3, whose status showed V2 (newer)"
    assert kept(lb3.live, Kept.LOST) == []


def test_sync_now_reaches_a_peer_that_was_unreachable_when_it_was_made(
    tmp_path: Path,
) -> None:
    """`lbwatch sync --now` re-claims the live content as this node's newest edit, "so it goes
    out even if it came from a peer (peers that hold the same content only note the later
    one)". lb1 has seen a higher counter than lb2 (a version lb1 refused as invalid); lb2 is
    unreachable when the operator runs it. When lb2 is back the link reads lb2's status, finds
    the same content and calls it in sync without pushing: lb2 never notes the new counter, and
    lb2's next edit, made on top of that content, loses to the re-claim on lb1 (promise 1)."""
    state = tmp_path / "lb1" / "state"
    (tmp_path / "lb1" / "etc").mkdir(parents=True)
    live1 = tmp_path / "lb1" / "etc" / UNIT
    live1.write_text(_base())
    cfg = config(
        agent={"node_name": "lb1", "state_dir": str(state), "run_dir": str(tmp_path / "run")},
        haproxy={"pidfile": str(tmp_path / "none.pid"), "find_without_pidfile": False},
        sync={"enabled": True, "config": str(live1), "check": CHECK},
    )
    svc = SyncService(cfg, Selector(), "lb1", lambda *_: None, lambda: None, lambda _: None)
    try:
        lb1 = Box("lb1", svc.ctx, Expectations())
        lb2 = box(tmp_path, "lb2")
        in_step(lb1, lb2)
        # lb1 refused lb3's version (invalid here) that claimed a higher counter; lb2 never saw it.
        forge(lb1, _base().replace("mode http", "mode htp"), 9, origin="lb3")
        refused = apply.apply_staged(lb1.ctx, wall())
        assert refused is not None and refused.received is not None
        assert refused.received.result == "rejected"
        now = svc._adopt_now()
        assert now.result == "applied" and now.version is not None
        views: list = []
        carrier = FakeCarrier(lb2.ctx.staging)
        carrier.up = False
        link = _link(lb2, views, carrier)
        link.start()
        try:
            # What _local_done does with sync --now's outcome ("applied": fresh).
            link.set_target(now.version, lb1.ctx.ledger.content_path(now.version), fresh=True)
            wait_for(lambda: link.view().state is PeerState.UNREACHABLE, 10, what="unreachable")
            carrier.up = True
            wait_for(
                lambda: link.view().state in (PeerState.IN_SYNC, PeerState.PENDING),
                10,
                what="lb2 reachable again",
            )
        finally:
            link.stop()
        if any("@" in p.name for p in lb2.ctx.staging.iterdir()):
            apply.apply_staged(lb2.ctx, wall())
        mine = operator_saves(lb2, text("edit on lb2 after sync --now"))
        assert mine.result == "applied" and mine.version is not None
        out = deliver(lb2, lb1)
        assert out.received is not None
        assert out.received.result == "applied", (
            f"lb2's edit (counter {mine.version.counter}) is {out.received.result} on lb1, "
            f"whose sync --now claimed counter {now.version.counter} and never reached lb2 "
            f"(pushes: {carrier.pushed})"
        )
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------
# An operator's edit and the guarded install


def test_after_an_upgrade_an_edit_not_yet_taken_is_not_overwritten(tmp_path: Path) -> None:
    """lbwatch before counters recorded ``versions.json`` as a flat map and the content copy
    under ``haproxy.cfg@lb1@<ns>@<sha256>``; the new ledger looks for ``...@c0@...``, does not
    find it, and so has no recorded content. After the upgrade an operator saves haproxy.cfg
    and a version from the (upgraded) peer is staged before the local job runs: the edit must
    be taken first (promise 3), as it is on a node that recorded its version after the upgrade
    (positive control). With no recorded content the staged version is installed unguarded
    over the save: no local edit, no lost copy, no conflict."""
    for upgraded in (False, True):
        node = box(tmp_path / str(upgraded), "lb1")
        data = node.live.read_bytes()
        if upgraded:
            sync = node.ctx.ledger.dir
            sync.mkdir(parents=True)
            old = {"file": UNIT, "origin": "lb1", "edited_ns": 5, "digest": _sha(data)}
            (sync / "versions.json").write_text(json.dumps({UNIT: old}))
            (sync / f"{UNIT}@lb1@5@{_sha(data)}").write_bytes(data)
            assert apply.reconcile(node.ctx).result == "unchanged"
        else:
            assert apply.reconcile(node.ctx).result == "adopted"
        recorded = node.ctx.ledger.content(UNIT) is not None
        saved = text("operator's save, not taken yet")
        node.live.write_text(saved)
        peer = text("the peer's version").encode()
        v = Version(UNIT, "lb2", 1, 1, _sha(peer))
        (node.ctx.staging / v.staged_name()).write_bytes(peer)
        out = apply.apply_staged(node.ctx, wall())
        assert out is not None
        lost = [p.read_text() for p in kept(node.live, Kept.LOST)]
        assert node.live.read_text() == saved or saved in lost, (
            f"upgraded={upgraded}: the operator's save was overwritten by lb2's version "
            f"without being taken (local edit taken first: {out.local is not None}; the "
            f"ledger found its recorded content: {recorded})"
        )


def test_the_copy_recorded_before_counters_is_found_after_the_upgrade(tmp_path: Path) -> None:
    """The root of the upgrade break above: the ledger reads the old index (counter 0), but
    looks for its content copy under the new name, so ``content`` is None and the peer links
    are handed a path that does not exist (every push of it fails, which reads as
    "unreachable"), and a failed local reload has nothing to roll back to."""
    node = box(tmp_path, "lb1")
    data = node.live.read_bytes()
    sync = node.ctx.ledger.dir
    sync.mkdir(parents=True)
    old = {"file": UNIT, "origin": "lb1", "edited_ns": 5, "digest": _sha(data)}
    (sync / "versions.json").write_text(json.dumps({UNIT: old}))
    (sync / f"{UNIT}@lb1@5@{_sha(data)}").write_bytes(data)
    v = node.ctx.ledger.current(UNIT)
    assert v == Version(UNIT, "lb1", 0, 5, _sha(data))
    assert node.ctx.ledger.content_path(v).exists(), node.ctx.ledger.content_path(v).name
    assert node.ctx.ledger.content(UNIT) == data


def test_a_deleted_haproxy_cfg_is_put_back_by_the_next_version(tmp_path: Path) -> None:
    """`_unrecorded_edit` says of a deleted live file: "a deletion is not a version, and the
    install puts it back". It does not: the install is guarded with the recorded content, the
    absent file never matches it, ``LiveChanged`` is raised on every attempt and the staged
    version is deferred, again at every rescan, while the node has no haproxy.cfg (positive
    control: with the file present the same version is installed)."""
    for deleted in (False, True):
        node = box(tmp_path / str(deleted), "lb1")
        assert apply.reconcile(node.ctx).result == "adopted"
        if deleted:
            node.live.unlink()
        theirs = text("the peer's version")
        v = Version(UNIT, "lb2", 5, 1, _sha(theirs.encode()))
        (node.ctx.staging / v.staged_name()).write_text(theirs)
        out = apply.apply_staged(node.ctx, wall())
        assert out is not None
        assert out.received is not None, f"deleted={deleted}: the staged version was deferred"
        assert out.received.result == "applied"
        assert node.live.read_text() == theirs


def test_a_bundles_lost_copy_is_as_private_as_its_most_private_file(tmp_path: Path) -> None:
    """A bundle holds haproxy.cfg (0644, as Debian ships it) and a certificate with its private
    key (0600). A bundle version that lost to a later edit is kept beside haproxy.cfg "as
    private as the live file": it gets haproxy.cfg's mode, 0644, and so the private key, in
    the kept copy, is readable by every local user (promise 4)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    live, key = etc / UNIT, etc / "site.pem"
    live.write_text(_base())
    live.chmod(0o644)
    key.write_text("-----BEGIN PRIVATE KEY-----\nours\n")
    key.chmod(0o600)
    files = FileSet(live, (str(etc / "*.pem"),))
    ours = files.read_live()
    current = Version(files.unit, "lb1", 5, 5, _sha(ours))
    theirs = pack({live: _base().encode(), key: b"-----BEGIN PRIVATE KEY-----\ntheirs\n"})
    v = Version(files.unit, "lb2", 4, 4, _sha(theirs))
    (staging / v.staged_name()).write_bytes(theirs)
    settings = ApplySettings(CHECK, _reload_ok, 3, 30, confined())
    rec = receive(staging / v.staged_name(), files, current, 5, settings, Expectations())
    assert rec.result == "kept-local"
    (copy,) = kept(staging / ".kept" / files.unit, Kept.LOST)
    assert b"PRIVATE KEY" in b"".join(files.unpack(copy.read_bytes()).values())
    mode = stat.S_IMODE(copy.stat().st_mode)
    assert mode & 0o077 == 0, f"{copy.name} holds site.pem's private key with mode {mode:o}"


def test_a_version_installed_through_a_symlinked_haproxy_cfg_keeps_the_link(
    tmp_path: Path,
) -> None:
    """haproxy.cfg is a symlink to the file configuration management writes (a common layout).
    The install takes the no-exchange path for a symlink and renames a regular file over the
    link: the link is gone, its target keeps the old config, and what the operator's tools
    write there afterwards is no longer live. Pre-existing (the old install renamed over the
    link too), but the guarded install is also unguarded (compare, then rename) on this path."""
    node = box(tmp_path, "lb1")
    real = tmp_path / "lb1" / "managed" / UNIT
    real.parent.mkdir()
    real.write_text(_base())
    node.live.unlink()
    node.live.symlink_to(real)
    assert apply.reconcile(node.ctx).result == "adopted"
    theirs = text("the peer's version")
    v = Version(UNIT, "lb2", 5, 1, _sha(theirs.encode()))
    (node.ctx.staging / v.staged_name()).write_text(theirs)
    out = apply.apply_staged(node.ctx, wall())
    assert out is not None and out.received is not None and out.received.result == "applied"
    assert node.live.read_text() == theirs
    assert node.live.is_symlink(), "the symlink was replaced by a regular file"
    assert real.read_text() == theirs


def test_a_save_still_being_written_is_not_reloaded_and_pushed_by_a_staged_job(
    tmp_path: Path,
) -> None:
    """The watcher takes a save only after ``debounce`` of quiet, so a file written in place in
    several writes (scp, cp of a large file, nano) is taken whole. The staged job reads the live
    file at once: a peer's version arriving while the first half of a save is on disk (and that
    half passes ``haproxy -c``: the frontends written so far) gets that half reloaded, recorded
    as this node's newest edit and so pushed to every peer, with the rest of the config
    missing."""
    node = box(tmp_path, "lb1")
    assert apply.reconcile(node.ctx).result == "adopted"
    whole = _base() + "\nfrontend more\n    bind 127.0.0.1:1\n    monitor-uri /more\n"
    half = whole[: whole.index("frontend monitor")]
    theirs = text("the peer's version")
    v = Version(UNIT, "lb2", 5, 1, _sha(theirs.encode()))
    with node.live.open("w") as saving:
        saving.write(half)
        saving.flush()
        (node.ctx.staging / v.staged_name()).write_text(theirs)
        out = apply.apply_staged(node.ctx, wall())
        saving.write(whole[len(half) :])
    assert out is not None
    recorded = node.ctx.ledger.content(UNIT)
    assert recorded != half.encode(), (
        "half of a save still being written was reloaded and recorded as this node's newest "
        f"version (local job: {out.local.result if out.local else None})"
    )
