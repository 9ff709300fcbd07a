"""The systemd tier's lab: two nodes booted by systemd, lbwatch from the package `make deb` built
from this checkout (built here when missing or older than the checkout), one lab per module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lab.netlab import Lab
from tests.lab.syslab import SysLab, installed

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "nsenter", "systemd-nspawn", "haproxy", "keepalived", "dpkg-deb", "apt-get")


def skip_marks() -> list[pytest.MarkDecorator]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return [
        pytest.mark.e2e,
        pytest.mark.systemd,
        pytest.mark.skipif(os.geteuid() != 0, reason="the systemd lab needs root"),
        pytest.mark.skipif(bool(missing), reason=f"the systemd lab needs {', '.join(missing)}"),
        pytest.mark.timeout(240),
    ]


def _digest(top: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(top.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(top)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fresh_deb() -> Path:
    """dist/lbwatch_*.deb built from this checkout: `make deb`'s, or built now when there is
    none, it holds other sources than lbwatch/ here (its tree is compared), or the unit, the
    config or the packaging is newer than it."""
    debs = sorted((REPO / "dist").glob("lbwatch_*.deb"))
    # What the package holds besides lbwatch/ (the unit, the config, the maintainer scripts):
    # newer than the package, it is rebuilt.
    others = [f for d in ("systemd", "config", "packaging") for f in (REPO / d).rglob("*")]
    if debs and any(f.stat().st_mtime > debs[-1].stat().st_mtime for f in others):
        debs = []
    if debs:
        tree = Path(
            subprocess.run(
                ["mktemp", "-d"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        try:
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], check=True)
            site = next(tree.glob("opt/lbwatch/lib/python3.*/site-packages"))
            if _digest(site / "lbwatch") == _digest(REPO / "lbwatch"):
                return debs[-1]
        finally:
            shutil.rmtree(tree, ignore_errors=True)
    out = subprocess.run(
        [str(REPO / "packaging" / "build-deb")],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def syslab() -> Iterator[SysLab]:
    """Both nodes booted, the package installed and configured, lbwatch enabled and started,
    VI_1 on lb1 and VI_2 on lb2; the nodes' journals printed at the end."""
    with installed(fresh_deb()) as lab:
        yield lab


@dataclass
class Probe:
    """The client's GETs of the VIP over a stretch (client.py ``probe``): each change of answer,
    and how many GETs there were and how many failed."""

    changes: list[dict] = field(default_factory=list)
    n: int = 0
    ok: int = 0

    @property
    def failed(self) -> int:
        return self.n - self.ok

    @property
    def served_by(self) -> set[str]:
        return {c["lb"] for c in self.changes if c["status"] == 200}

    def outages(self) -> list[float]:
        """Seconds of each stretch without an HTTP 200."""
        out, start = [], None
        for c in self.changes:
            if c["status"] != 200 and start is None:
                start = c["t"]
            elif c["status"] == 200 and start is not None:
                out.append(c["t"] - start)
                start = None
        return out


class probing:
    """``with probing(lab, limit) as probe:`` GETs of the VIP during the block (at most
    ``limit`` seconds), read into ``probe`` at its end; in either lab (bench/failover.py
    --systemd probes the bare lab too)."""

    def __init__(self, lab: Lab, limit: float = 60.0) -> None:
        self.lab, self.limit, self.probe = lab, limit, Probe()

    def __enter__(self) -> Probe:
        self.proc = self.lab.client_probe(self.limit)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"probing": True}
        return self.probe

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # a last answer after the block's end is part of it
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        for line in out.splitlines():
            data = json.loads(line)
            if "end" in data:
                self.probe.n, self.probe.ok = data["n"], data["ok"]
            else:
                self.probe.changes.append(data)
