"""What config sync costs when nothing is edited, in the two-node lab (root).

Four phases in one lab, each ``--idle`` seconds after ``--settle`` seconds of quiet:

1. lbwatch on both nodes without sync: the agent's idle CPU (the reference);
2. lbwatch with sync, both nodes in sync and no edits, first with ``[cluster] watch = false``,
   then with the cluster watch (the default): the agent's CPU, the CPU of everything sync keeps
   running (lb1's ssh master and session clients, lb2's sshd sessions and receivers), and the
   traffic on the ssh connection from lb1 to lb2 (the kernel's TCP counters, ``ss -ti`` in
   lb1's namespace): segments and bytes each way;
3. a kept ssh connection doing nothing but its keepalive (the same options, ``ssh -N``), the
   traffic reference: "no ssh traffic beyond the kept connection's keepalive".

A settled link reads the peer's status again every ``retry_max`` (60 s by default, one request
over the kept session): ``--idle 120`` covers two of them.

    sudo .venv/bin/python bench/sync_idle.py --idle 120
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_lab_sync import peer_state
from tests.lab.netlab import LB_ADDR, Lab, Node
from tests.util import wait_for


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def sync_procs(lb1: Node, lb2: Node) -> list[psutil.Process]:
    """What sync keeps running: ssh on lb1, sshd's session and the receiver on lb2."""
    out = []
    for node, match in ((lb1, ("ssh",)), (lb2, ("sshd:", "receive"))):
        for p in node.procs():
            with contextlib.suppress(psutil.Error):
                argv = " ".join(p.cmdline())
                if any(m in argv for m in match) and "/usr/sbin/sshd -D" not in argv:
                    out.append(p)
    return out


_COUNTERS = ("bytes_sent", "bytes_received", "segs_out", "segs_in")


def _ss(lb1: Node, *args: str) -> str:
    """``ss`` in lb1's namespace, on its established connections to lb2's ssh port."""
    return subprocess.run(
        lb1.enter("ss", *args, "state", "established", f"dst {LB_ADDR['lb2']}:22"),
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout


def tcp_counters(lb1: Node) -> dict[str, int]:
    """The sum of the TCP counters of lb1's connections to lb2's ssh port."""
    out = _ss(lb1, "-tinH")
    got = dict.fromkeys(_COUNTERS, 0)
    for key in _COUNTERS:
        for m in re.finditer(rf"\b{key}:(\d+)", out):
            got[key] += int(m.group(1))
    return got


def connections(lb1: Node) -> int:
    return len(_ss(lb1, "-tnH").splitlines())


class Figures(NamedTuple):
    agents: float  # share of a core
    extra: float  # share of a core
    traffic: dict[str, int]
    elapsed: float


def measure(
    idle: float, agents: list[psutil.Process], extra: list[psutil.Process], lb1: Node
) -> Figures:
    a0, e0, n0 = cpu(agents), cpu(extra), tcp_counters(lb1)
    t0 = time.monotonic()
    time.sleep(idle)
    elapsed = time.monotonic() - t0
    n1 = tcp_counters(lb1)
    return Figures(
        (cpu(agents) - a0) / elapsed,
        (cpu(extra) - e0) / elapsed,
        {k: n1[k] - n0[k] for k in _COUNTERS},
        elapsed,
    )


def agents_of(lab: Lab) -> list[psutil.Process]:
    pids = [n.agent_pid() for n in lab.nodes.values()]
    assert all(pids), "an agent is not running"
    return [psutil.Process(p) for p in pids if p]


def sync_phase(lab: Lab, args: argparse.Namespace, watch: bool) -> Figures:
    """Both agents with sync, in sync, measured; ``watch``: each also watches the other's node
    view (``[cluster] watch``, on by default: a long poll confirmed every second)."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    for node in (lb1, lb2):
        # lbwatch's own retry_initial and retry_max, not the lab's short ones (4 s).
        node.write_configs(
            sync=True,
            sync_retry=(1.0, 60.0),
            lbwatch_extra=f"\n[cluster]\nwatch = {'true' if watch else 'false'}\n",
        )
        node.start_lbwatch()
    wait_for(
        lambda: (
            peer_state(lb1, "lb2") == "in-sync" and peer_state(lb2, "lb1") in ("in-sync", "idle")
        ),
        30,
        what="in sync",
    )
    time.sleep(args.settle)
    got = connections(lb1)
    assert got == 1, f"expected lb1's one kept connection to lb2, found {got}"
    figures = measure(args.idle, agents_of(lab), sync_procs(lb1, lb2), lb1)
    for node in (lb1, lb2):
        node.stop_lbwatch()
    wait_for(lambda: connections(lb1) == 0, 30, what="lb1's connections closed")
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=float, default=120.0, help="seconds measured per phase")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of quiet before each")
    args = ap.parse_args()
    with Lab() as lab:
        lab.enable_sync()
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]

        for node in (lb1, lb2):
            node.write_configs(sync=False)
            node.start_lbwatch()
        time.sleep(args.settle)
        base_cpu, _, _, _ = measure(args.idle, agents_of(lab), [], lb1)
        for node in (lb1, lb2):
            node.stop_lbwatch()

        phases = {}
        for watch in (False, True):
            phases[watch] = sync_phase(lab, args, watch)

        key = lb1.dir / "ssh" / "sync_key"
        keep = subprocess.Popen(
            lb1.enter(
                "ssh",
                "-N",
                "-i",
                str(key),
                "-o",
                f"UserKnownHostsFile={lb1.dir / 'ssh' / 'known_hosts'}",
                "-o",
                "BatchMode=yes",
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=2",
                "-o",
                "ControlPath=none",
                LB_ADDR["lb2"],
            ),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: connections(lb1) == 1, 20, what="the reference connection")
            time.sleep(args.settle)
            _, _, reference, ref_elapsed = measure(args.idle, [], [], lb1)
        finally:
            keep.terminate()
            keep.wait(10)

    ref_min = 60.0 / ref_elapsed
    print(f"\nconfig sync at idle, {args.idle:g} s per phase, two nodes (both agents' CPU summed)")
    print("| | CPU (% of a core) |")
    print("|---|---|")
    print(f"| lbwatch agents, without sync | {base_cpu * 100:.3f} |")
    for watch, f in phases.items():
        what = "sync and the cluster watch" if watch else "sync, no cluster watch"
        print(f"| lbwatch agents, with {what}, in sync | {f.agents * 100:.3f} |")
        print(f"| ssh, sshd sessions and receivers kept for {what} | {f.extra * 100:.3f} |")
    print("\nssh traffic lb1 <-> lb2, per minute (TCP counters in lb1's namespace)")
    print("| | segments out / in | bytes out / in |")
    print("|---|---|---|")
    for watch, f in phases.items():
        t = {k: v * 60.0 / f.elapsed for k, v in f.traffic.items()}
        what = "with the cluster watch" if watch else "sync only"
        print(
            f"| lbwatch's kept connection, in sync, {what} | {t['segs_out']:.1f} / "
            f"{t['segs_in']:.1f} | {t['bytes_sent']:.0f} / {t['bytes_received']:.0f} |"
        )
    ref = {k: v * ref_min for k, v in reference.items()}
    print(
        f"| `ssh -N`, keepalive only (ServerAliveInterval 5) | {ref['segs_out']:.1f} / "
        f"{ref['segs_in']:.1f} | {ref['bytes_sent']:.0f} / {ref['bytes_received']:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
