"""When the agent probes haproxy: one probe at a time, every ``interval`` while a master runs,
at once for a new master, sooner when config sync's canary wants one. The GET itself runs on a
worker (``health.Prober``); its result comes back to the loop as a ``ProbeResult``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lbwatch.config import Health
from lbwatch.events import ProbeResult, ProcId
from lbwatch.health import Prober

Submit = Callable[[Callable[[], ProbeResult], Callable[[Exception], ProbeResult]], None]


class Probing:
    def __init__(self, cfg: Health | None, submit: Submit, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.prober = Prober(cfg) if cfg is not None else None
        self.submit = submit  # runs the probe on a worker, its result (or error) as an event
        self.clock = clock
        self.inflight = False
        self.next_at = 0.0

    def configure(self, cfg: Health | None) -> None:
        """A reloaded config: a new prober if the probe changed."""
        if cfg == self.cfg:
            return
        self.close()
        self.cfg = cfg
        self.prober = Prober(cfg) if cfg is not None else None

    def due_at(self, master: ProcId | None, canary: float | None) -> float | None:
        """When the next probe starts (None: none while no master runs, or one is running)."""
        if self.prober is None or master is None or self.inflight:
            return None
        return self.next_at if canary is None else min(self.next_at, canary)

    def now(self) -> None:
        """A new master proves its health at once."""
        self.next_at = self.clock()

    def start(self, master: ProcId | None) -> None:
        assert self.prober is not None and self.cfg is not None
        self.inflight = True
        self.next_at = self.clock() + self.cfg.interval
        prober, clock = self.prober, self.clock
        started = clock()
        self.submit(
            lambda: replace(
                prober.probe(), master=master, started=started, duration=clock() - started
            ),
            lambda exc: ProbeResult(
                False, f"{type(exc).__name__}: {exc}", internal=True, master=master
            ),
        )

    def done(self) -> None:
        self.inflight = False

    def close(self) -> None:
        if self.prober is not None:
            self.prober.close()
