"""End to end: config sync between the two lab nodes over real sshd, with the restricted sync
key (lbwatch's receiver into staging), real haproxy reloads, and the X-Config response header
as the witness of which version a node's haproxy serves."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch.statusdoc import PeerDoc, SyncReport, SyncView, VersionView
from tests.e2e.test_lab import TOOLS, services_up
from tests.lab.netlab import LB_ADDR, Lab, Node, haproxy_cfg
from tests.lab.ssh import by_hand, put_request
from tests.util import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(
        not Path("/usr/sbin/sshd").exists() or not Path("/usr/bin/rrsync").exists(),
        reason="needs sshd and rrsync",
    ),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason="lab tools missing"),
    pytest.mark.timeout(180),
]


def served(lab: Lab, node: Node) -> str:
    """The X-Config header node's haproxy answers with, asked through the node's own address."""
    return str(lab.client_fetch(LB_ADDR[node.name])["config"])


def sync_view(node: Node) -> SyncView | None:
    """The sync part of ``node``'s status document; None until its agent has written one."""
    doc = node.status()
    return doc.sync if doc is not None else None


def sync_of(node: Node) -> SyncView:
    """The sync part of ``node``'s status document, which its agent must have written by now."""
    sync = sync_view(node)
    assert sync is not None, f"{node.name}: no sync in its status document"
    return sync


def current_of(node: Node) -> VersionView:
    """The config version ``node`` holds, as its status document (written by now) says."""
    current = sync_of(node).current
    assert current is not None, f"{node.name}: no current version in its status document"
    return current


def local_result(node: Node) -> str | None:
    """What ``node``'s last local sync job came to; None before there is one."""
    sync = sync_view(node)
    return sync.local.result if sync is not None and sync.local is not None else None


def peer(node: Node, name: str) -> PeerDoc | None:
    """What ``node``'s status document says of its link to ``name``; None while it says
    nothing."""
    sync = sync_view(node)
    return sync.peers.get(name) if sync is not None else None


def peer_state(node: Node, name: str) -> str | None:
    """The state of ``node``'s link to ``name``; None while its status says nothing of it."""
    link = peer(node, name)
    return link.state if link is not None else None


def push_count(node: Node, name: str) -> int:
    """How many versions ``node`` has pushed to ``name``; its status must list the link."""
    link = peer(node, name)
    assert link is not None, f"{node.name}: no link to {name} in its status document"
    return link.pushes


def in_sync(a: Node, b: Node) -> bool:
    return peer_state(a, b.name) == "in-sync" and peer_state(b, a.name) == "in-sync"


def settled(node: Node, other: Node) -> bool:
    """``node``'s link to ``other`` has finished delivering the version ``node`` holds: it read
    ``other`` holding it. The link reports that only after the attempt it made for that version,
    a push included, so every push it made of it is counted by then."""
    sync = sync_view(node)
    if sync is None or sync.current is None:
        return False
    link = sync.peers.get(other.name)
    return link is not None and link.target == sync.current and link.state == "in-sync"


def cfg_path(node: Node) -> Path:
    return node.dir / "haproxy" / "haproxy.cfg"


def save_like_vim(path: Path, text: str) -> None:
    """Write a new file and rename it over the old one, as editors and `sed -i` do."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    tmp.rename(path)


def worker_pids(node: Node) -> set[int]:
    return {p.pid for p in node.live("haproxy")}


@contextlib.contextmanager
def synced_lab(retry: tuple[float, float] = (0.5, 4.0)) -> Iterator[Lab]:
    """Both nodes with sshd and lbwatch syncing haproxy.cfg with each other; both start from the
    same file, so each finds the other in sync at start-up without pushing."""
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lab.enable_sync()
        for node in (lb1, lb2):
            node.write_configs(sync=True, sync_retry=retry)
            node.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            wait_for(lambda: in_sync(lb1, lb2), 20, what="start-up comparison: in sync")
            assert served(lab, lb1) == served(lab, lb2) == "v1"
            yield lab
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")


@pytest.fixture
def synced() -> Iterator[Lab]:
    """The two nodes in sync, retrying a peer quickly (0.5 s doubling to 4 s)."""
    with synced_lab() as lab:
        yield lab


@pytest.fixture
def synced_defaults() -> Iterator[Lab]:
    """The two nodes in sync, retrying a peer as lbwatch does by default: 1 s doubling to 60 s."""
    with synced_lab(retry=(1.0, 60.0)) as lab:
        yield lab


def test_edit_on_one_node_is_served_by_the_other(synced: Lab) -> None:
    """An edit on lb1 is checked, reloaded there, pushed, checked and reloaded on lb2: lb2's
    haproxy serves it through lb2's own address; lb2 keeps the old file as a backup."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    # At most start-up's own v1 (lb2's agent had not recorded its copy yet: seen under load).
    pushes = push_count(lb1, "lb2")
    assert pushes <= 1
    save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
    wait_for(lambda: served(synced, lb2) == "v2", 15, what="lb2 serving v2")
    assert served(synced, lb1) == "v2"
    assert cfg_path(lb2).read_text() == haproxy_cfg("v2")
    assert [p.name for p in (lb2.dir / "haproxy").glob("haproxy.cfg.lbwatch-*")]
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="lb1 sees lb2 in sync")
    assert push_count(lb1, "lb2") == pushes + 1
    received = sync_of(lb2).received
    assert received is not None and received.origin == "lb1" and received.result == "applied"
    # lb2 did not push the received version back: its link to lb1, handed the version lb2 now
    # holds, is done with it (found lb1 holding it) and made no push on the way.
    wait_for(lambda: settled(lb2, lb1), 10, what="lb2's link done with lb1's version")
    assert push_count(lb2, "lb1") == 0
    assert "in-sync" in lb1.lbwatch_cli("sync", "--status")
    # sync --now on lb2 makes its (identical) file its own newest version and waits for lb1.
    out = lb2.lbwatch_cli("sync", "--now", "--wait", "20")
    assert "lb1" in out and "in-sync" in out
    assert "pushed on request (sync --now), nothing reloaded: same content" in out
    assert current_of(lb1).origin == "lb2"
    # lb1 now holds lb2's version and finds lb2 holding it too, without pushing it back.
    wait_for(
        lambda: (
            (sync := sync_view(lb1)) is not None
            and (link := sync.peers.get("lb2")) is not None
            and link.target == sync.current
            and link.state == "in-sync"
        ),
        10,
        what="lb1 sees lb2 holding lb2's version",
    )
    assert push_count(lb1, "lb2") == pushes + 1
    verdict = SyncReport.model_validate_json(lb1.lbwatch_cli("sync", "--status", "--json"))
    assert verdict.ok is True and verdict.peers["lb2"].sync == "in-sync"


def test_invalid_edit_is_not_reloaded_nor_pushed(synced: Lab) -> None:
    """A broken edit on lb1: not reloaded, not pushed, reported; both nodes keep serving v1;
    the fixed edit that follows goes through."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    pushes = push_count(lb1, "lb2")  # from here: start-up may have pushed v1
    workers = worker_pids(lb1)
    held = sync_of(lb1).current
    cfg_path(lb1).write_text(haproxy_cfg("v2").replace("mode http", "mode htp", 1))
    wait_for(lambda: local_result(lb1) == "invalid", 10, what="rejected locally")
    # This status is written once lbwatch has handled the job's outcome. By then a reload would
    # have been confirmed (a new worker: the job waits for one), and a version handed to the
    # peer links would already be this node's current one (the links deliver only that).
    sync = sync_of(lb1)
    assert sync.local is not None and "htp" in sync.local.message
    assert sync.current == held  # not made this node's version, so handed to no link
    assert worker_pids(lb1) == workers  # not reloaded
    assert "INVALID" in lb1.lbwatch_cli("status")
    assert served(synced, lb1) == served(synced, lb2) == "v1"
    assert cfg_path(lb2).read_text() == haproxy_cfg("v1")
    assert push_count(lb1, "lb2") == pushes
    assert not [p for p in (lb2.dir / "staging").iterdir() if "@" in p.name]
    save_like_vim(cfg_path(lb1), haproxy_cfg("v3"))
    wait_for(lambda: served(synced, lb2) == "v3", 15, what="lb2 serving the fixed v3")
    # One push in all, the fixed v3's; lb2 refused nothing, so nothing broken reached it.
    wait_for(lambda: settled(lb1, lb2), 10, what="lb1's link done with v3")
    assert push_count(lb1, "lb2") == pushes + 1
    assert "refused" not in lb2.log_text()


def test_a_reload_refused_on_the_editing_node_is_undone_on_the_peer_too(synced: Lab) -> None:
    """The edit goes to lb2 while lb1 reloads it (push_after = "check"). One that binds lb2's
    own address passes `haproxy -c` on both nodes and loads on lb2, but not on lb1: lb1 goes
    back to v1, and that restored version, newer than the refused one, takes lb2 back too."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    only_lb2 = f"frontend only_lb2\n    bind {LB_ADDR['lb2']}:8081\n\nfrontend monitor"
    save_like_vim(cfg_path(lb1), haproxy_cfg("lb2-only").replace("frontend monitor", only_lb2))
    # lb2 took it while lb1's reload was still unconfirmed (reload_confirm: 5 s).
    wait_for(lambda: served(synced, lb2) == "lb2-only", 10, what="lb2 serving the early push")
    wait_for(
        lambda: local_result(lb1) == "reload-failed",
        20,
        what="lb1's reload refused",
    )
    wait_for(lambda: served(synced, lb2) == "v1", 15, what="lb2 back on v1")
    wait_for(lambda: settled(lb1, lb2), 10, what="lb1's link done with the restored version")
    assert served(synced, lb1) == "v1"
    assert cfg_path(lb1).read_text() == cfg_path(lb2).read_text() == haproxy_cfg("v1")
    current = current_of(lb1)
    assert current == current_of(lb2) and current.origin == "lb1"
    assert "the peers given it back too" in lb1.log_text()


def test_peer_down_catches_up_with_the_newest_version(synced: Lab) -> None:
    """lb2's sshd is down through two edits on lb1: lb1 reports it unreachable and retries;
    when it is back, lb2 gets only the newest version (v3), never the stale v2."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    # Counted from here: at the lab's start lb1 may have pushed v1 too, when lb2's agent had
    # not recorded its own copy yet (seen under a CPU hog).
    pushes = push_count(lb1, "lb2")
    lb2.stop_sshd()
    save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
    wait_for(lambda: peer_state(lb1, "lb2") == "unreachable", 20, what="lb2 unreachable")
    assert served(synced, lb1) == "v2" and served(synced, lb2) == "v1"
    assert "UNREACHABLE since" in lb1.lbwatch_cli("sync", "--status", check=False)
    save_like_vim(cfg_path(lb1), haproxy_cfg("v3"))
    wait_for(lambda: served(synced, lb1) == "v3", 10, what="lb1 serving v3")
    lb2.start_sshd()
    wait_for(lambda: served(synced, lb2) == "v3", 20, what="lb2 caught up with v3")
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="in sync again")
    assert push_count(lb1, "lb2") == pushes + 1  # v3 only
    backups = [p.read_text() for p in (lb2.dir / "haproxy").glob("haproxy.cfg.lbwatch-2*")]
    assert haproxy_cfg("v2") not in backups  # v2 never went live on lb2


RETRY_IN = re.compile(r"peer lb2: unreachable \((.*)\); trying again in ([0-9.]+) s")


def retries(node: Node) -> list[tuple[str, float]]:
    """lbwatch's retries of lb2 so far, as (reason, delay) from its log."""
    return [(m[1], float(m[2])) for m in RETRY_IN.finditer(node.log_text())]


def backoff_past(node: Node, seconds: float) -> bool:
    return any(delay >= seconds for _, delay in retries(node))


def catch_up(lab: Lab, node: Node, since: float, limit: float = 5.0) -> float:
    """Seconds from ``since`` until ``node`` serves v2; fails past ``limit``."""
    wait_for(
        lambda: served(lab, node) == "v2", limit, interval=0.02, what=f"{node.name} serving v2"
    )
    return time.monotonic() - since


def test_returning_peer_catches_up_within_5_s(synced_defaults: Lab) -> None:
    """lb2's sshd is down until lb1's backoff (the default, 1 s doubling to 60 s) has grown past
    30 s; an edit made meanwhile is served by lb2 within 5 s of its sshd starting again, because
    lb1 knocks on lb2's port every second and delivers as soon as it answers."""
    lab = synced_defaults
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    lb2.stop_sshd()
    save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
    wait_for(lambda: served(lab, lb1) == "v2", 10, what="lb1 serving v2")
    wait_for(lambda: backoff_past(lb1, 30.0), 60, interval=0.5, what="lb1's backoff past 30 s")
    assert served(lab, lb2) == "v1"
    status = lb1.lbwatch_cli("sync", "--status", check=False)
    assert "ssh: connection refused (192.0.2.12:22)" in status, status
    assert "unexplained" not in status
    started = time.monotonic()
    lb2.start_sshd()
    listening = time.monotonic()
    took = catch_up(lab, lb2, started)
    print(
        f"catch-up: lb2 served v2 {took:.2f} s after sshd was started "
        f"({took - (listening - started):.2f} s after it listened); "
        f"lb1's backoff then: {retries(lb1)[-1][1]:.0f} s"
    )
    assert "lb2: 192.0.2.12:22 answers again; delivering now" in lb1.log_text()
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="lb1 sees lb2 in sync")


@pytest.mark.timeout(240)  # each attempt waits out ssh's ConnectTimeout: about 70 s cut off
def test_peer_back_on_the_network_catches_up_within_5_s(synced_defaults: Lab) -> None:
    """lb2 cut off at the network level (its switch port down: no refusal, lb1's SYNs go
    unanswered, and the kept ssh connection dies without a word) until lb1's backoff has grown
    past 30 s; lb2 serves the edit made meanwhile within 5 s of its port coming back up."""
    lab = synced_defaults
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    lab.ip("sw", "link", "set", "p-lb2", "down")
    try:
        save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
        wait_for(lambda: served(lab, lb1) == "v2", 10, what="lb1 serving v2")
        wait_for(lambda: backoff_past(lb1, 30.0), 120, interval=0.5, what="backoff past 30 s")
        reasons = {reason for reason, _ in retries(lb1)}
        print("lb1's reasons while lb2 was cut off:", sorted(reasons))
        assert any(
            r
            in (
                "ssh: connection timed out (192.0.2.12:22)",
                "ssh: no route to host (192.0.2.12:22)",
            )
            for r in reasons
        ), reasons
    finally:
        started = time.monotonic()
        lab.ip("sw", "link", "set", "p-lb2", "up")
    took = catch_up(lab, lb2, started)
    print(f"catch-up: lb2 served v2 {took:.2f} s after its port came back up")
    assert "lb2: 192.0.2.12:22 answers again; delivering now" in lb1.log_text()
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="lb1 sees lb2 in sync")


def test_simultaneous_edits_converge_without_ping_pong(synced: Lab) -> None:
    """lb1 and lb2 are edited at the same moment: both end up serving the same version, chosen
    by the rule (later edit wins), each node pushed once, and nothing moves afterwards: a later
    edit on the losing node goes through with its own push and not one push more."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    go = threading.Barrier(2)

    def edit(node: Node, text: str) -> None:
        go.wait(5)
        save_like_vim(cfg_path(node), text)

    threads = [
        threading.Thread(target=edit, args=(lb1, haproxy_cfg("from-lb1"))),
        threading.Thread(target=edit, args=(lb2, haproxy_cfg("from-lb2"))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    def converged() -> bool:
        a, b = served(synced, lb1), served(synced, lb2)
        return a == b and a in ("from-lb1", "from-lb2")

    wait_for(converged, 20, what="both nodes serving the same version")
    winner = served(synced, lb1)
    winner_node, loser_node = (lb1, lb2) if winner == "from-lb1" else (lb2, lb1)
    # Each link done with the version its node holds (the winner's, on both): every push either
    # made is counted from here on.
    wait_for(lambda: settled(lb1, lb2) and settled(lb2, lb1), 10, what="both links settled")
    current = [current_of(n) for n in (lb1, lb2)]
    assert current[0].digest == current[1].digest
    assert current[0].origin == winner_node.name
    # The losing version is kept on disk (a backup on its own node, or beside the winner's
    # live file if it got there) and reported as a conflict.
    loser_text = haproxy_cfg(f"from-{loser_node.name}")
    kept = [
        p.read_text() for n in (lb1, lb2) for p in (n.dir / "haproxy").glob("haproxy.cfg.lbwatch-*")
    ]
    assert loser_text in kept
    assert "lost to" in lb1.log_text() + lb2.log_text()
    pushes = (push_count(lb1, "lb2"), push_count(lb2, "lb1"))
    assert max(pushes) == 1 and sum(pushes) in (1, 2), pushes  # each edit pushed once at most
    assert served(synced, lb1) == served(synced, lb2) == winner
    # No ping-pong, bounded by a later event rather than a pause: an edit on the loser. Each
    # node runs one sync job at a time, in order, and a link one attempt at a time, so once
    # both links are done with that edit, whatever either node would still have done with the
    # winner's version (a push back, a re-push) is done and counted. Nothing is applied without
    # a push, so the pushes account for that too.
    save_like_vim(cfg_path(loser_node), haproxy_cfg("after"))
    wait_for(lambda: served(synced, winner_node) == "after", 15, what="the winner serving it")
    wait_for(
        lambda: (
            settled(lb1, lb2)
            and settled(lb2, lb1)
            and current_of(winner_node).origin == loser_node.name
        ),
        10,
        what="both links settled on the loser's later edit",
    )
    after = (push_count(lb1, "lb2"), push_count(lb2, "lb1"))
    assert after == (pushes[0] + int(loser_node is lb1), pushes[1] + int(loser_node is lb2)), after
    assert served(synced, lb1) == served(synced, lb2) == "after"


def stolen_key(lb1: Node) -> list[str]:
    """ssh with lb1's sync key, as whoever stole it from lb1 would run it (no kept connection)."""
    return [
        "ssh",
        "-i",
        str(lb1.dir / "ssh" / "sync_key"),
        "-o",
        f"UserKnownHostsFile={lb1.dir / 'ssh' / 'known_hosts'}",
        "-o",
        "BatchMode=yes",
        "-o",
        "ControlPath=none",
    ]


def test_sync_key_cannot_write_outside_staging_or_run_commands(synced: Lab) -> None:
    """lb1's sync key, used directly against lb2's sshd: the status file is read back through
    lb2's receiver (a positive control: the key, ssh and the receiver work), a file lb2 does not
    sync is refused unstored, a command is refused, and names or rsync paths outside staging
    land nowhere."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    ssh = stolen_key(lb1)
    code, answers, said = by_hand(lb1.enter(*ssh, LB_ADDR["lb2"]), b"GET status.json\n")
    assert code == 0 and b"\nDATA " in answers, (answers, said)
    # A version-shaped name of a file lb2 does not sync (the review's Lua file would be one).
    content = b"not synced here\n"
    name = f"control.txt@lb1@c1@1@{hashlib.sha256(content).hexdigest()}"
    code, answers, said = by_hand(lb1.enter(*ssh, LB_ADDR["lb2"]), put_request(name, content))
    refused = b"\nERR this node does not sync control.txt (it takes versions of haproxy.cfg)\n"
    assert answers.endswith(refused), (answers, said)
    assert not (lb2.dir / "staging" / name).exists()
    out = subprocess.run(
        lb1.enter(*ssh, LB_ADDR["lb2"], "touch", "/tmp/lbwatch-pwned"),
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode != 0 and not Path("/tmp/lbwatch-pwned").exists()
    assert "lbwatch receive: refused" in out.stderr
    evil = lb1.dir / "evil.cfg"
    evil.write_text("global\n")
    before = cfg_path(lb2).read_text()
    for target in ("/etc/haproxy/haproxy.cfg", "../haproxy/haproxy.cfg", "../../evil"):
        code, answers, _ = by_hand(
            lb1.enter(*ssh, LB_ADDR["lb2"]), put_request(target, b"global\n")
        )
        assert answers.endswith(b"\nERR not a staged version's name: %r\n" % target), answers
        subprocess.run(
            lb1.enter("rsync", "-e", " ".join(ssh), str(evil), f"{LB_ADDR['lb2']}:{target}"),
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    assert cfg_path(lb2).read_text() == before
    assert not (lb2.dir.parent / "evil").exists() and not (lb2.dir / "evil").exists()


def receivers_of(node: Node, peer: str) -> list[psutil.Process]:
    """The receivers running on ``node`` for ``peer``'s sync key (``--peer PEER``)."""
    found = []
    for p in node.procs():
        try:
            argv = p.cmdline()
            at = argv.index("receive") if "receive" in argv else len(argv)
            if argv[at + 1 : at + 3] == ["--peer", peer] and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def open_session(argv: list[str]) -> tuple[subprocess.Popen[bytes], bool]:
    """A session held open with the stolen key, and whether the receiver took it (greeted)
    rather than refusing it (ssh exits, the receiver's reason on its stderr)."""
    proc = subprocess.Popen(
        [*argv, "lbwatch-sync 1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # nsenter forks ssh: the group is ended whole (see the test)
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "no greeting and no end within 20 s"
    return proc, proc.stdout.readline().startswith(b"LBWATCH-SYNC 1 ")


def test_a_stolen_key_gets_eight_sessions_and_256_mib_and_the_agents_sessions_go_on(
    synced: Lab,
) -> None:
    """lb1's sync key, used by hand against lb2's sshd beside lb1's agent (whose sync link and
    cluster watch hold two sessions of it): sessions opened until one is refused ("busy") leave
    eight receivers of lb1's key on lb2, and an edit on lb1 still reaches lb2 through the
    agent's sessions; with lb2 paused (its staging not taken), a flood of 64 MiB versions
    stores at most the 256 MiB quota, the rest refused unstored."""
    lb1, lb2 = synced.nodes["lb1"], synced.nodes["lb2"]
    ssh = lb1.enter(*stolen_key(lb1), LB_ADDR["lb2"])
    held: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(12):
            proc, taken = open_session(ssh)
            held.append(proc)
            if not taken:
                break
        assert not taken, "twelve sessions of one key taken"
        assert proc.stderr is not None and b"lbwatch receive: busy: " in proc.stderr.read()
        assert len(receivers_of(lb2, "lb1")) == 8  # the agent's two and six by hand
        save_like_vim(cfg_path(lb1), haproxy_cfg("during-the-attack"))
        wait_for(lambda: served(synced, lb2) == "during-the-attack", 20, what="lb2 serving it")

        for proc in held:  # the thief lets go (its end of the stream): the agent's two stay
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(20)
        wait_for(lambda: len(receivers_of(lb2, "lb1")) == 2, 20, what="the six by hand gone")
        lb2.lbwatch_cli("pause")
        flood = b""
        for i in range(6):
            content = b"#" * (64 * 1024 * 1024 - 16) + b"%016d" % i
            digest = hashlib.sha256(content).hexdigest()
            flood += put_request(f"haproxy.cfg@mallory@c{9000 + i}@1@{digest}", content)
        _, answers, said = by_hand(ssh, flood, timeout=120)
        replies = answers.split(b"\n")[1:-1]  # after the greeting
        assert len(replies) == 6, (replies, said)
        assert replies[:3] == [b"OK"] * 3, replies
        full = [r for r in replies if r != b"OK"]
        assert full and all(r.startswith(b"ERR staging is full") for r in full), replies
        staged = [p for p in (lb2.dir / "staging").iterdir() if p.name.startswith("haproxy")]
        assert len(staged) == 6 - len(full)
        assert sum(p.stat().st_size for p in staged) <= 256 * 1024 * 1024
    finally:
        for proc in held:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: nsenter, ssh
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


MAP = "/etc/haproxy/maps/lab.map"


def test_map_file_travels_with_the_config() -> None:
    """With extra_files, a map edit on lb1 is served by lb2; a new map and the config that
    starts using it arrive as one version, so lb2 never checks a config without its map."""
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lab.enable_sync()
        for node in (lb1, lb2):
            (node.dir / "haproxy" / "maps").mkdir(parents=True)
            (node.dir / "haproxy" / "maps" / "lab.map").write_text("k red\n")
            node.write_configs(
                sync=True,
                sync_extra="/etc/haproxy/maps/*.map",
                haproxy=haproxy_cfg("v1", MAP),
            )
            node.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            wait_for(lambda: in_sync(lb1, lb2), 20, what="in sync at start-up")
            assert lab.client_fetch(LB_ADDR["lb2"])["map"] == "red"
            save_like_vim(lb1.dir / "haproxy" / "maps" / "lab.map", "k blue\n")
            wait_for(lambda: lab.client_fetch(LB_ADDR["lb2"])["map"] == "blue", 15, what="lb2 blue")
            # A new map, then the config that uses it, saved together.
            (lb1.dir / "haproxy" / "maps" / "new.map").write_text("k green\n")
            save_like_vim(cfg_path(lb1), haproxy_cfg("v2", "/etc/haproxy/maps/new.map"))
            wait_for(
                lambda: lab.client_fetch(LB_ADDR["lb2"])["map"] == "green", 15, what="lb2 green"
            )
            assert (lb2.dir / "haproxy" / "maps" / "new.map").read_text() == "k green\n"
            received = sync_of(lb2).received
            assert received is not None and received.result == "applied"
            assert "rejected" not in lb2.log_text()
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
