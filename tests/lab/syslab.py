"""The lab as users run it: each LB node a container booted by systemd 252 (``systemd-nspawn``
over an overlay of this host's root, a tmpfs upper per node, so the host is never written),
joined to the node's lab network namespace. Debian's own haproxy.service and keepalived.service
run the daemons, lbwatch comes from its Debian package (``make deb``) installed with apt and runs
under the shipped unit, configured from config/lbwatch.toml with node values only; every
start, stop and reload is systemctl's, and the logs are journald's.

Topology and addresses are ``netlab.Lab``'s (client, backend, bridge); keepalived runs the
example's classic pair: VI_1 (192.0.2.100) MASTER on lb1, VI_2 (192.0.2.101) MASTER on lb2.

The host has no systemd as PID 1, so each container is started with ``--register=no
--keep-unit`` in a cgroup made for it (in every cgroup hierarchy systemd uses), which is also how
everything in it is ended: ``cgroup.kill``. Names carry the run's PID like the namespaces:
``clear_stale_containers()`` ends what a run cut short left (containers, mounts, cgroups).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import psutil

from tests.lab.netlab import BACKEND, LB_ADDR, NS_RE, VIP, Lab, Node, haproxy_cfg, sh
from tests.lab.ssh import keygen
from tests.util import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "lbwatch.toml"
VIP2 = "192.0.2.101"
SMTP_PORT = 2525
SMTP_USER, SMTP_PASSWORD = "lbwatch", "lab-secret-7"  # the credential LoadCredential= passes
HOOK_PORT = 8081
METRICS_PORT = 9640
TEXTFILE = "/var/lib/prometheus/node-exporter/lbwatch.prom"
TRANSITIONS = "/var/log/keepalived-transitions.log"  # "WALL-TIME STATE INSTANCE" lines
BASE_RE = re.compile(r"/lbwatch-syslab-(\d+)-")
# The host image's units a lab node runs; every other unit the host enables is masked there.
KEEP = {"haproxy.service", "keepalived.service", "ssh.service", "sshd.service", "lbwatch.service"}
# Units of the image that have no business in a lab node (a console, the clock).
MASK = (
    "console-getty.service",
    "getty@.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)
# sh -c ENTER_CGROUP sh N FILE... COMMAND...: this shell's PID into each of the N cgroup.procs
# files (the container's own cgroup in every tree), then COMMAND in its place.
ENTER_CGROUP = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n - 1)); done; exec "$@"'
)
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "TERM=dumb"]


# ---------------------------------------------------------------------------------------------
# cgroups and leftovers


def hierarchies() -> list[Path]:
    """The cgroup trees systemd uses here: cgroup2 alone, or the named v1 tree and cgroup2
    beside it (the hybrid layout)."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


def _cgroup_kill(name: str) -> None:
    """End every process of the container's cgroup, then remove the cgroup in every tree."""
    for tree in hierarchies():
        group = tree / name
        if (group / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (group / "cgroup.kill").write_text("1")
    for tree in hierarchies():
        group = tree / name
        if not group.is_dir():
            continue
        deadline = time.monotonic() + 10
        while True:
            pids = [int(p) for sub in group.rglob("cgroup.procs") for p in sub.read_text().split()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:  # v1 has no cgroup.kill
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for sub in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()


def _mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        out.append(line.split()[4].replace("\\040", " "))
    return out


def _unmount_under(base: Path) -> None:
    """Unmount everything at or below ``base``, deepest first (lazily: a dead container's
    mounts may still be busy for a moment)."""
    prefix = str(base)
    for point in sorted(
        (m for m in _mounts() if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True
    ):
        sh("umount", "-l", point, check=False)


def clear_stale_containers() -> list[str]:
    """End the containers, mounts and cgroups of lab runs whose process is gone."""
    removed = []
    for tree in hierarchies():
        for group in tree.iterdir():
            m = NS_RE.match(group.name)
            if group.is_dir() and m and not psutil.pid_exists(int(m.group(1))):
                _cgroup_kill(group.name)
                removed.append(group.name)
    bases = set()
    for point in _mounts():
        m = BASE_RE.search(point)
        if m and not psutil.pid_exists(int(m.group(1))):
            end = point.find("/", m.end())
            bases.add(point if end < 0 else point[:end])
    for base in bases:
        _unmount_under(Path(base))
        if not any(BASE_RE.search(p) and p.startswith(base) for p in _mounts()):
            shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


# ---------------------------------------------------------------------------------------------
# Configuration: the example plus node values


def set_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` (TOML) with ``key = value`` in ``[table]``: the key's line replaced (a
    multi-line array whole), or a commented-out ``# key = ...`` line taken, or the line added
    after the table's header."""
    lines = text.splitlines()
    try:
        start = lines.index(f"[{table}]")
    except ValueError:
        return text.rstrip("\n") + f"\n\n[{table}]\n{key} = {value}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    pattern = re.compile(rf"^(# ?)?{re.escape(key)}\s*=")
    for i in range(start + 1, end):
        if pattern.match(lines[i]):
            last = i
            rest = lines[i].split("=", 1)[1].split("#", 1)[0].strip()
            if not lines[i].startswith("#") and rest == "[":
                last = next(j for j in range(i + 1, end) if lines[j].strip().startswith("]"))
            lines[i : last + 1] = [f"{key} = {value}"]
            return "\n".join(lines) + "\n"
    lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


def node_config(example: str, node: str, peers: list[str]) -> str:
    """config/lbwatch.toml with this lab's node values, every optional feature on: the probe
    (already on in the example), mail through the lab's SMTP server with the password from
    LoadCredential=, a webhook, config sync with the peers, the cluster watch, /metrics and the
    node_exporter textfile."""
    text = set_key(example, "agent", "node_name", f'"{node}"')
    for key, value in (
        ("host", f'"{BACKEND}"'),
        ("port", str(SMTP_PORT)),
        ("security", '"plain"'),
        ("allow_plain_password", "true"),
        ("timeout", "3.0"),
    ):
        text = set_key(text, "notify.email", key, value)
    text = set_key(text, "notify", "retry_initial", "0.5")
    text = set_key(text, "notify", "retry_max", "2.0")
    peer_list = ", ".join(f'{{ name = "{p}", host = "{LB_ADDR[p]}" }}' for p in peers)
    text = set_key(text, "sync", "peers", f"[{peer_list}]")
    text = set_key(text, "sync", "retry_initial", "0.5")
    text = set_key(text, "sync", "retry_max", "4.0")
    text = set_key(text, "metrics", "listen", f'"127.0.0.1:{METRICS_PORT}"')
    text = set_key(text, "metrics", "textfile", f'"{TEXTFILE}"')
    return text + (
        "\n# lab: the example's webhook, to the lab's receiver\n[[notify.webhooks]]\n"
        f'name = "chat"\nurl = "http://{BACKEND}:{HOOK_PORT}/hook"\ntimeout = 2.0\n'
    )


# config/keepalived.conf's: the preferred node 254, the other 253 (a third node 252).
PRIORITIES = {
    "VI_1": {"lb1": 254, "lb2": 253, "lb3": 252},
    "VI_2": {"lb1": 253, "lb2": 254, "lb3": 252},
}


def keepalived_pair_conf(node: str, transitions: str = "", profile: str = "classic") -> str:
    """The example's pair: VI_1 MASTER on lb1, VI_2 on lb2, events to lbwatch's FIFO; the
    ``profile`` of config/keepalived.conf ("classic": VRRP v2, advert_int 1) or of
    config/keepalived-fast.conf ("fast": VRRP v3, advert_int 0.1).
    ``transitions``: a script keepalived runs with the new state and the instance as its
    arguments at each MASTER, BACKUP, FAULT and STOP (its notify_STATE hooks beside the FIFO):
    a record independent of lbwatch (bench/chaos.py --systemd)."""
    blocks = []
    levers = []
    for name, vrid, vip in (("VI_1", 51, VIP), ("VI_2", 52, VIP2)):
        # lbwatch's lever, as the shipped examples have it (trackfile.py)
        levers.append(f"""track_file lbwatch_{name} {{
    file "/var/lib/lbwatch/track/{name}"
    weight 1
    init_file 0
}}
""")
        hooks = "".join(
            f'    notify_{state} "{transitions} {state.upper()} {name}"\n'
            for state in ("master", "backup", "fault", "stop")
            if transitions
        )
        advert = "0.1" if profile == "fast" else "1"
        blocks.append(f"""vrrp_instance {name} {{
    state BACKUP
    interface eth0
    virtual_router_id {vrid}
    priority {PRIORITIES[name][node]}
    advert_int {advert}
    virtual_ipaddress {{
        {vip}/24 dev eth0
    }}
    track_file {{
        lbwatch_{name}
    }}
{hooks}}}
""")
    # keepalived runs notify scripts as root only with script security on (keepalived.conf(5)).
    security = "    enable_script_security\n    script_user root\n" if transitions else ""
    version = "    vrrp_version 3\n" if profile == "fast" else ""
    return f"""global_defs {{
    router_id {node}
{version}    vrrp_garp_master_refresh 5
    notify_fifo /run/keepalived-lbwatch.fifo
{security}}}

""" + "\n".join([*levers, *blocks])


# ---------------------------------------------------------------------------------------------
# Nodes


class SysNode(Node):
    """A node whose PID 1 is systemd. ``init_pid`` is its systemd (host PID); ``root`` the
    merged tree seen from the host."""

    @property
    def root(self) -> Path:
        return self.dir / "c" / "root"

    @property
    def cgroup(self) -> str:
        return self.ns

    def enter(self, *argv: str) -> list[str]:
        """argv run inside the container, in all its namespaces, with a clean environment."""
        return ["nsenter", "-t", str(self.init_pid), "-a", "--", *CLEAN_ENV, *argv]

    def put(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the node's tree (its overlay upper), making its directory."""
        dest = self.root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.lab-tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.rename(dest)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def prop(self, unit: str, name: str) -> str:
        return self.systemctl("show", "-p", name, "--value", unit).strip()

    def main_pid(self, unit: str) -> int:
        """The unit's main process as a host PID (0: none)."""
        pid = int(self.prop(unit, "MainPID") or 0)
        return self.host_pid(pid) if pid else 0

    @property
    def transitions_path(self) -> Path:
        """keepalived's own transition record (``SysLab(transitions_log=True)``), read from
        the host through the node's tree."""
        return self.root / TRANSITIONS.lstrip("/")

    def scrape(self, port: int = METRICS_PORT) -> str:
        """lbwatch's /metrics, fetched inside the node by the node's own Python (this run's
        interpreter may live under the host's /tmp, which the container's own /tmp hides)."""
        url = f"http://127.0.0.1:{port}/metrics"
        fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return self.run("/usr/bin/python3", "-c", fetch)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-q", "-o", "short-unix", *args, timeout=60)

    def cli(self, *args: str, check: bool = True) -> str:
        return self.run("lbwatch", *args, check=check, timeout=60)


class SysLab(Lab):
    """``SysLab(deb)``: the lab's network, each LB node booted by systemd with Debian's haproxy
    and keepalived units running the lab's configs; ``install()`` then puts the lbwatch package
    on every node as an operator would (apt, config, sync setup, enable --now)."""

    node_class = SysNode

    def __init__(
        self, deb: Path, nodes: int = 2, transitions_log: bool = False, profile: str = "classic"
    ) -> None:
        """``transitions_log``: keepalived itself appends each transition of each instance to
        the node's ``transitions_path`` (its notify_STATE hooks). ``profile``: keepalived's
        timers, as ``keepalived_pair_conf`` takes it."""
        super().__init__(nodes=nodes, tmp_prefix=f"lbwatch-syslab-{os.getpid()}-")
        self.deb = deb
        self.transitions_log = transitions_log
        self.profile = profile
        self.containers: dict[str, subprocess.Popen[bytes]] = {}
        self.maildir: Path | None = None
        self.setup_said: dict[str, str] = {}  # what `lbwatch sync setup` printed on each node
        self.hookdir = self.base / "hooks"
        self.hook: subprocess.Popen[bytes] | None = None

    @property
    def sysnodes(self) -> dict[str, SysNode]:
        return self.nodes  # type: ignore[return-value]

    def up(self) -> SysLab:
        clear_stale_containers()
        super().up()
        return self

    # -- a node's tree and boot ---------------------------------------------------------------

    def _prepare(self, node: SysNode) -> None:
        top = node.dir / "c"
        top.mkdir(parents=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(top))
        for sub in ("upper", "work", "root"):
            (top / sub).mkdir()
        sh(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir=/,upperdir={top / 'upper'},workdir={top / 'work'}",
            str(node.root),
        )
        units = node.root / "etc/systemd/system"
        masked = set(MASK)
        for wants in Path("/etc/systemd/system").glob("*.wants"):
            masked |= {u.name for u in wants.iterdir() if u.name not in KEEP}
        for unit in masked:
            target = units / unit
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            target.symlink_to("/dev/null")
        wants = units / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        for unit in ("haproxy.service", "keepalived.service", "ssh.service"):
            link = wants / unit
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(f"/lib/systemd/system/{unit}")
        # A node starts without what the host's lbwatch install left (make deb-check).
        for leftover in ("etc/lbwatch", "var/lib/lbwatch"):
            shutil.rmtree(node.root / leftover, ignore_errors=True)
        node.put("/etc/hostname", node.name + "\n")
        node.put("/etc/haproxy/haproxy.cfg", haproxy_cfg())
        hook = ""
        if self.transitions_log:
            hook = "/etc/keepalived/transitions.sh"
            node.put(hook, f'#!/bin/sh\necho "$(date +%s.%N) $1 $2" >> {TRANSITIONS}\n', 0o755)
        node.put(
            "/etc/keepalived/keepalived.conf", keepalived_pair_conf(node.name, hook, self.profile)
        )
        # sshd runs the sync key's forced command through root's shell: no host dotfiles.
        for dotfile in ("/root/.bashrc", "/root/.profile"):
            node.put(dotfile, "")
        node.put("/root/.ssh/authorized_keys", "", 0o600)
        (node.root / "root/.ssh").chmod(0o700)
        for old in (node.root / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        keygen(node.root / "etc/ssh/ssh_host_ed25519_key")
        node.put("/etc/ssh/sshd_config.d/lab.conf", "HostKey /etc/ssh/ssh_host_ed25519_key\n")
        # What a node_exporter package would have made.
        (node.root / TEXTFILE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)

    def _start_node(self, node: Node) -> None:
        assert isinstance(node, SysNode)
        self._prepare(node)
        procs = []
        for tree in hierarchies():
            (tree / node.cgroup).mkdir(exist_ok=True)
            procs.append(str(tree / node.cgroup / "cgroup.procs"))
        log = (node.dir / "boot.log").open("ab")
        node.init = subprocess.Popen(
            [
                "sh",
                "-c",
                ENTER_CGROUP,
                "sh",
                str(len(procs)),
                *procs,
                "systemd-nspawn",
                "--quiet",
                "--directory",
                str(node.root),
                "--boot",
                f"--network-namespace-path=/run/netns/{node.ns}",
                "--register=no",
                "--keep-unit",
                f"--machine={node.name}",
                "--console=passive",
                # keepalived adds and removes the VIPs: nspawn leaves CAP_NET_ADMIN out by default.
                "--capability=CAP_NET_ADMIN",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.containers[node.name] = node.init
        deadline = time.monotonic() + 60
        while not node.init_pid:
            if node.init.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: systemd-nspawn ended: {self.boot_log(node)}")
            with contextlib.suppress(psutil.Error):
                kids = psutil.Process(node.init.pid).children()
                if kids and kids[0].name() == "systemd":
                    node.init_pid = kids[0].pid
            time.sleep(0.02)
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: systemd says {state!r}: {self.boot_log(node)}")
            state = node.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=60
            ).strip()
        if state == "degraded":
            # A unit of the host image that cannot run in a container is said, not fatal; one
            # the lab needs is.
            failed = node.systemctl("--failed", "--no-legend", "--plain", check=False)
            print(f"{node.name}: units failed at boot:\n{failed}", file=sys.stderr)
            if any(line.split()[:1] and line.split()[0] in KEEP for line in failed.splitlines()):
                raise RuntimeError(f"{node.name}: units the lab needs failed at boot: {failed}")

    @staticmethod
    def boot_log(node: SysNode) -> str:
        path = node.dir / "boot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    # -- lbwatch as an operator installs it ---------------------------------------------------

    def start_sinks(self) -> None:
        """Mail (with the password the nodes get through LoadCredential=) and webhooks, both on
        the backend host."""
        self.maildir = self.start_smtp_sink(SMTP_PORT, auth=f"{SMTP_USER}:{SMTP_PASSWORD}")
        self.hookdir.mkdir(exist_ok=True)
        self.hook = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns("be"),
                sys.executable,
                str(Path(__file__).with_name("hooksink.py")),
                BACKEND,
                str(HOOK_PORT),
                str(self.hookdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.hook.stdout is not None
        self.hook.stdout.readline()  # "ready"

    def apt_install(self, node: SysNode, deb: Path, *extra: str) -> str:
        """apt-get install of a package file on the node (no index update: its dependencies are
        the host image's)."""
        name = f"/root/{deb.name}"
        shutil.copy(deb, node.root / name.lstrip("/"))
        return node.run(
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *extra,
            "-o",
            "Dpkg::Options::=--force-confold",
            name,
            timeout=300,
        )

    def install(self) -> None:
        """On every node: the package, the node values in /etc/lbwatch/lbwatch.toml, the SMTP
        password as a credential (a drop-in), an operator's root ssh login between the nodes,
        `lbwatch sync setup --install --accept`, then `systemctl enable --now lbwatch`."""
        admin = self.base / "admin_key"
        pub = keygen(admin)
        for node in self.sysnodes.values():
            if "\ninstall ok installed" in "\n" + node.run(
                "dpkg-query", "-W", "-f", "${Status}", "lbwatch", check=False
            ):
                node.run("dpkg", "--purge", "lbwatch", timeout=120)
            self.apt_install(node, self.deb)
            example = (node.root / "etc/lbwatch/lbwatch.toml").read_text()
            others = [n for n in self.nodes if n != node.name]
            node.put("/etc/lbwatch/lbwatch.toml", node_config(example, node.name, others))
            node.put("/etc/lbwatch/smtp-password", SMTP_PASSWORD + "\n", 0o600)
            node.put(
                "/etc/systemd/system/lbwatch.service.d/credential.conf",
                "[Service]\nLoadCredential=smtp-password:/etc/lbwatch/smtp-password\n",
            )
            node.put("/root/.ssh/authorized_keys", pub + "\n", 0o600)
            shutil.copy(admin, node.root / "root/.ssh/id_ed25519")
            (node.root / "root/.ssh/id_ed25519").chmod(0o600)
        # Set up in turn, as an operator would: the first node's setup runs before any peer's
        # agent has made its staging, which it must take (a warning, exit 0).
        for node in self.sysnodes.values():
            self.setup_said[node.name] = node.cli("sync", "setup", "--install", "--accept")
        for node in self.sysnodes.values():
            node.systemctl("daemon-reload")
            node.systemctl("enable", "--now", "lbwatch")

    def healthy(self) -> bool:
        """Every node's agent ready with both daemons up, VI_1 on lb1 and VI_2 on lb2."""
        for node in self.sysnodes.values():
            doc = node.status()
            if doc is None or not doc.ready or not all(s.running for s in doc.services.values()):
                return False
        return self.holder(VIP) == "lb1" and (len(self.nodes) < 2 or self.holder(VIP2) == "lb2")

    def holder(self, vip: str) -> str:
        """The node whose eth0 has ``vip`` ("" none, "lb1+lb2" several)."""
        return "+".join(n.name for n in self.sysnodes.values() if has_addr(n, vip))

    def wait_healthy(self, limit: float = 60.0) -> None:
        wait_for(self.healthy, limit, what="every node healthy, VI_1 on lb1, VI_2 on lb2")

    # -- teardown -------------------------------------------------------------------------------

    def down(self) -> None:
        for node in self.sysnodes.values():
            _cgroup_kill(node.cgroup)
            proc = self.containers.get(node.name)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            node.init = None
            node.init_pid = 0
            _unmount_under(node.dir / "c")
        if self.hook is not None:
            self.hook.kill()
            self.hook.wait(5)
            if self.hook.stdout is not None:
                self.hook.stdout.close()
            self.hook = None
        if any(m.startswith(str(self.base) + "/") for m in _mounts()):
            # Never walk into a tree still mounted (the host's root under an overlay).
            self.base = Path(tempfile.mkdtemp(prefix="lbwatch-syslab-leftover-"))
        super().down()

    def __enter__(self) -> SysLab:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise


@contextlib.contextmanager
def installed(
    deb: Path, journal: Literal["always", "on error"] = "always", profile: str = "classic"
) -> Iterator[SysLab]:
    """``with installed(deb) as lab:`` both nodes booted, the package installed and configured,
    lbwatch enabled and started, VI_1 on lb1 and VI_2 on lb2; at the end each node's journal of
    lbwatch, haproxy and keepalived printed (``journal``: always, or only when the block or the
    set-up raised), and the lab torn down whatever happened."""
    lab = SysLab(deb, profile=profile)
    failed = True
    try:
        lab.up()
        lab.start_sinks()
        lab.install()
        lab.wait_healthy(60)
        yield lab
        failed = False
    finally:
        for node in lab.sysnodes.values():
            if node.init_pid and (failed or journal == "always"):
                print(f"----- journal of {node.name} (lbwatch, haproxy, keepalived) -----")
                print(node.journal("-u", "lbwatch", "-u", "haproxy", "-u", "keepalived")[-20000:])
        lab.down()


def has_addr(node: Node, addr: str) -> bool:
    return f" {addr}/" in node.run("ip", "-4", "addr", "show", "dev", "eth0")


def mails(maildir: Path) -> Iterator[str]:
    for path in sorted(maildir.glob("*.eml")):
        yield path.read_text(errors="replace")
