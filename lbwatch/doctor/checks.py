"""The checks of ``lbwatch doctor``, one function per area, each returning its findings: a
one-line statement of what is wrong (or right) and, when something is wrong, the fix.

They read this node's files and ask its daemons only what a look needs (``haproxy -c``, an ssh
session per peer, an SMTP NOOP): nothing here changes the node.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from lbwatch import kaconf
from lbwatch.config import Config
from lbwatch.doctor import units
from lbwatch.heartbeat import vip_address
from lbwatch.notify import writer
from lbwatch.sync import sandbox
from lbwatch.sync.confine import confine_for
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.transport import known_hosts_name

Level = Literal["ok", "warn", "error"]


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    level: Level
    area: str  # keepalived, haproxy, systemd, sync, notify
    what: str
    fix: Optional[str] = None


@dataclass(frozen=True)
class Where:
    """What the checks look at; the defaults are a Debian/RHEL node's."""

    keepalived_conf: Path = Path("/etc/keepalived/keepalived.conf")
    units: tuple[Path, ...] = units.SEARCH
    config_id: Optional[str] = None  # keepalived's -i; default: the node name's first part


def ok(area: str, what: str) -> Finding:
    return Finding(level="ok", area=area, what=what)


def warn(area: str, what: str, fix: str) -> Finding:
    return Finding(level="warn", area=area, what=what, fix=fix)


def error(area: str, what: str, fix: str) -> Finding:
    return Finding(level="error", area=area, what=what, fix=fix)


# -- keepalived --------------------------------------------------------------------------------


def keepalived(cfg: Config, where: Where) -> Iterator[Finding]:
    area = "keepalived"
    path = where.keepalived_conf
    try:
        ka = kaconf.read(path, where.config_id)
    except kaconf.ConfError as exc:
        yield error(area, f"cannot read keepalived's config: {exc}", f"fix {path}")
        return
    fifo = str(cfg.notify.fifo)
    scripts = [*(n for i in ka.instances for n in i.notify), *ka.group_notify]
    by_script = [s for s in scripts if re.search(r"\blbwatch\b.*\bnotify\b", s)]
    if writer.names_fifo(ka.notify_fifo, fifo):
        yield ok(area, f"keepalived reports transitions to lbwatch's FIFO {fifo}")
    elif ka.notify_fifo is not None:
        yield error(
            area,
            f"keepalived writes its notify FIFO {ka.notify_fifo}, lbwatch reads {fifo}",
            f"set notify_fifo {fifo} in global_defs (or [notify] fifo in lbwatch's config)",
        )
    elif by_script and len(by_script) == len(scripts):
        yield ok(area, "keepalived reports transitions through `lbwatch notify` scripts")
    else:
        yield error(
            area,
            "keepalived does not tell lbwatch its VRRP transitions (no notify_fifo, no "
            "`lbwatch notify` script): no mail on failover, VRRP state unknown",
            f"add `notify_fifo {fifo}` to global_defs in {path}",
        )
    for name, (command, at) in sorted(ka.scripts.items()):
        if re.match(r"^\s*(\S*/)?pidof(\s|$)", command):
            yield error(
                area,
                f"vrrp_script {name} ({at}) runs `{command}`: keepalived resolves the pidof "
                "symlink to killall5, which ignores the name, so the check always fails",
                "use `killall -0 haproxy` (or leave haproxy to lbwatch and drop the script)",
            )
    for at in ka.track_process:
        yield warn(
            area,
            f"vrrp_track_process ({at}) needs the kernel's proc connector, which is refused "
            "outside the initial network namespace (containers): there it never sees a change",
            "leave process tracking to lbwatch (it stops keepalived when haproxy dies)",
        )
    yield from _vips(cfg, ka, area)


def _vips(cfg: Config, ka: kaconf.Keepalived, area: str) -> Iterator[Finding]:
    theirs = {i.name: {vip_address(v) for v in i.vips} for i in ka.instances}
    if not cfg.vrrp_instances:
        if theirs:
            yield warn(
                area,
                "lbwatch's config names no VRRP instances: status, metrics and split-brain "
                "detection cannot tell which VIPs this node holds",
                "add [[vrrp_instances]] name and vips for "
                + ", ".join(f"{n} ({', '.join(sorted(v))})" for n, v in sorted(theirs.items())),
            )
        return
    for inst in cfg.vrrp_instances:
        mine = {vip_address(v) for v in inst.vips}
        if inst.name not in theirs:
            yield error(
                area,
                f"lbwatch's VRRP instance {inst.name} is not in keepalived's config",
                f"name it as keepalived does ({', '.join(sorted(theirs)) or 'none there'})",
            )
        elif mine != theirs[inst.name]:
            yield error(
                area,
                f"VIPs of {inst.name}: lbwatch has {', '.join(sorted(mine)) or 'none'}, "
                f"keepalived has {', '.join(sorted(theirs[inst.name])) or 'none'}",
                "make [[vrrp_instances]] vips the addresses of keepalived's virtual_ipaddress",
            )
        else:
            yield ok(area, f"{inst.name}: VIPs as keepalived has them ({', '.join(sorted(mine))})")


# -- haproxy -----------------------------------------------------------------------------------


def haproxy(cfg: Config, where: Where) -> Iterator[Finding]:
    area = "haproxy"
    ha = cfg.haproxy
    config_file = cfg.sync.config
    unit = units.load(f"{ha.unit}.service", where.units)
    argv = list(ha.start) if ha.start else unit.exec_start()
    how = "its start command" if ha.start else f"{ha.unit}.service's ExecStart"
    text = _read(config_file)
    running = _running_argv(ha.pidfile)
    if running:  # what runs says it best: a start command may be a wrapper script
        argv, how = running, f"the running haproxy ({ha.pidfile})"
    master_worker = any(a in ("-W", "-Ws") for a in argv) or bool(
        text and re.search(r"^\s*master-worker\b", text, re.M)
    )
    if not argv and text is None:
        yield warn(area, f"no start command and no {ha.unit}.service found", "install haproxy")
    elif master_worker:
        yield ok(area, f"haproxy runs in master-worker mode ({how})")
    else:
        yield error(
            area,
            f"haproxy does not run in master-worker mode ({how}: {' '.join(argv) or 'none'})",
            "start it with -W (or -Ws under systemd), or set master-worker in global: lbwatch "
            "tells a reload from a restart by the master",
        )
    if "-p" in argv[:-1]:
        written = Path(argv[argv.index("-p") + 1])
        if written != ha.pidfile:
            yield error(
                area,
                f"{how} writes the pidfile {written}, lbwatch watches {ha.pidfile}",
                f"set [haproxy] pidfile = {str(written)!r}",
            )
        else:
            yield ok(area, f"lbwatch watches the pidfile haproxy writes ({written})")
    yield from _health(cfg, text, area)
    yield from _check(cfg, area)


def _running_argv(pidfile: Path) -> list[str]:
    """The command line of the process the pidfile names, if it runs."""
    try:
        pid = int(pidfile.read_text().split()[0])
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _health(cfg: Config, text: str | None, area: str) -> Iterator[Finding]:
    health = cfg.haproxy.health
    if health is None or text is None:
        return
    url = urlsplit(health.url)
    uris = re.findall(r"^\s*monitor-uri\s+(\S+)", text, re.M)
    ports = {int(p) for p in re.findall(r"^\s*bind\s+\S*:(\d+)\b", text, re.M)}
    port = url.port or (443 if url.scheme == "https" else 80)
    if (url.path or "/") in uris and port in ports:
        yield ok(area, f"the health frontend answers {health.url}")
    else:
        yield error(
            area,
            f"[haproxy.health] probes {health.url}, but {cfg.sync.config} has no frontend "
            f"binding port {port} with `monitor-uri {url.path or '/'}`",
            f"add: frontend monitor / bind 127.0.0.1:{port} / mode http / monitor-uri "
            f"{url.path or '/'}",
        )


def _check(cfg: Config, area: str) -> Iterator[Finding]:
    argv = [a.replace("{file}", str(cfg.sync.config)) for a in cfg.sync.check]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        yield error(area, f"cannot run `{' '.join(argv)}`: {exc}", "install haproxy")
        return
    if done.returncode == 0:
        yield ok(area, f"`{' '.join(argv)}` passes")
        return
    lines = [ln for ln in (done.stderr + done.stdout).splitlines() if "ALERT" in ln]
    why = (lines or (done.stderr + done.stdout).splitlines() or ["no output"])[0]
    yield error(area, f"`{' '.join(argv)}` fails: {why.strip()[:300]}", "fix the config")


# -- systemd -----------------------------------------------------------------------------------


def systemd(cfg: Config, where: Where) -> Iterator[Finding]:
    area = "systemd"
    ka = units.load(f"{cfg.keepalived.unit}.service", where.units)
    restart = ka.get("Restart") or "no"
    if ka.path is None:
        yield warn(area, f"no {cfg.keepalived.unit}.service found", "install keepalived")
    elif restart in ("always", "on-success"):
        yield error(
            area,
            f"{ka.path}: Restart={restart}: when lbwatch stops keepalived because haproxy is "
            "down, systemd starts it again and the node takes the VIP back",
            "remove Restart= from keepalived's unit (lbwatch restarts it when it dies)",
        )
    else:
        yield ok(area, f"keepalived's unit leaves restarts to lbwatch (Restart={restart})")
    own = units.load("lbwatch.service", where.units)
    if own.path is None:
        yield warn(
            area,
            "lbwatch is not installed as a systemd unit",
            "install systemd/lbwatch.service (the Debian package does), then "
            "`systemctl enable --now lbwatch`",
        )
        return
    if own.masked:
        yield error(area, f"{own.path}: lbwatch.service is masked, systemd will not start it",
                    "systemctl unmask lbwatch")  # fmt: skip
        return
    argv = own.exec_start()
    program = argv[0] if argv else ""
    if not program or not os.access(program, os.X_OK) or not program.endswith("lbwatch"):
        yield error(
            area,
            f"{own.path}: ExecStart runs {program or 'nothing'!r}, which is not an installed "
            "lbwatch",
            "point ExecStart at the lbwatch command (`command -v lbwatch`)",
        )
    elif own.get("Type") != "notify" or not own.get("WatchdogSec"):
        yield warn(
            area,
            f"{own.path} is not the shipped unit (Type=notify with a watchdog)",
            "install the unit lbwatch ships (systemd/lbwatch.service)",
        )
    else:
        yield ok(area, f"lbwatch's unit runs {program}")


# -- sync --------------------------------------------------------------------------------------


def sync_key(cfg: Config) -> Iterator[Finding]:
    area = "sync"
    s = cfg.sync
    if not s.active():
        return
    try:
        st = s.ssh_key.stat()
    except OSError:
        yield error(
            area,
            f"no sync key at {s.ssh_key}",
            f'ssh-keygen -t ed25519 -N "" -f {s.ssh_key} (or `lbwatch sync setup PEER...`)',
        )
        return
    if stat.S_IMODE(st.st_mode) & 0o077:
        yield error(
            area,
            f"{s.ssh_key} is mode {stat.S_IMODE(st.st_mode):04o}: ssh refuses a private key "
            "others can read",
            f"chmod 600 {s.ssh_key}",
        )
    else:
        yield ok(area, f"sync key {s.ssh_key} is private")
    for peer in s.peers:
        host = known_hosts_name(peer.host, peer.port)
        if s.known_hosts is None:
            break
        found = subprocess.run(
            ["ssh-keygen", "-F", host, "-f", str(s.known_hosts)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if found.returncode != 0:
            yield error(
                area,
                f"{s.known_hosts} has no host key for {peer.name} ({host})",
                f"ssh-keyscan -p {peer.port} {peer.host} >> {s.known_hosts} (check the "
                "fingerprint)",
            )


def received(cfg: Config) -> Iterator[Finding]:
    """How a peer's version would fare here: the confined check can run, and a version like
    this node's own live config would be let through and pass it."""
    area = "sync"
    if not cfg.sync.active():
        return
    r = cfg.sync.received
    files = FileSet(cfg.sync.config, tuple(cfg.sync.extra_files))
    confine = confine_for(cfg, files.config, [Path(p) for p in files.patterns()])
    if confine.sandbox is None:
        yield warn(
            area,
            "versions from peers are checked as root, unconfined (sync.received.sandbox = false)",
            "install bubblewrap and remove `sandbox = false` from [sync.received]",
        )
    elif (absent := sandbox.missing()) is not None:
        yield error(area, f"the check of versions from peers cannot be confined: {absent}",
                    "apt-get install bubblewrap util-linux (dnf install bubblewrap)")  # fmt: skip
        return
    try:
        members = files.unpack(files.read_live())
    except (OSError, ValueError):
        return  # haproxy's own check says what is wrong with the live config
    refused = confine.refused(members, files.config)
    if refused is not None:
        yield warn(
            area,
            f"a version from a peer like this node's own {files.config} would be {refused}",
            "on every node, name what you use in [sync.received] allow, e.g. "
            f'allow = ["{_allow_example(refused)}"]',
        )
        return
    checked = confine.check(cfg.sync.check, files.config, members, cfg.sync.timeout)
    if not checked.ok:
        yield error(
            area,
            f"a version from a peer like this node's own {files.config} fails the confined "
            f"check (as {r.check_user}, no network): {checked.message[:300]}",
            f"make the files it loads readable by {r.check_user} (its group), or sync them "
            "with it ([sync] extra_files)",
        )
        return
    if confine.sandbox is not None:
        yield ok(area, f"versions from peers are checked confined (as {r.check_user}): "
                       f"this node's own {files.config} passes")  # fmt: skip


def _allow_example(refused: str) -> str:
    """An allow entry for the first refusal of a message ("line N: DIRECTIVE ARG: why")."""
    first = refused.removeprefix("refused: ").split(": ")[1]
    return first.replace('"', "")
