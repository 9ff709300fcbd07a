"""Failover on the systemd lab's nodes beside the bare lab's, in one run (root):
``bench/failover.py --systemd``.

Three set-ups, each faulted the same way with a client GETting the VIP every few ms:

- "bare lab, lbwatch": tests/lab/netlab.py's nodes, no systemd; lbwatch restarts haproxy
  with the lab's commands (its config: probe rise 1, keepalived_start_delay 1 s).
- "systemd, lbwatch": tests/lab/syslab.py's nodes booted by systemd, Debian's haproxy.service
  (Restart=always) and keepalived.service, lbwatch from its .deb with config/lbwatch.toml
  (probe rise 2, keepalived_start_delay 2 s) and every optional feature on.
- "systemd alone": the same nodes with `systemctl stop lbwatch` on both: haproxy.service's
  Restart=always brings a killed haproxy back, keepalived is left as it is.

Faults, on lb1 (MASTER of VI_1): kill -9 of every haproxy process (master and workers), and an
operator's `systemctl restart haproxy` (in the bare lab, what the unit does: TERM to the
master, then a new one). For each: the first HTTP 200 again (from either node), the GETs that
failed, keepalived's own record of VI_1's MASTER on lb2 and back on lb1 (its journal, or in
the bare lab its notify hooks), and when lb1 held VI_1 again with everything healthy (a new
haproxy master, both units active, VI_2 still on lb2 and, with lbwatch, its status saying so)
for HOLD seconds. Then the agent's idle CPU and RSS.

Figures are medians over the runs; the machine is shared and noisy (2 cores), so compare the
modes of one run with each other, not with figures from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from bench import wire
from bench.chaos_procs import node_procs
from bench.chaos_rig import restart_haproxy
from bench.failover import both_up, idle_figures, lbwatch_agent, master_at
from tests.lab.netlab import LB_ADDR, VIP, Lab, Node, sh
from tests.lab.syslab import VIP2, SysLab, installed
from tests.systemd.conftest import Probe, fresh_deb, probing

# lbwatch's own path per mode (kill_timed's exits against the capture), filled as modes run.
OWN_PATH: dict[str, list[float]] = {}
HOLD = 2.0  # healthy this long without a break: healed (a restart's gap would break it)
HEAL_LIMIT = 90.0  # a fault not healed by then fails the bench
SAMPLE = 0.1  # seconds between looks at the nodes while waiting to heal
# The existing targets (README's lbwatch figures table).
CPU_TARGET = 0.005  # idle CPU, share of a core: < 0.5 %
RSS_TARGET = 40e6  # RSS with the probe, bytes: <= 40 MB


@dataclass(frozen=True)
class Run:
    """One fault, seconds from it (the kill's signals sent; the restart command issued)."""

    first_ok: float  # the first 200 after the first failed GET (0: none failed)
    unserved: float  # total time without a 200 (every outage of the stretch)
    longest: float  # the longest of those outages (a move and a move back are two)
    failed: int  # GETs without a 200
    gets: int
    moved: float | None  # keepalived on lb2 entered MASTER of VI_1 (None: it did not)
    back: float | None  # ...and then lb1 did again
    healed: float  # lb1 holds VI_1, everything healthy (for HOLD s from then)
    served_by: tuple[str, ...]


class Rig(Protocol):
    """One set-up of the lab, as the measurements drive and observe it."""

    label: str
    settle: float  # after a heal, before the next fault: haproxy up past stable_after
    exits: list[float]  # each kill's haproxy master exit (wall time), as kill_timed saw it

    @property
    def lab(self) -> Lab: ...

    def master(self) -> int: ...
    def kill(self) -> float: ...  # the wall time of the fault
    def restart(self) -> float: ...
    def healthy(self) -> bool: ...
    def master_at(self, node: str, after: float) -> float | None: ...


def kill_timed(node: Node, master: int, exits: list[float]) -> float:
    """SIGKILL every haproxy process of ``node`` (host PIDs looked up first, then the clock);
    the wall time of the signals. The instant ``master`` (a host PID) was gone, as a pidfd held
    here shows it (the earliest lbwatch could see it), goes to ``exits``."""
    pids = [p.pid for p in node.live("haproxy")]
    fd = os.pidfd_open(master) if master else None
    try:
        killed = time.time()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if fd is not None and select.select([fd], [], [], 5.0)[0]:
            exits.append(time.time())
    finally:
        if fd is not None:
            os.close(fd)
    return killed


def own_path(cap: wire.Capture, exits: list[float]) -> list[float]:
    """For each exit: seconds until lb1's first priority-0 advertisement of VI_1 after it
    (faults that moved nothing have none, and are left out)."""
    adverts, _ = cap.read()
    out = []
    for exited in exits:
        lowered = [a.at for a in adverts if a.src == LB_ADDR["lb1"] and a.vrid == 51
                   and a.prio == 0 and exited <= a.at <= exited + 1.0]  # fmt: skip
        if lowered:
            out.append(lowered[0] - exited)
    return out


def holds(node: Node, vip: str) -> bool:
    """``vip`` on the node's eth0, asked from the host in its network namespace (no nsenter:
    cheaper, so looking often disturbs the failover less)."""
    out = sh("ip", "-n", node.ns, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    return f" {vip}/" in out


class BareRig:
    label = "bare lab, lbwatch"
    settle = 5.5  # the lab config's stable_after is 5 s

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.lb1, self.lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        self.exits: list[float] = []  # haproxy masters' exits after kill()

    def master(self) -> int:
        masters = node_procs(self.lb1).haproxy_masters()
        return masters[0] if masters else 0

    def kill(self) -> float:
        return kill_timed(self.lb1, self.master(), self.exits)

    def restart(self) -> float:
        at = time.time()
        restart_haproxy(self.lb1)
        return at

    def healthy(self) -> bool:
        return holds(self.lb1, VIP) and both_up(self.lb1) and both_up(self.lb2)

    def master_at(self, node: str, after: float) -> float | None:
        return master_at(self.lab.nodes[node], after)


class SysRig:
    settle = 10.5  # config/lbwatch.toml's stable_after is 10 s

    def __init__(self, lab: SysLab, lbwatch: bool) -> None:
        self.lab = lab
        self.lbwatch = lbwatch
        self.label = "systemd, lbwatch" if lbwatch else "systemd alone"
        self.lb1, self.lb2 = lab.sysnodes["lb1"], lab.sysnodes["lb2"]
        self.exits: list[float] = []  # haproxy masters' exits after kill()

    def master(self) -> int:
        return int(self.lb1.prop("haproxy", "MainPID") or 0)  # the node's PID: only compared

    def kill(self) -> float:
        return kill_timed(self.lb1, self.lb1.main_pid("haproxy"), self.exits)

    def restart(self) -> float:
        at = time.time()
        self.lb1.systemctl("restart", "haproxy")
        return at

    def healthy(self) -> bool:
        if not (holds(self.lb1, VIP) and holds(self.lb2, VIP2)):
            return False
        for node in (self.lb1, self.lb2):
            said = node.systemctl("is-active", "haproxy", "keepalived", check=False).split()
            if said != ["active", "active"]:
                return False
        return not self.lbwatch or (both_up(self.lb1) and both_up(self.lb2))

    def master_at(self, node: str, after: float) -> float | None:
        """When keepalived on ``node`` entered MASTER of VI_1 after ``after``, from its
        journal (journald's own time of the line)."""
        said = self.lab.sysnodes[node].journal("-u", "keepalived", "--since", f"@{int(after)}")
        for line in said.splitlines():
            stamp, _, rest = line.partition(" ")
            if "(VI_1) Entering MASTER STATE" in rest and float(stamp) >= after:
                return float(stamp)
        return None


def wait_healed(rig: Rig, old_master: int, since: float) -> float:
    """Seconds from ``since`` until a new haproxy master and everything healthy began, and
    stayed so for HOLD s. Bounded by HEAL_LIMIT."""
    start: float | None = None
    deadline = time.monotonic() + HEAL_LIMIT
    while time.monotonic() < deadline:
        now = time.time()
        if rig.master() not in (0, old_master) and rig.healthy():
            start = now if start is None else start
            if now - start >= HOLD:
                return start - since
        else:
            start = None
        time.sleep(SAMPLE)
    raise TimeoutError(f"{rig.label}: not healed {HEAL_LIMIT:g} s after the fault")


def first_ok(probe: Probe) -> float | None:
    """The wall time of the first 200 after the first failed GET (None: none failed)."""
    failed = False
    for change in probe.changes:
        failed = failed or change["status"] != 200
        if failed and change["status"] == 200:
            return float(change["t"])
    return None


def one_fault(rig: Rig, fault: Callable[[], float]) -> Run:
    old = rig.master()
    with probing(rig.lab, HEAL_LIMIT + 30) as probe:
        at = fault()
        healed = wait_healed(rig, old, at)
    moved = rig.master_at("lb2", at)
    back = rig.master_at("lb1", moved) if moved is not None else None
    ok = first_ok(probe)
    return Run(
        first_ok=0.0 if ok is None else ok - at,
        unserved=sum(probe.outages()),
        longest=max(probe.outages(), default=0.0),
        failed=probe.failed,
        gets=probe.n,
        moved=None if moved is None else moved - at,
        back=None if back is None else back - at,
        healed=healed,
        served_by=tuple(sorted(probe.served_by)),
    )


def faults(rig: Rig, runs: int) -> dict[str, list[Run]]:
    """``runs`` kills, then ``runs`` restarts, each once the last has healed and settled."""
    out: dict[str, list[Run]] = {"kill": [], "restart": []}
    for name, fault in (("kill", rig.kill), ("restart", rig.restart)):
        for i in range(runs):
            time.sleep(rig.settle)
            run = one_fault(rig, fault)
            out[name].append(run)
            print(f"  {rig.label}, {name} {i + 1}: {said(run)}", flush=True)
    return out


def said(run: Run) -> str:
    where = (
        f"VI_1 on lb2 after {run.moved:.2f} s, back on lb1 after {secs(run.back)}"
        if run.moved is not None
        else "VI_1 stayed on lb1"
    )
    return (
        f"first 200 again {run.first_ok:.3f} s, {run.failed} of {run.gets} GETs failed "
        f"({run.unserved:.3f} s without a 200, longest {run.longest:.3f} s), {where}, "
        f"healed {run.healed:.2f} s, "
        f"served by {'+'.join(run.served_by)}"
    )


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


# ---------------------------------------------------------------------------------------------
# The labs


Idle = dict[str, tuple[float, int]]  # node's label -> (CPU share of a core, RSS bytes)


def bench_bare(runs: int, idle: float, profile: str) -> tuple[dict[str, list[Run]], Idle]:
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        # As bench/failover.py's lbwatch mode: lb1 probes haproxy every 1 s, lb2 does not.
        lb1.write_configs(
            health=True, probe_interval=1.0, transitions_log=True, vrrp_profile=profile
        )
        lb2.write_configs(health=False, transitions_log=True, vrrp_profile=profile)
        for node in (lb1, lb2):
            node.start_lbwatch()
        rig = BareRig(lab)
        wait_healed(rig, 0, time.time())
        with wire.Capture(lab, lab.base / "bare.pcap") as cap:
            results = faults(rig, runs)
            OWN_PATH[rig.label] = own_path(cap, rig.exits)
        time.sleep(2)
        agents = {
            "bare lab lb1, probe every 1 s": lbwatch_agent(lb1),
            "bare lab lb2, no probe": lbwatch_agent(lb2),
        }
        return results, idle_figures(agents, idle)


def bench_systemd(
    runs: int, idle: float, profile: str
) -> tuple[dict[str, dict[str, list[Run]]], Idle]:
    with installed(fresh_deb(), journal="on error", profile=profile) as lab:
        out = {}
        rig = SysRig(lab, lbwatch=True)
        with wire.Capture(lab, lab.base / "systemd.pcap") as cap:
            out[rig.label] = faults(rig, runs)
            OWN_PATH[rig.label] = own_path(cap, rig.exits)
        time.sleep(2)
        agents = {
            f"systemd {n.name}, probe every 1 s, every feature on": psutil.Process(
                n.main_pid("lbwatch")
            )
            for n in lab.sysnodes.values()
        }
        figures = idle_figures(agents, idle)
        for node in lab.sysnodes.values():
            node.systemctl("stop", "lbwatch")
        rig = SysRig(lab, lbwatch=False)
        out[rig.label] = faults(rig, runs)
        return out, figures


# ---------------------------------------------------------------------------------------------
# The report


def med(values: list[float]) -> float:
    return statistics.median(values)


def kill_table(modes: dict[str, dict[str, list[Run]]], runs: int) -> None:
    print(
        f"| haproxy kill -9 on lb1, median of {runs} | first 200 again | without a 200 | "
        "longest gap | failed GETs | VI_1 to lb2 | lb2 MASTER after | lb1 MASTER again after | "
        "healed (lb1, all healthy) after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, by in modes.items():
        kills = by["kill"]
        moves = [r for r in kills if r.moved is not None]
        backs = [r.back for r in moves if r.back is not None]
        print(
            f"| {label} | {med([r.first_ok for r in kills]):.3f} s | "
            f"{med([r.unserved for r in kills]):.3f} s | "
            f"{med([r.longest for r in kills]):.3f} s | "
            f"{med([r.failed for r in kills]):g} of {med([r.gets for r in kills]):g} | "
            f"{len(moves)}/{len(kills)} | "
            f"{secs(med([r.moved for r in moves if r.moved is not None]) if moves else None)} | "
            f"{secs(med(backs) if backs else None)} | {med([r.healed for r in kills]):.2f} s |"
        )


def restart_table(modes: dict[str, dict[str, list[Run]]], runs: int) -> None:
    print(
        f"| `systemctl restart haproxy` on lb1, median of {runs} | failed GETs | "
        "without a 200 | VI_1 to lb2 | healed after |"
    )
    print("|---|---|---|---|---|")
    for label, by in modes.items():
        rs = by["restart"]
        moved = sum(r.moved is not None for r in rs)
        print(
            f"| {label} | {med([r.failed for r in rs]):g} of {med([r.gets for r in rs]):g} | "
            f"{med([r.unserved for r in rs]):.3f} s | {moved}/{len(rs)} | "
            f"{med([r.healed for r in rs]):.2f} s |"
        )


def own_path_table() -> None:
    """haproxy master's exit -> lb1's priority-0 advertisement on the wire, per lbwatch mode."""
    print("| haproxy's exit (pidfd) -> keepalived's priority-0 advert on the wire | runs | median "
          "| p95 | max |")  # fmt: skip
    print("|---|---|---|---|---|")
    for label, seen in OWN_PATH.items():
        if seen:
            own = sorted(seen)
            p95 = own[min(len(own) - 1, math.ceil(0.95 * len(own)) - 1)]
            print(f"| {label} | {len(own)} | {med(own) * 1000:.1f} ms | {p95 * 1000:.1f} ms | "
                  f"{own[-1] * 1000:.1f} ms |")  # fmt: skip
    print("(p95 by nearest rank: with fewer than 20 runs, the largest)")


def ratios(modes: dict[str, dict[str, list[Run]]]) -> None:
    """The figures of one mode over another's, both measured in this run."""
    pairs = (
        ("systemd, lbwatch", "systemd alone"),
        ("systemd, lbwatch", "bare lab, lbwatch"),
        ("systemd alone", "bare lab, lbwatch"),
    )
    for a, b in pairs:
        ka, kb = modes[a]["kill"], modes[b]["kill"]
        parts = []
        for what, get in (("first 200 again", "first_ok"), ("without a 200", "unserved"),
                          ("longest gap", "longest"), ("failed GETs", "failed")):  # fmt: skip
            x, y = med([getattr(r, get) for r in ka]), med([getattr(r, get) for r in kb])
            parts.append(f"{what} {x / y:.2f}" if y else f"{what} {x:.3f} s against 0")
        print(f"kill -9, {a} / {b}: " + ", ".join(parts))


def idle_table(figures: Idle, seconds: float) -> None:
    print(
        f"| lbwatch idle over {seconds:g} s | CPU (% of a core; target < {CPU_TARGET * 100:g} %) "
        f"| RSS (target <= {RSS_TARGET / 1e6:g} MB with the probe) |"
    )
    print("|---|---|---|")
    for label, (cpu, rss) in figures.items():
        cpu_ok = "ok" if cpu < CPU_TARGET else "OVER"
        rss_ok = "ok" if rss <= RSS_TARGET else "OVER"
        print(
            f"| {label} | {cpu * 100:.3f} % ({cpu_ok}) | {rss / 2**20:.1f} MiB "
            f"({rss / 1e6:.1f} MB, {rss_ok}) |"
        )


def run(runs: int, idle: float, json_path: Path | None, profile: str = "classic") -> int:
    print(
        f"failover benchmark, bare lab and systemd lab, {runs} runs per mode, keepalived's "
        f"{profile} profile",
        flush=True,
    )
    bare, figures = bench_bare(runs, idle, profile)
    modes = {BareRig.label: bare}
    sys_modes, sys_figures = bench_systemd(runs, idle, profile)
    modes.update(sys_modes)
    figures.update(sys_figures)
    print()
    kill_table(modes, runs)
    print(
        "(failed GETs: one every ~5 ms, each given 0.25 s; one sent while nobody holds the VIP "
        "waits that out, one refused fails at once: the time without a 200 compares better)"
    )
    print()
    own_path_table()
    print()
    ratios(modes)
    print()
    restart_table(modes, runs)
    print("(bare lab: TERM to the master and a new one started, as the unit's restart does)")
    print()
    idle_table(figures, idle)
    print(
        f"healed: sampled every {SAMPLE:g} s plus the time to look, and held {HOLD:g} s; "
        "the machine is shared and noisy: compare modes of this run only"
    )
    if json_path is not None:
        doc: dict[str, Any] = {
            "runs": runs,
            "idle_seconds": idle,
            "modes": {
                k: {f: [asdict(r) for r in v] for f, v in by.items()} for k, by in modes.items()
            },
            "idle": {k: {"cpu_share": c, "rss_bytes": r} for k, (c, r) in figures.items()},
            "targets": {"cpu_share_below": CPU_TARGET, "rss_bytes_at_most": RSS_TARGET},
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
    return 0
