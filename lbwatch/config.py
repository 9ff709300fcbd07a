"""Configuration: pydantic models (frozen, unknown keys rejected) and ``load(path) -> Config``.

The same ``load`` is used by ``lbwatch check-config``, at start-up and on SIGHUP, so an error reads
the same everywhere: one line per problem, naming the file and the field.

Annotations use ``typing.Optional``/``List`` rather than ``X | None`` because pydantic evaluates
them at run time and lbwatch supports Python 3.9 (RHEL 9's system Python).
"""

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Tuple, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from lbwatch import defaults
from lbwatch.heartbeat import STALE_AFTER
from lbwatch.sync.admit import parse_allow

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on RHEL 9 / Debian 11 only
    import tomli as tomllib

DEFAULT_PATH = Path(defaults.CONFIG_PATH)
DEFAULT_RUN_DIR = Path(defaults.RUN_DIR)

Argv = List[str]

# A day: no interval, timeout or delay of a supervisor is meant to be longer, and a much larger
# one would overflow the event loop's epoll timeout (about 24.8 days) once it is waited on.
MAX_SECONDS = 86400.0


def _seconds_at_least(floor: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        # allow_inf_nan=False refuses inf and nan before this runs; kept as a second line of
        # defence because a comparison with nan is always false.
        if not math.isfinite(value) or value < floor:
            raise ValueError(f"must be at least {floor:g} s")
        if value > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS:g} s (one day)")
        return value

    return check


# Every duration in the file is one of these. The floor keeps a typo such as 1e-9 from turning a
# pacing interval into a busy loop that burns a core or restarts a daemon without pause.
Seconds = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_seconds_at_least(0.1))]
# Where 0 means "no wait" and is a reasonable setting.
SecondsOrZero = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_seconds_at_least(0))]
# The retry after giving up: faster than once a second would not be giving up.
SlowSeconds = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_seconds_at_least(1))]
# split_brain_after: longer than a stopped agent's view may still be served as current (the
# heartbeat's bound, and the receiver's look a tenth of a second later), with a margin, so that
# such a view can never confirm a claim (cluster.splitbrain).
SPLIT_BRAIN_FLOOR = STALE_AFTER + 0.5
SplitBrainSeconds = Annotated[
    float, Field(allow_inf_nan=False), AfterValidator(_seconds_at_least(SPLIT_BRAIN_FLOOR))
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backoff(_Model):
    """Restart pacing for one service: exponential, capped, with a give-up after a burst."""

    initial: Seconds = Field(1.0, description="delay before the second start attempt (s)")
    factor: float = Field(2.0, ge=1, allow_inf_nan=False)
    max: Seconds = Field(30.0, description="cap on the delay between attempts (s)")
    stable_after: Seconds = Field(
        10.0, description="a process up this long resets the attempt count (s)"
    )
    max_attempts: int = Field(5, ge=1, description="attempts within `window` before giving up")
    window: Seconds = 300.0
    giveup_retry: SlowSeconds = Field(300.0, description="delay between attempts once given up")


class Health(_Model):
    """Optional HTTP probe, so that a hung haproxy counts as down (monitor-uri or stats URL)."""

    url: str
    interval: Seconds = 1.0
    timeout: Seconds = 1.0
    fall: int = Field(2, ge=1, description="consecutive failures that mark haproxy down")
    rise: int = Field(2, ge=1, description="consecutive successes that mark haproxy up")

    @model_validator(mode="after")
    def _http_only(self) -> "Health":
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class ServiceCfg(_Model):
    """How to find one daemon and how to control it.

    Every command is an argv list, run without a shell. A command left out defaults to
    ``systemctl VERB UNIT``, so a systemd host needs almost no configuration.
    """

    pidfile: Path
    process_name: str = Field(min_length=1)
    unit: str = Field(min_length=1)
    start: Optional[Argv] = None
    stop: Optional[Argv] = None
    restart: Optional[Argv] = None
    reload: Optional[Argv] = None
    command_timeout: Seconds = 30.0
    # Without a valid pidfile, look for a process of this name whose parent is not of the same
    # name (haproxy's master, keepalived's parent). Off where another instance may run unmanaged.
    find_without_pidfile: bool = True
    backoff: Backoff = Backoff()

    @model_validator(mode="after")
    def _non_empty_commands(self) -> "ServiceCfg":
        for verb in ("start", "stop", "restart", "reload"):
            argv = getattr(self, verb)
            if argv is not None and (not argv or not all(argv)):
                raise ValueError(f"{verb}: must be a non-empty argv list of non-empty strings")
        return self

    def command(self, verb: str) -> Argv:
        argv: Optional[Argv] = getattr(self, verb)
        return list(argv) if argv is not None else ["systemctl", verb, self.unit]

    def via_unit(self) -> bool:
        """systemd starts, stops and restarts it as ``unit``: those commands are `systemctl VERB
        unit` (the default), so what systemd says of that unit is about this daemon."""
        for verb in ("start", "stop", "restart"):
            argv = self.command(verb)
            if Path(argv[0]).name != "systemctl" or argv[1:] != [verb, self.unit]:
                return False
        return True


class HaproxyCfg(ServiceCfg):
    pidfile: Path = Path("/run/haproxy.pid")
    process_name: str = "haproxy"
    unit: str = "haproxy"
    health: Optional[Health] = None


class KeepalivedCfg(ServiceCfg):
    pidfile: Path = Path("/run/keepalived.pid")
    process_name: str = "keepalived"
    unit: str = "keepalived"
    # Read by `lbwatch doctor` (its notify_fifo, scripts and VIPs against lbwatch's).
    config: Path = Path("/etc/keepalived/keepalived.conf")
    # One file per VRRP instance that keepalived.conf tracks (track_file ... weight 1): how
    # lbwatch moves an instance without restarting keepalived (`lbwatch drain`). Under the
    # state directory by default, so that a drain holds across a reboot (see trackfile.py).
    track_dir: Path = Path("/var/lib/lbwatch/track")


class VrrpInstance(_Model):
    """A keepalived VRRP instance this node takes part in; lets `status` say which VIPs it holds."""

    name: str = Field(min_length=1)
    vips: List[str] = []


class Policy(_Model):
    # "ensure": a haproxy restarted by someone else only makes sure keepalived runs.
    # "restart": also restart keepalived, like the classic script; off by default because a
    # keepalived restart sends a priority-0 advertisement and moves the VIP away and back.
    on_haproxy_restart: Literal["ensure", "restart"] = "ensure"
    # haproxy must have been up (and healthy, with a probe) this long before keepalived is
    # started, so a crash-looping haproxy does not pull the VIP back again and again.
    keepalived_start_delay: SecondsOrZero = 2.0
    # What a failed keepalived stop command is followed by, after this delay: SIGTERM to the
    # identified keepalived process, because a node with haproxy down must not hold the VIP.
    stop_retry: Seconds = 1.0
    # After a start command succeeded, wait this long for the process to show up before another
    # attempt is considered (systemctl start returns before a Type=simple daemon is visible).
    start_confirm: Seconds = 5.0
    # haproxy's master exited while systemd restarts haproxy's unit (`systemctl restart`): keep
    # keepalived (and lbwatch's own start of haproxy) waiting this long for the new master to run
    # and pass its probe, instead of moving the VIP away and back. 0: off. Asked only when
    # haproxy's commands are systemctl's and systemd runs; see unitjob.py.
    restart_grace: SecondsOrZero = 5.0
    # haproxy here cannot serve and no peer can take this node's VIP over (their haproxy down
    # too, their keepalived stopped, paused: ``handover``): keepalived is kept running, said at
    # once in the log and the status, and mailed (agent:vip_kept) if it lasts this long.
    kept_alert_after: Seconds = 10.0


class Email(_Model):
    """SMTP delivery. The password never sits in this file: give ``password_file`` or the name of
    a systemd credential (``LoadCredential=NAME:...``, read from ``$CREDENTIALS_DIRECTORY``)."""

    host: str = Field(min_length=1)
    port: Optional[int] = Field(None, ge=1, le=65535)  # 25, 587 with starttls, 465 with tls
    security: Literal["plain", "starttls", "tls"] = "starttls"
    username: Optional[str] = None
    password_file: Optional[Path] = None
    password_credential: Optional[str] = None
    sender: str = Field(min_length=3, description="the From: address")
    to: List[str] = Field(min_length=1)
    timeout: Seconds = 10.0
    # CA bundle the server's certificate is verified against (a private CA); default: the
    # system's. Verification is never switched off.
    ca_file: Optional[Path] = None
    # security = "plain" with a username sends the password in clear: refused unless this says
    # it is meant (a relay on a trusted link).
    allow_plain_password: bool = False
    # An idle connection is kept this long for the next message (one the server has closed
    # meanwhile is replaced); 0: closed as soon as nothing waits.
    keep_open: SecondsOrZero = 30.0

    @model_validator(mode="after")
    def _password_source(self) -> "Email":
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("give password_file or password_credential, not both")
        if self.username is None and (self.password_file or self.password_credential):
            raise ValueError("a password needs a username")
        if self.security == "plain" and self.username is not None and not self.allow_plain_password:
            raise ValueError(
                'security = "plain" with a username sends the password in clear: use "starttls" '
                'or "tls", or set allow_plain_password = true if that is meant'
            )
        for addr in (self.sender, *self.to):
            if "@" not in addr or any(c in addr for c in "\r\n<>,; "):
                raise ValueError(f"not a plain e-mail address: {addr!r}")
        return self

    def smtp_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"plain": 25, "starttls": 587, "tls": 465}[self.security]


class Webhook(_Model):
    """POST JSON to ``url``; the payload's ``text`` field is what Slack-style receivers show."""

    name: str = Field("webhook", min_length=1)
    url: str
    timeout: Seconds = 5.0
    verify: bool = True  # TLS certificate verification; only turn off for a lab

    @model_validator(mode="after")
    def _http_only(self) -> "Webhook":
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class Route(_Model):
    """Events matching any pattern in ``events`` go to ``channels`` ("email", a webhook's name,
    or "*"). Event names: vrrp:STATE (MASTER, BACKUP, FAULT, ...), lvs:UP, lvs:DOWN,
    agent:KIND (haproxy_down, keepalived_restarted, giveup, ...); shell-style wildcards."""

    events: List[str] = Field(min_length=1)
    channels: List[str] = Field(["*"], min_length=1)


DEFAULT_ROUTES = (Route(events=["vrrp:MASTER", "vrrp:FAULT", "agent:*"], channels=["*"]),)


class Notify(_Model):
    fifo: Path = Path(defaults.NOTIFY_FIFO)  # why directly under /run: see defaults.py
    spool_dir: Optional[Path] = None  # default: <agent.state_dir>/spool
    spool_max: int = Field(1000, ge=1, description="messages kept per channel before dropping")
    flap_window: Seconds = 60.0
    flap_max: int = Field(3, ge=1, description="messages per instance and window sent one by one")
    dedupe_window: SecondsOrZero = 60.0
    retry_initial: Seconds = 2.0
    retry_max: Seconds = 300.0
    email: Optional[Email] = None
    webhooks: List[Webhook] = []
    routes: List[Route] = list(DEFAULT_ROUTES)

    @model_validator(mode="after")
    def _channels_known(self) -> "Notify":
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names) or "email" in names:
            raise ValueError("webhook names must be unique and not 'email'")
        known = {"*", *names, *(["email"] if self.email else [])}
        for route in self.routes:
            for channel in route.channels:
                if channel not in known and not (channel == "email" and self.email is None):
                    raise ValueError(f"route names an unknown channel {channel!r}")
        return self

    def channel_names(self) -> List[str]:
        return (["email"] if self.email else []) + [w.name for w in self.webhooks]


class SyncPeer(_Model):
    """Another node that receives this node's config edits (rsync over ssh into its staging)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", min_length=1)


def _allow_entry(entry: str) -> str:
    parse_allow(entry)  # the grammar lives with the rule that reads it
    return entry


class Received(_Model):
    """What a version received from a peer may do on this node, and how it is checked: see
    sync/admit.py (the directives) and sync/sandbox.py (the check)."""

    # "DIRECTIVE [PATTERN]": a directive that runs code, creates a file or socket, or connects
    # to a local socket, which a received version may use (with a path matching PATTERN; `*`
    # matches across `/`), beyond the defaults for haproxy's own run and state directories.
    allow: List[Annotated[str, AfterValidator(_allow_entry)]] = []
    # Check received versions confined (unprivileged, no network, read-only, limits). Off only
    # where bubblewrap cannot run; the check then runs as root, as for a local edit.
    sandbox: bool = True
    check_user: str = Field("haproxy", min_length=1, pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
    check_memory: int = Field(
        1024, ge=64, le=65536, description="address space of the confined check (MiB)"
    )


class Sync(_Model):
    """haproxy config sync: a local edit is validated, reloaded and pushed to ``peers``; a version
    a peer pushes into ``staging_dir`` is validated, installed and reloaded here. Off while
    ``peers`` is empty and ``enabled`` is false."""

    enabled: bool = False
    config: Path = Path("/etc/haproxy/haproxy.cfg")
    # Files the config names (maps, ACL lists, certificates), absolute paths or globs: they
    # travel with it as one version, so a config never arrives before the map it uses.
    extra_files: List[str] = []
    peers: List[SyncPeer] = []
    # "{file}" is replaced by the file to check: the live file for a local edit, the staged
    # copy for a received one. Only exit 0 counts as valid.
    check: Argv = ["haproxy", "-c", "-f", "{file}"]
    staging_dir: Optional[Path] = None  # default: <agent.state_dir>/incoming
    backups: int = Field(5, ge=0, description="generations kept beside the live file")
    ssh_key: Path = Path("/etc/lbwatch/sync_key")
    known_hosts: Optional[Path] = Path("/etc/lbwatch/known_hosts")
    # Short on purpose: ssh's control socket path must fit in 107 bytes.
    control_dir: Path = Path("/run/lbwatch/ssh")
    timeout: Seconds = Field(10.0, description="per command: check, reload, rsync (s)")
    debounce: SecondsOrZero = Field(0.2, description="quiet time before a change is taken (s)")
    reload_confirm: Seconds = Field(5.0, description="wait for haproxy's new workers (s)")
    peer_confirm: Seconds = Field(10.0, description="wait for a peer to apply a push (s)")
    retry_initial: Seconds = 1.0
    retry_max: Seconds = 60.0
    # Anything in staging_dir unchanged this long that is not the newest version waiting to be
    # taken is removed: keep it well above 2 x timeout, the longest a push may take.
    staging_grace: Seconds = Field(600.0, description="litter in staging_dir removed after (s)")
    # What one peer's sync key may take from this node (its receivers read them from staging,
    # see sync/limits.py): sessions at once per key, and what staging may hold, bodies being
    # received included. A version is at most 64 MiB whatever these say.
    receiver_sessions: int = Field(8, ge=2, le=64, description="per peer key, at once")
    staging_max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024, le=2**40)
    staging_max_files: int = Field(64, ge=2, le=100_000)
    # When this node's own version goes to the peers: "check", once it passed the check, while
    # it reloads here (a failed reload sends the restored version after it); "healthy", once
    # its reload here was confirmed and [haproxy.health] has passed `rise` times in a row on it
    # (a canary: slower, but a config that passes the check and serves nothing stays on this
    # node). See sync/canary.py.
    push_after: Literal["check", "healthy"] = "check"
    received: Received = Received()

    @model_validator(mode="after")
    def _sane(self) -> "Sync":
        if not self.check or not all(self.check):
            raise ValueError("check: must be a non-empty argv list of non-empty strings")
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names):
            raise ValueError("peer names must be unique")
        for pattern in self.extra_files:
            if not pattern.startswith("/") or any(c in str(Path(pattern).parent) for c in "*?["):
                raise ValueError(
                    f"extra_files: {pattern!r}: an absolute path; wildcards in the name only"
                )
        if len(str(self.control_dir)) > 50:
            raise ValueError("control_dir: keep it under 50 characters (ssh's socket path limit)")
        return self

    def active(self) -> bool:
        return self.enabled or bool(self.peers)


class Cluster(_Model):
    """Seeing the group: each node's agent writes a view of its node into its staging, and
    watches its sync peers' views over the sync key (``lbwatch status --cluster``); on them it
    detects split brain. Needs config sync's peers."""

    watch: bool = True
    # Two nodes claiming one VRRP instance (MASTER, or holding its VIPs) for this long is a
    # split brain: both agents alert. A failover's overlap is far shorter.
    split_brain_after: SplitBrainSeconds = 3.0
    # Resolve a declared split brain: the node VRRP would make BACKUP stands down for the
    # instance (FAULT through its track file) while the peer link shows the other serving and
    # holding it, until VRRP between the nodes works again (cluster/standdown.py).
    resolve_split_brain: bool = True


class MetricsCfg(_Model):
    """Prometheus metrics, off unless one of these is set: ``listen``, an address for an HTTP
    listener answering ``GET /metrics`` ("127.0.0.1:9640", "[::1]:9640"); ``textfile``, a file
    for node_exporter's textfile collector (a .prom file in its --collector.textfile.directory)."""

    listen: Optional[str] = None
    textfile: Optional[Path] = None
    textfile_interval: Seconds = Field(15.0, description="the textfile rewritten at most (s)")

    @model_validator(mode="after")
    def _address(self) -> "MetricsCfg":
        if self.listen is not None:
            self.address()
        if self.textfile is not None and not self.textfile.is_absolute():
            raise ValueError("textfile: an absolute path")
        return self

    def address(self) -> Tuple[str, int]:
        """``listen`` as (host, port); an IPv6 host without its brackets."""
        assert self.listen is not None
        host, sep, port = self.listen.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""  # an IPv6 address needs its brackets, or the port is ambiguous
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f'listen: {self.listen!r}: an address and a port, as "127.0.0.1:9640" or '
                '"[::1]:9640"'
            )
        return host, int(port)


class Agent(_Model):
    node_name: Optional[str] = None  # defaults to the host name
    run_dir: Path = DEFAULT_RUN_DIR  # status.json, the agent's pidfile
    state_dir: Path = Path("/var/lib/lbwatch")  # the pause flag, which survives restarts
    scan_interval: Seconds = Field(1.0, description="psutil rescan period (s)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    agent: Agent = Agent()
    haproxy: HaproxyCfg = HaproxyCfg()
    keepalived: KeepalivedCfg = KeepalivedCfg()
    policy: Policy = Policy()
    vrrp_instances: List[VrrpInstance] = []
    notify: Notify = Notify()
    sync: Sync = Sync()
    cluster: Cluster = Cluster()
    metrics: MetricsCfg = MetricsCfg()

    @model_validator(mode="after")
    def _canary_needs_probe(self) -> "Config":
        # Across two sections, so the message names its field itself (see ``parse``).
        if self.sync.push_after == "healthy" and self.haproxy.health is None:
            raise ValueError(
                'sync.push_after: "healthy" needs the [haproxy.health] probe; '
                'configure one or set push_after = "check"'
            )
        return self

    def staging_path(self) -> Path:
        return self.sync.staging_dir or self.agent.state_dir / "incoming"

    def fifo_path(self) -> Path:
        return self.notify.fifo

    def spool_path(self) -> Path:
        return self.notify.spool_dir or self.agent.state_dir / "spool"


class ConfigError(Exception):
    """The config could not be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _field_path(loc: Tuple[Union[int, str], ...]) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += ("." if out else "") + item
    return out or "(top level)"


def parse(data: Dict[str, Any], source: str) -> Config:
    """Validate already-decoded TOML; errors name ``source`` and the field."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(x for x in err["loc"] if not str(x).startswith("function-"))
            msg = re.sub(r" for <class '[\w.]+'>", "", err["msg"].removeprefix("Value error, "))
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            # A check across sections (at the top level) names its field in its message.
            where = f"{_field_path(loc)}: " if loc else ""
            problems.append(f"{source}: {where}{msg}")
        raise ConfigError(problems) from None


def load(path: Path) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError([f"{path}: not valid TOML: nested too deeply"]) from None
    return parse(data, str(path))


def run_dir_hint(path: Path) -> Path:
    """The run directory a file that may not validate names: ``[agent] run_dir`` if the file
    parses as TOML and that one value is a string, else the default. Lets ``status``, ``pause``
    and ``resume`` find a running agent while its config file is broken."""
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return DEFAULT_RUN_DIR
    agent = data.get("agent")
    run_dir = agent.get("run_dir") if isinstance(agent, dict) else None
    return Path(run_dir) if isinstance(run_dir, str) and run_dir else DEFAULT_RUN_DIR
