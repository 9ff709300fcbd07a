"""End to end: a pair upgraded from an lbwatch whose sync key ran rrsync. With the old entry
still in authorized_keys, edits go through rsync and the log says how to move on; once the
entry names lbwatch's receiver and the sending agent connects anew, the same pair syncs through
the receiver. Real sshd, rrsync, haproxy; X-Config is the witness of what a node serves."""

from __future__ import annotations

import psutil

from tests.e2e.test_lab import services_up
from tests.e2e.test_lab_sync import cfg_path, in_sync, save_like_vim, served
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.lab.netlab import Lab, Node, haproxy_cfg
from tests.util import wait_for

pytestmark = sync_marks

TOLD = "its sync key runs rrsync, so pushes go through rsync"


def receivers(node: Node) -> list[psutil.Process]:
    """lbwatch receive processes on ``node`` (its sshd runs them for a peer's sessions)."""
    found = []
    for p in node.procs():
        try:
            argv = p.cmdline()
            if "receive" in argv and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_pair_still_on_rrsync_syncs_then_moves_to_the_receiver() -> None:
    """Both keys on the old rrsync entry: an edit on lb1 is served by lb2, through rsync (no
    receiver runs on lb2), and lb1 says once how to move on. lb2's entry is then changed to the
    receiver and lb1's agent restarted (a new connection logs in): the next edit is served by
    lb2 through a receiver (one for sync, one for the cluster watch, which the rrsync entry kept
    out), with nothing more said about rrsync."""
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        lab.enable_sync(rrsync=True)
        try:
            for node in (lb1, lb2):
                node.write_configs(sync=True)
                node.start_lbwatch()
            wait_for(lambda: services_up(lb1) and services_up(lb2), 20, what="both nodes up")
            wait_for(lambda: in_sync(lb1, lb2), 20, what="in sync through rsync")

            save_like_vim(cfg_path(lb1), haproxy_cfg("over-rsync"))
            wait_for(lambda: served(lab, lb2) == "over-rsync", 20, what="lb2 serving the edit")
            assert receivers(lb2) == []
            assert lb1.log_text().count(TOLD) == 1  # the log repeats no file across starts yet

            pub = (lb1.dir / "ssh" / "sync_key.pub").read_text()
            (lb2.dir / "ssh" / "authorized_keys").write_text(lab.sync_entry(lb2, pub))
            lb1.stop_lbwatch()
            told = (lb1.dir / "lbwatch.log").read_text().count(TOLD)
            lb1.start_lbwatch()
            wait_for(lambda: in_sync(lb1, lb2), 20, what="in sync again after the restart")
            save_like_vim(cfg_path(lb1), haproxy_cfg("over-receiver"))
            wait_for(lambda: served(lab, lb2) == "over-receiver", 20, what="lb2 serving it")
            # Two: the sync link's session and the cluster watch's, each with its receiver.
            wait_for(lambda: len(receivers(lb2)) == 2, 10, what="sync's and the watch's")
            assert (lb1.dir / "lbwatch.log").read_text().count(TOLD) == told
        finally:
            for node in (lb1, lb2):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
