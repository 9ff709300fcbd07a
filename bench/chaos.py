"""Chaos soak of lbwatch in the real two-node lab (root): a seeded schedule of faults (daemons
killed or stopped, haproxy restarted or reloaded by the operator, lbwatch killed, sshd and the
SMTP server down, valid, invalid and simultaneous config edits, VRRP cut, a link flap, a
wall-clock step, a full disk under the spool and staging directories) while an observer outside
the agents checks the invariants the whole time. Prints a table of figures per invariant, the
timeline around each violation, and exits 1 when a hard invariant failed.

    sudo .venv/bin/python bench/chaos.py --seed 1 --minutes 5 [--json out.json]
    sudo make chaos SEED=1 MINUTES=30 [PROFILE=fast]

The schedule is a function of the seed alone (bench/chaos_plan.py); what the daemons do in
reply is not repeatable, so a violation is reported with its timeline.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chaos_faults import SMTP_PORT, Injector, prepare_disks
from bench.chaos_observer import Observer, read_transitions, watchdog_env
from bench.chaos_plan import KINDS, Fault, plan
from bench.chaos_report import Applied, RunData, analyse, render
from tests.lab.netlab import Lab, Node, notify_toml
from tests.util import wait_for

# every transition mailed one by one: no digest hides one
NOTIFY = notify_toml(SMTP_PORT, notify="flap_max = 100000\n")
DRAIN = 40.0  # seconds at most after the last heal for mail and convergence to settle


def services_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


def start_agent(node: Node, offset: float) -> None:
    env = watchdog_env(node)
    if offset:
        env["LBWATCH_TEST_WALL_OFFSET"] = str(offset)
    node.start_lbwatch(env=env)


def settle(lab: Lab, maildir: Path, limit: float) -> None:
    """Wait (bounded) until lb1 holds the VIP alone and the mail directory stops growing."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    deadline = time.monotonic() + limit
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(list(maildir.glob("*.json")))
        if n != count:
            count, quiet_since = n, time.monotonic()
        home = lb1.has_vip() and not lb2.has_vip()
        if home and time.monotonic() - quiet_since > 8.0:
            return
        time.sleep(0.5)


def run(
    seed: int,
    minutes: float,
    kinds: tuple[str, ...],
    log: bool = True,
    logs_dir: Path | None = None,
    profile: str = "classic",
) -> dict[str, Any]:
    schedule = plan(seed, minutes * 60, kinds)
    applied: list[Applied] = []
    with Lab() as lab:
        lab.enable_sync()
        maildir = lab.start_smtp_sink(SMTP_PORT)
        observer = Observer(lab)
        for node in lab.nodes.values():
            prepare_disks(node)
            node.write_configs(
                keepalived_notify="fifo",
                lbwatch_extra=NOTIFY,
                sync=True,
                transitions_log=True,
                vrrp_profile=profile,
            )
            start_agent(node, 0.0)
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        wait_for(lambda: services_up(lb1) and services_up(lb2), 30, what="both nodes up")
        wait_for(lb1.has_vip, 30, what="lb1 to hold the VIP")
        wait_for(lambda: lab.client_get() == (200, "lb1"), 20, what="HTTP 200 via lb1")
        settle(lab, maildir, 15)
        injector = Injector(lab, start_agent)
        observer.start(minutes * 60 + DRAIN + 60)
        t0 = time.time()
        observer.note(
            "chaos", f"start, seed {seed}, {profile} profile, {len(schedule)} faults planned", t0
        )
        heals: list[tuple[float, int, Fault]] = []
        pending = list(schedule)
        injected: dict[int, Applied] = {}
        while pending or heals:
            next_at = min([t0 + f.at for f in pending[:1]] + [h[0] for h in heals[:1]])
            time.sleep(max(0.0, next_at - time.time()))
            now = time.time()
            if heals and heals[0][0] <= now:
                _, _, f = heapq.heappop(heals)
                detail = _safely(lambda f=f, now=now: injector.heal(f, now))
                injected[f.n] = injected[f.n].healed_at(now, detail)
                observer.note("chaos", f"heal {f.label()}: {detail}", now)
                if log:
                    print(f"{now - t0:8.2f}  heal {f.label()}: {detail}", flush=True)
                continue
            f = pending.pop(0)
            detail = _safely(lambda f=f, now=now: injector.inject(f, now))
            injected[f.n] = Applied(f, now, now if not f.hold else 0.0, detail, "")
            observer.note("chaos", f"inject {f.label()}: {detail}", now)
            if log:
                print(f"{now - t0:8.2f}  inject {f.label()}: {detail}", flush=True)
            if f.hold:
                heapq.heappush(heals, (now + f.hold, f.n, f))
        end = time.time()
        observer.note("chaos", "last fault healed; draining", end)
        settle(lab, maildir, DRAIN)
        time.sleep(6.0)  # the last convergence deadline (5 s) has passed for anything late
        observer.stop()
        applied = [injected[n] for n in sorted(injected)]
        data = RunData(
            seed=seed,
            minutes=minutes,
            profile=profile,
            t0=t0,
            end=end,
            faults=applied,
            obs=observer.obs,
            valid_edits=list(injector.valid),
            invalid_edits=list(injector.invalid),
            transitions={n: read_transitions(node) for n, node in lab.nodes.items()},
            maildir=maildir,
            logs={n: node.log_text() for n, node in lab.nodes.items()},
        )
        if logs_dir is not None:
            logs_dir.mkdir(parents=True, exist_ok=True)
            for name, text in data.logs.items():
                (logs_dir / f"lbwatch-{name}.log").write_text(text)
        return analyse(data)


def _safely(action: Any) -> str:
    """A fault that could not be done is logged as such and the soak goes on."""
    try:
        return str(action())
    except Exception as exc:  # any failure of the harness: said on the timeline
        return f"HARNESS ERROR {type(exc).__name__}: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="write the figures and violations here")
    parser.add_argument("--logs", type=Path, help="keep the agents' logs in this directory")
    parser.add_argument(
        "--profile",
        choices=("classic", "fast"),
        default="classic",
        help="keepalived's VRRP profile: classic (v2, advert_int 1) or fast (v3, advert_int 0.1)",
    )
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated fault kinds (default: all)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        print(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    result = run(args.seed, args.minutes, kinds, logs_dir=args.logs, profile=args.profile)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
    return 1 if result["hard_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
