"""`lbwatch drain` / `undrain` against `systemctl stop keepalived` on the MASTER, as clients
see them through the VIP, in the two-node lab (root).

Two clients run in the client's namespace through the VIP for the whole run, at once, a GET
every 10 ms each (tests/lab/client.py ``stream``):

- new: a new TCP connection per GET;
- keep-alive: one HTTP/1.1 connection reused for every GET, replaced only when the server
  closes it. A GET on a reused connection that the server had closed gracefully, with no
  byte of reply, is sent again on a new connection (RFC 9112 9.3.1: the request is
  idempotent) and counted as "retried", apart from the failures.

A failure is a GET without a 200: a reset, a timeout (--timeout, on the connect and on each
read), a refused connection, a connection closed with no reply. Each round: drain lb1 (`lbwatch
drain --wait` in lb1) -> VIP on lb2, settled -> undrain -> VIP back on lb1 (preemption,
priorities 254/253) -> settled; then as many rounds of the baseline: lb1's agent paused (or it
would start keepalived again), keepalived stopped by lbwatch's configured stop command
(start-stop-daemon --stop --retry TERM/5/KILL/2: SIGTERM and wait, as `systemctl stop
keepalived` does; the lab has no systemd) -> VIP on lb2 -> keepalived started by its configured
start command -> VIP back on lb1 -> agent resumed, settled. "Settled" also waits for both
clients to have had 50 answers in a row since, so every GET is counted in the operation it
followed (from its command to the next operation's). Figures are printed, never asserted.

    sudo make bench                            # runs it with the other benches
    sudo .venv/bin/python bench/drain.py       # --rounds 5 --timeout 1.0 --json drain.json

With --close-before-move (an experiment: lbwatch does not do this), haproxy on both nodes has
one more line, ``http-after-response set-header Connection close if { var(proc.leaving) -m int
gt 0 }``, and the bench sets ``proc.leaving`` (haproxy's CLI, ``set var``, experimental mode)
on the node about to lose the VIP just before drain or undrain, and clears it once the VIP has
moved: each kept connection is closed by haproxy after its next answer instead of being cut
when the VIP leaves. stop/start run as without it.

The machine is shared and noisy: compare the operations of one run rather than runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_lab_cluster import pair
from tests.e2e.test_lab_drain import cli, command, ready_to_drain
from tests.e2e.test_lab_handover import state
from tests.lab.netlab import HERE, VIP, Lab, Node, haproxy_cfg
from tests.util import wait_for

KINDS = ("new", "keep-alive")
CLIENT_MODE = {"new": "new", "keep-alive": "keepalive"}
OPS = ("drain", "undrain", "stop", "start")
IN_A_ROW = 50  # answers in a row (both clients) that make the pair settled for them
# --close-before-move: haproxy answers with "Connection: close" while proc.leaving is set.
CLOSE_RULE = (
    "    http-after-response set-header Connection close if { var(proc.leaving) -m int gt 0 }\n"
)
HAPROXY_CLI = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); "
    "s.connect('/run/haproxy/admin.sock'); s.sendall(sys.argv[1].encode() + b'\\n'); "
    "print(s.makefile().read())"
)


def closing_cfg() -> str:
    """The lab's haproxy.cfg with ``CLOSE_RULE`` in the frontend that the clients reach."""
    cfg = haproxy_cfg()
    return cfg.replace("    default_backend app\n", CLOSE_RULE + "    default_backend app\n", 1)


def set_leaving(node: Node, on: bool) -> None:
    """haproxy's ``proc.leaving`` on ``node`` (1: close each connection after its answer)."""
    said = node.run(
        sys.executable,
        "-c",
        HAPROXY_CLI,
        f"experimental-mode on; set var proc.leaving int({int(on)})",
    )
    if said.strip():
        raise RuntimeError(f"{node.name}: haproxy's CLI said {said.strip()!r}")


@dataclass(frozen=True)
class Get:
    """One GET as the client logged it (tests/lab/client.py ``stream``)."""

    began: float
    ended: float
    outcome: str
    lb: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("ok", "retried")


def read_gets(path: Path) -> list[Get]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:  # the last line may be half written
                out.append(Get(float(parts[0]), float(parts[1]), parts[2], parts[3]))
    return out


class Clients:
    """Both clients, streaming their GETs to files under ``dir`` until stopped (SIGTERM)."""

    def __init__(self, lab: Lab, dir: Path, timeout: float) -> None:
        self.lab, self.timeout = lab, timeout
        self.paths = {kind: dir / f"client-{CLIENT_MODE[kind]}.log" for kind in KINDS}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Clients:
        for kind, path in self.paths.items():
            argv = [sys.executable, str(HERE / "client.py"), "stream", CLIENT_MODE[kind]]
            argv += [f"http://{VIP}/", str(path), str(self.timeout)]
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.lab.ns("cl"), *argv],
                    stdin=subprocess.DEVNULL,
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def gets(self) -> dict[str, list[Get]]:
        return {kind: read_gets(path) for kind, path in self.paths.items()}

    def answered_since(self, since: float) -> bool:
        """Each client's last ``IN_A_ROW`` GETs, all begun after ``since``, were answered."""
        for gets in self.gets().values():
            tail = gets[-IN_A_ROW:]
            if len(tail) < IN_A_ROW or tail[0].began < since or not all(g.ok for g in tail):
                return False
        return True


@dataclass
class Op:
    """One operation: its command's wall time, when keepalived on the node taking the VIP said
    MASTER (its notify_master hook), and how long the command took to return."""

    name: str
    began: float
    mastered: float | None = None
    returned: float | None = None  # how long the command took


@dataclass
class Run:
    ops: list[Op] = field(default_factory=list)


def entered_master(node: Node, after: float) -> float | None:
    path = node.transitions_path
    lines = path.read_text().splitlines() if path.exists() else []
    found = [float(t) for t, s in (ln.split() for ln in lines) if s == "MASTER"]
    return next((t for t in found if t >= after), None)


def vip_alone(holder: Node, other: Node) -> bool:
    return holder.has_vip() and not other.has_vip()


def settle(lab: Lab, clients: Clients, since: float) -> None:
    """lb1 MASTER with the VIP, lb2 a BACKUP lb1 has heard, both clients answered since."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    wait_for(lambda: ready_to_drain(lb1, lb2), 30, what="lb1 MASTER, lb2 BACKUP, heard")
    wait_for(lambda: clients.answered_since(since), 30, what="both clients answered")


def drain_round(lab: Lab, clients: Clients, run: Run, close: bool) -> None:
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    if close:
        set_leaving(lb1, True)
    done = cli(lb1, "drain", "--wait", "--reason", "bench")
    if done.code != 0:
        raise RuntimeError(f"lbwatch drain exited {done.code}: {done.err.strip()}")
    op = Op("drain", done.began, returned=done.ended - done.began)
    wait_for(lambda: vip_alone(lb2, lb1), 15, what="the VIP on lb2 alone")
    wait_for(lambda: state(lb2) == "MASTER" and state(lb1) == "BACKUP", 10, what="lb2 MASTER")
    op.mastered = entered_master(lb2, op.began)
    run.ops.append(op)
    if close:
        set_leaving(lb1, False)
    settled = time.time()
    wait_for(lambda: clients.answered_since(settled), 30, what="both clients answered")

    if close:
        set_leaving(lb2, True)
    done = cli(lb1, "undrain")
    if done.code != 0:
        raise RuntimeError(f"lbwatch undrain exited {done.code}: {done.err.strip()}")
    op = Op("undrain", done.began, returned=done.ended - done.began)
    wait_for(lambda: vip_alone(lb1, lb2), 15, what="the VIP back on lb1 alone")
    op.mastered = entered_master(lb1, op.began)
    run.ops.append(op)
    if close:
        set_leaving(lb2, False)
    settle(lab, clients, time.time())


def stop_round(lab: Lab, clients: Clients, run: Run) -> None:
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    lb1.lbwatch_cli("pause", "--reason", "bench: keepalived stopped by hand")
    wait_for(lambda: lb1.doc().paused, 5, what="lb1 paused")
    began = time.time()
    lb1.run(*command(lb1, "keepalived", "stop"))
    op = Op("stop", began, returned=time.time() - began)
    wait_for(lambda: vip_alone(lb2, lb1), 15, what="the VIP on lb2 alone")
    op.mastered = entered_master(lb2, began)
    run.ops.append(op)
    settled = time.time()
    wait_for(lambda: clients.answered_since(settled), 30, what="both clients answered")

    began = time.time()
    lb1.run(*command(lb1, "keepalived", "start"))
    op = Op("start", began, returned=time.time() - began)
    wait_for(lambda: vip_alone(lb1, lb2), 15, what="the VIP back on lb1 alone")
    op.mastered = entered_master(lb1, began)
    run.ops.append(op)
    lb1.lbwatch_cli("resume")
    wait_for(lambda: not lb1.doc().paused, 5, what="lb1 resumed")
    settle(lab, clients, time.time())


@dataclass(frozen=True)
class Window:
    """The GETs one client began from an operation's command to the next one's."""

    op: Op
    kind: str
    gets: list[Get]
    last_ok_before: float | None  # the end of the last 200 before the window

    @property
    def failed(self) -> list[Get]:
        return [g for g in self.gets if not g.ok]

    @property
    def retried(self) -> int:
        return sum(1 for g in self.gets if g.outcome == "retried")

    def longest_gap(self) -> float:
        """The longest time the client went without a 200 answer: from the end of one 200 to
        the end of the next (a GET every 10 ms makes 10-15 ms the floor)."""
        ends = [g.ended for g in self.gets if g.ok]
        if self.last_ok_before is not None:
            ends.insert(0, self.last_ok_before)
        if not ends:
            return float("nan")
        if self.failed and self.failed[-1].ended > ends[-1]:
            ends.append(self.failed[-1].ended)  # never answered again within the window
        return max((b - a for a, b in zip(ends, ends[1:])), default=0.0)


def windows(run: Run, gets: dict[str, list[Get]], end: float) -> list[Window]:
    out = []
    bounds = [op.began for op in run.ops] + [end]
    for kind, all_gets in gets.items():
        for i, op in enumerate(run.ops):
            lo, hi = bounds[i], bounds[i + 1]
            before = [g.ended for g in all_gets if g.ok and g.began < lo]
            inside = [g for g in all_gets if lo <= g.began < hi]
            out.append(Window(op, kind, inside, before[-1] if before else None))
    return out


def table(run: Run, wins: list[Window], rounds: int, timeout: float) -> dict[str, Any]:
    print(
        f"\n{rounds} rounds each; GETs every 10 ms per client, timeout {timeout:g} s; each "
        "operation's GETs are those begun from its command to the next operation's"
    )
    head = "| operation | VIP taken (median) "
    for kind in KINDS:
        head += f"| {kind}: failed, median / total | {kind}: longest gap without a 200, max "
    print(head + "| keep-alive: retried, total | GETs per round (both) |")
    print("|---" * (4 + 2 * len(KINDS)) + "|")
    figures: dict[str, Any] = {}
    for name in OPS:
        ops = [op for op in run.ops if op.name == name]
        took = [op.mastered - op.began for op in ops if op.mastered is not None]
        row = f"| {name} | {statistics.median(took):.2f} s " if took else f"| {name} | - "
        fig: dict[str, Any] = {"vip_taken_s": took}
        for kind in KINDS:
            mine = [w for w in wins if w.op.name == name and w.kind == kind]
            failed = [len(w.failed) for w in mine]
            gaps = [w.longest_gap() for w in mine]
            why = collections.Counter(g.outcome for w in mine for g in w.failed)
            row += f"| {statistics.median(failed):g} / {sum(failed)} "
            row += f"| {max(gaps) * 1000:.0f} ms "
            fig[kind] = {"failed": failed, "longest_gap_s": gaps, "why": dict(why)}
        ka = [w for w in wins if w.op.name == name and w.kind == "keep-alive"]
        per_round = sum(len(w.gets) for w in wins if w.op.name == name) / max(1, len(ops))
        row += f"| {sum(w.retried for w in ka)} | {per_round:.0f} |"
        fig["retried"] = sum(w.retried for w in ka)
        figures[name] = fig
        print(row)
    print("\nfailures by kind of client and outcome:")
    for name in OPS:
        for kind in KINDS:
            why = figures[name][kind]["why"]
            if why:
                said = ", ".join(f"{k} x{v}" for k, v in sorted(why.items()))
                print(f"  {name}, {kind}: {said}")
    return figures


def failures_detail(wins: list[Window]) -> None:
    """Each failed GET, in time from its operation's command (for the report's story)."""
    print("\nfailed GETs, seconds from the operation's command (began -> ended, outcome):")
    for w in wins:
        for g in w.failed:
            print(
                f"  {w.op.name:<7} {w.kind:<10} {g.began - w.op.began:7.3f} -> "
                f"{g.ended - w.op.began:7.3f}  {g.outcome}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each (5)")
    parser.add_argument("--timeout", type=float, default=1.0, help="the clients' GET timeout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--close-before-move",
        action="store_true",
        help="the experiment: haproxy closes kept connections on the node losing the VIP "
        "during drain and undrain (see above)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    started = time.monotonic()
    how = ", haproxy closing kept connections first" if args.close_before_move else ""
    print(
        f"drain benchmark: {args.rounds} rounds of drain/undrain{how}, then of stop/start",
        flush=True,
    )
    with Lab() as lab:
        haproxy = closing_cfg() if args.close_before_move else ""
        pair(lab, "", transitions_log=True, haproxy=haproxy)
        run = Run()
        with Clients(lab, lab.base, args.timeout) as clients:
            settle(lab, clients, time.time())
            for i in range(args.rounds):
                drain_round(lab, clients, run, args.close_before_move)
                print(f"  drain/undrain round {i + 1} done", flush=True)
            for i in range(args.rounds):
                stop_round(lab, clients, run)
                print(f"  stop/start round {i + 1} done", flush=True)
            end = time.time()
        gets = clients.gets()
    wins = windows(run, gets, end)
    before = [g for kind in KINDS for g in gets[kind] if g.began < run.ops[0].began]
    print(
        f"before the first operation: {len(before)} GETs, "
        f"{sum(1 for g in before if not g.ok)} failed"
    )
    figures = table(run, wins, args.rounds, args.timeout)
    failures_detail(wins)
    for name, what in (
        ("drain", "`lbwatch drain --wait`"),
        ("undrain", "`lbwatch undrain`"),
        ("stop", "the stop command"),
    ):
        took = sorted(op.returned for op in run.ops if op.name == name and op.returned is not None)
        if took:
            print(
                f"{what} returned after {statistics.median(took):.2f} s "
                f"(median; {took[0]:.2f}-{took[-1]:.2f})"
            )
    print(f"the run took {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": args.rounds, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
