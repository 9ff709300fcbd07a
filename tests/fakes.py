"""Test doubles shared by the tests: a scripted controller and config/identity builders."""

from __future__ import annotations

from typing import Any

from lbwatch.config import Config, parse
from lbwatch.events import Action, ActionResult, Outcome, ProcId


def config(**sections: Any) -> Config:
    """A Config from keyword sections, validated like a TOML file would be."""
    return parse(sections, "test.toml")


def proc(pid: int, started: float = -1000.0, name: str = "haproxy") -> ProcId:
    """An identity; ``started`` is monotonic, far in the past by default."""
    return ProcId(pid=pid, create_time_wall=1_700_000_000.0 + pid, name=name, started=started)


class FakeController:
    """Records every action and answers with a scripted outcome (OK unless told otherwise)."""

    def __init__(self) -> None:
        self.executed: list[Action] = []
        self.outcomes: dict[tuple[str, str], Outcome] = {}

    def execute(self, action: Action) -> ActionResult:
        self.executed.append(action)
        outcome = self.outcomes.get((action.service.value, action.verb.value), Outcome.OK)
        detail = "exit 0" if outcome is Outcome.OK else "exit 1: scripted failure"
        return ActionResult(action, outcome, detail, 0.01)
