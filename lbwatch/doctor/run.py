"""``lbwatch doctor [--json]``: every check, one line per finding (the fix under it), exit 1
when any finding is an error. Warnings are said but do not fail: they name a setup that can
work (lbwatch started by hand, a key still on rrsync)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable

from lbwatch.config import Config
from lbwatch.doctor import checks, fifo, keepalived, peervrrp, remote, unitpaths
from lbwatch.doctor.checks import Finding, Where

LABEL = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}


def findings(cfg: Config, where: Where) -> list[Finding]:
    out: list[Finding] = []
    steps: list[Callable[[], Iterable[Finding]]] = [
        lambda: checks.keepalived(cfg, where),
        lambda: keepalived.check(cfg, where),
        lambda: fifo.check(cfg, where),
        lambda: peervrrp.peer_vrrp(cfg),
        lambda: checks.haproxy(cfg, where),
        lambda: checks.systemd(cfg, where),
        lambda: unitpaths.check(cfg, where),
        lambda: checks.sync_key(cfg),
        lambda: checks.received(cfg),
        lambda: remote.peers(cfg),
        lambda: remote.notify(cfg, where),
    ]
    for step in steps:
        try:
            out += list(step())
        except Exception as exc:  # noqa: BLE001 - a check's own failure is a finding
            out.append(checks.error("doctor", f"a check failed: {type(exc).__name__}: {exc}",
                                    "report this as a bug"))  # fmt: skip
    return out


def main(cfg: Config, as_json: bool, where: Where | None = None) -> int:
    found = findings(cfg, where or Where(keepalived_conf=cfg.keepalived.config))
    bad = any(f.level == "error" for f in found)
    if as_json:
        print(json.dumps([f.model_dump() for f in found], indent=1))
        return 1 if bad else 0
    for f in found:
        print(f"{LABEL[f.level]} {f.area:<10} {f.what}")
        if f.fix:
            print(f"{'':16} fix: {f.fix}")
    counts = {level: sum(f.level == level for f in found) for level in LABEL}
    print(
        f"{counts['error']} error(s), {counts['warn']} warning(s), {counts['ok']} ok",
        file=sys.stderr,
    )
    return 1 if bad else 0
