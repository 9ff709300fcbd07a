"""End to end, config sync on the bad day: skewed clocks, a peer that claims too much, and an
operator who saves while a peer's version is being checked. Real sshd, rrsync, haproxy and
keepalived in the two-node lab; X-Config is the witness of which version a node serves.

The lab's nodes share the host's kernel clock, so lb2's wall clock is skewed with the agent's
test-only ``LBWATCH_TEST_WALL_OFFSET`` (libfaketime breaks Python's time.sleep on Debian)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lbwatch.statusdoc import VersionView
from lbwatch.sync.versions import MAX_AHEAD, Version
from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_sync import (
    cfg_path,
    current_of,
    in_sync,
    peer_state,
    save_like_vim,
    served,
    sync_of,
    sync_view,
)
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.netlab import LB_ADDR, Lab, Node, haproxy_cfg
from tests.lab.ssh import by_hand, put_request
from tests.util import wait_for

# The sync lab's marks: e2e, root, sshd and rrsync, the lab's tools, 180 s.
pytestmark = sync_marks


@contextmanager
def lab_with(
    env: dict[str, dict[str, str]] | None = None, options: dict[str, str] | None = None
) -> Iterator[Lab]:
    """Both nodes syncing, each started with its own extra environment and [sync] settings."""
    with Lab() as lab:
        lab.enable_sync()
        nodes = list(lab.nodes.values())
        for node in nodes:
            node.write_configs(sync=True, sync_options=(options or {}).get(node.name, ""))
            node.start_lbwatch(env=(env or {}).get(node.name))
        try:
            wait_for(lambda: all(services_up(n) for n in nodes), 20, what="both nodes up")
            wait_for(lambda: in_sync(*nodes), 20, what="start-up comparison: in sync")
            yield lab
        finally:
            for node in nodes:
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")


def current(node: Node) -> VersionView:
    return current_of(node)


def both_serve(lab: Lab, text: str, origin: str = "lb1") -> bool:
    """Both nodes serve ``text``, and ``origin``, whose edit it is, sees the other in sync."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    other = "lb2" if origin == "lb1" else "lb1"
    return (
        served(lab, lb1) == served(lab, lb2) == text
        and peer_state(lab.nodes[origin], other) == "in-sync"
    )


@pytest.mark.parametrize(
    ("offset", "first", "second"),
    [("600", "lb2", "lb1"), ("-600", "lb1", "lb2")],
    ids=["lb2-10min-ahead", "lb2-10min-behind"],
)
def test_later_edit_wins_whatever_the_clocks(offset: str, first: str, second: str) -> None:
    """lb2's clock is 10 minutes off. An edit on the node whose clock is ahead, then, once it is
    served everywhere, an edit on the node whose clock is behind: the later edit wins on both
    nodes and both say in-sync (with wall-clock order the earlier edit won for good)."""
    with lab_with(env={"lb2": {"LBWATCH_TEST_WALL_OFFSET": offset}}) as lab:
        a, b = lab.nodes[first], lab.nodes[second]
        save_like_vim(cfg_path(a), haproxy_cfg(f"from-{first}"))
        wait_for(
            lambda: both_serve(lab, f"from-{first}", first), 20, what=f"{first}'s edit everywhere"
        )
        seen = current(b).counter
        save_like_vim(cfg_path(b), haproxy_cfg(f"from-{second}"))
        wait_for(
            lambda: both_serve(lab, f"from-{second}", second),
            20,
            what=f"{second}'s later edit everywhere",
        )
        for node in (a, b):
            assert current(node).origin == second
            assert current(node).counter == seen + 1
        assert "lost to" not in a.log_text() + b.log_text()


def _as_key(lab: Lab, sender: str, receiver: str, requests: bytes) -> bytes:
    """What someone holding ``sender``'s sync key can do: speak to ``receiver``'s receiver over
    the restricted key, by hand (not through lbwatch's sender), in one session; its answers."""
    node = lab.nodes[sender]
    ssh = [
        "ssh",
        "-i",
        str(node.dir / "ssh" / "sync_key"),
        "-o",
        f"UserKnownHostsFile={node.dir / 'ssh' / 'known_hosts'}",
        "-o",
        "BatchMode=yes",
        "-o",
        "ControlPath=none",
    ]
    code, answers, said = by_hand(node.enter(*ssh, LB_ADDR[receiver]), requests)
    assert code == 0, (answers, said)
    return answers


def _push_as(lab: Lab, sender: str, receiver: str, version: Version, content: bytes) -> None:
    """Send a file with any version name (and its true hash) into ``receiver``'s staging
    directory with ``sender``'s key."""
    answers = _as_key(lab, sender, receiver, put_request(version.staged_name(), content))
    assert answers.endswith(b"\nOK\n"), answers


def _claim(lab: Lab, receiver: Node, text: str, ahead: int) -> Version:
    content = haproxy_cfg(text).encode()
    cur = current(receiver)
    year_2100_ns = 4_102_444_800 * 10**9
    v = Version(
        "haproxy.cfg",
        "lb2",
        cur.counter + ahead,
        year_2100_ns,
        hashlib.sha256(content).hexdigest(),
    )
    _push_as(lab, "lb2", receiver.name, v, content)
    return v


def test_no_claimed_version_locks_a_node() -> None:
    """A version pushed into lb1 with lb2's key, claiming 500 edits ahead and the year 2100,
    is taken (within the bound) and spreads to lb2; yet the next real edit on lb2, then on lb1,
    wins on both nodes. A claim beyond the bound is refused, and the next edit still wins and
    is taken by lb2 (with wall-clock order, the 2100 claim won over every later edit)."""
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        claim = _claim(lab, lb1, "claimed", 500)
        wait_for(
            lambda: served(lab, lb1) == served(lab, lb2) == "claimed", 20, what="claim everywhere"
        )
        save_like_vim(cfg_path(lb2), haproxy_cfg("edit-on-lb2"))
        wait_for(lambda: both_serve(lab, "edit-on-lb2", "lb2"), 20, what="lb2's edit everywhere")
        assert current(lb1).counter == current(lb2).counter == claim.counter + 1
        save_like_vim(cfg_path(lb1), haproxy_cfg("edit-on-lb1"))
        wait_for(lambda: both_serve(lab, "edit-on-lb1"), 20, what="lb1's edit everywhere")

        _claim(lab, lb1, "too-far", MAX_AHEAD + 10)
        wait_for(
            lambda: (
                (sync := sync_view(lb1)) is not None
                and sync.received is not None
                and sync.received.result == "implausible"
            ),
            20,
            what="the implausible claim refused",
        )
        received = sync_of(lb1).received
        assert received is not None and "claims edit counter" in received.message
        assert served(lab, lb1) == served(lab, lb2) == "edit-on-lb1"
        save_like_vim(cfg_path(lb1), haproxy_cfg("next-edit"))
        wait_for(lambda: both_serve(lab, "next-edit"), 20, what="the next edit everywhere")
        assert current(lb1) == current(lb2)


TOP = 2**53 + 1  # the counter of the forged PUTs found in the lab: one beyond the maximum


def _forged(content: bytes, counter: int, n: int) -> bytes:
    """One PUT of a version with any counter and the year 2100, as lb2's key may send it."""
    name = Version(
        "haproxy.cfg",
        "lb2",
        counter,
        4_102_444_800 * 10**9 + n,
        hashlib.sha256(content).hexdigest(),
    ).staged_name()
    return put_request(name, content)


def _put_all(lab: Lab, puts: list[bytes]) -> float:
    """Every PUT into lb1 through lb2's key in one session (each answered OK, so each landed
    in lb1's staging); then until lb1 has taken or refused them all. The session's seconds."""
    started = time.monotonic()
    answers = _as_key(lab, "lb2", "lb1", b"".join(puts))
    took = time.monotonic() - started
    assert answers.splitlines()[1:] == [b"OK"] * len(puts), answers
    staging = lab.nodes["lb1"].dir / "staging"
    wait_for(
        lambda: not any(p.name.startswith("haproxy.cfg@") for p in staging.iterdir()),
        30,
        what="lb1 done with the forged versions",
    )
    return took


def _held_as_the_key_reads_it(lab: Lab) -> int:
    """The counter of the version lb1 holds, read from its status file with lb2's key (where
    the key's holder aims the next claim)."""
    answers = _as_key(lab, "lb2", "lb1", b"GET status.json\n")
    data = answers.split(b"\n", 2)[2]
    return int(json.loads(data)["haproxy.cfg"]["current"]["counter"])


def _sync_time(lab: Lab, text: str, limit: float) -> float:
    """An operator's save on lb1; the seconds until lb2 serves it (polled as fast as the lab's
    client runs), or ``limit`` and more when it does not within ``limit``."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    started = time.monotonic()
    save_like_vim(cfg_path(lb1), haproxy_cfg(text))
    while time.monotonic() - started <= limit:
        if served(lab, lb2) == text:
            return time.monotonic() - started
        time.sleep(0.02)
    return time.monotonic() - started


def test_no_forged_puts_keep_the_attacked_nodes_next_edit_from_its_peer() -> None:
    """With lb2's sync key, the attack as found (twenty PUTs claiming edit 2^53+1), then ten
    invalid and ten valid versions each claiming a million edits beyond the last, are pushed
    into lb1; lb1's next real edit is still served by lb2 within 10 s, as an edit before the
    attack was (the positive control; the refusals used to push lb1's next edit beyond what
    lb2 would take, and lb2 took it only minutes later, after a refusal per half million)."""
    limit = 10.0
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        before = _sync_time(lab, "before-the-attack", limit)
        assert before <= limit, "control: an edit before the attack is served by lb2"
        start = base = _held_as_the_key_reads_it(lab)
        tops = _put_all(lab, [_forged(haproxy_cfg(f"top-{n}").encode(), TOP, n) for n in range(20)])
        assert "implausible" in lb1.log_text()
        broken = [
            _forged(
                haproxy_cfg(f"broken-{k}").encode() + b"no-such-keyword\n", base + k * MAX_AHEAD, k
            )
            for k in range(1, 11)
        ]
        _put_all(lab, broken)
        base = _held_as_the_key_reads_it(lab)
        climb = [
            _forged(haproxy_cfg(f"climb-{k}").encode(), base + k * MAX_AHEAD, k)
            for k in range(1, 11)
        ]
        _put_all(lab, climb)
        after = _sync_time(lab, "after-the-attack", limit)
        print(
            f"lb1's edit served by lb2 in {before:.2f} s before the attack, {after:.2f} s after "
            f"it (twenty PUTs of 2^53+1 in {tops:.2f} s, then twenty climbing claims); "
            f"counters: lb1 {current(lb1).counter}, lb2 {current(lb2).counter}, "
            f"the attack began at {start}"
        )
        assert after <= limit, (
            f"lb1's edit made after the forged PUTs was not served by lb2 within {limit:g} s "
            f"(lb1 holds counter {current(lb1).counter}, lb2 {current(lb2).counter}; lb1's link "
            f"to lb2: {peer_state(lb1, 'lb2')})"
        )
        wait_for(lambda: both_serve(lab, "after-the-attack"), 10, what="lb1 sees lb2 in sync")


CHECK_SLOWLY = """#!/bin/sh
# The lab's checker on lb1: a version from staging waits for the test's go (at most 10 s) after
# saying it is being checked, so that the operator's save lands during the check.
case "$1" in
  {staging}/*)
    touch {dir}/checking
    i=0
    while [ ! -e {dir}/go ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    ;;
esac
exec haproxy -c -f "$1"
"""


def test_save_during_a_peer_versions_check_is_not_lost(tmp_path: Path) -> None:
    """The operator saves haproxy.cfg on lb1 while lb2's version is being checked on lb1: lb1
    does not install lb2's version over the save; the save becomes lb1's edit and wins on both
    nodes, lb2's version is kept beside lb1's live file, and the conflict is reported."""
    script = tmp_path / "check.sh"
    # The checker reports to the test through files: it runs unconfined, as a local edit's.
    options = f'check = ["{script}", "{{file}}"]\nreceived = {{ sandbox = false }}'
    with lab_with(options={"lb1": options}) as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        script.write_text(CHECK_SLOWLY.format(staging=lb1.dir / "staging", dir=tmp_path))
        script.chmod(0o755)
        save_like_vim(cfg_path(lb2), haproxy_cfg("from-lb2"))
        wait_for((tmp_path / "checking").exists, 20, what="lb2's version being checked on lb1")
        save_like_vim(cfg_path(lb1), haproxy_cfg("saved-on-lb1"))
        (tmp_path / "go").touch()
        wait_for(lambda: both_serve(lab, "saved-on-lb1"), 30, what="the save everywhere")
        assert cfg_path(lb1).read_text() == haproxy_cfg("saved-on-lb1")
        (lost,) = (lb1.dir / "staging" / ".kept").glob("haproxy.cfg.lbwatch-lost-lb2-*")
        assert lost.read_text() == haproxy_cfg("from-lb2")
        assert re.search(r"haproxy\.cfg on lb2 lost to this node's later edit", lb1.log_text())
