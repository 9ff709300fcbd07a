"""keepalived's own levers, measured on bare keepalived (root; no haproxy, no lbwatch):

1. how soon a freshly started keepalived claims a VIP that nobody holds, by initial state,
   ``nopreempt``, priority 255 (or no priority line), ``down_timer_adverts`` and
   ``vrrp_startup_delay``; and whether starting a lower-priority node with ``state MASTER``
   beside a running MASTER disturbs it;
2. ``track_file`` with weight 0 on the MASTER: file written -> FAULT, its priority-0
   advertisements, the peer holding the VIP; file back to 0 -> BACKUP, then the preemption;
   which kinds of write keepalived sees (in place, rename over, a write not yet closed, unlink);
3. ``track_file`` with a weight that takes the MASTER below its peer and back: does the peer
   take over at the next advertisement or at its master-down timer, and do both nodes hold the
   VIP at once, or neither, during each handover;
4. what keepalived logs and writes to its notify FIFO at each of these (printed after the
   table, from the first run of each).

The lab: namespaces ``kal<pid>-sw`` (a bridge) and ``kal<pid>-ka1``/``-ka2`` (192.0.2.61 and .62,
VIP 192.0.2.160, VRID 61, priorities 254/253 as lbwatch's shipped configs), each node a PID and
mount namespace of its own with a private /run (tests/lab/nodeinit.py is its PID 1), keepalived
run in it as ``keepalived -n -l -D -G``. Every event is put on the host's wall clock, which all
namespaces share: the VIP's arrival and departure on either node by one rtnetlink listener in
the switch's namespace (VIPWATCH: the order of its messages is the order in which the kernel
changed the addresses, so "both held it" or "neither did" at a handover is exact, and its
times are within its wake-up latency), VRRP advertisements and gratuitous ARPs by tcpdump on
the bridge (bench/wire.py), keepalived's log and notify FIFO lines by this script as it reads
them. A run's start is this script's clock just before it starts nsenter (+ keepalived) or
writes the file.

    sudo .venv/bin/python bench/ka_levers.py                  # everything, about 5 minutes
    sudo .venv/bin/python bench/ka_levers.py --questions 3 --profiles fast --runs 7

Profiles: classic (VRRP v2, advert_int 1) and fast (VRRP v3, advert_int 0.1), as
config/keepalived.conf and keepalived-fast.conf. In the classic profile q1 leaves out the ways
of starting whose code path another one's already covers (--all-starts: every way in both).
Figures are medians over the runs; the host is shared and noisy, and no figure is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import wire

ROOT = Path(__file__).resolve().parents[1]
NODEINIT = ROOT / "tests" / "lab" / "nodeinit.py"
NS_RE = re.compile(r"^kal(\d+)-")
ADDR = {"ka1": "192.0.2.61", "ka2": "192.0.2.62"}
PRIO = {"ka1": 254, "ka2": 253}
VIP = "192.0.2.160"
VRID = 61
PROFILES = {"classic": (2, 1.0), "fast": (3, 0.1)}  # VRRP version, advert_int
NAN = float("nan")
SETTLE = 0.3  # s between a handover seen and the next step: the FIFO lines and ARPs are out


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(
        argv, check=check, timeout=20, capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout


def skew(priority: int, profile: str) -> float:
    """keepalived's skew time (vrrp.h VRRP_TIMER_SKEW): (256 - priority)/256 s in VRRP v2
    whatever the advert interval, (256 - priority)/256 of the master's interval in v3."""
    version, advert = PROFILES[profile]
    return (256 - priority) / 256 * (advert if version == 3 else 1.0)


def down_timer(priority: int, profile: str, adverts: int = 3) -> float:
    """VRRP_MS_DOWN_TIMER: down_timer_adverts x the master's advert interval + skew."""
    return adverts * PROFILES[profile][1] + skew(priority, profile)


# ---------------------------------------------------------------------------------------------
# What was seen, on the host's wall clock


@dataclass(frozen=True)
class Seen:
    at: float
    node: str
    kind: str  # "vip+" / "vip-" (VIPWATCH), "log" (keepalived's stderr), "fifo" (notify FIFO)
    text: str
    seq: int = 0  # VIP events: their order as the kernel made them (VIPWATCH)


class Timeline:
    """Everything the readers saw, appended from their threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Seen] = []

    def add(self, seen: Seen) -> None:
        with self._lock:
            self._items.append(seen)

    def select(
        self, node: str, kind: str, after: float, before: float = math.inf, match: str = ""
    ) -> list[Seen]:
        with self._lock:
            items = list(self._items)
        return [
            s
            for s in items
            if s.node == node and s.kind == kind and after <= s.at < before and match in s.text
        ]

    def first(
        self, node: str, kind: str, after: float, match: str = "", before: float = math.inf
    ) -> float:
        found = self.select(node, kind, after, before, match)
        return min(s.at for s in found) if found else NAN

    def first_seen(self, node: str, kind: str, after: float) -> Seen | None:
        found = self.select(node, kind, after)
        return min(found, key=lambda s: s.seq) if found else None

    def wait(self, node: str, kind: str, after: float, timeout: float, match: str = "") -> float:
        """The first such event after ``after``, waiting up to ``timeout`` s for it (nan)."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.first(node, kind, after, match)
            if not math.isnan(at) or time.monotonic() > deadline:
                return at
            time.sleep(0.002)

    def said(self, after: float, before: float) -> list[Seen]:
        with self._lock:
            items = list(self._items)
        return sorted(
            (s for s in items if s.kind in ("log", "fifo") and after <= s.at < before),
            key=lambda s: s.at,
        )


# The VIP's arrival and departure on either node, from one rtnetlink socket in the switch's
# namespace that listens to every namespace it has an id for (NETLINK_LISTEN_ALL_NSID, Linux
# 4.20+; the veths made from there gave both nodes one). Address changes in all namespaces are
# made under the one rtnl_lock and notified before it is released, so the order of this
# socket's messages is the order in which the kernel changed the addresses: which node held
# the VIP first at a handover is exact, whatever the scheduling of this reader. Its times are
# when it read each message (netlink has no kernel timestamps).
VIPWATCH = r"""
import select, socket, struct, sys, time
vip = socket.inet_aton(sys.argv[1])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((0, 0x10))  # RTMGRP_IPV4_IFADDR
s.setsockopt(270, 8, 1)  # SOL_NETLINK, NETLINK_LISTEN_ALL_NSID
print("ready", flush=True)
while True:
    data, anc, _, _ = s.recvmsg(65536, 64)
    at = time.time()
    nsid = next((struct.unpack("i", d[:4])[0] for l, t, d in anc if (l, t) == (270, 8)), -1)
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        attr = off + 24  # nlmsghdr, ifaddrmsg
        while kind in (20, 21) and attr + 8 <= off + length:
            alen, atype = struct.unpack_from("=HH", data, attr)
            if alen < 4:
                break
            if atype in (1, 2) and data[attr + 4 : attr + 8] == vip:  # IFA_ADDRESS, IFA_LOCAL
                print(f"{at:.6f} {nsid} {'+' if kind == 20 else '-'}", flush=True)
                break
            attr += (alen + 3) & ~3
        off += (length + 3) & ~3
"""
# keepalived -l prints "%c: message" (second resolution: the script's own stamp is used).
_LOG_STAMP = re.compile(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}: ")


def _read_vipwatch(stream: Iterator[str], nodes: dict[int, str], tl: Timeline) -> None:
    for seq, line in enumerate(stream):
        at, nsid, sign = line.split()
        node = nodes.get(int(nsid), f"nsid {nsid}")
        tl.add(Seen(float(at), node, "vip" + sign, line.strip(), seq))


def _read_log(stream: Iterator[str], node: str, tl: Timeline) -> None:
    for line in stream:
        tl.add(Seen(time.time(), node, "log", _LOG_STAMP.sub("", line.rstrip("\n"))))


def _read_fifo(path: Path, node: str, tl: Timeline, stop: threading.Event) -> None:
    # O_RDWR: the FIFO never reads as closed while keepalived restarts between runs.
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    buf = b""
    try:
        while not stop.is_set():
            if not select.select([fd], [], [], 0.2)[0]:
                continue
            at = time.time()
            buf += os.read(fd, 4096)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                tl.add(Seen(at, node, "fifo", line.decode(errors="replace")))
    finally:
        os.close(fd)


def _thread(target: Callable[..., None], *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------
# The lab


@dataclass
class Node:
    lab: Lab
    name: str
    dir: Path
    init: subprocess.Popen[bytes] | None = None
    init_pid: int = 0
    ka: subprocess.Popen[str] | None = None
    ka_pid: int = 0  # keepalived's parent process, host PID
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.lab.ns(self.name)

    @property
    def addr(self) -> str:
        return ADDR[self.name]

    @property
    def fifo(self) -> Path:
        return self.dir / "notify.fifo"

    def start(self) -> None:
        for sub in ("haproxy", "keepalived", "track"):  # nodeinit binds the first two
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        log = (self.dir / "init.log").open("ab")
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--pid", "--mount", "--uts", "--fork",
             "--mount-proc", sys.executable, str(NODEINIT), str(self.dir), self.name],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 10
        while not (self.dir / "ready").exists():
            if time.monotonic() > deadline or self.init.poll() is not None:
                raise RuntimeError(f"node {self.name} did not come up")
            time.sleep(0.02)
        self.init_pid = psutil.Process(self.init.pid).children()[0].pid
        os.mkfifo(self.fifo)
        self.threads.append(
            _thread(_read_fifo, self.fifo, self.name, self.lab.tl, self.lab.stopping)
        )

    def has_vip(self) -> bool:
        return f" {VIP}/" in sh("ip", "-n", self.ns, "-4", "-o", "addr", "show", "dev", "eth0")

    def ka_start(self, conf: str) -> float:
        """Start keepalived on ``conf``; returns the wall time just before."""
        if self.ka is not None:
            raise RuntimeError(f"{self.name}: keepalived already runs")
        path = self.dir / "keepalived" / "keepalived.conf"
        path.write_text(conf)
        argv = ["nsenter", "-t", str(self.init_pid), "-n", "-p", "-m", "-u", "--"]
        argv += ["keepalived", "-n", "-l", "-D", "-G", "-f", str(path), "-p", "/run/ka.pid"]
        argv += ["-r", "/run/ka_vrrp.pid", "-c", "/run/ka_check.pid", "-b", "/run/ka_bfd.pid"]
        t0 = time.time()
        self.ka = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )  # fmt: skip
        assert self.ka.stderr is not None
        self.threads.append(_thread(_read_log, self.ka.stderr, self.name, self.lab.tl))
        # nsenter forks (-p): keepalived's parent is its child.
        deadline = time.monotonic() + 5
        while not self.ka_pid and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                kids = psutil.Process(self.ka.pid).children()
                self.ka_pid = kids[0].pid if kids else 0
            time.sleep(0.001)
        if not self.ka_pid:
            raise RuntimeError(f"{self.name}: keepalived did not start")
        return t0

    def ka_stop(self) -> None:
        """SIGTERM to keepalived (a MASTER sends priority 0 and drops the VIP), SIGKILL after
        10 s; only the PIDs this script started, or their children."""
        if self.ka is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.ka_pid, signal.SIGTERM)
        try:
            self.ka.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                for p in [*psutil.Process(self.ka_pid).children(recursive=True)]:
                    os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.ka_pid, signal.SIGKILL)
            self.ka.wait(10)
        if self.ka.stderr is not None:
            self.ka.stderr.close()
        self.ka, self.ka_pid = None, 0

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.ka_stop()
        if self.init is not None and self.init.poll() is None:
            # Leaving PID 1 kills everything else in the node's PID namespace.
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.init.wait(10)


def _kill_netns(name: str) -> None:
    for pid in sh("ip", "netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def clear_stale(prefix: str) -> None:
    """Namespaces of this bench left by runs whose process is gone, and any of our own."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_RE.match(name)
        if m and (name.startswith(prefix + "-") or not psutil.pid_exists(int(m.group(1)))):
            _kill_netns(name)


class Lab:
    """``with Lab() as lab``: the bridge and both nodes, with their readers; torn down on exit,
    failure included."""

    def __init__(self) -> None:
        self.prefix = f"kal{os.getpid()}"
        self.base = Path(tempfile.mkdtemp(prefix="ka-levers-"))
        self.tl = Timeline()
        self.stopping = threading.Event()
        self.nodes = {n: Node(self, n, self.base / n) for n in ADDR}
        self.vipwatch: subprocess.Popen[str] | None = None
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def __enter__(self) -> Lab:
        try:
            self._up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _up(self) -> None:
        clear_stale(self.prefix)
        for host in ("sw", *self.nodes):
            sh("ip", "netns", "add", self.ns(host))
            self._made.append(self.ns(host))
            sh("ip", "-n", self.ns(host), "link", "set", "lo", "up")
        sw = self.ns("sw")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for name, node in self.nodes.items():
            sh("ip", "-n", sw, "link", "add", f"p-{name}", "type", "veth", "peer", "name", "eth0",
               "netns", node.ns)  # fmt: skip
            sh("ip", "-n", sw, "link", "set", f"p-{name}", "master", "br0", "up")
            sh("ip", "-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            sh("ip", "-n", node.ns, "link", "set", "eth0", "up")
        for node in self.nodes.values():
            node.start()
        self._watch_vip()

    def _watch_vip(self) -> None:
        nsids = {}
        for line in sh("ip", "-n", self.ns("sw"), "netns", "list-id").splitlines():
            m = re.match(r"nsid (\d+) \(iproute2 netns name: (\S+)\)", line)
            if m:
                nsids[int(m[1])] = m[2].removeprefix(self.prefix + "-")
        if sorted(nsids.values()) != sorted(self.nodes):
            raise RuntimeError(f"the switch's namespace ids are {nsids}")
        self.vipwatch = subprocess.Popen(
            ["ip", "netns", "exec", self.ns("sw"), sys.executable, "-c", VIPWATCH, VIP],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.vipwatch.stdout is not None
        if self.vipwatch.stdout.readline().strip() != "ready":
            raise RuntimeError("the VIP watch did not start")
        _thread(_read_vipwatch, self.vipwatch.stdout, nsids, self.tl)

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for node in self.nodes.values():
            node.down()
        if self.vipwatch is not None:
            self.vipwatch.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.vipwatch.wait(10)
        for name in reversed(self._made):
            _kill_netns(name)
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# keepalived's configuration


def ka_conf(
    node: Node,
    profile: str,
    state: str = "BACKUP",
    priority: int | None = 0,
    instance: str = "",
    globals_: str = "",
    track: tuple[Path, int] | None = None,
) -> str:
    """``priority`` 0: the node's (254/253); None: no priority line. ``track``: (file, weight)
    as a global track_file and the instance's track_file entry."""
    version, advert = PROFILES[profile]
    prio = PRIO[node.name] if priority == 0 else priority
    tf_global = tf_inst = ""
    if track is not None:
        tf_global = f'track_file TF {{\n    file "{track[0]}"\n}}\n\n'
        tf_inst = f"    track_file {{\n        TF weight {track[1]}\n    }}\n"
    return f"""global_defs {{
    router_id {node.name}
    vrrp_version {version}
    notify_fifo {node.fifo}
{globals_}}}

{tf_global}vrrp_instance VI_1 {{
    state {state}
    interface eth0
    virtual_router_id {VRID}
{f"    priority {prio}" if prio is not None else ""}
    advert_int {advert}
{instance}    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
{tf_inst}}}
"""


def write_file(path: Path, value: str, how: str) -> float:
    """Write ``value`` to a track file, ``how``: "in place" (open, write, close: inotify's
    IN_CLOSE_WRITE) or "rename" (a temporary file beside it renamed over it: IN_MOVED_TO).
    Returns the wall time just before."""
    if how == "rename":
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(value + "\n")
        t0 = time.time()
        os.replace(tmp, path)
        return t0
    t0 = time.time()
    path.write_text(value + "\n")
    return t0


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    question: str
    what: str
    profile: str
    values: list[float] = field(default_factory=list)  # seconds; nan: not seen
    expect: str = ""
    unit: str = "ms"

    def cell(self) -> str:
        good = [v for v in self.values if not math.isnan(v)]
        if not good:
            return f"{'-':>9}  n=0/{len(self.values)}"
        if self.unit == "of":  # yes (1) or no (0) in each run
            return f"{sum(good):>9.0f} of {len(good)}"
        scale = 1000.0 if self.unit == "ms" else 1.0
        med, lo, hi = (statistics.median(good) * scale, min(good) * scale, max(good) * scale)
        prec = 2 if self.unit == "ms" and abs(med) < 10 else 1 if self.unit == "ms" else 0
        n = f"n={len(good)}" + (f"/{len(self.values)}" if len(good) != len(self.values) else "")
        return f"{med:>9.{prec}f} {self.unit}  {n:<6} [{lo:.{prec}f} .. {hi:.{prec}f}]"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    said: dict[str, list[str]] = field(default_factory=dict)

    def row(self, question: str, what: str, profile: str, expect: str = "", unit: str = "ms"):
        for r in self.rows:
            if (r.question, r.what, r.profile) == (question, what, profile):
                return r
        r = Row(question, what, profile, expect=expect, unit=unit)
        self.rows.append(r)
        return r

    def keep_said(self, lab: Lab, label: str, t0: float, t1: float) -> None:
        """What keepalived logged and wrote to its FIFO between t0 and t1, once per label."""
        if label in self.said:
            return
        self.said[label] = [
            f"{(s.at - t0) * 1000:9.1f} ms {s.node} {s.kind:<4} {s.text}"
            for s in lab.tl.said(t0, t1)
            if s.kind == "fifo" or _worth_showing(s.text)
        ]

    def print(self) -> None:
        print("\n| q | measure | profile | median | n | [min .. max] | expected from source |")
        for r in self.rows:
            cell = r.cell()
            print(f"| {r.question} | {r.what} | {r.profile} | {cell} | {r.expect} |")
        for label, lines in self.said.items():
            print(f"\n--- {label} (times from the action)")
            for line in lines:
                print("   ", line)


_SHOW = re.compile(r"VI_1|[Tt]rack|Warning|Delaying|priority|FAULT|advert", re.ASCII)


def _worth_showing(text: str) -> bool:
    return bool(_SHOW.search(text)) and "Opening file" not in text


def delta(a: float, b: float) -> float:
    return b - a if not (math.isnan(a) or math.isnan(b)) else NAN


def first_advert(
    adverts: list[wire.Advert], src: str, after: float, before: float = math.inf, prio: int = -1
) -> float:
    found = [
        a.at for a in adverts if a.src == src and after <= a.at < before and prio in (-1, a.prio)
    ]
    return min(found) if found else NAN


def last_advert(adverts: list[wire.Advert], src: str, before: float, min_prio: int = 1) -> float:
    found = [a.at for a in adverts if a.src == src and a.at < before and a.prio >= min_prio]
    return max(found) if found else NAN


def first_garp(garps: list[wire.Garp], after: float) -> float:
    found = [g.at for g in garps if g.addr == VIP and g.at >= after]
    return min(found) if found else NAN


def handover(
    report: Report, lab: Lab, where: tuple[str, str], profile: str, new: str, old: str, after: float
) -> None:
    """Rows for one handover of the VIP from ``old`` to ``new``: how long both held it (< 0: how
    long neither did), by the VIP watch's times, and whether the kernel added it on ``new``
    before it removed it from ``old`` (by the VIP watch's order, exact)."""
    came = lab.tl.first_seen(new, "vip+", after)
    gone = lab.tl.first_seen(old, "vip-", after)
    question, label = where
    both = report.row(question, f"{label}: VIP on both ({new} add -> {old} drop; < 0: on neither)",
                      profile)  # fmt: skip
    first = report.row(question, f"{label}: {new} added it before {old} dropped it", profile,
                       unit="of")  # fmt: skip
    if came is None or gone is None:
        both.values.append(NAN)
        first.values.append(NAN)
        return
    both.values.append(gone.at - came.at)
    first.values.append(1.0 if came.seq < gone.seq else 0.0)


# ---------------------------------------------------------------------------------------------
# 1. Claiming a VIP nobody holds; a lower-priority `state MASTER` beside a running MASTER


@dataclass(frozen=True)
class Start:
    """One way of starting keepalived on ka1 alone."""

    label: str
    state: str = "BACKUP"
    priority: int | None = 0  # 0: the node's, 254
    instance: str = ""
    globals_: str = ""
    # Its code path is another's with one more term (or none): measured in the fast profile
    # only, unless --all-starts, to keep the run short.
    extra: bool = False

    def expect(self, profile: str) -> float:
        """When vrrp_scheduler.c:vrrp_init_state says the VIP comes, after VRRP's start."""
        prio = 255 if self.priority is None else self.priority or PRIO["ka1"]
        delay = 1.0 if "vrrp_startup_delay" in self.globals_ else 0.0
        if self.state == "MASTER" and prio == 255:
            return delay  # address owner: ms_down_timer = 1 us
        adverts = 1 if "down_timer_adverts 1" in self.instance else 3
        return delay + down_timer(prio, profile, adverts)


STARTS = (
    Start("state BACKUP"),
    Start("state MASTER", state="MASTER"),
    Start("state MASTER + nopreempt", state="MASTER", instance="    nopreempt\n"),
    Start("state BACKUP + nopreempt", instance="    nopreempt\n", extra=True),
    Start("state BACKUP + down_timer_adverts 1", instance="    down_timer_adverts 1\n"),
    Start("state BACKUP + vrrp_startup_delay 1", globals_="    vrrp_startup_delay 1\n", extra=True),
    Start("state MASTER + priority 255", state="MASTER", priority=255),
    Start("state MASTER, no priority line (-> 255)", state="MASTER", priority=None, extra=True),
    Start("state BACKUP + priority 255", priority=255, extra=True),
)


@dataclass(frozen=True)
class Opts:
    runs: int  # of each measurement
    all_starts: bool = False  # q1: the extra ways of starting in the classic profile too


def q1_claim(lab: Lab, profile: str, opts: Opts, report: Report) -> None:
    ka1 = lab.nodes["ka1"]
    starts: list[tuple[Start, float, float]] = []  # (how, started, VIP seen)
    with wire.Capture(lab, lab.base / f"q1-{profile}.pcap") as cap:  # type: ignore[arg-type]
        for how in STARTS:
            if how.extra and profile == "classic" and not opts.all_starts:
                continue
            limit = how.expect(profile) + 2.0
            for _ in range(opts.runs):
                if ka1.has_vip():
                    raise RuntimeError("ka1 holds the VIP before keepalived starts")
                t0 = ka1.ka_start(ka_conf(ka1, profile, how.state, how.priority, how.instance,
                                          how.globals_))  # fmt: skip
                vip = lab.tl.wait("ka1", "vip+", t0, limit)
                time.sleep(0.05)
                report.keep_said(lab, f"q1 {profile}: start, {how.label}", t0, time.time())
                ka1.ka_stop()
                lab.tl.wait("ka1", "vip-", t0, 2.0)
                starts.append((how, t0, vip))
        adverts, _ = cap.read()
    for how, t0, vip in starts:
        # VRRP is up: the instance's first line, "(VI_1) removing VIPs." (vrrp_daemon.c:
        # vrrp_restore_interfaces_startup, with -D), whatever state comes next.
        up = lab.tl.first("ka1", "log", t0, "(VI_1)", before=t0 + 5)
        exp = f"VRRP up + {how.expect(profile) * 1000:.0f} ms"
        report.row("1", f"start -> VIP, {how.label}", profile, exp).values.append(delta(t0, vip))
        report.row("1", f"  VRRP up -> VIP, {how.label}", profile, exp).values.append(
            delta(up, vip)
        )
        report.row("1", f"  start -> first advert on the wire, {how.label}", profile).values.append(
            delta(t0, first_advert(adverts, ADDR["ka1"], t0, t0 + 10))
        )
        report.row("1", "start -> VRRP up (instance's first log line), all", profile).values.append(
            delta(t0, up)
        )


BESIDE = (("253", 0), ("no priority line (255)", None))  # ka2's priority: label, ka_conf's


def q1_beside_master(lab: Lab, profile: str, opts: Opts, report: Report) -> None:
    """ka1 (254) is MASTER; ka2 starts with `state MASTER` (at 253, then with no priority
    line, which keepalived reads as 255), is watched for its down timer and more, and stopped;
    ka1 holds the VIP again before the next run."""
    ka1, ka2 = lab.nodes["ka1"], lab.nodes["ka2"]
    advert = PROFILES[profile][1]
    seen: list[tuple[str, float, float]] = []
    with wire.Capture(lab, lab.base / f"q1b-{profile}.pcap") as cap:  # type: ignore[arg-type]
        t_up = ka1.ka_start(ka_conf(ka1, profile))
        if math.isnan(lab.tl.wait("ka1", "vip+", t_up, down_timer(254, profile) + 2)):
            raise RuntimeError("ka1 did not take the VIP")
        time.sleep(advert)
        for label, prio in BESIDE:
            # At 253: its down timer and more (it would claim the VIP then, if ever); at 255 it
            # claims it at once.
            window = down_timer(PRIO["ka2"], profile) + max(0.5, advert) if prio == 0 else 0.5
            for _ in range(opts.runs):
                t0 = ka2.ka_start(ka_conf(ka2, profile, state="MASTER", priority=prio))
                time.sleep(window)
                t1 = time.time()
                report.keep_said(lab, f"q1 {profile}: ka2 starts `state MASTER`, {label}, "
                                 "beside ka1 (MASTER, 254)", t0, t1)  # fmt: skip
                ka2.ka_stop()
                seen.append((label, t0, t1))
                if not ka1.has_vip() and math.isnan(lab.tl.wait("ka1", "vip+", t1, 2)):
                    raise RuntimeError("ka1 did not take the VIP back")
                time.sleep(advert)
        ka1.ka_stop()
        adverts, _ = cap.read()
    tl = lab.tl
    for label, t0, t1 in seen:
        sent = [a for a in adverts if a.src == ADDR["ka2"] and t0 <= a.at < t1]
        counts = (
            ("adverts sent by ka2", sent),
            ("times ka2 added the VIP", tl.select("ka2", "vip+", t0, t1)),
            ("times ka1 dropped the VIP", tl.select("ka1", "vip-", t0, t1)),
            ("ka1 logs a lower-priority advert", tl.select("ka1", "log", t0, t1, "lower priority")),
        )
        expect = "0" if label == BESIDE[0][0] else ""
        for what, found in counts:
            row = report.row("1", f"beside a MASTER, ka2 `state MASTER` {label}: {what}", profile,
                             expect, unit="count")  # fmt: skip
            row.values.append(float(len(found)))
        if label != BESIDE[0][0]:
            report.row("1", f"  ka2 {label}: start -> ka2 holds the VIP", profile).values.append(
                delta(t0, tl.first("ka2", "vip+", t0))
            )
            handover(report, lab, ("1", f"  ka2 {label}"), profile, "ka2", "ka1", t0)


# ---------------------------------------------------------------------------------------------
# 2. track_file, weight 0: FAULT and back


def start_pair(lab: Lab, profile: str, track: tuple[Path, int], instance: str = "") -> None:
    """ka1 (254, tracking ``track``) MASTER with the VIP, then ka2 (253) as its BACKUP."""
    ka1, ka2 = lab.nodes["ka1"], lab.nodes["ka2"]
    track[0].write_text("0\n")
    t0 = ka1.ka_start(ka_conf(ka1, profile, instance=instance, track=track))
    if math.isnan(lab.tl.wait("ka1", "vip+", t0, down_timer(254, profile) + 2)):
        raise RuntimeError("ka1 did not take the VIP")
    t1 = ka2.ka_start(ka_conf(ka2, profile))
    if math.isnan(lab.tl.wait("ka2", "fifo", t1, 5, "BACKUP")):
        raise RuntimeError("ka2 did not come up as BACKUP")
    time.sleep(PROFILES[profile][1] * 1.5)


def stop_pair(lab: Lab) -> None:
    lab.nodes["ka2"].ka_stop()
    lab.nodes["ka1"].ka_stop()


@dataclass(frozen=True)
class Flip:
    """One write to the track file and what followed, on the wall clock."""

    how: str
    wrote: float
    settled: float


def q2_fault(lab: Lab, profile: str, opts: Opts, report: Report) -> None:
    advert = PROFILES[profile][1]
    track = lab.nodes["ka1"].dir / "track" / "fault"
    faults: list[Flip] = []
    backs: list[Flip] = []
    with wire.Capture(lab, lab.base / f"q2-{profile}.pcap") as cap:  # type: ignore[arg-type]
        start_pair(lab, profile, (track, 0))
        for i in range(2 * opts.runs):
            how = ("in place", "rename")[i % 2]
            t_w = write_file(track, "1", how)
            lab.tl.wait("ka2", "vip+", t_w, advert + 2)
            time.sleep(SETTLE)
            report.keep_said(lab, f"q2 {profile}: 1 written ({how}), FAULT", t_w, time.time())
            faults.append(Flip(how, t_w, time.time()))
            t_r = write_file(track, "0", how)
            lab.tl.wait("ka1", "vip+", t_r, down_timer(254, profile) + 2)
            lab.tl.wait("ka2", "vip-", t_r, 1)
            time.sleep(SETTLE)
            report.keep_said(lab, f"q2 {profile}: 0 written ({how}), back", t_r, time.time())
            backs.append(Flip(how, t_r, time.time()))
        q2_writes_seen(lab, profile, track, report)
        stop_pair(lab)
        adverts, garps = cap.read()
    q2_figures(lab, profile, faults, backs, adverts, garps, report)


def q2_figures(
    lab: Lab,
    profile: str,
    faults: list[Flip],
    backs: list[Flip],
    adverts: list[wire.Advert],
    garps: list[wire.Garp],
    report: Report,
) -> None:
    tl, a1, a2 = lab.tl, ADDR["ka1"], ADDR["ka2"]
    sk = skew(PRIO["ka2"], profile) * 1000
    for f in faults:
        t, end = f.wrote, f.settled
        prio0 = [a.at for a in adverts if a.src == a1 and a.prio == 0 and t <= a.at < end]
        gone, came = tl.first("ka1", "vip-", t), tl.first("ka2", "vip+", t)
        rows = (
            (f"write ({f.how}) -> ka1 FAULT (FIFO line)", tl.first("ka1", "fifo", t, "FAULT"), ""),
            (f"write ({f.how}) -> ka1's first priority-0 advert", min(prio0, default=NAN), ""),
            (f"write ({f.how}) -> ka1 drops the VIP", gone, ""),
            (f"write ({f.how}) -> ka2's first advert (MASTER)", first_advert(adverts, a2, t),
             f"prio-0 advert + skew {sk:.1f} ms"),
            (f"write ({f.how}) -> ka2 holds the VIP", came, ""),
            (f"write ({f.how}) -> ka2's gratuitous ARP", first_garp(garps, t), ""),
        )  # fmt: skip
        for what, at, exp in rows:
            report.row("2", what, profile, exp).values.append(delta(t, at))
        handover(report, lab, ("2", "FAULT"), profile, "ka2", "ka1", t)
        report.row("2", "FAULT: priority-0 adverts sent", profile, "2", unit="count").values.append(
            float(len(prio0))
        )
    for b in backs:
        t = b.wrote
        came = tl.first("ka1", "vip+", t)
        report.row("2", f"write 0 ({b.how}) -> ka1 BACKUP (FIFO line)", profile).values.append(
            delta(t, tl.first("ka1", "fifo", t, "BACKUP"))
        )
        # vrrp.c:vrrp_state_leave_fault restarts the down timer; the peer's adverts (253) are
        # then discarded (vrrp_state_backup), so it runs out in full.
        exp = f"{down_timer(254, profile) * 1000:.1f} ms (down timer)"
        report.row("2", f"write 0 ({b.how}) -> ka1 holds the VIP again (preempts)", profile,
                   exp).values.append(delta(t, came))  # fmt: skip
        handover(report, lab, ("2", "preempt after FAULT"), profile, "ka1", "ka2", t)


def q2_writes_seen(lab: Lab, profile: str, track: Path, report: Report) -> None:
    """A write not yet closed (is it seen before close?) and an unlink (read as 0)."""
    tl = lab.tl
    t0 = time.time()
    with track.open("w") as f:
        f.write("1\n")
        f.flush()
        before_close = tl.wait("ka1", "fifo", t0, 1.0, "FAULT")
        t_close = time.time()
    report.row("2", "written, not closed: FAULT within 1 s", profile, "no (IN_CLOSE_WRITE)",
               unit="of").values.append(0.0 if math.isnan(before_close) else 1.0)  # fmt: skip
    report.row("2", "  ... then closed -> FAULT (FIFO line)", profile).values.append(
        delta(t_close, tl.wait("ka1", "fifo", t_close, 1.0, "FAULT"))
    )
    time.sleep(SETTLE)
    t_u = time.time()
    track.unlink()
    back = tl.wait("ka1", "fifo", t_u, 1.0, "BACKUP")
    report.row("2", "file (1) unlinked -> ka1 BACKUP (read as 0)", profile).values.append(
        delta(t_u, back)
    )
    tl.wait("ka1", "vip+", t_u, down_timer(254, profile) + 2)
    track.write_text("0\n")
    time.sleep(SETTLE)


# ---------------------------------------------------------------------------------------------
# 3. track_file with a weight: below the peer and back


WEIGHT = -2  # "1" in the file: 254 - 2 = 252, under ka2's 253; "0": 254 again


def q3_weight(lab: Lab, profile: str, opts: Opts, report: Report) -> None:
    advert = PROFILES[profile][1]
    track = lab.nodes["ka1"].dir / "track" / "drain"
    lowers: list[Flip] = []
    raises: list[Flip] = []
    with wire.Capture(lab, lab.base / f"q3-{profile}.pcap") as cap:  # type: ignore[arg-type]
        # notify_priority_changes: the FIFO also says MASTER_PRIORITY / BACKUP_PRIORITY.
        start_pair(lab, profile, (track, WEIGHT), "    notify_priority_changes\n")
        for _ in range(opts.runs):
            t_w = write_file(track, "1", "rename")
            lab.tl.wait("ka2", "vip+", t_w, down_timer(PRIO["ka2"], profile) + advert + 2)
            lab.tl.wait("ka1", "vip-", t_w, 1)
            time.sleep(SETTLE)
            report.keep_said(lab, f"q3 {profile}: ka1 lowered to 252", t_w, time.time())
            lowers.append(Flip("lower", t_w, time.time()))
            t_r = write_file(track, "0", "rename")
            lab.tl.wait("ka1", "vip+", t_r, down_timer(254, profile) + advert + 2)
            lab.tl.wait("ka2", "vip-", t_r, 1)
            time.sleep(SETTLE)
            report.keep_said(lab, f"q3 {profile}: ka1 back at 254", t_r, time.time())
            raises.append(Flip("raise", t_r, time.time()))
        stop_pair(lab)
        adverts, _ = cap.read()
    q3_figures(lab, profile, lowers, raises, adverts, report)


def q3_figures(
    lab: Lab,
    profile: str,
    lowers: list[Flip],
    raises: list[Flip],
    adverts: list[wire.Advert],
    report: Report,
) -> None:
    tl, a1, a2 = lab.tl, ADDR["ka1"], ADDR["ka2"]
    for f in lowers:
        t = f.wrote
        took = first_advert(adverts, a2, t)  # ka2's first advert: it is MASTER
        came, gone = tl.first("ka2", "vip+", t), tl.first("ka1", "vip-", t)
        rows = (
            ("lower: write -> 'Changing effective priority' logged",
             tl.first("ka1", "log", t, "Changing effective priority"), ""),
            ("lower: write -> ka1's first advert at 252", first_advert(adverts, a1, t, prio=252),
             f"<= {PROFILES[profile][1] * 1000:.0f} ms (next advert)"),
            ("lower: write -> ka2's first advert (MASTER)", took, ""),
            ("lower: write -> ka2 holds the VIP", came, ""),
        )  # fmt: skip
        for what, at, exp in rows:
            report.row("3", what, profile, exp).values.append(delta(t, at))
        report.row("3", "lower: ka1's last advert at 254 -> ka2's first", profile,
                   f"{down_timer(PRIO['ka2'], profile) * 1000:.1f} ms (down timer)",
                   ).values.append(delta(last_advert(adverts, a1, t, 254), took))  # fmt: skip
        handover(report, lab, ("3", "lower"), profile, "ka2", "ka1", t)
        report.row("3", "lower: ka2's advert -> ka2 adds the VIP", profile).values.append(
            delta(took, came)
        )
        report.row("3", "lower: ka2's advert -> ka1 drops the VIP", profile).values.append(
            delta(took, gone)
        )
    for f in raises:
        t = f.wrote
        took = first_advert(adverts, a1, t, prio=254)
        came, gone = tl.first("ka1", "vip+", t), tl.first("ka2", "vip-", t)
        report.row("3", "raise: write -> ka1 holds the VIP (preempts)", profile).values.append(
            delta(t, came)
        )
        report.row("3", "raise: ka2's last advert before the write -> ka1's first", profile,
                   f"{down_timer(254, profile) * 1000:.1f} ms (down timer)",
                   ).values.append(delta(last_advert(adverts, a2, t), took))  # fmt: skip
        handover(report, lab, ("3", "raise"), profile, "ka1", "ka2", t)


# ---------------------------------------------------------------------------------------------


QUESTIONS: dict[str, tuple[Callable[[Lab, str, Opts, Report], None], ...]] = {
    "1": (q1_claim, q1_beside_master),
    "2": (q2_fault,),
    "3": (q3_weight,),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default="1,2,3", help="which of 1,2,3 (4 comes with each)")
    parser.add_argument("--profiles", default="classic,fast", help="classic, fast or both")
    parser.add_argument("--runs", type=int, default=5, help="runs of each measurement")
    parser.add_argument(
        "--all-starts", action="store_true", help="q1: every way of starting in both profiles"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    if not wire.available() or not shutil.which("keepalived"):
        print("tcpdump and keepalived are needed", file=sys.stderr)
        return 2
    questions = args.questions.split(",")
    profiles = args.profiles.split(",")
    for q in questions:
        if q not in QUESTIONS:
            parser.error(f"unknown question {q!r}: 1, 2 or 3")
    for p in profiles:
        if p not in PROFILES:
            parser.error(f"unknown profile {p!r}: classic or fast")
    said = subprocess.run(
        ["keepalived", "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    print((said.stdout + said.stderr).splitlines()[0], file=sys.stderr)
    report, opts = Report(), Opts(args.runs, args.all_starts)
    began = time.monotonic()
    with Lab() as lab:
        for q in questions:
            for profile in profiles:
                for step in QUESTIONS[q]:
                    print(f"q{q} {profile}: {step.__name__} ...", file=sys.stderr, flush=True)
                    step(lab, profile, opts, report)
    report.print()
    print(f"\n({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
