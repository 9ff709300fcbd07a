"""A two-node keepalived + HAProxy cluster in network namespaces, for tests, the demo and bench
(three nodes with ``Lab(nodes=3)``: lb3 at 192.0.2.13).

Topology, all on one bridge in TEST-NET-1 (192.0.2.0/24), nothing routed anywhere else::

    client 192.0.2.30 --+
    lb1    192.0.2.11 --+-- br0 (namespace <prefix>-sw)      VIP 192.0.2.100 (VRRP id 51)
    lb2    192.0.2.12 --+
    backend 192.0.2.20 -+   python http.server on :8080

Each LB node has its own network, PID, mount and UTS namespace, a private /run, and its own
/etc/haproxy and /etc/keepalived bound in, so it sees only its own haproxy, keepalived and
lbwatch. Namespace names start with ``lbw<pid of the test run>-``; ``clear_stale()`` removes
those of runs whose process is gone, so a run cut short never breaks the next one. Only processes
inside our own namespaces are ever signalled, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lbwatch.status import STATUS_FILE
from lbwatch.statusdoc import StatusDoc
from lbwatch.sync.transport import authorized_keys_line, rrsync_authorized_keys_line
from tests.lab.ssh import keygen, known_hosts_line, write_sshd_config
from tests.util import load_status

HERE = Path(__file__).resolve().parent
SUBNET = "192.0.2"
VIP = f"{SUBNET}.100"
BACKEND = f"{SUBNET}.20"
CLIENT = f"{SUBNET}.30"
# lb3 only in a three-node lab (``Lab(nodes=3)``); every other lab has lb1 and lb2.
LB_ADDR = {"lb1": f"{SUBNET}.11", "lb2": f"{SUBNET}.12", "lb3": f"{SUBNET}.13"}
# VRRP priorities: the shipped examples' (config/keepalived*.conf: the highest two, for the
# smallest skew time), and the 100/97 of most published examples, which bench/failover.py keeps
# as a baseline (and for the vrrp_script set-up, whose weight -5 must move the VIP).
PRIORITY = {"lb1": 254, "lb2": 253, "lb3": 252}
BLOG_PRIORITY = {"lb1": 100, "lb2": 97, "lb3": 94}
NS_RE = re.compile(r"^lbw(\d+)-")


def sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=check, timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


def netns_list() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def clear_stale() -> list[str]:
    """Delete lab namespaces (and kill what runs in them) left by runs that are gone."""
    removed = []
    for name in netns_list():
        m = NS_RE.match(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            _kill_netns(name)
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------
# Configuration files for a node


def haproxy_cfg(x_config: str = "v1", map_file: str = "") -> str:
    """The same file on both nodes, as config sync wants it: X-LB comes from the node's host
    name (haproxy's ``hostname`` fetch; each node has its own UTS namespace), X-Config tells
    which version of the file a node serves, X-Map (with ``map_file``) the value of key ``k``
    in that map."""
    map_line = (
        f"    http-response set-header X-Map %[str(k),map({map_file},none)]\n" if map_file else ""
    )
    return f"""# lab haproxy
global
    stats socket /run/haproxy/admin.sock mode 600 level admin

defaults
    mode http
    timeout connect 500ms
    timeout client 5s
    timeout server 5s

frontend web
    bind :80
    http-response set-header X-LB %[hostname]
    http-response set-header X-Config "{x_config}"
{map_line}    default_backend app

frontend monitor
    bind 127.0.0.1:8404
    monitor-uri /health

backend app
    server be1 {BACKEND}:8080
"""


def keepalived_conf(
    node: str,
    mode: str,
    notify: str = "",
    fifo: bool = False,
    smtp_alert: str = "",
    transitions: str = "",
    profile: str = "classic",
    priorities: dict[str, int] | None = None,
    track_dir: str = "",
) -> str:
    """``profile``: "classic" (VRRP v2, advert_int 1) or "fast" (VRRP v3, advert_int 0.1, as
    config/keepalived-fast.conf). ``mode`` "lbwatch": plain VRRP, lbwatch does the tracking;
    "vrrp_script": the classic ``killall -0 haproxy`` check that lbwatch replaces (interval 1,
    fall 2, weight -5). ``priorities``: by node, ``PRIORITY`` (the shipped examples') unless
    given (``BLOG_PRIORITY``).
    ``fifo``: keepalived writes its events to lbwatch's FIFO (global_defs notify_fifo);
    ``notify``: a notify script command line for the instance; ``smtp_alert``: "HOST PORT",
    keepalived's own mail at each transition, sent there; ``transitions``: a script keepalived
    runs with the new state as its argument at each MASTER, BACKUP, FAULT and STOP (its own
    notify_STATE hooks, beside ``notify`` and the FIFO): a record independent of lbwatch.
    ``track_dir``: VI_1 tracks lbwatch's file there (``trackfile``), as the shipped examples."""
    script = track = ""
    fifo_line = "    notify_fifo /run/keepalived-lbwatch.fifo\n" if fifo else ""
    if smtp_alert:
        fifo_line += (
            "    notification_email {\n        ops@example.org\n    }\n"
            f"    notification_email_from keepalived@{node}.example.org\n"
            f"    smtp_server {smtp_alert}\n    smtp_connect_timeout 3\n    smtp_alert\n"
        )
    hook = f'    notify "{notify}"\n' if notify else ""
    if transitions:
        for state in ("master", "backup", "fault", "stop"):
            hook += f'    notify_{state} "{transitions} {state.upper()}"\n'
    if mode == "vrrp_script":
        # Not `pidof`: Debian's keepalived resolves that symlink to killall5 and the check fails.
        script = """vrrp_script chk_haproxy {
    script "/usr/bin/killall -0 haproxy"
    interval 1
    fall 2
    rise 2
    weight -5
}

"""
        track = "    track_script {\n        chk_haproxy\n    }\n"
    if track_dir:
        script += (
            f'track_file lbwatch_VI_1 {{\n    file "{track_dir}/VI_1"\n    weight 1\n'
            "    init_file 0\n}\n\n"
        )
        track += "    track_file {\n        lbwatch_VI_1\n    }\n"
    # A MASTER repeats its gratuitous ARP every 5 s: after a split brain heals, the node that
    # stayed MASTER sends none of its own, and the client kept the other's MAC (25-29 s out).
    version, advert = ("    vrrp_version 3\n", "0.1") if profile == "fast" else ("", "1")
    return f"""global_defs {{
    router_id {node}
{version}    vrrp_garp_master_refresh 5
    enable_script_security
    script_user root
{fifo_line}}}

{script}vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {(priorities or PRIORITY)[node]}
    advert_int {advert}
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
{track}{hook}}}
"""


# haproxy's start as lbwatch runs it in the lab, and as an operator's restart does
# (bench/chaos.py): one at a time, nothing started while a haproxy runs, done once the master is
# up, as `systemctl start haproxy` is in production (haproxy_start.sh says why). flock -o: the
# daemon does not inherit the lock.
# The lbwatch command of the environment running the tests (the peers' forced command too).
LBWATCH = str(Path(sys.executable).with_name("lbwatch"))
METRICS_PORT = 9640
METRICS = f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'  # lbwatch_extra for /metrics
HAPROXY_START = ["flock", "-o", "/run/haproxy.start.lock", str(HERE / "haproxy_start.sh")]


def lbwatch_toml(
    node_dir: Path,
    node: str,
    health: bool = True,
    extra: str = "",
    probe_interval: float = 0.5,
    rise: int = 1,
    start_delay: float = 1.0,
) -> str:
    probe = (
        f"""
[haproxy.health]
url = "http://127.0.0.1:8404/health"
interval = {probe_interval}
timeout = 0.5
fall = 2
rise = {rise}
"""
        if health
        else ""
    )
    # No systemd in the lab: services run by configured commands.
    return f"""# lab config for {node}
[agent]
node_name = "{node}"
run_dir = "/run/lbwatch"
state_dir = "{node_dir}/state"
scan_interval = 1.0
log_level = "debug"

[haproxy]
start = {json.dumps(HAPROXY_START)}
stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile", "/run/haproxy.pid",
        "--name", "haproxy", "--retry", "TERM/5/KILL/2"]
reload = ["start-stop-daemon", "--stop", "--quiet", "--signal", "USR2",
          "--pidfile", "/run/haproxy.pid", "--name", "haproxy"]
command_timeout = 10.0

[haproxy.backoff]
initial = 0.5
max = 4.0
stable_after = 5.0
max_attempts = 4
window = 60.0
giveup_retry = 30.0
{probe}
[keepalived]
track_dir = "{node_dir}/state/track"
start = ["keepalived", "-f", "/etc/keepalived/keepalived.conf"]
stop = ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--pidfile", "/run/keepalived.pid",
        "--name", "keepalived", "--retry", "TERM/5/KILL/2"]
command_timeout = 10.0

[keepalived.backoff]
initial = 0.5
max = 4.0
stable_after = 5.0

[policy]
keepalived_start_delay = {start_delay}

[[vrrp_instances]]
name = "VI_1"
vips = ["{VIP}"]
{extra}"""


def notify_toml(port: int = 2525, notify: str = "", email: str = "") -> str:
    """lbwatch's [notify] section for the lab: quick retries, mail to the SMTP sink on the
    backend host (``Lab.start_smtp_sink``); ``notify``, ``email``: more keys for each table."""
    return f"""
[notify]
retry_initial = 0.5
retry_max = 2.0
{notify}
[notify.email]
host = "{BACKEND}"
port = {port}
security = "plain"
sender = "lbwatch@example.org"
to = ["ops@example.org"]
timeout = 3
{email}"""


def sync_toml(
    node_dir: Path,
    node: str,
    peers: list[str],
    extra: str = "",
    retry: tuple[float, float] = (0.5, 4.0),
    options: str = "",
) -> str:
    """lbwatch's [sync] section for a lab node: push to ``peers`` over their sshd; ``extra``:
    a glob of extra files synced with the config; ``retry``: retry_initial and retry_max (short
    by default, so tests wait less; lbwatch's own defaults are 1 and 60 s); ``options``: more
    lines of the section (``push_after = "healthy"``)."""
    peer_lines = "\n".join(f'  {{ name = "{p}", host = "{LB_ADDR[p]}" }},' for p in peers)
    return f"""
[sync]
config = "/etc/haproxy/haproxy.cfg"
extra_files = [{f'"{extra}"' if extra else ""}]
staging_dir = "{node_dir}/staging"
ssh_key = "{node_dir}/ssh/sync_key"
known_hosts = "{node_dir}/ssh/known_hosts"
control_dir = "/run/lbwatch/ssh"
timeout = 5.0
retry_initial = {retry[0]}
retry_max = {retry[1]}
peer_confirm = 10.0
{options}
peers = [
{peer_lines}
]
"""


# ---------------------------------------------------------------------------------------------
# Nodes


@dataclass
class Node:
    lab: Lab
    name: str
    dir: Path
    init: subprocess.Popen[bytes] | None = None
    init_pid: int = 0  # host PID of the node's PID 1
    lbwatch: subprocess.Popen[bytes] | None = None
    sshd: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    binds: list[str] = field(default_factory=list)  # paths bind_file mounted over, in order

    @property
    def ns(self) -> str:
        return f"{self.lab.prefix}-{self.name}"

    @property
    def addr(self) -> str:
        return LB_ADDR[self.name]

    def enter(self, *argv: str) -> list[str]:
        """argv that runs inside this node (network, PID, mount and UTS namespaces)."""
        return ["nsenter", "-t", str(self.init_pid), "-n", "-p", "-m", "-u", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 20.0) -> str:
        proc = subprocess.run(
            self.enter(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            said = (proc.stderr.strip() + "\n" + proc.stdout.strip()[-2000:]).strip()
            raise RuntimeError(f"{self.name}: {' '.join(argv)} exited {proc.returncode}: {said}")
        return proc.stdout

    def procs(self, name: str | None = None) -> list[psutil.Process]:
        """Processes in this node's PID namespace (host PIDs), optionally by name."""
        try:
            ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return []
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.pid == self.init_pid:
                continue
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/pid") != ns:
                    continue
            except OSError:
                continue
            if name is None or proc.info["name"] == name:
                found.append(proc)
        return found

    def live(self, name: str) -> list[psutil.Process]:
        out = []
        for p in self.procs(name):
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Signal every live process of ``name`` in this node at once; returns host PIDs."""
        pids = [p.pid for p in self.live(name)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def haproxy_pids(self) -> list[int]:
        """Host PIDs of the haproxy master its pidfile names and of that master's workers
        (the master first); [] while the pidfile is missing or names no live process."""
        try:
            master = psutil.Process(self.host_pid(int(self.read("/run/haproxy.pid").split()[0])))
            return [master.pid, *(w.pid for w in master.children() if w.name() == "haproxy")]
        except (OSError, ValueError, IndexError, LookupError, psutil.Error):
            return []

    def signal_haproxy(self, sig: int) -> list[int]:
        """Send ``sig`` to haproxy's master and its workers (``haproxy_pids``), by PID: SIGSTOP
        freezes haproxy (it holds its sockets and answers nothing, as a hung haproxy does),
        SIGCONT thaws it. Returns the host PIDs signalled; raises when there is no haproxy."""
        pids = self.haproxy_pids()
        if not pids:
            raise LookupError(f"{self.name}: no haproxy master in /run/haproxy.pid")
        for pid in pids:
            os.kill(pid, sig)
        return pids

    def read(self, path: str) -> str:
        """A file as this node sees it (its private /run included)."""
        return Path(f"/proc/{self.init_pid}/root{path}").read_text()

    def write(self, path: str, text: str) -> None:
        """Replace a file as this node sees it by rename, so that no reader (lbwatch reading a
        pidfile) ever sees it empty or half-written."""
        dest = Path(f"/proc/{self.init_pid}/root{path}")
        tmp = dest.with_name(f".{dest.name}.lab-tmp")
        tmp.write_text(text)
        tmp.rename(dest)

    def ns_pid(self, host_pid: int) -> int:
        """The PID that host PID ``host_pid`` has inside this node: what its pidfiles, its `ps`
        and lbwatch's log say."""
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise LookupError(f"no NSpid for host PID {host_pid}")

    def host_pid(self, ns_pid: int) -> int:
        """The host PID of the process this node knows as ``ns_pid``."""
        for proc in self.procs():
            with contextlib.suppress(OSError, LookupError):
                if self.ns_pid(proc.pid) == ns_pid:
                    return proc.pid
        raise LookupError(f"{self.name}: no process {ns_pid}")

    def agent_pid(self) -> int | None:
        """Host PID of the running lbwatch agent (`lbwatch run`, not a CLI call), if any."""
        for proc in self.procs():
            with contextlib.suppress(psutil.Error):
                argv = proc.cmdline()
                if proc.name().startswith("python") and "lbwatch" in argv and argv[-1] == "run":
                    return proc.pid
        return None

    def bind_file(self, src: Path, dst: str) -> None:
        """Bind-mount host file ``src`` over ``dst`` in this node's mount namespace only (the
        host and the other node keep the real one). Mounts stack: the latest is what the node
        reads, and each switch is atomic."""
        self.run("mount", "--bind", str(src), dst)
        self.binds.append(dst)

    def small_fs(self, path: Path, size: str, mode: str) -> None:
        """A tmpfs of ``size`` (e.g. "1m") over the directory ``path`` in this node's mount
        namespace only: a disk that can be filled without filling the host's. Undone with
        bind_file's mounts."""
        self.run("mkdir", "-p", str(path))
        self.run("mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path))
        self.binds.append(str(path))

    def unbind_all(self) -> None:
        """Undo bind_file's mounts, latest first. From inside the node's PID namespace too:
        umount reads /proc/self, which exists only for processes the node's /proc shows."""
        while self.binds:
            self.run("umount", self.binds[-1])
            self.binds.pop()

    def has_vip(self) -> bool:
        return f" {VIP}/" in self.run("ip", "-4", "addr", "show", "dev", "eth0")

    # -- daemons --------------------------------------------------------------------------------

    def write_configs(
        self,
        keepalived_mode: str = "lbwatch",
        health: bool = True,
        lbwatch_extra: str = "",
        probe_interval: float = 0.5,
        keepalived_notify: str = "",
        sync: bool = False,
        sync_extra: str = "",
        haproxy: str = "",
        sync_retry: tuple[float, float] = (0.5, 4.0),
        sync_options: str = "",
        rise: int = 1,
        smtp_alert: str = "",
        transitions_log: bool = False,
        vrrp_profile: str = "classic",
        priorities: dict[str, int] | None = None,
        start_delay: float = 1.0,
    ) -> None:
        """``keepalived_notify``: "" none, "fifo" keepalived's notify_fifo, "script" keepalived
        runs `lbwatch notify` as its notify script, "both" both at once. ``sync``: config sync
        with the other node (needs ``Lab.enable_sync``); ``rise``: the probe's; ``smtp_alert``:
        keepalived's own mail to "HOST PORT"; ``transitions_log``: keepalived itself appends
        "WALL-TIME STATE" to ``transitions_path`` at each transition; ``priorities``: VRRP's by
        node (``keepalived_conf``'s); ``start_delay``: lbwatch's keepalived_start_delay."""
        if sync:
            others = [n for n in self.lab.nodes if n != self.name]
            lbwatch_extra += sync_toml(
                self.dir, self.name, others, sync_extra, sync_retry, sync_options
            )
        script = ""
        if keepalived_notify in ("script", "both"):
            script = f"{LBWATCH} --config {self.dir / 'lbwatch.toml'} notify"
        (self.dir / "haproxy" / "haproxy.cfg").write_text(haproxy or haproxy_cfg())
        hook = ""
        if transitions_log:
            # In the node's own /etc/keepalived: root's and nobody else's, as keepalived's
            # script security wants every directory up to it.
            hook = "/etc/keepalived/transitions.sh"
            sh_file = self.dir / "keepalived" / "transitions.sh"
            sh_file.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $1" >> {self.transitions_path}\n')
            sh_file.chmod(0o755)
        (self.dir / "keepalived" / "keepalived.conf").write_text(
            keepalived_conf(
                self.name,
                keepalived_mode,
                script,
                fifo=keepalived_notify in ("fifo", "both"),
                smtp_alert=smtp_alert,
                transitions=hook,
                profile=vrrp_profile,
                priorities=priorities,
                track_dir=str(self.dir / "state" / "track"),
            )
        )
        (self.dir / "state" / "track").mkdir(parents=True, exist_ok=True)
        (self.dir / "lbwatch.toml").write_text(
            lbwatch_toml(
                self.dir, self.name, health, lbwatch_extra, probe_interval, rise, start_delay
            )
        )

    @property
    def transitions_path(self) -> Path:
        """Where keepalived's own transition hooks (``write_configs(transitions_log=True)``)
        append "WALL-TIME STATE" lines."""
        return self.dir / "transitions.log"

    # -- sshd, for config sync ------------------------------------------------------------------

    def start_sshd(self) -> None:
        """sshd on the node's address; its only key is the peers' restricted sync key."""
        self.run("mkdir", "-p", "/run/sshd")  # privilege separation directory, in our /run
        log = (self.dir / "sshd.log").open("ab")
        self.sshd = subprocess.Popen(
            self.enter("/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "ssh" / "sshd_config")),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while ":22 " not in self.run("ss", "-Htln"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: sshd not listening")
            time.sleep(0.05)

    def stop_sshd(self) -> None:
        """Stop the listener and every session it forked: the peer is unreachable."""
        for p in self.procs("sshd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        if self.sshd is not None:
            self.sshd.wait(10)
            self.sshd = None

    def start_haproxy(self) -> None:
        """Another haproxy master, even while one runs (a test's deliberate second master)."""
        self.run("haproxy", "-W", "-D", "-f", "/etc/haproxy/haproxy.cfg", "-p", "/run/haproxy.pid")

    def start_haproxy_service(self) -> None:
        """haproxy started as lbwatch starts it here: nothing is done while one runs."""
        self.run(*HAPROXY_START)

    def start_keepalived(self) -> None:
        self.run("keepalived", "-f", "/etc/keepalived/keepalived.conf")

    def start_lbwatch(self, env: dict[str, str] | None = None) -> None:
        """``env``: added to lbwatch's environment (e.g. a test clock offset)."""
        log = self.dir / "lbwatch.log"
        if log not in self.logs:  # a restarted agent appends to the same file: read it once
            self.logs.append(log)
        with log.open("ab") as out:
            self.lbwatch = subprocess.Popen(
                self.enter(
                    sys.executable,
                    "-m",
                    "lbwatch",
                    "--config",
                    str(self.dir / "lbwatch.toml"),
                    "run",
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def lbwatch_cli(self, *args: str, check: bool = True) -> str:
        return self.run(
            sys.executable,
            "-m",
            "lbwatch",
            "--config",
            str(self.dir / "lbwatch.toml"),
            *args,
            check=check,
        )

    def scrape(self, port: int = METRICS_PORT) -> str:
        """lbwatch's /metrics, fetched inside the node (the lab configs listen on loopback)."""
        url = f"http://127.0.0.1:{port}/metrics"
        fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return self.run(sys.executable, "-c", fetch)

    def status(self) -> StatusDoc | None:
        """lbwatch's status document as the agent wrote it; None until it has written one."""
        return load_status(Path(f"/proc/{self.init_pid}/root/run/lbwatch/{STATUS_FILE}"))

    def doc(self) -> StatusDoc:
        """lbwatch's status document, which the agent must have written by now."""
        doc = self.status()
        assert doc is not None, f"{self.name}: no /run/lbwatch/{STATUS_FILE} yet"
        return doc

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop_lbwatch(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.lbwatch is None:
            return None
        # The Popen is nsenter; the agent is its child inside the node.
        for p in self.procs():
            with contextlib.suppress(psutil.Error):
                if "lbwatch" in " ".join(p.cmdline()) and p.name().startswith("python"):
                    os.kill(p.pid, sig)
        try:
            code = self.lbwatch.wait(timeout)
        except subprocess.TimeoutExpired:
            self.lbwatch.kill()
            code = self.lbwatch.wait(5)
        self.lbwatch = None
        return code


# ---------------------------------------------------------------------------------------------
# The lab


class Lab:
    node_class: type[Node] = Node

    def __init__(
        self, base: Path | None = None, nodes: int = 2, tmp_prefix: str = "lbwatch-lab-"
    ) -> None:
        self.prefix = f"lbw{os.getpid()}"
        self.base = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=base))
        self.nodes = {n: self.node_class(self, n, self.base / n) for n in list(LB_ADDR)[:nodes]}
        self.backend: subprocess.Popen[bytes] | None = None
        self.smtp: subprocess.Popen[str] | None = None
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str, *args: str) -> None:
        sh("ip", "-n", self.ns(host), *args)

    def up(self) -> Lab:
        clear_stale()
        for name in [n for n in netns_list() if n.startswith(self.prefix + "-")]:
            _kill_netns(name)
        sw = self.ns("sw")
        for host in ("sw", *self.nodes, "be", "cl"):
            sh("ip", "netns", "add", self.ns(host))
            self._made.append(self.ns(host))
            self.ip(host, "link", "set", "lo", "up")
        self.ip("sw", "link", "add", "br0", "type", "bridge")
        self.ip("sw", "link", "set", "br0", "up")
        addrs = {**{n: LB_ADDR[n] for n in self.nodes}, "be": BACKEND, "cl": CLIENT}
        for host, addr in addrs.items():
            sh(
                "ip",
                "-n",
                sw,
                "link",
                "add",
                f"p-{host}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.ns(host),
            )
            self.ip("sw", "link", "set", f"p-{host}", "master", "br0", "up")
            self.ip(host, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip(host, "link", "set", "eth0", "up")
        with open(os.devnull, "wb") as devnull:
            self.backend = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns("be"),
                    sys.executable,
                    str(HERE / "backend.py"),
                    BACKEND,
                    "8080",
                ],
                stdin=subprocess.DEVNULL,
                stdout=devnull,
                stderr=devnull,
            )
        for node in self.nodes.values():
            self._start_node(node)
        return self

    def _start_node(self, node: Node) -> None:
        for sub in ("haproxy", "keepalived", "state"):
            (node.dir / sub).mkdir(parents=True, exist_ok=True)
        # unshare complains on stderr when its child is killed at teardown: keep it in a file.
        log = (node.dir / "init.log").open("ab")
        node.init = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.ns,
                "unshare",
                "--pid",
                "--mount",
                "--uts",
                "--fork",
                "--mount-proc",
                sys.executable,
                str(HERE / "nodeinit.py"),
                str(node.dir),
                node.name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not (node.dir / "ready").exists():
            if time.monotonic() > deadline or node.init.poll() is not None:
                raise RuntimeError(f"node {node.name} did not come up")
            time.sleep(0.02)
        kids = psutil.Process(node.init.pid).children()
        node.init_pid = kids[0].pid

    def enable_sync(self, rrsync: bool = False) -> None:
        """Keys for config sync and sshd on every LB node. Each node's sync key is authorized on
        the others only through lbwatch's restricted entry (its receiver, into their staging;
        ``rrsync``: the entry peers had before lbwatch had a receiver); each node knows the
        others' host keys."""
        pubs, hosts = {}, {}
        for node in self.nodes.values():
            ssh_dir = node.dir / "ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            (node.dir / "staging").mkdir(mode=0o755, exist_ok=True)
            pubs[node.name] = keygen(ssh_dir / "sync_key")
            hosts[node.name] = keygen(ssh_dir / "host_key")
        for node in self.nodes.values():
            others = [n for n in self.nodes if n != node.name]
            ssh_dir = node.dir / "ssh"
            auth = ssh_dir / "authorized_keys"
            auth.write_text("".join(self.sync_entry(node, pubs[o], rrsync, o) for o in others))
            auth.chmod(0o600)
            (ssh_dir / "known_hosts").write_text(
                "".join(known_hosts_line(LB_ADDR[o], 22, hosts[o]) + "\n" for o in others)
            )
            write_sshd_config(
                ssh_dir, node.addr, 22, ssh_dir / "host_key", auth, Path("/run/sshd.pid")
            )
            node.start_sshd()

    @staticmethod
    def sync_entry(node: Node, pub: str, rrsync: bool = False, peer: str | None = None) -> str:
        """The authorized_keys line on ``node`` for the sync key ``pub`` of the node ``peer``
        (as `sync setup` writes it; None: an entry from before there was --peer)."""
        staging = node.dir / "staging"
        if rrsync:
            return rrsync_authorized_keys_line(staging, pub) + "\n"
        return authorized_keys_line(staging, pub, LBWATCH, peer) + "\n"

    def set_vrrp(self, on: bool) -> None:
        """VRRP between the LB nodes cut (``on`` False) or restored: multicast (VRRP's
        224.0.0.18) is no longer flooded to their bridge ports, while unicast (the clients, the
        sync link's ssh) flows on. The kernel here loads no tc classifiers, so this is the cut
        that works."""
        for name in self.nodes:
            sh("bridge", "-n", self.ns("sw"), "link", "set", "dev", f"p-{name}",
               "mcast_flood", "on" if on else "off")  # fmt: skip

    def start_smtp_sink(self, port: int = 2525, auth: str = "") -> Path:
        """A real SMTP server (aiosmtpd) on the backend host; each accepted message becomes a
        file in the returned directory. ``auth`` "USER:PASSWORD": mail only after AUTH with
        these."""
        maildir = self.base / "mail"
        maildir.mkdir(exist_ok=True)
        self.smtp = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns("be"),
                sys.executable,
                str(HERE / "smtpsink.py"),
                BACKEND,
                str(port),
                str(maildir),
                *([auth] if auth else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.smtp.stdout is not None
        self.smtp.stdout.readline()  # "ready"
        return maildir

    def stop_smtp_sink(self) -> None:
        """Kill the SMTP server (its messages stay); ``start_smtp_sink`` starts it again."""
        if self.smtp is not None:
            self.smtp.kill()
            self.smtp.wait(5)
            if self.smtp.stdout is not None:
                self.smtp.stdout.close()
            self.smtp = None

    def client_get(self, timeout: float = 1.0) -> tuple[int, str]:
        """One GET through the VIP from the client: (HTTP status or 0, X-LB header)."""
        data = self.client_fetch(VIP, timeout)
        return int(data["status"]), str(data["lb"])

    def client_fetch(self, addr: str, timeout: float = 1.0) -> dict:
        """One GET of http://ADDR/ from the client: {"status": N or 0, "lb": X-LB,
        "config": X-Config}."""
        out = sh(
            "ip",
            "netns",
            "exec",
            self.ns("cl"),
            sys.executable,
            str(HERE / "client.py"),
            "once",
            f"http://{addr}/",
            str(timeout),
            check=False,
            timeout=timeout + 10,
        ).stdout
        try:
            data = json.loads(out)
        except ValueError:
            return {"status": 0, "lb": "", "config": ""}
        return dict(data)

    def _client(self, *args: str) -> subprocess.Popen[str]:
        """client.py ARGS on the client host, its report on the returned process's stdout."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns("cl"), sys.executable, str(HERE / "client.py"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def client_sample(self, seconds: float, addr: str = VIP) -> subprocess.Popen[str]:
        """Start a client that GETs http://ADDR/ every few ms for ``seconds``, then prints how
        often each answer came (client.py's ``sample``)."""
        return self._client("sample", f"http://{addr}/", str(seconds))

    def client_probe(self, seconds: float, addr: str = VIP) -> subprocess.Popen[str]:
        """Start a client that GETs http://ADDR/ every few ms for ``seconds`` and prints each
        change of answer with its wall time (client.py's ``probe``)."""
        return self._client("probe", f"http://{addr}/", str(seconds))

    def client_watch(
        self,
        want: str,
        limit: float,
        addr: str = VIP,
        header: str = "X-LB",
        timeout: float = 0.1,
    ) -> subprocess.Popen[str]:
        """Start a client that GETs http://ADDR/ every few ms and prints the wall time of the
        first HTTP 200 whose ``header`` is ``want``. A GET sent while the address leads nowhere
        waits out ``timeout``: the first 200 can come up to that much after one was possible."""
        return self._client("watch", f"http://{addr}/", want, str(limit), header, str(timeout))

    def down(self) -> None:
        for node in self.nodes.values():
            if node.lbwatch is not None:
                node.stop_lbwatch(signal.SIGKILL, timeout=5)
            if node.sshd is not None:
                node.sshd.kill()
            if node.init is not None and node.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.init_pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.init.wait(10)
            if node.sshd is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.sshd.wait(5)
        for proc in (self.backend, self.smtp):
            if proc is not None:
                proc.kill()
                proc.wait(5)
                if proc.stdout is not None:
                    proc.stdout.close()
        for name in reversed(self._made):
            _kill_netns(name)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Lab:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()
