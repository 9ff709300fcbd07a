"""End to end: config sync with the canary (``[sync] push_after = "healthy"``) between the two lab
nodes, real haproxy reloads, real health probes (the lab's ``monitor-uri /health`` on
127.0.0.1:8404, interval 0.5 s, fall 2, rise 2 here), alerts mailed to a real SMTP server.

An edit that passes ``haproxy -c`` but drops the frontend the probe asks is reloaded on lb1 and
never reaches lb2; a valid edit does, and so does the fix that follows the broken one."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_notify import NOTIFY
from tests.e2e.test_lab_sync import (
    cfg_path,
    in_sync,
    peer_state,
    push_count,
    save_like_vim,
    served,
    sync_of,
)
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.netlab import VIP, Lab, haproxy_cfg
from tests.util import wait_for

pytestmark = sync_marks

CANARY = 'push_after = "healthy"'


def without_monitor(text: str) -> str:
    """The lab's config minus the frontend the health probe asks: `haproxy -c` passes (the web
    frontend still listens), the probe gets no answer."""
    cut = re.sub(r"frontend monitor\n(    .*\n)+\n", "", text)
    assert cut != text and "8404" not in cut
    return cut


def mails(maildir: Path) -> list[tuple[str, str]]:
    """(subject, body) of every message the sink accepted."""
    out = []
    for path in sorted(maildir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        body = msg.get_body(("plain",))
        out.append((str(msg["Subject"]), body.get_content() if body is not None else ""))
    return out


@pytest.fixture
def canary() -> Iterator[tuple[Lab, Path]]:
    """Both nodes syncing with push_after = "healthy" (probe rise 2), alerts by mail; both start
    from the same file, each finds the other in sync once its start-up version passed."""
    with Lab() as lab:
        maildir = lab.start_smtp_sink()
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lab.enable_sync()
        for node in (lb1, lb2):
            node.write_configs(sync=True, sync_options=CANARY, rise=2, lbwatch_extra=NOTIFY)
            node.start_lbwatch()
        try:
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            wait_for(lambda: in_sync(lb1, lb2), 20, what="start-up comparison: in sync")
            assert served(lab, lb1) == served(lab, lb2) == "v1"
            yield lab, maildir
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
            print("mail:", [s for s, _ in mails(maildir)])


def test_a_serving_edit_reaches_the_peer_after_its_probes(canary: tuple[Lab, Path]) -> None:
    """The positive control: a valid edit on lb1 is reloaded there, held until two probes started
    after the reload pass, then pushed; lb2 serves it."""
    lab, _ = canary
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    pushes = push_count(lb1, "lb2")  # from here: start-up may have pushed v1
    save_like_vim(cfg_path(lb1), haproxy_cfg("v2"))
    wait_for(lambda: served(lab, lb2) == "v2", 15, what="lb2 serving v2")
    text = lb1.log_text()
    assert "pushing to peers once its health probe passes 2 time(s) on it" in text
    released = re.findall(r"passed its health probe 2 time\(s\) \(held ([0-9.]+) s\)", text)
    # Start-up's version, then v2's: rise 2 at a 0.5 s interval is about 0.5 s held.
    assert len(released) == 2 and 0.4 < float(released[-1]) < 2.0, released
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="lb1 sees lb2 in sync")
    assert push_count(lb1, "lb2") == pushes + 1
    assert sync_of(lb1).held is None


def test_an_edit_that_serves_nothing_never_reaches_the_peer(canary: tuple[Lab, Path]) -> None:
    """An edit that passes `haproxy -c` but drops the probed frontend: lb1 reloads it (it serves
    it on :80) but never pushes it: over at least six of its failing probes lb2 receives
    nothing and serves v1; lb1 alerts config_unhealthy once and `lbwatch status` says why.
    The fix that follows replaces the held version and reaches lb2."""
    lab, maildir = canary
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    pushes = push_count(lb1, "lb2")  # from here: start-up may have pushed v1
    broken = without_monitor(haproxy_cfg("v2-no-monitor"))
    save_like_vim(cfg_path(lb1), broken)
    wait_for(lambda: served(lab, lb1) == "v2-no-monitor", 10, what="lb1 reloaded the edit")
    wait_for(
        lambda: any("Event: config_unhealthy" in body for _, body in mails(maildir)),
        15,
        what="the config_unhealthy mail",
    )
    # A bounded window, counted in lb1's own failing canary probes, not slept.
    wait_for(
        lambda: lb1.log_text().count("canary probe failed") >= 6, 15, what="six failing probes"
    )
    assert "valid and reloaded" in lb1.log_text()
    held = sync_of(lb1).held
    assert held is not None and held.failures >= 6 and held.passes == 0
    status = lb1.lbwatch_cli("status", check=False)
    assert "NOT PUSHED: health probe failing on the new config" in status, status
    assert push_count(lb1, "lb2") == pushes
    assert sync_of(lb2).received is None  # nothing ever arrived in lb2's staging
    assert "version from lb1" not in lb2.log_text()
    assert cfg_path(lb2).read_text() == haproxy_cfg("v1") and served(lab, lb2) == "v1"
    unhealthy = [s for s, body in mails(maildir) if "Event: config_unhealthy" in body]
    assert len(unhealthy) == 1 and "reloaded here but not pushed" in unhealthy[0], unhealthy
    # lb1 failing its probe gave up the VIP: clients get lb2, still on v1.
    wait_for(
        lambda: lab.client_fetch(VIP)["lb"] == "lb2", 15, what="the VIP on lb2 (lb1 unhealthy)"
    )
    assert lab.client_fetch(VIP)["config"] == "v1"
    # The fix replaces the held version; only it is pushed.
    save_like_vim(cfg_path(lb1), haproxy_cfg("v3"))
    wait_for(lambda: served(lab, lb2) == "v3", 20, what="lb2 serving the fix")
    wait_for(lambda: peer_state(lb1, "lb2") == "in-sync", 10, what="in sync again")
    assert push_count(lb1, "lb2") == pushes + 1
    backups = [p.read_text() for p in (lb2.dir / "haproxy").glob("haproxy.cfg.lbwatch-*")]
    assert broken not in backups and cfg_path(lb2).read_text() == haproxy_cfg("v3")
