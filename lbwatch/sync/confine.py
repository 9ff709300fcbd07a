"""A received version's two walls, as the receiving job uses them: ``admit`` (which directives it
may use) before anything runs, then the check in ``sandbox``. Built once from the node's own
config (``[sync.received]``); frozen.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lbwatch.config import Config
from lbwatch.sync import sandbox
from lbwatch.sync.admit import DEFAULT_ALLOW, Refusal, Rules, parse_allow, refusals
from lbwatch.sync.install import Validation, validate, verdict

SHOWN = 3  # refusals named in one message; the rest are counted
SOCKETS = ("stats socket", "bind")  # where an allowed socket may be: hidden from the check


@dataclass(frozen=True)
class Confine:
    rules: Rules
    sandbox: sandbox.Settings | None  # None: checked unconfined, as a local edit is

    def refused(self, files: Mapping[Path, bytes], config: Path) -> str | None:
        """Why a version holding ``files`` is refused before any check, or None. The main
        config and any other haproxy config it carries (``*.cfg``) are read."""
        found: list[Refusal] = []
        for path, content in sorted(files.items()):
            if path == config or path.suffix == ".cfg":
                where = "" if path == config else f"{path.name} "
                found += [
                    Refusal(r.line, f"{where}{r.directive}".strip(), r.arg, r.why)
                    for r in refusals(content, self.rules, os.path.realpath)
                ]
        if not found:
            return None
        more = f" (and {len(found) - SHOWN} more)" if len(found) > SHOWN else ""
        return "refused: " + "; ".join(str(r) for r in found[:SHOWN]) + more

    def check(
        self, template: list[str], config: Path, files: Mapping[Path, bytes], timeout: float
    ) -> Validation:
        """The checker's verdict on ``config`` with ``files`` (live path -> content) as the
        version has them. Unconfined, the checker reads ``config`` where it is."""
        if self.sandbox is None:
            return validate(template, config, timeout)
        result = sandbox.check(template, config, files, self.sandbox, timeout)
        return verdict(result, confined=True)


def confine_for(cfg: Config, config_file: Path, needed: list[Path]) -> Confine:
    """This node's walls for versions of ``config_file``; ``needed``: files the check reads
    (never hidden from it)."""
    received = cfg.sync.received
    own = [cfg.staging_path(), cfg.agent.state_dir, cfg.agent.run_dir]
    hidden = tuple(sorted({os.path.realpath(p) for p in own}))
    rules = Rules(
        tuple(parse_allow(a) for a in (*DEFAULT_ALLOW, *received.allow)),
        hidden,
        str(config_file.parent),
    )
    if not received.sandbox:
        return Confine(rules, None)
    sockets = [a.pattern for a in rules.allow if a.directive in SOCKETS and a.pattern]
    settings = sandbox.settings_for(
        received.check_user,
        received.check_memory,
        cfg.sync.timeout,
        [*map(Path, hidden), *(Path(_fixed_part(p)) for p in sockets)],
        needed,
    )
    return Confine(rules, settings)


def _fixed_part(pattern: str) -> str:
    """The directory a path pattern can only be inside: its longest parent without a wildcard."""
    parts = Path(pattern).parent.parts
    fixed = [p for p in itertools.takewhile(lambda p: not any(c in p for c in "*?[$"), parts)]
    return str(Path(*fixed)) if fixed else "/"
