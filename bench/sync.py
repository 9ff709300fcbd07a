"""Config-sync benchmark in the two-node lab (root): save haproxy.cfg on lb1 -> lb2 serving it.

Three ways, in the same run, each over --runs saves (the file saved like an editor does, a new
file renamed over the old one):

- lbwatch: lb1 checks, reloads and confirms, pushes over its kept ssh connection into lb2's
  staging; lb2 checks, installs, reloads and confirms. Measured until a client asking lb2's own
  address gets the new X-Config header: the change is live on node 2.
- the classic loop: `while inotifywait -e close_write,moved_to DIR; do rsync -e ssh ...; done`
  with an unrestricted key straight onto lb2's live file; no check, no reload. Measured until
  lb2's file has the new content (it would still need a reload to be live).
- lsyncd 2.2 with its defaults (default.rsync, delay 15 s), same unrestricted key, file only.

``--push-after both`` also runs lbwatch with the canary (``push_after = "healthy"``: lb1 pushes
only once its health probe, every 0.5 s in the lab, passed ``rise`` times on the new config),
once per ``--rise`` value, in the same lab right after the default ``"check"``.

    sudo make bench            # or: sudo .venv/bin/python bench/sync.py --runs 7
    sudo .venv/bin/python bench/sync.py --runs 7 --push-after both --rise 1 2 --lsyncd-runs 0
    sudo .venv/bin/python bench/sync.py --runs 7 --lsyncd-runs 0 --three-nodes

``--unconfined-too`` first runs lbwatch with lb2 checking the received version as root
(``[sync.received] sandbox = false``), to price the confined check in the same lab.

``--three-nodes`` then builds a three-node lab (lb3 at 192.0.2.13) and times one rename-save on
lb1 until lb2 and lb3 both serve it: the slower peer against the two-node figure of the run.

Medians; the machine is shared and noisy, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_lab_sync import peer_state, save_like_vim
from tests.lab.netlab import LB_ADDR, Lab, Node, haproxy_cfg
from tests.lab.ssh import keygen
from tests.util import wait_for


def live_file(node: Node) -> Path:
    return node.dir / "haproxy" / "haproxy.cfg"


def served_on(lab: Lab, node: Node, tag: str, limit: float) -> Callable[[], float]:
    """Start a client polling node's own address for X-Config == tag; returns a function that
    waits for it and gives the wall time of the first such answer."""
    watch = lab.client_watch(tag, limit, addr=LB_ADDR[node.name], header="X-Config")
    assert watch.stdout is not None
    watch.stdout.readline()  # running

    def first() -> float:
        assert watch.stdout is not None
        result = json.loads(watch.stdout.readline())
        watch.wait(5)
        watch.stdout.close()
        if result["first_ok"] is None:
            raise RuntimeError(f"{node.name} never served {tag}")
        return float(result["first_ok"])

    return first


def file_arrives(path: Path, text: str, limit: float) -> float:
    """Poll the file every 2 ms; wall time it first holds ``text``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if path.read_text() == text:
                return time.time()
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"{path} did not get the new content within {limit:g} s")


def save_in_place(path: Path, text: str) -> None:
    """Truncate and rewrite the same inode, as cp, a shell redirect or nano do."""
    with path.open("r+") as f:
        f.truncate(0)
        f.write(text)


def bench_lbwatch(
    lab: Lab, runs: int, push_after: str = "check", rise: int = 1, confined: bool = True
) -> dict[str, list[float]]:
    """Both save styles: a rename into place is taken at once, a write in place after the
    debounce (200 ms of quiet). ``push_after`` and the probe's ``rise``: the canary;
    ``confined``: lb2 checks the received version confined (the default) or as root."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    options = f'push_after = "{push_after}"' + (
        "" if confined else "\nreceived = { sandbox = false }"
    )
    for node in (lb1, lb2):
        # The file as the last setting left it (both nodes alike): rewritten with new content
        # on both, it would be two edits, and the later one's node would hold the version.
        live = live_file(node).read_text() if live_file(node).exists() else ""
        node.write_configs(sync=True, sync_options=options, rise=rise, haproxy=live)
        node.start_lbwatch()
    wait_for(
        lambda: (
            peer_state(lb1, "lb2") == "in-sync"
            and peer_state(lb2, "lb1") in ("in-sync", "idle")  # idle: it holds lb1's
        ),
        30,
        what="lbwatch in sync at start",
    )
    out: dict[str, list[float]] = {"rename": [], "in place": []}
    log = lb1.dir / "lbwatch.log"  # one file across restarts (log_text() repeats it per start)
    log2 = lb2.dir / "lbwatch.log"
    logged, logged2 = log.stat().st_size, log2.stat().st_size
    renames: list[tuple[float, float]] = []  # (saved, latency) of each rename-save
    saves: list[float] = []
    for i in range(runs):
        for style, save in (("rename", save_like_vim), ("in place", save_in_place)):
            tag = f"lbwatch-{push_after}-{rise}-{confined}-{style.replace(' ', '-')}-{i}"
            first = served_on(lab, lb2, tag, 20)
            saved = time.time()
            save(live_file(lb1), haproxy_cfg(tag))
            out[style].append(first() - saved)
            saves.append(saved)
            if style == "rename":
                renames.append((saved, out[style][-1]))
            wait_for(
                lambda: peer_state(lb1, "lb2") == "in-sync",
                20,
                what="lb2 confirmed in sync",
            )
            time.sleep(0.5)
    for node in (lb1, lb2):
        node.stop_lbwatch()
    if push_after == "check":
        steps = breakdown(renames, saves, step_lines(log, logged), step_lines(log2, logged2))
        out.update({f"step: {k}": v for k, v in steps.items()})
    if push_after == "healthy":
        # lb1's own figure: from its reload confirmed to the push (the canary's cost).
        held = re.findall(
            r"passed its health probe \d+ time\(s\) \(held ([0-9.]+) s\)",
            log.read_bytes()[logged:].decode(),
        )
        out["held on lb1"] = [float(x) for x in held]
    return out


def bench_three(runs: int) -> dict[str, list[float]]:
    """Three nodes: a rename-save on lb1 goes to lb2 and lb3 at once (one link thread each).
    Per save, the time until each peer serves it, and the slower of the two."""
    out: dict[str, list[float]] = {"lb2": [], "lb3": [], "slower": []}
    with Lab(nodes=3) as lab:
        lab.enable_sync()
        nodes = list(lab.nodes.values())
        for node in nodes:
            node.write_configs(sync=True, sync_options='push_after = "check"')
            node.start_lbwatch()
        lb1, peers = nodes[0], nodes[1:]

        def settled() -> bool:
            return all(peer_state(lb1, p.name) == "in-sync" for p in peers)

        wait_for(settled, 30, what="three nodes in sync at start")
        for i in range(runs):
            tag = f"three-{i}"
            firsts = {p.name: served_on(lab, p, tag, 20) for p in peers}
            saved = time.time()
            save_like_vim(live_file(lb1), haproxy_cfg(tag))
            for name, first in firsts.items():
                out[name].append(first() - saved)
            out["slower"].append(max(out["lb2"][-1], out["lb3"][-1]))
            wait_for(settled, 20, what="both peers confirmed in sync")
            time.sleep(0.5)
        for node in nodes:
            node.stop_lbwatch()
    return out


# The agents' debug lines with their millisecond timestamps: a step's duration (lbwatch/sync/
# timing.py), and the watcher's "changed" line, the moment lb1 saw the save.
_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) \S+\s+"
    r"(?:sync step (?P<step>.+?): (?P<ms>[0-9.]+) ms|\S+ changed \(sha256)"
)
STEPS = (  # (name in the logs, node, row of the table), in the order they begin
    ("seen", "lb1", "save -> change seen on lb1"),
    ("check", "lb1", "haproxy -c on lb1"),
    ("reload", "lb1", "reload on lb1, new worker confirmed (beside the push: not on the path)"),
    ("push to lb2", "lb1", "push to lb2 (over the kept session to its receiver)"),
    ("check", "lb2", "haproxy -c on lb2"),
    ("install", "lb2", "install on lb2 (backup, fsync, rename)"),
    ("reload", "lb2", "reload on lb2, new worker confirmed"),
)
# The steps overlap at their edges: lb2 takes the file as rsync renames it, before rsync
# exits; lb2's new worker serves before lbwatch has seen it. So no "rest" row: the end-to-end
# figure is the reference.
END = "end to end: save on lb1 -> lb2 serving it"


def step_lines(log: Path, since: int) -> list[tuple[float, str, float]]:
    """(wall time, step, ms) of each step line logged after byte ``since``; "seen" (0 ms) for
    the watcher's change line."""
    out = []
    for line in log.read_bytes()[since:].decode(errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            out.append((at, m.group("step") or "seen", float(m.group("ms") or 0.0)))
    return out


def breakdown(
    renames: list[tuple[float, float]],
    saves: list[float],
    lb1: list[tuple[float, str, float]],
    lb2: list[tuple[float, str, float]],
) -> dict[str, list[float]]:
    """Per rename-save, each step's milliseconds: the lines logged between this save and the
    next one; "seen" is the change line's time after the save."""
    rows: dict[str, list[float]] = {row: [] for _, _, row in STEPS}
    rows[END] = []
    ends = [*sorted(saves)[1:], float("inf")]
    for saved, latency in renames:
        end = next(e for e in ends if e > saved)
        got: dict[str, float] = {}
        for node, lines in (("lb1", lb1), ("lb2", lb2)):
            for at, step, ms in lines:
                key = f"{node} {step}"
                if saved <= at < end and key not in got:
                    got[key] = max(0.0, (at - saved) * 1000) if step == "seen" else ms
        if not all(f"{node} {step}" in got for step, node, _ in STEPS):
            continue  # a run whose lines are not all there (e.g. the log not flushed): left out
        for step, node, row in STEPS:
            rows[row].append(got[f"{node} {step}"])
        rows[END].append(latency * 1000)
    return rows


def print_breakdown(lbw: dict[str, list[float]]) -> None:
    steps = {k[len("step: ") :]: v for k, v in lbw.items() if k.startswith("step: ")}
    if not steps or not all(steps.values()):
        print("no step breakdown: the agents' step lines were not found")
        return
    n = len(next(iter(steps.values())))
    print(f"\nlbwatch rename-save, where the time goes (medians of {n}, from the agents' logs):")
    print("| step | ms |\n|---|---|")
    for row, xs in steps.items():
        print(f"| {row} | {statistics.median(xs):.0f} |")


def unrestricted_key(lab: Lab) -> tuple[Path, str]:
    """The classic scripts' key: root on lb2 with no restriction (what lbwatch's receiver entry
    avoids). Returns the key and the ssh command line."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    key = lb1.dir / "ssh" / "classic_key"
    pub = keygen(key)
    with (lb2.dir / "ssh" / "authorized_keys").open("a") as f:
        f.write(pub + "\n")
    ssh = f"ssh -i {key} -o UserKnownHostsFile={lb1.dir / 'ssh' / 'known_hosts'} -o BatchMode=yes"
    return key, ssh


def bench_file_copier(lab: Lab, runs: int, argv: list[str], limit: float, name: str) -> list[float]:
    """Run a file copier on lb1 (inotifywait loop or lsyncd), save, time the file on lb2."""
    lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
    log = (lb1.dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(lb1.enter(*argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    out = []
    try:
        time.sleep(2.0)  # watches set up
        for i in range(runs):
            text = haproxy_cfg(f"{name}-{i}")
            saved = time.time()
            save_like_vim(live_file(lb1), text)
            out.append(file_arrives(live_file(lb2), text, limit) - saved)
            time.sleep(0.5)
    except RuntimeError:
        print((lb1.dir / f"{name}.log").read_text(errors="replace"), file=sys.stderr)
        raise
    finally:
        for p in lb1.procs():
            try:
                cmd = " ".join(p.cmdline())
            except Exception:
                continue
            if name in cmd or "inotifywait" in cmd or "lsyncd" in cmd:
                p.kill()
        proc.kill()
        proc.wait(5)
    return out


def classic_loop(ssh: str) -> list[str]:
    # -m and a read loop: restarting inotifywait per event would miss a rename that lands
    # while rsync runs. -I: rsync's quick check skips a file of the same size and mtime
    # second, which two quick edits easily are (a silent miss of the classic scripts).
    script = (
        "inotifywait -m -q -e close_write,moved_to --format %f /etc/haproxy/ | "
        'while read -r f; do [ "$f" = haproxy.cfg ] || continue; '
        f'rsync -I -e "{ssh}" /etc/haproxy/haproxy.cfg {LB_ADDR["lb2"]}:/etc/haproxy/haproxy.cfg; '
        "done"
    )
    return ["sh", "-c", f": classic; {script}"]


def lsyncd_argv(lab: Lab, ssh: str) -> list[str]:
    conf = lab.nodes["lb1"].dir / "lsyncd.conf.lua"
    rsh = ssh.replace('"', '\\"')
    conf.write_text(f"""settings {{ nodaemon = true }}
sync {{
    default.rsync,
    source = "/etc/haproxy/",
    target = "{LB_ADDR["lb2"]}:/etc/haproxy/",
    rsync = {{ rsh = "{rsh}" }},
}}
""")
    return ["lsyncd", str(conf)]


def summary(name: str, xs: list[float], base: float | None) -> str:
    med = statistics.median(xs)
    ratio = f"  ({med / base:.2f}x lbwatch)" if base else ""
    return (
        f"{name:<40} median {med:7.3f} s  min {min(xs):.3f}  max {max(xs):.3f}  n={len(xs)}{ratio}"
    )


def print_others(
    loop: list[float], lsy: list[float], three: dict[str, list[float]] | None, base: float
) -> None:
    if loop:
        print(summary("inotifywait + rsync loop", loop, base))
    else:
        print("inotifywait + rsync loop: skipped (apt-get install inotify-tools)")
    if lsy:
        print(summary("lsyncd, defaults", lsy, base))
    else:
        print("lsyncd: skipped (apt-get install lsyncd)")
    if three:
        print(summary("three nodes: lb1 -> lb2 serving", three["lb2"], None))
        print(summary("three nodes: lb1 -> lb3 serving", three["lb3"], None))
        print(summary("three nodes: the slower peer", three["slower"], None))
        slower = statistics.median(three["slower"])
        print(
            f"three nodes: the slower peer takes {slower / base:.2f}x the two-node rename-save "
            f"({base:.3f} s, same run; target <= 1.3x)"
        )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--lsyncd-runs", type=int, default=5, help="each takes ~15 s; 0 to skip")
    ap.add_argument(
        "--push-after",
        choices=("check", "healthy", "both"),
        default="check",
        help='lbwatch\'s [sync] push_after; "both": "check", then "healthy" once per --rise',
    )
    ap.add_argument(
        "--rise", type=int, nargs="+", default=[1], help="the probe's rise (lab: every 0.5 s)"
    )
    ap.add_argument(
        "--unconfined-too",
        action="store_true",
        help="also lbwatch with lb2 checking as root ([sync.received] sandbox = false), first",
    )
    ap.add_argument(
        "--three-nodes",
        action="store_true",
        help="then a three-node lab: the slower peer against the two-node figure",
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    settings = [("check", 1)] if args.push_after != "healthy" else []
    if args.push_after != "check":
        settings += [("healthy", r) for r in args.rise]
    with Lab() as lab:
        lab.enable_sync()
        unconfined = bench_lbwatch(lab, args.runs, confined=False) if args.unconfined_too else None
        canary = {s: bench_lbwatch(lab, args.runs, *s) for s in settings}
        lbw = canary[settings[0]]
        _, ssh = unrestricted_key(lab)
        loop: list[float] = []
        if shutil.which("inotifywait"):
            loop = bench_file_copier(lab, args.runs, classic_loop(ssh), 10, "classic")
        lsy: list[float] = []
        if shutil.which("lsyncd") and args.lsyncd_runs:
            lsy = bench_file_copier(lab, args.lsyncd_runs, lsyncd_argv(lab, ssh), 40, "lsyncd")
    three = bench_three(args.runs) if args.three_nodes else None
    base = statistics.median(lbw["rename"])
    print("\nsave on lb1 -> lb2; lbwatch: served by lb2 after check + reload on both nodes;")
    print("the others: file copied to lb2 only (no check, no reload); saves are renames")
    for (push_after, rise), got in canary.items():
        name = "lbwatch" if push_after == "check" else f"lbwatch, healthy rise {rise}"
        print(summary(f"{name}, rename-save", got["rename"], None))
        print(summary(f"{name}, write in place", got["in place"], None))
        if "held on lb1" in got:
            print(summary(f"{name}, held on lb1", got["held on lb1"], None))
    if unconfined is not None:
        for style in ("rename", "in place"):
            print(summary(f"lbwatch, lb2 checks as root, {style}", unconfined[style], base))
    print_others(loop, lsy, three, base)
    if unconfined is not None:
        print("\nbefore: lb2 checks the received version as root, unconfined")
        print_breakdown(unconfined)
        print("\nnow: confined")
    print_breakdown(lbw)
    for (push_after, rise), runs in canary.items():
        for style, xs in runs.items():
            if style.startswith("step: "):
                continue
            print(
                f"per-run lbwatch push_after={push_after} rise={rise} {style}:",
                " ".join(f"{x:.3f}" for x in xs),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
