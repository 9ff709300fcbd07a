"""Counters of what happened, kept on the loop thread by the publisher, handed to the exporter
as a frozen ``Counts``: actions by service, verb and outcome, start attempts, restarts (a new
main process after an earlier one, whoever started it), failovers lbwatch caused, and the health
probe's durations."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lbwatch.events import Action, ActionResult, ProbeResult, ProcId, Service, Verb

# Seconds: the probe's timeout is 1 s by default, and a healthy haproxy answers in a few ms.
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FAILOVER_ALERTS = ("haproxy_down", "haproxy_unhealthy")  # keepalived stopped for these


@dataclass(frozen=True)
class Probes:
    """A histogram of probe durations: counts per bucket (not cumulative), their sum."""

    buckets: tuple[int, ...] = (0,) * (len(PROBE_BUCKETS) + 1)  # the last one: +Inf
    total: float = 0.0

    def add(self, seconds: float) -> Probes:
        i = next((i for i, b in enumerate(PROBE_BUCKETS) if seconds <= b), len(PROBE_BUCKETS))
        counts = list(self.buckets)
        counts[i] += 1
        return Probes(tuple(counts), self.total + seconds)


@dataclass(frozen=True)
class Counts:
    actions: dict[tuple[str, str, str], int] = field(default_factory=dict)  # service, verb, outcome
    start_attempts: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    failovers: dict[str, int] = field(default_factory=dict)  # by FAILOVER_ALERTS reason
    probes: dict[str, Probes] = field(default_factory=dict)  # "ok", "failed"


class Tally:
    def __init__(self) -> None:
        self.actions: Counter[tuple[str, str, str]] = Counter()
        self.start_attempts: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.failovers: Counter[str] = Counter()
        self.probes: dict[str, Probes] = {}
        self._mains: dict[Service, ProcId] = {}  # the main process last seen, per service

    def dispatched(self, action: Action) -> None:
        if action.verb is Verb.START:
            self.start_attempts[action.service.value] += 1
        if action.verb is Verb.STOP and action.alert in FAILOVER_ALERTS:
            self.failovers[action.alert] += 1

    def finished(self, result: ActionResult) -> None:
        a = result.action
        self.actions[(a.service.value, a.verb.value, result.outcome.value)] += 1

    def seen(self, service: Service, proc: ProcId | None) -> None:
        """The service's main process now: a new one after an earlier one is a restart."""
        if proc is None:
            return
        before = self._mains.get(service)
        if before is not None and not before.same_process(proc):
            self.restarts[service.value] += 1
        self._mains[service] = proc

    def probed(self, result: ProbeResult, seconds: float) -> None:
        if result.internal:
            return  # lbwatch's own fault, not a probe of haproxy
        key = "ok" if result.ok else "failed"
        self.probes[key] = self.probes.get(key, Probes()).add(seconds)

    def counts(self) -> Counts:
        return Counts(
            dict(self.actions),
            dict(self.start_attempts),
            dict(self.restarts),
            dict(self.failovers),
            dict(self.probes),
        )
