"""Test doubles shared by the tests: a scripted controller, a local-disk sync carrier and
config/identity builders."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from lbwatch.config import Config, parse
from lbwatch.events import Action, ActionResult, Outcome, ProcId, UnitPlan, Verb
from lbwatch.services import CommandResult
from lbwatch.sync.transport import Peer, explain


def config(**sections: Any) -> Config:
    """A Config from keyword sections, validated like a TOML file would be."""
    return parse(sections, "test.toml")


def proc(pid: int, started: float = -1000.0, name: str = "haproxy") -> ProcId:
    """An identity; ``started`` is monotonic, far in the past by default."""
    return ProcId(pid=pid, start_ticks=1000 + pid, name=name, started=started)


class FakeController:
    """Records every action and answers with a scripted outcome (OK unless told otherwise);
    an ASK is answered with ``plan``."""

    def __init__(self) -> None:
        self.executed: list[Action] = []
        self.begun: list[Action] = []  # given to ``begin``, on the loop, as each was issued
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.plan = UnitPlan.UNKNOWN

    def begin(self, action: Action) -> None:
        self.begun.append(action)

    def execute(self, action: Action) -> ActionResult:
        self.executed.append(action)
        outcome = self.outcomes.get((action.service.value, action.verb.value), Outcome.OK)
        detail = "exit 0" if outcome is Outcome.OK else "exit 1: scripted failure"
        plan = self.plan if action.verb is Verb.ASK else None
        return ActionResult(action, outcome, detail, 0.01, plan=plan)


class FakeCarrier:
    """A peer's staging directory on the local disk instead of rsync over ssh: ``push`` copies
    into it, ``fetch`` copies out of it, and ``up = False`` makes every transfer fail with what
    rsync and ssh print then (``fault``, by default a refused connection). ``calls``: each
    transfer's monotonic time and what it was; ``closed``: how often the kept connection was
    ended."""

    REFUSED = "ssh: connect to host {host} port {port}: Connection refused"
    DENIED = "root@{host}: Permission denied (publickey)."

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.up = True
        self.fault = self.REFUSED
        self.pushed: list[str] = []
        self.calls: list[tuple[float, str]] = []
        self.closed = 0

    def _down(self, peer: Peer, what: str) -> CommandResult | None:
        self.calls.append((time.monotonic(), what))
        if self.up:
            return None
        output = (
            self.fault.format(host=peer.host, port=peer.port) + "\n"
            "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
            "rsync error: unexplained error (code 255) at io.c(232) [sender=3.2.7]\n"
        )
        fake = CommandResult(
            Outcome.FAILED, "exit 255: rsync error: unexplained error", 0.0, output
        )
        return explain(fake, peer, None)

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult:
        if (down := self._down(peer, f"push {remote_name}")) is not None:
            return down
        shutil.copyfile(local, self.staging / remote_name)
        self.pushed.append(remote_name)
        return CommandResult(Outcome.OK, "exit 0", 0.0)

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult:
        if (down := self._down(peer, f"fetch {remote_name}")) is not None:
            return down
        if not (self.staging / remote_name).exists():
            # What rrsync from rsync 3.4 on says (exit 12); plain rsync exits 23.
            said = (
                "/usr/bin/rrsync error: post-realpath open failed (race detected): "
                f"{remote_name} No such file or directory\n"
            )
            return explain(CommandResult(Outcome.FAILED, "exit 12", 0.0, said), peer, None)
        shutil.copyfile(self.staging / remote_name, local)
        return CommandResult(Outcome.OK, "exit 0", 0.0)

    def close(self, peer: Peer) -> CommandResult:
        self.closed += 1
        return CommandResult(Outcome.FAILED, "exit 255: no control socket", 0.0)


class Expectations:
    """Stands in for the config watcher: records what lbwatch said it is about to write
    (``accept``) or remove (``forget``)."""

    def __init__(self) -> None:
        self.accepted: list[tuple[Path, str]] = []
        self.forgotten: list[Path] = []

    def accept(self, path: Path, content_digest: str) -> None:
        self.accepted.append((path, content_digest))

    def forget(self, path: Path) -> None:
        self.forgotten.append(path)
