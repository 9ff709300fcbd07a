"""The canary of config sync, ``[sync] push_after = "healthy"``: this node's own version goes to
the peers only once haproxy, reloaded on it here, has passed its HTTP health probe ``rise``
times in a row. ``haproxy -c`` proves that a file parses, not that it serves: a config whose
probed frontend was removed passes it. Held here, such a version never reaches a peer, which
keeps serving the version before it.

Pure: the sync service keeps at most one ``Gate`` (a newer version replaces the held one) and
folds each probe result into it with ``judge``; time comes in as values.

Which probes count:

- only those *started* at or after ``Gate.opens``, which is ``SETTLE`` after the reload was
  confirmed. Not "those of this master": a master-worker reload keeps the master and its PID,
  so nothing in a result but its start time tells the old config from the new one;
- ``rise`` passes in a row release the version; a failure starts the count from zero again;
- a probe that could not run at all (an lbwatch fault, ``internal``) counts neither way, as in
  the supervision policy;
- ``fall`` failures in a row are told once per version (the ``config_unhealthy`` alert). The
  version stays held and goes out if it passes later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from lbwatch.events import ProbeResult
from lbwatch.statusdoc import HeldView
from lbwatch.sync.versions import Version

# With haproxy 2.6 the old workers still accept connections for a moment after the new worker
# appears (which is what confirms a reload): measured on 2.6.12, with a config that dropped the
# probed frontend, a probe started within 2 ms of the new worker's appearance was still answered
# by an old worker in 13 of 100, 7 of 100 and 3 of 200 reloads, never one started later
# (bench/reload_race.py). Counting starts 25 times that after the confirmation, so a pass of the
# old config is never taken for the new one's.
SETTLE = 0.05


class Step(str, enum.Enum):
    """What one probe result did to the held version."""

    IGNORED = "ignored"  # started before the gate opened, or could not run: counts neither way
    PASSED = "passed"  # a pass, fewer than `rise` in a row so far
    HEALTHY = "healthy"  # the `rise`-th pass in a row: push it now
    FAILED = "failed"  # a failure: the passes count from zero again
    UNHEALTHY = "unhealthy"  # the `fall`-th failure in a row: tell it (once per version)


@dataclass(frozen=True)
class Gate:
    """This node's version, reloaded here and waiting for its health to be proved."""

    version: Version
    fresh: bool  # made here just now: the peers cannot hold it (PeerLink.set_target's ``fresh``)
    opens: float  # monotonic: probes started from this instant on count
    held_wall: float  # when it was held, for people reading the status
    passes: int = 0  # in a row
    failures: int = 0  # in a row
    counted: int = 0  # probes counted so far
    told: bool = False  # the unhealthy alert went out
    last: str = ""  # the last counted probe's detail


def hold(version: Version, fresh: bool, now: float, wall: float) -> Gate:
    """Hold ``version``, whose reload was confirmed at or before monotonic ``now``."""
    return Gate(version, fresh, now + SETTLE, wall)


def judge(gate: Gate, probe: ProbeResult, rise: int, fall: int) -> tuple[Gate, Step]:
    """Fold one finished probe into ``gate``."""
    if probe.internal or probe.started < gate.opens:
        return gate, Step.IGNORED
    counted = gate.counted + 1
    if probe.ok:
        passes = gate.passes + 1
        gate = replace(gate, passes=passes, failures=0, counted=counted, last=probe.detail)
        return gate, Step.HEALTHY if passes >= rise else Step.PASSED
    failures = gate.failures + 1
    gate = replace(gate, passes=0, failures=failures, counted=counted, last=probe.detail)
    if failures >= fall and not gate.told:
        return replace(gate, told=True), Step.UNHEALTHY
    return gate, Step.FAILED


def probe_wanted(gate: Gate) -> float | None:
    """When the canary wants a probe started, so the wait for the first counted one is short:
    at ``opens`` until one has counted (a probe still running then is not one), after that at
    the probe's own interval (``rise`` passes in a row are meant to be spread over time)."""
    return gate.opens if gate.counted == 0 else None


def status(gate: Gate, rise: int) -> HeldView:
    """The held version in the status document."""
    v = gate.version
    return HeldView(
        digest=v.digest,
        origin=v.origin,
        since=gate.held_wall,
        passes=gate.passes,
        rise=rise,
        failures=gate.failures,
        last=gate.last,
    )


def status_line(held: HeldView) -> str:
    """The held version's line in `lbwatch status` and `lbwatch sync --status`."""
    digest = held.digest[:12]
    if held.failures:
        text = (
            f"{digest} NOT PUSHED: health probe failing on the new config "
            f"({held.failures} in a row; last: {held.last})"
        )
    else:
        text = (
            f"{digest} not pushed yet: waiting for health "
            f"{held.passes}/{held.rise} on the new config"
        )
    return f"  {'  held':<11} {text}"
