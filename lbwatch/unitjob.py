"""What systemd is doing with a unit whose main process was just seen gone: the properties
lbwatch reads (over systemd's private socket, ``sdbus``, or from the two `systemctl show` queries
where that cannot be reached), and their reading into a ``UnitPlan``. Pure; ``services.ask_unit``
asks.

lbwatch asks when haproxy's master exits without lbwatch stopping it and haproxy is managed
through its unit, so that an operator's `systemctl restart haproxy` does not cost a failover
(``policy.restart_grace``). How systemd 252 shows each case, from its source (src/core/job.c,
service.c, unit.c, dbus-unit.c of v252.31) and as sampled on Debian 12's 252.39 with Debian's
haproxy.service (tests/test_unitjob.py holds the samples):

- `systemctl restart`: a restart job is installed before the stop begins; once the unit is
  inactive it becomes a start job with the same id (job.c, job_finish_and_invalidate: "Patch
  restart jobs so that they become normal start jobs"). haproxy's master is the last of its
  processes to exit, so by the time lbwatch asks, the job is already a start job and the new
  master may run. `try-restart` is the same job on an active unit (job_type_collapse);
  `reload-or-restart` is a reload for a unit with ExecReload= (dbus-unit.c,
  bus_unit_queue_job), so the master stays and nothing is asked.
- `systemctl stop`: a stop job, usually finished before lbwatch asks: inactive, no job.
- A crash (or a SIGTERM from someone else) under Restart=always: no job, SubState auto-restart
  for RestartSec; then systemd queues a restart job itself (service.c, service_enter_restart)
  and counts it in NRestarts. A start that is not such a restart sets NRestarts to 0
  (service_enter_dead sets flush_n_restarts, service_start flushes), and only a start resets
  Result, so a job with NRestarts > 0, or a failed Result, is systemd's own restart, unless it
  is seen sooner after the exit than RestartSec, when Restart= cannot have queued it: an
  operator's restart after earlier crashes, its stop half done and its start not begun
  ("job 782 start; inactive/dead; 2 restarts"), still shows their NRestarts
  (``_before_restart_sec``).

An answer that does not tell reads as UNKNOWN, which lbwatch treats like a crash: the hold it
would buy is lost, never safety.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lbwatch.events import UnitPlan

# Both queries together; an answer that takes longer is UNKNOWN, and the exit is acted on as a
# crash. systemd answers in about 1 ms over its private socket, `systemctl show` in 10-30 ms on
# an idle node (Debian 12, systemd 252).
ASK_TIMEOUT = 1.0

PROPERTIES = (
    *("Job", "ActiveState", "SubState", "Result", "NRestarts", "MainPID"),
    *("RestartUSec", "ExecMainExitTimestampMonotonic"),
)


@dataclass(frozen=True)
class UnitView:
    """The unit's properties as `systemctl show` printed them ("" or 0 when absent)."""

    job: str  # the id of the unit's job, "" for none (`Job=` prints only the id)
    active: str  # ActiveState: active, activating, deactivating, inactive, failed, ...
    sub: str  # SubState: running, start, stop-sigterm, auto-restart, dead, ...
    result: str  # Result: success, signal, exit-code, core-dump, ...
    restarts: int  # NRestarts: restarts systemd itself queued since the last other start
    main_pid: int  # MainPID: 0 for none
    # RestartUSec (None: not read, or not a timespan read here), the main process's exit
    # (ExecMainExitTimestampMonotonic, 0: unknown) and when this view was read, all in
    # microseconds, the last two on CLOCK_MONOTONIC, which lbwatch and PID 1 share.
    restart_usec: int | None = None
    exited_usec: int = 0
    read_usec: int = 0


def unit_query(unit: str) -> list[str]:
    """The unit's state. With -p, systemctl prints a property even when empty (`Job=`)."""
    return ["systemctl", "show", f"--property={','.join(PROPERTIES)}", "--", unit]


def job_query(job: str) -> list[str]:
    """A job's type: `systemctl show` takes a job id where it takes a unit."""
    return ["systemctl", "show", "--property=JobType", job]


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isalnum():
            out[key] = value.strip()
    return out


def _number(value: str) -> int:
    return int(value) if value.isdigit() else 0


def read_unit(text: str, read_usec: int = 0) -> UnitView:
    """Read the unit query's output, read at ``read_usec`` (CLOCK_MONOTONIC); lines that are
    not ``Name=value`` (a warning on the merged output) are passed over."""
    f = _fields(text)
    return UnitView(
        job=f.get("Job", "") if f.get("Job", "").isdigit() else "",
        active=f.get("ActiveState", ""),
        sub=f.get("SubState", ""),
        result=f.get("Result", ""),
        restarts=_number(f.get("NRestarts", "")),
        main_pid=_number(f.get("MainPID", "")),
        restart_usec=timespan_usec(f.get("RestartUSec", "")),
        exited_usec=_number(f.get("ExecMainExitTimestampMonotonic", "")),
        read_usec=read_usec,
    )


# systemctl prints a timespan in its units, largest first ("100ms", "1min 30s"); a bare
# number only as "0".
_SPAN = {"us": 1, "ms": 10**3, "s": 10**6, "min": 60 * 10**6, "h": 3600 * 10**6}
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|min|h)")


def timespan_usec(text: str) -> int | None:
    """A timespan as `systemctl show` prints it, in microseconds; None for what is not read
    here (infinity, days, a bare number other than 0)."""
    if text.strip() == "0":
        return 0
    parts = [_SPAN_PART.fullmatch(p) for p in text.split()]
    if not parts or not all(parts):
        return None
    return round(sum(float(m[1]) * _SPAN[m[2]] for m in parts if m))


def read_bus(props: Mapping[str, object], read_usec: int = 0) -> tuple[UnitView, str]:
    """The unit's properties as ``sdbus.get_properties`` read them at ``read_usec``
    (CLOCK_MONOTONIC), and the object path of its job ("" for none: systemd's Job is (0, "/")
    then)."""
    job = props.get("Job")
    job_id, job_path = job if isinstance(job, tuple) and len(job) == 2 else (0, "/")

    def number(name: str) -> int:
        value = props.get(name)
        return value if isinstance(value, int) else 0

    view = UnitView(
        job=str(job_id) if isinstance(job_id, int) and job_id > 0 else "",
        active=str(props.get("ActiveState", "")),
        sub=str(props.get("SubState", "")),
        result=str(props.get("Result", "")),
        restarts=number("NRestarts"),
        main_pid=number("MainPID"),
        restart_usec=number("RestartUSec") if "RestartUSec" in props else None,
        exited_usec=number("ExecMainExitTimestampMonotonic"),
        read_usec=read_usec,
    )
    return view, str(job_path) if view.job else ""


def read_job_type(text: str) -> str | None:
    """The job query's JobType; None when it printed none (the job finished meanwhile)."""
    return _fields(text).get("JobType") or None


def classify(view: UnitView, job_type: str | None, dead_pid: int) -> UnitPlan:
    """What systemd is doing, from the unit's state and its job's type (None: no job, or it
    finished before its type was read), ``dead_pid`` being the main process seen gone."""
    if job_type == "stop":
        return UnitPlan.STOP
    if view.sub == "auto-restart":
        return UnitPlan.AUTO_RESTART  # Restart= is waiting out RestartSec, or just queued its job
    if view.job:
        # A job of unknown type while activating can only be a start (a stop job deactivates).
        unknown_start = job_type is None and view.active == "activating"
        if job_type not in ("restart", "start") and not unknown_start:
            return UnitPlan.UNKNOWN
        if view.active == "deactivating":
            # The stop half of a restart job: an operator's (systemd's own restart job is queued
            # in auto-restart, where its stop half takes no time).
            return UnitPlan.RESTART
        return _started(view)
    if view.main_pid == dead_pid:
        return UnitPlan.UNKNOWN  # systemd has not taken the exit in yet
    if view.active == "active" and view.main_pid:
        return _started(view)  # done already by the time lbwatch asked
    if view.active in ("inactive", "failed", "deactivating"):
        return UnitPlan.NONE
    return UnitPlan.UNKNOWN


def _started(view: UnitView) -> UnitPlan:
    """The unit is being, or has been, started again: by Restart= when NRestarts counts it or
    the crash's Result still shows (it is reset by the start), else on request."""
    if (view.result != "success" or view.restarts > 0) and not _before_restart_sec(view):
        return UnitPlan.AUTO_RESTART
    return UnitPlan.RESTART


def _before_restart_sec(view: UnitView) -> bool:
    """Read sooner after the exit than RestartSec: Restart= has not queued anything yet, so the
    job is someone else's. NRestarts may still count an earlier crash then: after a stop on
    request systemd zeroes it only at the next start (service.c, service_enter_dead sets
    flush_n_restarts), which is the very start being asked about. The view was read after
    systemd answered, so the time between is an upper bound on what systemd had waited."""
    if view.restart_usec is None or not view.exited_usec or not view.read_usec:
        return False
    return 0 <= view.read_usec - view.exited_usec < view.restart_usec


def describe(view: UnitView, job_type: str | None) -> str:
    """The answer in words, for the log ("job 123 start; activating/start; 0 restarts; main
    PID 53")."""
    job = "no job" if not view.job else f"job {view.job} {job_type or '(finished)'}"
    state = f"{view.active}/{view.sub}"
    if view.result not in ("success", ""):
        state += f", result {view.result}"
    parts = [job, state, f"{view.restarts} restarts"]
    if view.main_pid:
        parts.append(f"main PID {view.main_pid}")
    return "; ".join(parts)
