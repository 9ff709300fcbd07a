"""Failover benchmark in the two-node lab (root): SIGKILL of haproxy on the MASTER -> first HTTP
200 through the VIP from the peer. For each keepalived profile (classic: VRRP v2, advert_int 1;
fast: v3, advert_int 0.1), in the same run: lbwatch with the shipped priorities (254/253,
config/keepalived*.conf), lbwatch with the 100/97 of most published examples, and the approach
lbwatch replaces (vrrp_script `killall -0 haproxy`, interval 1, fall 2, weight -5, at 100/97 as
those examples have it). A packet capture on the lab's bridge times keepalived's priority-0
advertisement, the peer's first advertisement as MASTER and its gratuitous ARP, so the outage
is broken into its parts. Also lbwatch's idle CPU and RSS.

    sudo make bench            # or: sudo .venv/bin/python bench/failover.py --runs 7 --idle 30
    sudo make bench-systemd    # --systemd: the systemd lab's nodes beside the bare lab's, with
                               # and without lbwatch (bench/failover_systemd.py)

Figures are medians over the runs; the machine is shared and noisy, so compare the set-ups of
the same run rather than against figures from elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import wire
from lbwatch.statusdoc import ActionEntry
from tests.lab.netlab import BLOG_PRIORITY, LB_ADDR, PRIORITY, VIP, Lab, Node
from tests.util import wait_for

ADVERT_INT = {"classic": 1.0, "fast": 0.1}
SHIPPED = (PRIORITY["lb1"], PRIORITY["lb2"])  # config/keepalived*.conf: 254/253
BLOG = (BLOG_PRIORITY["lb1"], BLOG_PRIORITY["lb2"])  # 100/97, as most published examples


def skew(priority: int, profile: str) -> float:
    """VRRP's skew time: how long a backup of ``priority`` waits after a priority-0
    advertisement before it takes over (RFC 5798 6.1; RFC 3768 alike for v2)."""
    return (256 - priority) / 256 * ADVERT_INT[profile]


# Targets, printed beside the figures (never asserted: the machine is shared and noisy).
OUTAGE_TARGET = {"classic": 0.05, "fast": 0.03}  # lbwatch at the shipped priorities, median
OWN_TARGET = (0.005, 0.015)  # lbwatch's own path, death seen -> priority-0 advert: median, p95


def both_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


# The client's timeout for one GET. A GET sent while the VIP leads nowhere (lb1 has let it go,
# lb2 has not taken it yet) waits this long: the first 200 comes up to this much after lb2
# could answer. 100 ms made the fast profile's outage look 40 ms longer than it was (a GET
# sent just before lb2's MASTER waited out its timeout); a LAN connect takes under 1 ms here,
# and a slow one counted as lost only lengthens the figure.
CLIENT_TIMEOUT = 0.02


@dataclass(frozen=True)
class Setup:
    """One cell of the table: who moves the VIP, at which priorities, on which profile."""

    mode: str  # "lbwatch" or "vrrp_script"
    prio: tuple[int, int]  # lb1's, lb2's
    profile: str

    @property
    def priorities(self) -> dict[str, int]:
        return {"lb1": self.prio[0], "lb2": self.prio[1]}

    @property
    def shipped(self) -> bool:
        return self.prio == (PRIORITY["lb1"], PRIORITY["lb2"])

    @property
    def label(self) -> str:
        prio = f"{self.prio[0]}/{self.prio[1]}"
        if self.mode == "vrrp_script":
            return f"vrrp_script killall -0, {prio}"
        return f"lbwatch, {prio}" + (" (shipped)" if self.shipped else "")


@dataclass(frozen=True)
class Run:
    """One failover, every time on the host's wall clock (None: not seen)."""

    killed: float
    first_ok: float
    began: float  # when the answered GET was sent
    waited: float  # how long the GET before it took (nan: none before it)
    seen: float | None  # the master's pidfd became readable: lbwatch could see the death
    dispatched: float | None  # lbwatch dispatched "stop keepalived"
    lowered: float | None  # lb1's first advertisement below its priority (0 with lbwatch)
    mastered: float | None  # lb2's first advertisement (it is MASTER)
    garp: float | None  # lb2's first gratuitous ARP for the VIP

    @property
    def outage(self) -> float:
        return self.first_ok - self.killed


def one_failover(lab: Lab) -> tuple[float, float, dict[str, Any]]:
    """Kill haproxy on lb1: (wall time of the kill, of the master's exit, the client's report:
    when the first 200 from lb2 came, when that GET began, and the GET before it). The exit is
    when the master's pidfd became readable here: the first instant lbwatch's own pidfd could
    have told it (its log line comes later, and since the stop's signal is sent before
    anything is logged it cannot time the stop)."""
    lb1 = lab.nodes["lb1"]
    with lab.client_watch("lb2", 30, timeout=CLIENT_TIMEOUT) as watch:
        assert watch.stdout is not None
        watch.stdout.readline()
        # The PIDs first, then the clock, then the signals: finding the node's processes
        # among the host's takes 15-20 ms here (Node.kill's scan of /proc), while haproxy still
        # serves; timed from before the scan, that showed as lbwatch's "kill -> death seen".
        pids = [p.pid for p in lb1.live("haproxy")]
        master = os.pidfd_open(lb1.host_pid(int(lb1.read("/run/haproxy.pid"))))
        try:
            killed = time.time()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            select.select([master], [], [], 5.0)
            exited = time.time()
        finally:
            os.close(master)
        result = json.loads(watch.stdout.readline())
    if result["first_ok"] is None:
        raise RuntimeError("no HTTP 200 from lb2 within 30 s")
    return killed, exited, result


def settle_on_lb1(lab: Lab, until: float = 0.0) -> None:
    """lb1 holds the VIP and answers, for a second at least and until wall time ``until``."""
    lb1 = lab.nodes["lb1"]
    wait_for(lb1.has_vip, 40, what="lb1 to take the VIP back")
    wait_for(lambda: lab.client_get() == (200, "lb1"), 20, what="HTTP 200 via lb1")
    time.sleep(max(1.0, until - time.time()))


def lbwatch_agent(node: Node) -> psutil.Process:
    for p in node.procs():
        if p.name().startswith("python") and "lbwatch" in " ".join(p.cmdline()):
            return p
    raise RuntimeError(f"no lbwatch on {node.name}")


def stop_action(node: Node, killed: float) -> ActionEntry:
    """lbwatch's "stop keepalived" entry dispatched after ``killed``, from its status."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = node.status()
        for action in doc.recent_actions if doc is not None else []:
            if action.action == "stop keepalived" and action.at >= killed:
                return action
        time.sleep(0.05)
    raise RuntimeError(f"no stop action on {node.name}")


def idle_figures(agents: dict[str, psutil.Process], seconds: float) -> dict[str, tuple[float, int]]:
    """CPU share of a core and RSS of each agent over ``seconds`` of idling."""
    before = {k: a.cpu_times() for k, a in agents.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    out = {}
    for k, agent in agents.items():
        after = agent.cpu_times()
        used = after.user + after.system - before[k].user - before[k].system
        out[k] = (used / elapsed, agent.memory_info().rss)
    return out


def master_at(node: Node, after: float) -> float | None:
    """The wall time keepalived on ``node`` entered MASTER after ``after`` (its own notify
    hook's record, independent of lbwatch)."""
    try:
        lines = node.transitions_path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        at, _, state = line.partition(" ")
        if state.strip() == "MASTER" and float(at) >= after:
            return float(at)
    return None


def log_stamp(line: str) -> float | None:
    """The host-clock time of one line of lbwatch's log (millisecond timestamps)."""
    if not line.startswith("20"):
        return None
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float(line[19:23])


def log_window(node: Node, after: float, seconds: float) -> list[str]:
    """lbwatch's log lines on ``node`` from ``after`` for ``seconds``."""
    out = []
    for line in node.log_text().splitlines():
        stamp = log_stamp(line)
        if stamp is not None and after - 0.001 <= stamp <= after + seconds:
            out.append(line)
    return out


def mac_of(node: Node) -> str:
    """The Ethernet address of the node's eth0, as tcpdump prints it."""
    words = node.run("ip", "-o", "link", "show", "dev", "eth0").split()
    return words[words.index("link/ether") + 1]


def on_the_wire(cap: wire.Capture, setup: Setup, killed: float, lb2_mac: str) -> dict[str, Any]:
    """lb1's first lowered advertisement of VI_1 after the kill, lb2's first advertisement
    after that (it is MASTER: a BACKUP sends none) and lb2's first gratuitous ARP for the VIP."""
    # The capture is flushed per packet, but tcpdump -r may read it a moment before the last
    # ones land; they are all there well within this bound.
    deadline = time.monotonic() + 3
    found: dict[str, Any] = {"lowered": None, "mastered": None, "garp": None}
    want = 0 if setup.mode == "lbwatch" else setup.priorities["lb1"] - 5  # the script's weight
    while time.monotonic() < deadline:
        adverts, garps = cap.read()
        found["lowered"] = next(
            (
                a.at
                for a in adverts
                if a.src == LB_ADDR["lb1"] and a.vrid == 51 and a.prio == want and a.at >= killed
            ),
            None,
        )
        after = found["lowered"] if found["lowered"] is not None else killed
        found["mastered"] = next(
            (a.at for a in adverts if a.src == LB_ADDR["lb2"] and a.vrid == 51 and a.at >= after),
            None,
        )
        found["garp"] = next(
            (g.at for g in garps if g.addr == VIP and g.mac == lb2_mac and g.at >= killed), None
        )
        if all(v is not None for v in found.values()):
            break
        time.sleep(0.1)
    return found


def p95(values: list[float]) -> float:
    """The 95th percentile by nearest rank: with fewer than 20 values, the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def bench_setup(setup: Setup, runs: int, idle: float, capdir: Path) -> dict[str, Any]:
    """``runs`` failovers of one set-up in a lab of its own, with the bridge captured; with
    ``idle``, lbwatch's idle figures after them."""
    out: list[Run] = []
    figures: dict[str, tuple[float, int]] = {}
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        if setup.mode == "vrrp_script":
            for node in (lb1, lb2):
                node.write_configs(
                    keepalived_mode="vrrp_script",
                    vrrp_profile=setup.profile,
                    priorities=setup.priorities,
                )
                node.start_haproxy()
                node.start_keepalived()
        else:
            # lb1 probes haproxy over HTTP at the default interval, lb2 does not: idle figures
            # for both set-ups.
            lb1.write_configs(
                health=True,
                probe_interval=1.0,
                vrrp_profile=setup.profile,
                priorities=setup.priorities,
            )
            lb2.write_configs(health=False, vrrp_profile=setup.profile, priorities=setup.priorities)
            for node in (lb1, lb2):
                node.start_lbwatch()
            wait_for(lambda: both_up(lb1) and both_up(lb2), 30, what="both nodes up")
        lb2_mac = mac_of(lb2)
        pcap = capdir / f"{setup.mode}-{setup.profile}-{setup.prio[1]}.pcap"
        with wire.Capture(lab, pcap) as cap:
            settle_on_lb1(lab)
            for i in range(runs):
                killed, exited, client = one_failover(lab)
                ours = setup.mode == "lbwatch"
                seen = exited if ours else None
                dispatched = stop_action(lb1, killed).at if ours else None
                found = on_the_wire(cap, setup, killed, lb2_mac)
                run = Run(
                    killed=killed,
                    first_ok=float(client["first_ok"]),
                    began=float(client["began"]),
                    waited=float(client["before"][1]) if client["before"] else float("nan"),
                    seen=seen,
                    dispatched=dispatched,
                    **found,
                )
                out.append(run)
                print(f"  {setup.profile}, {setup.label}, run {i + 1}: {describe(run)}", flush=True)
                own = gap(run.seen, run.lowered)
                if ours and own > OWN_TARGET[1]:  # where did it go? lbwatch's side, from its log
                    print(f"    own path over {OWN_TARGET[1] * 1000:.0f} ms; lb1's log:")
                    for line in log_window(lb1, killed, 1.0):
                        print(f"      {line}")
                if ours:
                    wait_for(lambda: both_up(lb1), 30, what="lb1 healed")
                    # haproxy up past the lab's stable_after (5 s) before the next kill, so each
                    # is a first failure as in production, not one of a crash loop that lbwatch
                    # would give up on.
                    started = lb1.doc().services["haproxy"].started or time.time()
                    settle_on_lb1(lab, until=started + 5.5)
                else:
                    lb1.start_haproxy()  # what an operator (or cron) would do
                    settle_on_lb1(lab)
        if idle and setup.mode == "lbwatch":
            time.sleep(2)
            agents = {
                "lb1, with the HTTP probe (every 1 s)": lbwatch_agent(lb1),
                "lb2, without the probe": lbwatch_agent(lb2),
            }
            figures = idle_figures(agents, idle)
    return {"runs": out, "idle": figures}


def gap(a: float | None, b: float | None) -> float:
    """b - a in seconds; nan when either was not seen."""
    return float("nan") if a is None or b is None else b - a


def describe(run: Run) -> str:
    def ms(a: float | None, b: float | None) -> str:
        return f"{gap(a, b) * 1000:.1f}"

    if run.seen is None:
        return (
            f"outage {run.outage:.3f} s; kill -> lb1 advertises lower {ms(run.killed, run.lowered)}"
            f" ms, -> lb2 MASTER {ms(run.lowered, run.mastered)} ms, -> GARP "
            f"{ms(run.mastered, run.garp)} ms, -> first 200 {ms(run.garp, run.first_ok)} ms"
        )
    return (
        f"outage {run.outage * 1000:.1f} ms = death seen {ms(run.killed, run.seen)} + "
        f"priority-0 advert {ms(run.seen, run.lowered)} (stop issued "
        f"{ms(run.seen, run.dispatched)} after the death) + lb2 MASTER "
        f"{ms(run.lowered, run.mastered)} + GARP "
        f"{ms(run.mastered, run.garp)} + first 200 {ms(run.garp, run.first_ok)} ms (answered GET "
        f"sent {ms(run.garp, run.began)} ms after the GARP, the GET before it took "
        f"{run.waited * 1000:.0f} ms)"
    )


def median_ms(values: list[float]) -> str:
    good = [v for v in values if not math.isnan(v)]
    return f"{statistics.median(good) * 1000:.1f}" if good else "-"


def outage_table(results: dict[Setup, dict[str, Any]]) -> None:
    runs = len(next(iter(results.values()))["runs"])
    print(
        f"| profile | set-up | median outage ({runs} runs) | min | max | / vrrp_script's | target "
        "| on the wire: kill -> lb2's GARP, median |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for setup, value in results.items():
        base = [r.outage for s, v in results.items() if s.profile == setup.profile
                and s.mode == "vrrp_script" for r in v["runs"]]  # fmt: skip
        out = [r.outage for r in value["runs"]]
        med = statistics.median(out)
        ratio = f"{med / statistics.median(base):.3f}" if base else "-"
        target = ""
        if setup.mode == "lbwatch" and setup.shipped:
            target = f"<= {OUTAGE_TARGET[setup.profile]:.2f} s"
        print(
            f"| {setup.profile} | {setup.label} | {med:.3f} s | {min(out):.3f} s | "
            f"{max(out):.3f} s | {ratio} | {target} | "
            f"{median_ms([gap(r.killed, r.garp) for r in value['runs']])} ms |"
        )


def breakdown_tables(results: dict[Setup, dict[str, Any]]) -> None:
    print(
        "| lbwatch, median (ms) | kill -> death seen (master's pidfd readable) | -> priority-0 "
        "advert on the wire (lbwatch's own path) | -> lb2's first advert (MASTER) (skew) | -> "
        "lb2's GARP | -> client's first 200 | outage |"
    )
    print("|---|---|---|---|---|---|---|")
    for setup, value in results.items():
        rs = value["runs"]
        if setup.mode == "lbwatch":
            cells = [
                median_ms([gap(r.killed, r.seen) for r in rs]),
                median_ms([gap(r.seen, r.lowered) for r in rs]),
                median_ms([gap(r.lowered, r.mastered) for r in rs])
                + f" ({skew(setup.prio[1], setup.profile) * 1000:.1f})",
                median_ms([gap(r.mastered, r.garp) for r in rs]),
                median_ms([gap(r.garp, r.first_ok) for r in rs]),
                median_ms([r.outage for r in rs]),
            ]
            print(f"| {setup.profile}, {setup.label} | " + " | ".join(cells) + " |")
    print()
    print(
        "| vrrp_script, median (ms) | kill -> lb1 advertises priority - 5 | -> lb2's first advert"
        " (MASTER) | -> lb2's GARP | -> client's first 200 | outage |"
    )
    print("|---|---|---|---|---|---|")
    for setup, value in results.items():
        rs = value["runs"]
        if setup.mode == "vrrp_script":
            cells = [
                median_ms([gap(r.killed, r.lowered) for r in rs]),
                median_ms([gap(r.lowered, r.mastered) for r in rs]),
                median_ms([gap(r.mastered, r.garp) for r in rs]),
                median_ms([gap(r.garp, r.first_ok) for r in rs]),
                median_ms([r.outage for r in rs]),
            ]
            print(f"| {setup.profile}, {setup.label} | " + " | ".join(cells) + " |")


def own_path_table(results: dict[Setup, dict[str, Any]]) -> None:
    print(
        "lbwatch's own path: death seen (the master's pidfd readable) -> priority-0 "
        "advertisement on the wire "
        f"(target: median <= {OWN_TARGET[0] * 1000:.0f} ms, p95 <= {OWN_TARGET[1] * 1000:.0f} ms;"
        " p95 by nearest rank, the largest of fewer than 20)"
    )
    print("| profile | runs | median | p95 | max |")
    print("|---|---|---|---|---|")
    for profile in dict.fromkeys(s.profile for s in results):
        own = [gap(r.seen, r.lowered) for s, v in results.items() if s.profile == profile
               and s.mode == "lbwatch" for r in v["runs"]]  # fmt: skip
        own = [v for v in own if not math.isnan(v)]
        if own:
            print(
                f"| {profile} | {len(own)} | {statistics.median(own) * 1000:.1f} ms | "
                f"{p95(own) * 1000:.1f} ms | {max(own) * 1000:.1f} ms |"
            )


def client_table(results: dict[Setup, dict[str, Any]]) -> None:
    print(
        "| lbwatch, median | GARP -> answered GET sent | the GET before it took "
        f"(the client's timeout: {CLIENT_TIMEOUT * 1000:.0f} ms) |"
    )
    print("|---|---|---|")
    for setup, value in results.items():
        if setup.mode != "lbwatch":
            continue
        rs = value["runs"]
        waited = [r.waited for r in rs if not math.isnan(r.waited)]
        span = f" (min {min(waited) * 1000:.0f}, max {max(waited) * 1000:.0f})" if waited else ""
        print(
            f"| {setup.profile}, {setup.label} | {median_ms([gap(r.garp, r.began) for r in rs])} "
            f"ms | {median_ms(waited)} ms{span} |"
        )


def idle_table(results: dict[Setup, dict[str, Any]], idle: float) -> None:
    figures = next((v["idle"] for v in results.values() if v["idle"]), {})
    if not figures:
        return
    print(f"| lbwatch idle, scan every 1 s, over {idle:.0f} s | CPU (% of a core) | RSS |")
    print("|---|---|---|")
    for label, (cpu, rss) in figures.items():
        print(f"| {label} | {cpu * 100:.3f} % | {rss / 2**20:.1f} MiB ({rss / 1e6:.1f} MB) |")
    print("bench/memory.py measures the same on loopback, with more samples and USS.")


def report(results: dict[Setup, dict[str, Any]], idle: float) -> None:
    for table in (outage_table, breakdown_tables, own_path_table, client_table):
        print()
        table(results)
    print()
    idle_table(results, idle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="failovers per set-up and profile")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU sampling")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="lbwatch only (no vrrp_script, no 100/97): the shipped set-up",
    )
    parser.add_argument(
        "--profiles",
        default=None,
        help="keepalived profiles (config/keepalived.conf, keepalived-fast.conf); by default "
        "classic,fast, and with --systemd one of them, classic by default",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="instead: kill -9 and restart of haproxy on the systemd lab's nodes (with lbwatch "
        "and with systemd alone) beside the bare lab's, and the agents' idle figures "
        "(--skip-baseline does not apply)",
    )
    parser.add_argument("--json", type=Path, help="with --systemd: also write the figures here")
    args = parser.parse_args()
    if args.json is not None and not args.systemd:
        parser.error("--json goes with --systemd")
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    profiles = (args.profiles or ("classic" if args.systemd else "classic,fast")).split(",")
    unknown = [p for p in profiles if p not in ADVERT_INT]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r}: classic or fast")
    if args.systemd:
        from bench.failover_systemd import run

        if len(profiles) != 1:
            parser.error("--systemd runs one profile: --profiles classic or --profiles fast")
        return run(args.runs, args.idle, args.json, profiles[0])
    if not wire.available():
        print("tcpdump is needed to time VRRP on the wire: `make apt` installs it", file=sys.stderr)
        return 2
    setups = []
    for profile in profiles:
        if not args.skip_baseline:
            setups.append(Setup("vrrp_script", BLOG, profile))
        setups.append(Setup("lbwatch", SHIPPED, profile))
        if not args.skip_baseline:
            setups.append(Setup("lbwatch", BLOG, profile))
    print(f"failover benchmark, {args.runs} runs per set-up, {len(setups)} set-ups", flush=True)
    started = time.monotonic()
    results: dict[Setup, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lbwatch-bench-wire-") as capdir:
        for setup in setups:
            first_lbwatch = setup.mode == "lbwatch" and not any(
                s.mode == "lbwatch" for s in results
            )
            results[setup] = bench_setup(
                setup, args.runs, args.idle if first_lbwatch else 0.0, Path(capdir)
            )
    report(results, args.idle)
    skews = ", ".join(f"{p}: {skew(p, 'classic') * 1000:.1f} ms" for p in (BLOG[1], SHIPPED[1]))
    print(f"VRRP skew time of the backup at priority {skews} (advert_int 1; a tenth at 0.1)")
    print(f"the run took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
