"""Failover benchmark in the two-node lab (root): SIGKILL of haproxy on the MASTER -> first HTTP
200 through the VIP from the peer, for lbwatch and, in the same run, for the approach it
replaces (keepalived's vrrp_script `killall -0 haproxy`, interval 1, fall 2, weight -5,
priorities 100/97, advert_int 1). Also lbwatch's death-to-action time, idle CPU and RSS.

    sudo make bench            # or: sudo .venv/bin/python bench/failover.py --runs 5 --idle 30
    sudo make bench-systemd    # --systemd: the systemd lab's nodes beside the bare lab's, with
                               # and without lbwatch (bench/failover_systemd.py)

Figures are medians over the runs; the machine is shared and noisy, so compare the two modes of
the same run rather than against figures from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbwatch.statusdoc import ActionEntry
from tests.lab.netlab import Lab, Node
from tests.util import wait_for

SKEW_97 = (256 - 97) / 256  # VRRP skew time of the backup, the floor for any failover


def both_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


# The client's timeout for one GET. A GET sent while the VIP leads nowhere (lb1 has let it go,
# lb2 has not taken it yet) waits this long: the first 200 comes up to this much after lb2
# could answer. 100 ms made the fast profile's outage look 40 ms longer than it was (a GET
# sent just before lb2's MASTER waited out its timeout); a LAN connect takes under 1 ms here,
# and a slow one counted as lost only lengthens the figure.
CLIENT_TIMEOUT = 0.02
OWN_TARGET = 0.02  # lbwatch's own path, death seen -> keepalived's priority-0 advertisement


def one_failover(lab: Lab) -> tuple[float, float, dict[str, Any]]:
    """Kill haproxy on lb1: (wall time of the kill, seconds until the client's first 200 from
    lb2, the client's report: when the answered GET began, and the GET before it)."""
    lb1 = lab.nodes["lb1"]
    with lab.client_watch("lb2", 30, timeout=CLIENT_TIMEOUT) as watch:
        assert watch.stdout is not None
        watch.stdout.readline()
        killed = time.time()
        lb1.kill("haproxy")
        result = json.loads(watch.stdout.readline())
    if result["first_ok"] is None:
        raise RuntimeError("no HTTP 200 from lb2 within 30 s")
    return killed, float(result["first_ok"]) - killed, result


def settle_on_lb1(lab: Lab) -> None:
    lb1 = lab.nodes["lb1"]
    wait_for(lb1.has_vip, 40, what="lb1 to take the VIP back")
    wait_for(lambda: lab.client_get() == (200, "lb1"), 20, what="HTTP 200 via lb1")
    time.sleep(1.0)


def bench_vrrp_script(runs: int) -> list[float]:
    outages = []
    with Lab() as lab:
        for node in lab.nodes.values():
            node.write_configs(keepalived_mode="vrrp_script")
            node.start_haproxy()
            node.start_keepalived()
        settle_on_lb1(lab)
        for i in range(runs):
            outages.append(one_failover(lab)[1])
            print(f"  vrrp_script run {i + 1}: outage {outages[-1]:.3f} s", flush=True)
            lab.nodes["lb1"].start_haproxy()  # what an operator (or cron) would do
            settle_on_lb1(lab)
    return outages


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


def death_seen(node: Node, after: float) -> float | None:
    """When lbwatch on ``node`` logged a haproxy master's exit, after ``after``."""
    for line in node.log_text().splitlines():
        stamp = log_stamp(line) if "exited (pidfd)" in line else None
        if stamp is not None and stamp >= after - 0.001:
            return stamp
    return None


def log_window(node: Node, after: float, seconds: float) -> list[str]:
    """lbwatch's log lines on ``node`` from ``after`` for ``seconds``."""
    out = []
    for line in node.log_text().splitlines():
        stamp = log_stamp(line)
        if stamp is not None and after - 0.001 <= stamp <= after + seconds:
            out.append(line)
    return out


def bench_lbwatch(runs: int, idle: float, profile: str = "classic") -> dict[str, Any]:
    outages, reactions, mastered, own = [], [], [], []
    sent_after, waited = [], []  # the answered GET: sent after lb2's MASTER; the one before it
    with Lab() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        # lb1 probes haproxy over HTTP at the default interval, lb2 does not: idle figures for
        # both set-ups. keepalived records its own transitions on lb2.
        lb1.write_configs(health=True, probe_interval=1.0, vrrp_profile=profile)
        lb2.write_configs(health=False, vrrp_profile=profile, transitions_log=True)
        for node in (lb1, lb2):
            node.start_lbwatch()
        wait_for(lambda: both_up(lb1) and both_up(lb2), 30, what="both nodes up")
        settle_on_lb1(lab)
        for i in range(runs):
            killed, outage, client = one_failover(lab)
            outages.append(outage)
            reactions.append(stop_action(lb1, killed).at - killed)
            at = None
            for _ in range(200):  # keepalived's hook runs a moment after the transition
                at = master_at(lb2, killed)
                if at is not None:
                    break
                time.sleep(0.05)
            mastered.append((at or float("nan")) - killed)
            sent_after.append(float(client["began"]) - (at or float("nan")))
            waited.append(float(client["before"][1]) if client["before"] else float("nan"))
            seen = death_seen(lb1, killed)
            # lbwatch's own path: the death seen -> keepalived's priority-0 advertisement,
            # which is lb2's MASTER less the skew time lb2 waits after it.
            skew = SKEW_97 / (10 if profile == "fast" else 1)
            own.append((at or float("nan")) - skew - (seen or float("nan")))
            print(
                f"  lbwatch ({profile}) run {i + 1}: outage {outage:.3f} s, "
                f"death-to-action {reactions[-1] * 1000:.1f} ms, "
                f"lb2 MASTER after {mastered[-1] * 1000:.0f} ms, "
                f"death seen -> priority-0 advert {own[-1] * 1000:.0f} ms, "
                f"answered GET sent {sent_after[-1] * 1000:.0f} ms after lb2's MASTER, "
                f"the GET before it took {waited[-1] * 1000:.0f} ms",
                flush=True,
            )
            if own[-1] > OWN_TARGET:  # where did it go? lbwatch's side of it, from its log
                print(f"    over {OWN_TARGET * 1000:.0f} ms; lb1's log from the death on:")
                for line in log_window(lb1, killed, 1.0):
                    print(f"      {line}")
            wait_for(lambda: both_up(lb1), 30, what="lb1 healed")
            settle_on_lb1(lab)
            # haproxy up past the lab's stable_after (5 s), so each kill is a first failure
            # as in production, not one of a crash loop that lbwatch would give up on.
            time.sleep(5.5)
        time.sleep(2)
        agents = {
            "lb1, with the HTTP probe (every 1 s)": lbwatch_agent(lb1),
            "lb2, without the probe": lbwatch_agent(lb2),
        }
        figures = idle_figures(agents, idle)
    return {
        "outages": outages,
        "reactions": reactions,
        "mastered": mastered,
        "own": own,
        "sent_after": sent_after,
        "waited": waited,
        "idle": figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU sampling")
    parser.add_argument(
        "--skip-baseline", action="store_true", help="measure lbwatch only (no comparison)"
    )
    parser.add_argument(
        "--profiles",
        default="classic,fast",
        help="keepalived profiles for lbwatch (config/keepalived.conf, keepalived-fast.conf)",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="instead: kill -9 and restart of haproxy on the systemd lab's nodes (with lbwatch "
        "and with systemd alone) beside the bare lab's, and the agents' idle figures "
        "(--skip-baseline and --profiles do not apply)",
    )
    parser.add_argument("--json", type=Path, help="with --systemd: also write the figures here")
    args = parser.parse_args()
    if args.json is not None and not args.systemd:
        parser.error("--json goes with --systemd")
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if args.systemd:
        from bench.failover_systemd import run

        return run(args.runs, args.idle, args.json)
    print(f"failover benchmark, {args.runs} runs per mode", flush=True)
    # "fast": VRRP v3 with advert_int 0.1 (config/keepalived-fast.conf); "classic": v2, 1 s.
    baseline = [float("nan")] if args.skip_baseline else bench_vrrp_script(args.runs)
    results = {p: bench_lbwatch(args.runs, args.idle, p) for p in args.profiles.split(",")}
    med_base = statistics.median(baseline)
    print()
    print("| approach | median outage | min | max |")
    print("|---|---|---|---|")
    print(
        f"| vrrp_script killall -0 (interval 1, fall 2, weight -5) | {med_base:.3f} s | "
        f"{min(baseline):.3f} s | {max(baseline):.3f} s |"
    )
    for profile, ours in results.items():
        out = ours["outages"]
        print(
            f"| lbwatch, {profile} profile | {statistics.median(out):.3f} s | {min(out):.3f} s | "
            f"{max(out):.3f} s |"
        )
    print()
    print(
        "| lbwatch, median | outage / vrrp_script's | death -> stop dispatched | "
        "death seen -> priority-0 advert | death -> lb2 MASTER | lb2 MASTER -> first 200 |"
    )
    print("|---|---|---|---|---|---|")
    for profile, ours in results.items():
        med = statistics.median(ours["outages"])
        react = statistics.median(ours["reactions"])
        master = statistics.median(ours["mastered"])
        print(
            f"| {profile} | {med / med_base:.2f} | {react * 1000:.1f} ms "
            f"(max {max(ours['reactions']) * 1000:.1f}) | "
            f"{statistics.median(ours['own']) * 1000:.0f} ms (max {max(ours['own']) * 1000:.0f}) | "
            f"{master * 1000:.0f} ms | {(med - master) * 1000:.0f} ms |"
        )
    print()
    print(
        "| lbwatch, median | lb2 MASTER -> answered GET sent | the GET before it took "
        f"(the client's timeout: {CLIENT_TIMEOUT * 1000:.0f} ms) |"
    )
    print("|---|---|---|")
    for profile, ours in results.items():
        print(
            f"| {profile} | {statistics.median(ours['sent_after']) * 1000:.0f} ms | "
            f"{statistics.median(ours['waited']) * 1000:.0f} ms "
            f"(min {min(ours['waited']) * 1000:.0f}, max {max(ours['waited']) * 1000:.0f}) |"
        )
    print(
        f"VRRP skew time at priority 97: {SKEW_97:.3f} s (advert_int 1), "
        f"{SKEW_97 / 10:.3f} s (advert_int 0.1)"
    )
    ours = results[next(iter(results))]
    print()
    print(f"| lbwatch idle, scan every 1 s, over {args.idle:.0f} s | CPU (% of a core) | RSS |")
    print("|---|---|---|")
    for label, (cpu, rss) in ours["idle"].items():
        print(f"| {label} | {cpu * 100:.3f} % | {rss / 2**20:.1f} MiB ({rss / 1e6:.1f} MB) |")
    print("bench/memory.py measures the same on loopback, with more samples and USS.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
