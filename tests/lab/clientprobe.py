"""The lab client's probe through the VIP (client.py's ``probe``: a GET every few ms, a new
connection each, timeout 0.25 s), read while it runs, and what its answers say: which node
answered when, and since when one node alone answers. Each new connection follows the client's
ARP entry for the VIP, so the answers tell which node's MAC the client holds at each moment.

The probe prints only changes of answer, each with the wall time the first GET with the new
answer began and its running counts; an answer therefore lasts from its change to the next
(or to the probe's end), and how many GETs it got is the difference of the counts.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from dataclasses import dataclass
from types import TracebackType

from tests.lab.netlab import Lab


@dataclass(frozen=True)
class Change:
    at: float  # wall time the first GET with this answer began
    status: int  # HTTP status, 0 when the GET failed (refused, timed out)
    lb: str  # X-LB: the node that answered ("" when none did)
    n: int  # GETs so far, this one included


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    status: int
    lb: str
    gets: int

    @property
    def answer(self) -> str:
        return self.lb if self.status == 200 else "failed"


class Probe:
    """Start it with ``with Probe(lab, seconds) as probe``; it is stopped (SIGTERM to its PID)
    and waited for on leaving the block."""

    def __init__(self, lab: Lab, seconds: float) -> None:
        self._proc = lab.client_probe(seconds)
        self.changes: list[Change] = []
        self.ended: tuple[float, int] | None = None  # (wall time, GETs in all)
        self._lock = threading.Lock()
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if json.loads(first or "{}") != {"probing": True}:
            self.stop()
            raise RuntimeError(f"the lab client did not start probing: {first!r}")
        self._reader = threading.Thread(target=self._read, name="lab-probe", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            data = json.loads(line)
            with self._lock:
                if "t" in data:
                    self.changes.append(Change(data["t"], data["status"], data["lb"], data["n"]))
                elif "end" in data:
                    self.ended = (data["end"], data["n"])

    def last(self) -> Change | None:
        with self._lock:
            return self.changes[-1] if self.changes else None

    def stop(self) -> None:
        """SIGTERM to the client (it prints its end line), then wait for it and its output."""
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        with contextlib.suppress(AttributeError):
            self._reader.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def segments(self, until: float | None = None) -> list[Segment]:
        """Each answer and how long it lasted; the last lasts to the probe's end, or to
        ``until`` while it runs."""
        with self._lock:
            changes, ended = list(self.changes), self.ended
        out = []
        for i, c in enumerate(changes):
            if i + 1 < len(changes):
                end, n_end = changes[i + 1].at, changes[i + 1].n
            elif ended is not None:
                end, n_end = ended[0], ended[1] + 1
            else:
                end, n_end = (until if until is not None else c.at), c.n + 1
            out.append(Segment(c.at, end, c.status, c.lb, n_end - c.n))
        return out

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def within(segments: list[Segment], start: float, end: float) -> list[Segment]:
    """The segments clipped to [start, end]; a clipped one keeps its whole count of GETs."""
    out = []
    for s in segments:
        a, b = max(s.start, start), min(s.end, end)
        if b > a:
            out.append(Segment(a, b, s.status, s.lb, s.gets))
    return out


def seconds_off(segments: list[Segment], start: float, end: float, holder: str) -> float:
    """How long, within [start, end], the client was answered by another node than
    ``holder`` or not at all."""
    return sum(s.end - s.start for s in within(segments, start, end) if s.answer != holder)


def gets_by_answer(segments: list[Segment], start: float, end: float) -> dict[str, int]:
    """GETs that began within [start, end], by answer (a node's name, or "failed")."""
    out: dict[str, int] = {}
    for s in within(segments, start, end):
        out[s.answer] = out.get(s.answer, 0) + s.gets
    return out


def alone_since(segments: list[Segment], holder: str, until: float) -> float | None:
    """From when, up to ``until``, every GET was answered by ``holder``: the start of the last
    segment before ``until`` when it is ``holder``'s, else None."""
    before = [s for s in segments if s.start < until]
    if not before or before[-1].answer != holder:
        return None
    return before[-1].start
