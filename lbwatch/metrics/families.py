"""The metric families, built at each scrape from the last status document and counters: pure,
the time comes in as ``now`` (wall clock, for the one "as of now" timestamp). Names follow
Prometheus's conventions: the ``lbwatch_`` prefix, base units in names (``_seconds``),
``_total`` counters (prometheus_client adds the suffix), timestamps rather than ages, and an
enum as one series per possible value (1 for the current one) with labels of few values.
A VRRP instance's label is ``vrrp``: ``instance`` is Prometheus's own target label.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbwatch.cluster.service import STARTING
from lbwatch.cluster.watch import STATES
from lbwatch.events import Health, Service
from lbwatch.metrics.tally import PROBE_BUCKETS, Counts
from lbwatch.notify.rules import TRANSITIONS
from lbwatch.statusdoc import StatusDoc
from lbwatch.sync.peers import PeerState

SERVICES = tuple(s.value for s in Service)
HEALTH_STATES = tuple(h.value for h in Health)
VRRP_STATES = (*sorted(TRANSITIONS), "unknown")
PEER_STATES = tuple(s.value for s in PeerState)
CLUSTER_STATES = (*STATES, STARTING)


def _onehot(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], str]],
            values: tuple[str, ...]) -> GaugeMetricFamily:  # fmt: skip
    """One series per possible value of an enum, 1 for the current one; ``rows``: the other
    labels' values and the current value (one outside ``values`` is shown as itself)."""
    g = GaugeMetricFamily(name, doc, labels=[*labels, "state"])
    for keys, current in rows:
        for value in values if current in values else (*values, current):
            g.add_metric([*keys, value], 1.0 if value == current else 0.0)
    return g


def families(doc: StatusDoc, counts: Counts, now: float) -> Iterator[Metric]:
    yield from _agent(doc)
    yield from _services(doc, counts)
    yield from _health(doc, counts)
    yield from _vrrp(doc)
    yield from _sync(doc, now)
    yield from _notify(doc)
    yield from _cluster(doc)


def _agent(doc: StatusDoc) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "lbwatch_build_info", "lbwatch's version and Python's", labels=["version", "python"]
    )
    info.add_metric([doc.agent.version, platform.python_version()], 1.0)
    yield info
    yield GaugeMetricFamily("lbwatch_agent_up", "1 while the agent runs", value=1.0)
    yield GaugeMetricFamily(
        "lbwatch_agent_start_time_seconds", "when the agent started", value=doc.agent.create_time
    )
    yield GaugeMetricFamily(
        "lbwatch_paused", "1 during a maintenance pause", value=1.0 if doc.paused else 0.0
    )


def _services(doc: StatusDoc, counts: Counts) -> Iterator[Metric]:
    up = GaugeMetricFamily("lbwatch_service_up", "main process running", labels=["service"])
    given = GaugeMetricFamily(
        "lbwatch_service_given_up", "1 after repeated failed starts", labels=["service"]
    )
    starts = CounterMetricFamily(
        "lbwatch_service_start_attempts", "starts lbwatch ran", labels=["service"]
    )
    restarts = CounterMetricFamily(
        "lbwatch_service_restarts",
        "a new main process after an earlier one, whoever started it",
        labels=["service"],
    )
    for name in SERVICES:
        svc = doc.services.get(name)
        up.add_metric([name], 1.0 if svc is not None and svc.running else 0.0)
        given.add_metric([name], 1.0 if svc is not None and svc.given_up else 0.0)
        starts.add_metric([name], counts.start_attempts.get(name, 0))
        restarts.add_metric([name], counts.restarts.get(name, 0))
    yield from (up, given, starts, restarts)
    actions = CounterMetricFamily(
        "lbwatch_actions", "actions finished", labels=["service", "verb", "outcome"]
    )
    for (service, verb, outcome), n in sorted(counts.actions.items()):
        actions.add_metric([service, verb, outcome], n)
    yield actions
    failovers = CounterMetricFamily(
        "lbwatch_failovers",
        "keepalived stopped by lbwatch so the VIP moves (haproxy down or unhealthy)",
        labels=["reason"],
    )
    for reason in ("haproxy_down", "haproxy_unhealthy"):
        failovers.add_metric([reason], counts.failovers.get(reason, 0))
    yield failovers


def _health(doc: StatusDoc, counts: Counts) -> Iterator[Metric]:
    if doc.health.url is None:
        return
    yield _onehot(
        "lbwatch_health_state",
        "haproxy's health as the probe concluded (after fall and rise)",
        [],
        [([], doc.health.state)],
        HEALTH_STATES,
    )
    h = HistogramMetricFamily(
        "lbwatch_health_probe_duration_seconds", "one probe of haproxy", labels=["result"]
    )
    for result in ("ok", "failed"):
        p = counts.probes.get(result)
        if p is None:
            continue
        cumulative, running = [], 0
        for bound, n in zip((*map(str, PROBE_BUCKETS), "+Inf"), p.buckets):
            running += n
            cumulative.append((bound, float(running)))
        h.add_metric([result], cumulative, p.total)
    yield h


def _vrrp(doc: StatusDoc) -> Iterator[Metric]:
    rows = []
    for key, inst in sorted(doc.vrrp.items()):
        kind, name = ("group", key[6:]) if key.startswith("group:") else ("instance", key)
        rows.append(([kind, name], inst.state))
    yield _onehot(
        "lbwatch_vrrp_state",
        "VRRP state as keepalived last reported it on the notify FIFO",
        ["kind", "vrrp"],
        rows,
        VRRP_STATES,
    )
    held = GaugeMetricFamily(
        "lbwatch_vip_held", "the VIP is on this node's interfaces", labels=["vrrp", "vip"]
    )
    for key, inst in sorted(doc.vrrp.items()):
        for vip in inst.vips:
            held.add_metric([key, vip], 1.0 if vip in inst.held else 0.0)
    yield held
    drained = GaugeMetricFamily(
        "lbwatch_drained",
        "1 while the instance is drained here (lbwatch drain) and its track file says so",
        labels=["vrrp"],
    )
    applied = set(doc.drain.applied) if doc.drain is not None else set()
    for key in sorted(doc.vrrp):
        if not key.startswith("group:"):
            drained.add_metric([key], 1.0 if key in applied else 0.0)
    yield drained
    standing = GaugeMetricFamily(
        "lbwatch_standing_down",
        "1 while the instance stands down here (FAULT) to end a split brain",
        labels=["vrrp"],
    )
    for key in sorted(doc.vrrp):
        if not key.startswith("group:"):
            standing.add_metric([key], 1.0 if key in doc.standing_down else 0.0)
    yield standing
    yield GaugeMetricFamily(
        "lbwatch_vip_kept",
        "1 while haproxy here cannot serve and keepalived keeps the VIP: no peer can take it",
        value=1 if doc.kept is not None else 0,
    )


def _sync(doc: StatusDoc, now: float) -> Iterator[Metric]:
    sync = doc.sync
    if sync is None or sync.file is None:
        return
    if sync.current is not None:
        yield GaugeMetricFamily(
            "lbwatch_sync_version_edited_timestamp_seconds",
            "when the config version this node holds was edited (on its origin's clock)",
            value=sync.current.edited,
        )
        yield GaugeMetricFamily(
            "lbwatch_sync_version_counter",
            "the edit counter of the version this node holds",
            value=sync.current.counter,
        )
    peers = sorted(sync.peers.items())
    yield _onehot(
        "lbwatch_sync_peer_state",
        "each peer as this node's sync link sees it",
        ["peer"],
        [([name], p.state) for name, p in peers],
        PEER_STATES,
    )
    pushes = CounterMetricFamily("lbwatch_sync_pushes", "versions pushed", labels=["peer"])
    failures = CounterMetricFamily(
        "lbwatch_sync_failures", "attempts that did not reach the peer", labels=["peer"]
    )
    last = GaugeMetricFamily(
        "lbwatch_sync_peer_last_in_sync_timestamp_seconds",
        "when the peer was last seen in sync (now, while it is)",
        labels=["peer"],
    )
    for name, p in peers:
        pushes.add_metric([name], p.pushes)
        failures.add_metric([name], p.failures)
        when = now if p.state == "in-sync" else p.last_in_sync
        if when is not None:
            last.add_metric([name], when)
    yield from (pushes, failures, last)


def _notify(doc: StatusDoc) -> Iterator[Metric]:
    notify = doc.notify
    if notify is None:
        return
    waiting = GaugeMetricFamily(
        "lbwatch_notify_spool_messages", "messages waiting in the spool", labels=["channel"]
    )
    delivered = CounterMetricFamily(
        "lbwatch_notify_deliveries", "messages delivered", labels=["channel"]
    )
    failed = CounterMetricFamily(
        "lbwatch_notify_delivery_failures", "delivery attempts that failed", labels=["channel"]
    )
    rejected = CounterMetricFamily(
        "lbwatch_notify_rejected", "messages refused for good, set aside", labels=["channel"]
    )
    dropped = CounterMetricFamily(
        "lbwatch_notify_dropped", "messages dropped beyond spool_max", labels=["channel"]
    )
    for name, ch in sorted(notify.channels.items()):
        waiting.add_metric([name], ch.waiting)
        delivered.add_metric([name], ch.delivered)
        failed.add_metric([name], ch.failed)
        rejected.add_metric([name], ch.rejected)
        dropped.add_metric([name], ch.dropped)
    yield from (waiting, delivered, failed, rejected, dropped)
    yield CounterMetricFamily(
        "lbwatch_notify_malformed_lines",
        "lines on keepalived's notify FIFO that were not notify lines",
        value=notify.malformed_lines,
    )
    yield GaugeMetricFamily(
        "lbwatch_notify_fifo_unread",
        "1 when the running keepalived writes a FIFO other than the one lbwatch reads, or none",
        value=1 if notify.fifo_unread else 0,
    )


def _cluster(doc: StatusDoc) -> Iterator[Metric]:
    cluster = doc.cluster
    if cluster is None:
        return
    yield _onehot(
        "lbwatch_cluster_peer_state",
        "each peer as this node's cluster watch last heard it",
        ["peer"],
        [([name], p.state) for name, p in sorted(cluster.peers.items())],
        CLUSTER_STATES,
    )
    split = GaugeMetricFamily(
        "lbwatch_split_brain",
        "1 while a VRRP instance is claimed by more than one node for split_brain_after",
        labels=["vrrp"],
    )
    declared = {s.instance for s in cluster.split_brain if s.declared}
    for name in sorted(doc.vrrp):
        if not name.startswith("group:"):
            split.add_metric([name], 1.0 if name in declared else 0.0)
    yield split
