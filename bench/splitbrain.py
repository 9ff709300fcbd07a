"""Split brain in the two-node lab (root): VRRP cut between the nodes while the peer link
works, resolved by lbwatch (the default: the node VRRP makes BACKUP stands down, the node left
holding the VIP sends gratuitous ARP) and left alone (``[cluster] resolve_split_brain =
false``: today's behaviour), ROUNDS rounds of each in the same run.

Target in the lab: one holder within 5 s of a VRRP multicast cut, no client stranded on the
wrong MAC, against today's behaviour in the same run.

A round: the pair settled (both agents up and watching each other for standdown.STABLE; a
fresh lab for each mode and every standdown.MAX_STANDS rounds, since lbwatch stands down at
most that often in standdown.WINDOW), a capture on the bridge (tcpdump) and the lab's client
GETting through the VIP every ~5 ms (a new connection each, timeout 0.25 s:
tests/lab/clientprobe.py). VRRP is cut (``Lab.set_vrrp``: multicast off on the nodes' bridge
ports) 1.8 s before one of lb1's gratuitous-ARP refreshes (the lab's keepalived sends one every
5 s: tests/lab/splitlab.py says why the cut is timed so: the client follows lb2, and only
lbwatch's gratuitous ARP can bring it back before lb1's next refresh), held --hold seconds,
restored, and the round ends once all is back to normal.

Measured, all on the host's wall clock (keepalived's transitions from its own notify hooks):
- split: the cut -> lb2 MASTER;
- one holder: the cut -> lb2 out of MASTER (FAULT: it stood down), or none during the cut;
- lb1's gratuitous ARP: one holder -> lb1's first on the wire (lbwatch's ANNOUNCE);
- GETs during the cut answered by lb1, by lb2, or failed; the seconds of the cut the client was
  not answered by lb1 (on lb2's MAC, or unanswered), in all and once there was one holder (a
  GET sent to lb2's MAC just before lb1's gratuitous ARP arrived waits out its 0.25 s timeout,
  so this is at least the ARP's delay and at most that plus 0.25 s);
- one answer: the cut -> every GET answered by lb1 from then until the restore;
- restore: VRRP back -> lb2 BACKUP; -> normal: lb2 BACKUP with its track file at 0, the VIP
  on lb1 alone, and every GET answered by lb1 from then on; GETs failed after the restore.

    sudo make bench                                         # among the others
    sudo .venv/bin/python bench/splitbrain.py               # 3 rounds a mode, about 3 minutes
    sudo .venv/bin/python bench/splitbrain.py --rounds 5 --hold 20

Figures are medians over the rounds (with min and max), printed, never asserted: the machine
is shared and noisy, so compare the two modes of one run rather than against figures from
elsewhere.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import wire
from lbwatch import trackfile
from lbwatch.cluster.standdown import MAX_STANDS
from tests.lab.clientprobe import Probe, alone_since, gets_by_answer, seconds_off
from tests.lab.netlab import Lab, Node
from tests.lab.splitlab import (
    RESOLVE_OFF,
    cut_before_refresh,
    entered,
    garps,
    settled_pair,
    track_value,
    transitions,
    vrrp_state,
)
from tests.util import wait_for

MODES = {"lbwatch resolves": "", "left alone": RESOLVE_OFF}
NAN = float("nan")
TARGET_ONE_HOLDER = 5.0  # s from the cut: the target, printed beside the figure
AFTER_NORMAL = 2.0  # s the client is watched once all is back to normal


@dataclass
class Round:
    mode: str
    split: float = NAN  # the cut -> lb2 MASTER
    one_holder: float = NAN  # the cut -> lb2 out of MASTER during the cut; nan: none
    garp: float = NAN  # one holder -> lb1's first gratuitous ARP on the wire after it
    gets: dict[str, int] = field(default_factory=dict)  # during the cut, by answer
    stranded: float = NAN  # s of the cut not answered by lb1
    stranded_single: float = NAN  # s not answered by lb1 once there was one holder
    one_answer: float = NAN  # the cut -> every GET answered by lb1 until the restore
    backup: float = NAN  # restore -> lb2 BACKUP
    normal: float = NAN  # restore -> all back to normal
    failed_after: int = 0  # GETs failed after the restore
    hold: float = NAN  # how long the cut lasted


def back_to_normal(lb1: Node, lb2: Node) -> bool:
    """lb1 MASTER with the VIP alone, lb2 BACKUP with its track file at 0 (or none), and
    neither agent seeing a split brain."""
    if vrrp_state(lb1) != "MASTER" or vrrp_state(lb2) != "BACKUP":
        return False
    if track_value(lb2) not in (None, trackfile.OK) or not lb1.has_vip() or lb2.has_vip():
        return False
    for node in (lb1, lb2):
        cluster = node.doc().cluster
        if cluster is None or cluster.split_brain:
            return False
    return True


def one_round(lab: Lab, mode: str, hold: float, index: int) -> Round:
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    r = Round(mode)
    pcap = lab.base / f"round{index}.pcap"
    with wire.Capture(lab, pcap) as cap, Probe(lab, hold + 90) as probe:
        t0, _, _ = cut_before_refresh(lab, cap)
        wait_for(lambda: entered(lb2, "MASTER", t0) is not None, 15, what="lb2 MASTER")
        wait_for(lambda: time.time() >= t0 + hold, hold + 5, interval=0.005, what="the hold")
        lab.set_vrrp(True)
        restored = time.time()
        # keepalived's own hook writes BACKUP down a moment after its FIFO said it
        wait_for(lambda: back_to_normal(lb1, lb2) and entered(lb2, "BACKUP", restored), 30,
                 what="all back to normal")  # fmt: skip
        normal_seen = time.time()
        wait_for(lambda: time.time() > normal_seen + AFTER_NORMAL, AFTER_NORMAL + 5,
                 what="the watch after the restore")  # fmt: skip
        probe.stop()
        lb1_garps = garps(cap, lb1, t0)
    segs = probe.segments()
    end = probe.ended[0] if probe.ended else time.time()
    split = entered(lb2, "MASTER", t0)
    assert split is not None
    out = next(((at, s) for at, s in transitions(lb2, split) if s != "MASTER"), None)
    r.hold = restored - t0
    r.split = split - t0
    if out is not None and out[0] < restored:
        r.one_holder = out[0] - t0
        r.garp = next((at - out[0] for at in lb1_garps if at >= out[0]), NAN)
        r.stranded_single = seconds_off(segs, out[0], restored, "lb1")
        since = alone_since(segs, "lb1", restored)
        r.one_answer = since - t0 if since is not None else NAN
    r.gets = gets_by_answer(segs, t0, restored)
    r.stranded = seconds_off(segs, t0, restored, "lb1")
    backup = entered(lb2, "BACKUP", restored)
    r.backup = backup - restored if backup is not None else NAN
    client_back = max(alone_since(segs, "lb1", end) or end, restored)
    writes = [a.at for a in lb2.doc().recent_actions if a.action == "track keepalived"]
    track_back = max([restored, *(at for at in writes if at > restored)])
    r.normal = max(backup if backup is not None else restored, client_back, track_back) - restored
    r.failed_after = gets_by_answer(segs, restored, end).get("failed", 0)
    return r


def describe(r: Round) -> str:
    def s(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.3f}"

    gets = ", ".join(f"{k} {v}" for k, v in sorted(r.gets.items()))
    return (
        f"  {r.mode}: split {s(r.split)} s, one holder {s(r.one_holder)} s, lb1's GARP "
        f"+{s(r.garp)} s, not lb1 {s(r.stranded)} s ({s(r.stranded_single)} s after one "
        f"holder), one answer {s(r.one_answer)} s; GETs {gets}; restore: BACKUP "
        f"{s(r.backup)} s, normal {s(r.normal)} s, failed after it {r.failed_after}"
    )


def run_mode(mode: str, rounds: int, hold: float) -> list[Round]:
    out: list[Round] = []
    while len(out) < rounds:
        with Lab() as lab:
            settled_pair(lab, MODES[mode])
            for _ in range(min(MAX_STANDS, rounds - len(out))):
                r = one_round(lab, mode, hold, len(out))
                print(describe(r), flush=True)
                out.append(r)
    return out


def median(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else NAN


def cell(values: list[float], unit: str = "s") -> str:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return f"none (in all {len(values)} rounds)"
    prec = 0 if unit == "" else 3
    text = f"{statistics.median(good):.{prec}f}{(' ' + unit) if unit else ''}"
    text += f" [{min(good):.{prec}f} .. {max(good):.{prec}f}]"
    if len(good) != len(values):
        text += f" ({len(good)} of {len(values)} rounds)"
    return text


def ratio(off: list[float], on: list[float]) -> str:
    a, b = median(off), median(on)
    if math.isnan(a) or math.isnan(b):
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.1f}x"


def report(results: dict[str, list[Round]]) -> None:
    on, off = results["lbwatch resolves"], results["left alone"]

    def col(rs: list[Round], attr: str) -> list[float]:
        return [float(getattr(r, attr)) for r in rs]

    def gets(rs: list[Round], answer: str) -> list[float]:
        return [float(r.gets.get(answer, 0)) for r in rs]

    rows = [
        ("cut -> lb2 MASTER (the split)", col(on, "split"), col(off, "split"), "s"),
        (
            f"cut -> one holder (target {TARGET_ONE_HOLDER:g} s)",
            col(on, "one_holder"),
            col(off, "one_holder"),
            "s",
        ),
        ("one holder -> lb1's gratuitous ARP", col(on, "garp"), col(off, "garp"), "s"),
        ("GETs answered by lb1 during the cut", gets(on, "lb1"), gets(off, "lb1"), ""),
        ("GETs answered by lb2 during the cut", gets(on, "lb2"), gets(off, "lb2"), ""),
        ("GETs failed during the cut", gets(on, "failed"), gets(off, "failed"), ""),
        ("s of the cut not answered by lb1", col(on, "stranded"), col(off, "stranded"), "s"),
        (
            "  of which after one holder (stranded)",
            col(on, "stranded_single"),
            col(off, "stranded_single"),
            "s",
        ),
        ("cut -> every GET answered by lb1", col(on, "one_answer"), col(off, "one_answer"), "s"),
        ("restore -> lb2 BACKUP", col(on, "backup"), col(off, "backup"), "s"),
        ("restore -> back to normal", col(on, "normal"), col(off, "normal"), "s"),
        ("GETs failed after the restore", col(on, "failed_after"), col(off, "failed_after"), ""),
    ]
    holds = [r.hold for r in on + off]
    print(f"\nmedians [min .. max] over the rounds; cuts of {median(holds):.1f} s")
    print("| measure | lbwatch resolves | left alone (today) | left alone / lbwatch |")
    print("|---|---|---|---|")
    for what, a, b, unit in rows:
        print(f"| {what} | {cell(a, unit)} | {cell(b, unit)} | {ratio(b, a)} |")
    print("none: not within the cut (two nodes held the VIP until VRRP was restored)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="VRRP cuts per mode")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds each cut lasts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if not wire.available():
        print("tcpdump is needed to time lb1's refreshes: `make apt` installs it", file=sys.stderr)
        return 2
    if args.hold < 8:
        parser.error("--hold: at least 8 s (the split comes 2 to 3 s after the cut)")
    started = time.monotonic()
    print(
        f"split-brain benchmark: {args.rounds} rounds a mode, cuts of {args.hold:g} s", flush=True
    )
    results = {}
    for mode in MODES:
        print(f"{mode}:", flush=True)
        results[mode] = run_mode(mode, args.rounds, args.hold)
    report(results)
    print(f"the run took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
