"""The status document (``status.json`` under ``agent.run_dir``), defined once: the agent builds
it from these frozen models (``publish``), ``lbwatch status``, ``sync --status`` and ``pause``
read it through them, and tests that need a document write it through them.
``lbwatch status --json`` prints it as written.

Reading is lenient about what it does not know (``extra="ignore"``, defaults for what an
older agent did not write): the CLI may be newer than the agent that is running.

Field annotations use ``typing.Optional``, not ``X | None``: pydantic evaluates them, and
Python 3.9 cannot.
"""

from __future__ import annotations

import json
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class AgentInfo(_Part):
    pid: int
    start_ticks: int  # boot-relative: with the PID, tells whether the writer still runs
    create_time: float  # wall clock, for reading
    node: str
    version: str
    config: Optional[str] = None
    state_dir: str = ""  # where the pause flag lives


class ServiceView(_Part):
    running: bool
    pid: Optional[int] = None
    started: Optional[float] = None
    children: list[int] = Field(default_factory=list)
    in_progress: Optional[str] = None
    attempts: int = 0
    given_up: bool = False
    next_attempt_in: Optional[float] = None
    down_reason: Optional[str] = None
    last_failure: Optional[str] = None


class HealthView(_Part):
    url: Optional[str] = None
    state: str = "unknown"
    detail: Optional[str] = None


class ActionEntry(_Part):
    at: float
    seq: int
    action: str
    reason: str
    outcome: str  # "in progress" until it finished
    detail: Optional[str] = None
    duration: Optional[float] = None


class PauseInfo(_Part):
    since: float = 0.0
    reason: str = ""
    by: str = ""


class VipsView(_Part):
    """A VRRP instance or sync group on this node: its VRRP state as keepalived last reported it
    on the notify FIFO ("unknown" until it reports one; "STOP" while keepalived is not running),
    and which of its VIPs sit on this node's interfaces."""

    state: str = "unknown"
    vips: list[str] = Field(default_factory=list)
    held: list[str] = Field(default_factory=list)


class ChannelView(_Part):
    waiting: int = 0
    dropped: int = 0
    delivered: int = 0
    rejected: int = 0
    failed: int = 0  # failed delivery attempts since the agent started
    failures_in_a_row: int = 0
    retry_in: Optional[float] = None
    last_ok: Optional[float] = None
    last_error: Optional[str] = None


class NotifyView(_Part):
    fifo: Optional[str] = None
    fifo_error: Optional[str] = None
    fifo_notice: Optional[str] = None
    fifo_unread: Optional[str] = None  # keepalived writes another FIFO, or none (notify.writer)
    malformed_lines: int = 0
    spool: str = ""
    held_in_memory: int = 0
    channels: dict[str, ChannelView] = Field(default_factory=dict)


class VersionView(_Part):
    """A config version as the document shows it."""

    origin: str
    counter: int = 0
    edited: float  # wall-clock seconds of the edit, on its origin's clock
    digest: str


class JobView(_Part):
    """The last local sync job's outcome."""

    result: str
    message: str = ""
    at: float = 0.0


class ReceivedView(_Part):
    """The last version received from a peer, and what became of it."""

    result: str
    message: str = ""
    origin: str = Field("?", alias="from")
    version: Optional[VersionView] = None
    at: float = 0.0


class HeldView(_Part):
    """This node's version held back from the peers by the canary."""

    digest: str
    origin: str
    since: float
    passes: int
    rise: int
    failures: int
    last: Optional[str] = None


class PeerDoc(_Part):
    state: str
    since: float
    message: str = ""
    target: Optional[VersionView] = None
    peer_digest: Optional[str] = None
    pushes: int = 0
    failures: int = 0  # attempts that failed to reach it, since the agent started
    last_in_sync: Optional[float] = None  # wall clock: when it last left in-sync


class SyncView(_Part):
    """Config sync on this node; ``file`` None: not running (``error`` says why, if it
    failed to start)."""

    error: Optional[str] = None
    file: Optional[str] = None
    extra_files: list[str] = Field(default_factory=list)
    staging: Optional[str] = None
    current: Optional[VersionView] = None
    local: Optional[JobView] = None
    received: Optional[ReceivedView] = None
    held: Optional[HeldView] = None
    peers: dict[str, PeerDoc] = Field(default_factory=dict)


class AuthView(_Part):
    """An instance's VRRP authentication as peers may see it: never the password
    (``lbwatch.vrrpview.auth_check`` says what stands for it, and why that is safe)."""

    type: Optional[str] = None  # PASS, AH; None: no authentication
    check: Optional[str] = None  # two hex digits that differ, 255 times in 256, between passwords


class TrackView(_Part):
    kind: str  # "script", "interface"
    name: str
    weight: int


class VrrpSettings(_Part):
    """An instance's settings in keepalived.conf: what peers must agree on. The fields after
    ``version`` are None in a view from an lbwatch older than them: "cannot compare"."""

    state: Optional[str] = None
    priority: Optional[int] = None  # as keepalived runs it (kaconf.priority); older: as written
    advert_int: Optional[float] = None
    version: Optional[int] = None
    vrid: Optional[int] = None
    vips: Optional[list[str]] = None  # addresses, without prefix length or dev
    interface: Optional[str] = None  # where its advertisements go (and come from)
    auth: Optional[AuthView] = None
    tracks: Optional[list[TrackView]] = None


class KeepalivedConfView(_Part):
    """keepalived.conf as the agent last read it (``[keepalived] config``)."""

    path: str
    error: Optional[str] = None  # it could not be read
    instances: dict[str, VrrpSettings] = Field(default_factory=dict)


class NodeService(_Part):
    running: bool = False
    given_up: bool = False
    down_reason: Optional[str] = None


class LastAction(_Part):
    at: float
    action: str
    outcome: str
    reason: str = ""


class NodeAgent(_Part):
    pid: int
    start_ticks: int  # the receiver checks these against /proc before answering for the view
    version: str
    # The file the agent renews every second (``lbwatch.heartbeat``): the receiver answers for
    # the view only while it is fresh. None: an agent older than the heartbeat.
    heartbeat: Optional[str] = None


class NodeView(_Part):
    """What a node's agent tells its peers about the node (``node.json`` in its staging, read
    over the sync key): written by ``cluster.nodeview`` from the status document, read by the
    peers' cluster watch for ``status --cluster`` and split-brain detection."""

    node: str
    agent: NodeAgent
    paused: bool = False
    drained: list[str] = Field(default_factory=list)  # instances drained here (lbwatch drain)
    sources: dict[str, str] = Field(default_factory=dict)  # each instance's VRRP source address
    standing_down: list[str] = Field(default_factory=list)  # in FAULT for a split brain's end
    haproxy: NodeService = Field(default_factory=NodeService)
    keepalived: NodeService = Field(default_factory=NodeService)
    health: str = "unknown"
    # Keyed "VI_1" for an instance, "group:G1" for a sync group.
    vrrp: dict[str, VipsView] = Field(default_factory=dict)
    config: Optional[VersionView] = None  # the haproxy config version this node holds
    last_action: Optional[LastAction] = None
    keepalived_conf: Optional[KeepalivedConfView] = None
    written: float = 0.0  # wall clock, on the node's own clock: for reading only


class PeerNode(_Part):
    """A peer as this node's cluster watch last heard it."""

    # "up", "agent down", "agent not responding", "unreachable", "no view", "rrsync", "starting"
    state: str
    since: float  # wall clock: in this state since
    reason: str = ""
    view: Optional[NodeView] = None  # the last view heard (current only while "up")


class SplitBrainView(_Part):
    """A VRRP instance claimed by more than one node (MASTER, or holding its VIPs)."""

    instance: str
    nodes: list[str]
    vips: list[str] = Field(default_factory=list)
    since: float  # wall clock, when this node first saw it
    declared: bool = False  # seen for split_brain_after: alerted
    waiting: str = ""  # what the decision waits for (a peer that cannot be asked)


class ClusterView(_Part):
    peers: dict[str, PeerNode] = Field(default_factory=dict)
    split_brain: list[SplitBrainView] = Field(default_factory=list)


class ClusterReport(_Part):
    """``lbwatch status --cluster --json``: every node, this one included (its view built from
    its status as its peers get it)."""

    seen_from: str
    watching: bool  # False: this node watches no peers (no sync peers, or watch off)
    nodes: dict[str, PeerNode] = Field(default_factory=dict)
    split_brain: list[SplitBrainView] = Field(default_factory=list)


class DrainView(_Part):
    """The operator's drain (``lbwatch drain``): what was asked (``instances``; empty: every
    instance), which instances it covers here, and which of them keepalived's track files
    already say are drained."""

    instances: list[str] = Field(default_factory=list)
    since: float = 0.0
    reason: str = ""
    by: str = ""
    covers: list[str] = Field(default_factory=list)
    applied: list[str] = Field(default_factory=list)
    no_lever: list[str] = Field(default_factory=list)  # keepalived.conf does not track the file


class KeptView(_Part):
    """haproxy here cannot serve, and keepalived keeps the VIP because no peer can take it."""

    since: float  # wall clock
    why: str


class StatusDoc(_Part):
    agent: AgentInfo
    summary: str
    ready: bool = False
    paused: bool = False
    kept: Optional[KeptView] = None
    drain: Optional[DrainView] = None
    # keepalived's track files as last read (``trackfile``): instance -> value (None: none)
    track: dict[str, Optional[int]] = Field(default_factory=dict)
    # each instance's VRRP source address (``publish.vrrp_sources``): VRRP's tie-break
    sources: dict[str, str] = Field(default_factory=dict)
    # instances standing down in a split brain (``cluster.standdown``), with why
    standing_down: dict[str, str] = Field(default_factory=dict)
    services: dict[str, ServiceView] = Field(default_factory=dict)
    health: HealthView = Field(default_factory=HealthView)
    recent_actions: list[ActionEntry] = Field(default_factory=list)
    pause: Optional[PauseInfo] = None
    vrrp: dict[str, VipsView] = Field(default_factory=dict)
    notify: Optional[NotifyView] = None
    sync: Optional[SyncView] = None
    cluster: Optional[ClusterView] = None
    keepalived_conf: Optional[KeepalivedConfView] = None
    updated: float = 0.0

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=1).encode()


class StatusReport(_Part):
    """``lbwatch status --json``: the document as the agent wrote it, and whether that agent
    still runs."""

    agent_running: bool
    problem: Optional[str] = None
    status: Optional[StatusDoc] = None


class PeerVerdictView(_Part):
    sync: str
    why: str = ""


class SyncReport(_Part):
    """``lbwatch sync --status --json`` and ``sync --now --json``: the verdict, its exit code,
    and the sync part of the status it was judged on."""

    exit: int
    ok: bool
    problems: list[str] = Field(default_factory=list)
    peers: dict[str, PeerVerdictView] = Field(default_factory=dict)
    node: Optional[str] = None
    sync: Optional[SyncView] = None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=1, sort_keys=True)
