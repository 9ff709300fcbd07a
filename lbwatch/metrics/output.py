"""Where the metrics go, as ``[metrics]`` says: an HTTP listener answering ``GET /metrics``
(``listen``), and/or a node_exporter textfile (``textfile``), rewritten every
``textfile_interval`` seconds while anything changed and at least once a minute, so that
node_exporter's ``node_textfile_mtime_seconds`` tells a live agent from a dead one.

The loop hands over each new status document and the counters (``update``): a reference swap,
no I/O. Scrapes run on the listener's thread and the textfile on its own thread; both render
the last snapshot, which is frozen, so nothing is shared that could change under them.

The listener is a trust boundary, every local user can reach it: what a client may do there,
and the limits that keep it from delaying supervision, are ``listener``'s.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from lbwatch.config import MetricsCfg
from lbwatch.fsutil import write_atomic
from lbwatch.metrics.families import families
from lbwatch.metrics.listener import Listener
from lbwatch.metrics.tally import Counts
from lbwatch.statusdoc import StatusDoc
from lbwatch.systemd import sandbox_hint

log = logging.getLogger(__name__)

HEARTBEAT = 60.0  # the textfile is rewritten at least this often


@dataclass(frozen=True)
class Snapshot:
    doc: StatusDoc
    counts: Counts
    running: bool = True


class _Families(Collector):
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> list[Metric]:
        snap = self.snapshot  # one read: a scrape renders one snapshot
        if snap is None:
            return []
        if not snap.running:
            return [GaugeMetricFamily("lbwatch_agent_up", "1 while the agent runs", value=0.0)]
        return list(families(snap.doc, snap.counts, time.time()))


class Exporter:
    def __init__(self, cfg: MetricsCfg) -> None:
        self.cfg = cfg
        self.collector = _Families()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.error: str | None = None
        self._listener: Listener | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._failing = False  # the last textfile write failed (said once, until one works)
        if cfg.listen is not None:
            self._listen(*cfg.address())
        if cfg.textfile is not None:
            self._threads.append(
                threading.Thread(target=self._textfile, name="lbwatch-textfile", daemon=True)
            )
            self._threads[-1].start()

    def _listen(self, host: str, port: int) -> None:
        http = CollectorRegistry(auto_describe=False)
        http.register(self.collector)
        ProcessCollector(registry=http)  # the agent's own CPU, memory and descriptors
        try:
            self._listener = Listener(host, port, http)
        except OSError as exc:
            # Supervision goes on without the listener; the log and the status say why.
            self.error = f"metrics: cannot listen on {self.cfg.listen}: {exc.strerror or exc}"
            log.error("%s", self.error)
            return
        self._listener.start()
        log.info("metrics: serving /metrics on %s", self.cfg.listen)

    def update(self, doc: StatusDoc, counts: Counts) -> None:
        self.collector.snapshot = Snapshot(doc, counts)
        self._dirty.set()

    def _textfile(self) -> None:
        assert self.cfg.textfile is not None
        written = 0.0
        self._dirty.wait()  # the first snapshot: before it, a file would be empty
        while not self._stop.is_set():
            self._dirty.wait(max(0.0, written + HEARTBEAT - time.monotonic()))
            if self._stop.is_set():
                return
            self._write(self.cfg.textfile)
            written = time.monotonic()
            self._dirty.clear()
            self._stop.wait(self.cfg.textfile_interval)  # at most one write per interval

    def _write(self, path: Path) -> None:
        """Write the textfile; a failure is said once, until a write works again. Under the
        unit's sandbox (ProtectSystem=strict) a directory outside its ReadWritePaths= fails
        every write alike: the message then says what to add."""
        try:
            write_atomic(path, generate_latest(self.registry))
        except OSError as exc:
            if not self._failing:
                log.error("metrics: cannot write %s: %s%s", path, exc,
                          sandbox_hint(path.parent, exc))  # fmt: skip
            self._failing = True
            return
        if self._failing:
            log.info("metrics: %s written again", path)
        self._failing = False

    def close(self) -> None:
        """Stop serving; a textfile says the agent is no longer up."""
        self._stop.set()
        self._dirty.set()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(5.0)
        snap = self.collector.snapshot
        if self.cfg.textfile is not None and snap is not None:
            self.collector.snapshot = Snapshot(snap.doc, snap.counts, running=False)
            self._write(self.cfg.textfile)  # the thread has ended: _failing is this one's
