"""Chaos soak of lbwatch in the real two-node lab (root): a seeded schedule of faults (daemons
killed or stopped, haproxy restarted or reloaded by the operator, lbwatch killed, sshd and the
SMTP server down, valid, invalid and simultaneous config edits, VRRP cut, a link flap, a
wall-clock step, a full disk under the spool and staging directories) while an observer outside
the agents checks the invariants the whole time. Prints a table of figures per invariant, the
timeline around each violation, and exits 1 when a hard invariant failed.

    sudo .venv/bin/python bench/chaos.py --seed 1 --minutes 5 [--json out.json] [--systemd]
    sudo .venv/bin/python bench/chaos.py --seed 1 --minutes 5 --overlap --baseline seed
    sudo make chaos SEED=1 MINUTES=30 [PROFILE=fast]
    sudo make chaos-systemd SEED=21 MINUTES=10

``--overlap``: the pair's faults too (bench/chaos_plan.py's PAIR_KINDS: the same fault on
both nodes within seconds, drain and undrain, one node deaf to VRRP); without it a seed's
schedule is the one it always was. ``--baseline seed``: after the lbwatch soak, the same
schedule with the nodes running the seed's scripts instead (bench/chaos_seedrig.py,
bench/seed/), and both soaks' figures side by side (bench/chaos_compare.py).

``--systemd``: the same soak on the systemd tier (tests/lab/syslab.py: nodes booted by
systemd, lbwatch from its package under the shipped unit); which faults apply there and how is
bench/chaos_sysrig.py's docstring. The schedule is a function of the seed and the fault kinds
alone (bench/chaos_plan.py); what the daemons do in reply is not repeatable, so a violation is
reported with its timeline.
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

from bench.chaos_compare import render as render_comparison
from bench.chaos_faults import Injector
from bench.chaos_observer import Observer, read_transitions
from bench.chaos_plan import BARE_KINDS, KINDS, PAIR_KINDS, SYSTEMD_KINDS, Fault, plan
from bench.chaos_report import Applied, RunData, analyse, render
from bench.chaos_rig import BareRig, Rig
from bench.chaos_seedrig import SeedRig
from tests.lab.netlab import PRIORITY, Lab

DRAIN = 40.0  # seconds at most after the last heal for mail and convergence to settle
ADVERT_INT = {"classic": 1.0, "fast": 0.1}  # keepalived's, by VRRP profile (tests/lab/netlab)


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
    systemd: bool = False,
    supervisor: str = "lbwatch",
) -> dict[str, Any]:
    """One soak; ``supervisor`` "seed": the seed's scripts instead of lbwatch (bare lab)."""
    rig: Rig
    if systemd:
        from bench.chaos_sysrig import SysRig  # builds the package when it is not fresh

        rig = SysRig()
    elif supervisor == "seed":
        rig = SeedRig(profile)
    else:
        rig = BareRig(profile)
    try:
        result = soak(rig, seed, minutes, kinds, log, logs_dir, profile)
    finally:
        rig.down()
    return result


def soak(
    rig: Rig,
    seed: int,
    minutes: float,
    kinds: tuple[str, ...],
    log: bool,
    logs_dir: Path | None,
    profile: str,
) -> dict[str, Any]:
    skipped = {k: why for k, why in rig.skipped.items() if k in kinds}
    for kind, why in skipped.items():
        print(f"not injected on the {rig.tier} lab: {kind}: {why}", flush=True)
    kinds = tuple(k for k in kinds if k not in skipped)
    schedule = plan(seed, minutes * 60, kinds)
    lab = rig.lab
    maildir = rig.up()
    observer = Observer(lab, rig.cfg_path, unit_pings=rig.tier == "systemd")
    rig.start(observer)
    settle(lab, maildir, 15)
    mail_since = rig.mark_start()
    injector = Injector(rig)
    observer.start(minutes * 60 + DRAIN + 60)
    t0 = time.time()
    observer.note(
        "chaos",
        f"start, seed {seed}, {profile} profile, {rig.tier} lab, {len(schedule)} faults planned",
        t0,
    )
    # Timed steps after an injection: a BOTH fault's second node, then heals.
    steps: list[tuple[float, int, str, Fault]] = []
    pending = list(schedule)
    injected: dict[int, Applied] = {}
    while pending or steps:
        next_at = min([t0 + f.at for f in pending[:1]] + [h[0] for h in steps[:1]])
        time.sleep(max(0.0, next_at - time.time()))
        now = time.time()
        if steps and steps[0][0] <= now:
            _, _, phase, f = heapq.heappop(steps)
            if phase == "second":
                detail = _safely(lambda f=f: injector.second(f))
                injected[f.n] = injected[f.n].second_at(now, detail)
            else:
                detail = _safely(lambda f=f, now=now: injector.heal(f, now))
                now = time.time()  # a heal may wait (systemd bringing lbwatch back)
                injected[f.n] = injected[f.n].healed_at(now, detail)
            _say(observer, log, t0, now, f"{phase} {f.label()}: {detail}")
            continue
        f = pending.pop(0)
        detail = _safely(lambda f=f, now=now: injector.inject(f, now))
        injected[f.n] = Applied(f, now, now if not f.hold else 0.0, detail, "")
        _say(observer, log, t0, now, f"inject {f.label()}: {detail}")
        if f.second_after:
            heapq.heappush(steps, (now + f.second_after, f.n, "second", f))
        if f.hold:
            heapq.heappush(steps, (now + f.hold, f.n, "heal", f))
    end = time.time()
    observer.note("chaos", "last fault healed; draining", end)
    settle(lab, maildir, DRAIN)
    time.sleep(6.0)  # the last convergence deadline (5 s) has passed for anything late
    observer.stop()
    until = time.time()
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
        mail_since=mail_since,
        logs=rig.logs(),
        wedge_after=rig.wedge_after,
        tier=rig.tier,
        supervisor=rig.supervisor,
        advert_int=ADVERT_INT[profile],
        priorities=tuple(PRIORITY[n] for n in lab.nodes),
        observed_until=until,
    )
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        for name, text in data.logs.items():
            (logs_dir / f"{rig.supervisor}-{name}.log").write_text(text)
    result = analyse(data)
    result["skipped"] = skipped
    return result


def _say(observer: Observer, log: bool, t0: float, now: float, text: str) -> None:
    observer.note("chaos", text, now)
    if log:
        print(f"{now - t0:8.2f}  {text}", flush=True)


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
        "--kinds",
        default="",
        help="comma-separated fault kinds (default: all that apply to the lab)",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="the systemd tier: nodes booted by systemd, lbwatch from its package (needs the "
        "classic profile)",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="the pair's faults too: the same fault on both nodes within seconds, drain and "
        "undrain, one node deaf to VRRP (another schedule than the seed's without them)",
    )
    parser.add_argument(
        "--baseline",
        choices=("seed",),
        help="then the same schedule with the seed's scripts instead of lbwatch, and both "
        "soaks' figures side by side",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if args.systemd and args.profile != "classic":
        print("--systemd: the systemd lab runs the example's classic pair", file=sys.stderr)
        return 2
    if args.systemd and args.baseline:
        print("--baseline: the seed's scripts run on the bare lab only", file=sys.stderr)
        return 2
    # Under --systemd all its kinds: those that do not apply are said, with why, and left out.
    default = SYSTEMD_KINDS if args.systemd else BARE_KINDS
    if args.overlap:
        default += PAIR_KINDS
    kinds = tuple(k for k in args.kinds.split(",") if k) or default
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        print(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    result = run(
        args.seed,
        args.minutes,
        kinds,
        logs_dir=args.logs,
        profile=args.profile,
        systemd=args.systemd,
    )
    print(render(result))
    out: dict[str, Any] = result
    if args.baseline:
        base = run(args.seed, args.minutes, kinds, logs_dir=args.logs and args.logs / "seed",
                   profile=args.profile, supervisor="seed")  # fmt: skip
        print(render(base))
        print()
        print(render_comparison(result, base))
        out = {"lbwatch": result, "seed": base}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True))
    return 1 if result["hard_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
