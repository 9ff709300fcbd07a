"""Adversarial, end to end: what the bound on claims does to a node that lost its sync state,
in the two-node lab (real sshd, rrsync, haproxy; X-Config is the witness of what a node
serves). A failing test here shows a break of issue 9's promises (report on branch ``adv9``);
it is not marked xfail on purpose."""

from __future__ import annotations

import shutil

import pytest

from lbwatch.sync.versions import MAX_AHEAD
from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_sync import cfg_path, peer, save_like_vim, served
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.e2e.test_lab_sync_trust import _claim, both_serve, current, lab_with
from tests.lab.netlab import haproxy_cfg
from tests.util import wait_for

# The sync lab's marks: e2e, root, sshd and rrsync, the lab's tools, 180 s.
pytestmark = sync_marks


def test_after_a_claim_a_node_that_lost_its_state_still_wins_with_its_next_edit() -> None:
    """A version pushed into lb1 with a sync key claims exactly MAX_AHEAD edits ahead: within
    the bound, both nodes take it. lb2 then loses its sync state (state/sync removed, lbwatch
    restarted): it records its file afresh at counter 1 and reads lb1's counter, which is more
    than MAX_AHEAD ahead of that, so it counts it for half the bound only. The operator's next
    edit on lb2 must win on both nodes (promise 2; the commit: a node that lost its state is
    brought in line); it takes a counter below the claim's, lb1 keeps the claim, and the two
    nodes serve different configs with nothing left to deliver."""
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        save_like_vim(cfg_path(lb1), haproxy_cfg("edit-1"))
        wait_for(lambda: both_serve(lab, "edit-1"), 20, what="a first edit everywhere")
        _claim(lab, lb1, "claimed", MAX_AHEAD)
        wait_for(
            lambda: served(lab, lb1) == served(lab, lb2) == "claimed",
            20,
            what="the claim, within the bound, everywhere",
        )
        lb2.stop_lbwatch()
        shutil.rmtree(lb2.dir / "state" / "sync")
        lb2.start_lbwatch()
        wait_for(lambda: services_up(lb2), 20, what="lb2's lbwatch back")
        # (The status file of the stopped agent says in-sync too: wait for the new one's.)
        wait_for(
            lambda: (
                (link := peer(lb2, "lb1")) is not None
                and link.state == "in-sync"
                and link.target is not None
                and link.target.counter == 1
            ),
            20,
            what="lb2 recorded its file afresh and compared with lb1",
        )
        save_like_vim(cfg_path(lb2), haproxy_cfg("edit-after-the-wipe"))
        try:
            wait_for(
                lambda: both_serve(lab, "edit-after-the-wipe", "lb2"),
                20,
                what="lb2's edit everywhere",
            )
        except TimeoutError:
            pytest.fail(
                f"lb1 serves {served(lab, lb1)!r} (counter {current(lb1).counter}), lb2 "
                f"serves {served(lab, lb2)!r} (counter {current(lb2).counter}); lb2's link "
                f"to lb1: {peer(lb2, 'lb1')}"
            )
