"""Configuration: pydantic models (frozen, unknown keys rejected) and ``load(path) -> Config``.

The same ``load`` is used by ``lbwatch check-config``, at start-up and on SIGHUP, so an error reads
the same everywhere: one line per problem, naming the file and the field.

Annotations use ``typing.Optional``/``List`` rather than ``X | None`` because pydantic evaluates
them at run time and lbwatch supports Python 3.9 (RHEL 9's system Python).
"""

import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on RHEL 9 / Debian 11 only
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/lbwatch/lbwatch.toml")

Argv = List[str]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backoff(_Model):
    """Restart pacing for one service: exponential, capped, with a give-up after a burst."""

    initial: float = Field(1.0, gt=0, description="delay before the second start attempt (s)")
    factor: float = Field(2.0, ge=1)
    max: float = Field(30.0, gt=0, description="cap on the delay between attempts (s)")
    stable_after: float = Field(
        10.0, gt=0, description="a process up this long resets the attempt count (s)"
    )
    max_attempts: int = Field(5, ge=1, description="attempts within `window` before giving up")
    window: float = Field(300.0, gt=0)
    giveup_retry: float = Field(300.0, gt=0, description="delay between attempts once given up")


class Health(_Model):
    """Optional HTTP probe, so that a hung haproxy counts as down (monitor-uri or stats URL)."""

    url: str
    interval: float = Field(1.0, gt=0)
    timeout: float = Field(1.0, gt=0)
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
    command_timeout: float = Field(30.0, gt=0)
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


class HaproxyCfg(ServiceCfg):
    pidfile: Path = Path("/run/haproxy.pid")
    process_name: str = "haproxy"
    unit: str = "haproxy"
    health: Optional[Health] = None


class KeepalivedCfg(ServiceCfg):
    pidfile: Path = Path("/run/keepalived.pid")
    process_name: str = "keepalived"
    unit: str = "keepalived"


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
    keepalived_start_delay: float = Field(2.0, ge=0)
    # What a failed keepalived stop command is followed by, after this delay: SIGTERM to the
    # identified keepalived process, because a node with haproxy down must not hold the VIP.
    stop_retry: float = Field(1.0, gt=0)
    # After a start command succeeded, wait this long for the process to show up before another
    # attempt is considered (systemctl start returns before a Type=simple daemon is visible).
    start_confirm: float = Field(5.0, gt=0)


class Agent(_Model):
    node_name: Optional[str] = None  # defaults to the host name
    run_dir: Path = Path("/run/lbwatch")  # status.json, the agent's pidfile
    state_dir: Path = Path("/var/lib/lbwatch")  # the pause flag, which survives restarts
    scan_interval: float = Field(1.0, gt=0, description="psutil rescan period (s)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    agent: Agent = Agent()
    haproxy: HaproxyCfg = HaproxyCfg()
    keepalived: KeepalivedCfg = KeepalivedCfg()
    policy: Policy = Policy()
    vrrp_instances: List[VrrpInstance] = []


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
            problems.append(f"{source}: {_field_path(loc)}: {msg}")
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
    return parse(data, str(path))
