"""Does lbwatch's unit let it write every path its config names? Under ProtectSystem=strict a
path outside the unit's writable ones fails only when lbwatch writes there, with "Read-only file
system" in the journal (a metrics textfile in node_exporter's directory, a map directory of
[sync] extra_files): doctor says so before, naming the key, the setting that decides and the
drop-in that fixes it.

The unit and its drop-ins are read from the files as systemd would (``units``), judged by
``unitfs``; symlinks in the paths are resolved first, as systemd resolves them before it mounts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lbwatch.config import Config
from lbwatch.doctor import unitfs, units
from lbwatch.doctor.checks import Finding, Where, error, ok, warn
from lbwatch.systemd import readwrite_fix

AREA = "systemd"
UNIT = "lbwatch.service"


class Written(NamedTuple):
    key: str  # the config key that names it
    path: Path  # as configured (or defaulted)
    directory: Path  # what must be writable: the path itself, or the directory a file is made in


def written(cfg: Config) -> list[Written]:
    """Every path the running agent writes, as this config has it. A file is replaced through a
    temporary file beside it, or created, so its directory must be writable."""
    s = cfg.sync
    out = [
        Written("agent.run_dir", cfg.agent.run_dir, cfg.agent.run_dir),
        Written("agent.state_dir", cfg.agent.state_dir, cfg.agent.state_dir),
        Written("notify.spool_dir", cfg.spool_path(), cfg.spool_path()),
        Written("notify.fifo", cfg.notify.fifo, cfg.notify.fifo.parent),
        # keepalived's track files (lbwatch drain), replaced through a file beside them
        Written("keepalived.track_dir", cfg.keepalived.track_dir, cfg.keepalived.track_dir),
    ]
    if s.active():  # installs the config and its files, with backups beside them
        out.append(Written("sync.config", s.config, s.config.parent))
        for i, pattern in enumerate(s.extra_files):
            out.append(Written(f"sync.extra_files[{i}]", Path(pattern), Path(pattern).parent))
        out.append(Written("sync.staging_dir", cfg.staging_path(), cfg.staging_path()))
    if s.peers:  # ssh's kept connections
        out.append(Written("sync.control_dir", s.control_dir, s.control_dir))
    if cfg.metrics.textfile is not None:
        out.append(Written("metrics.textfile", cfg.metrics.textfile, cfg.metrics.textfile.parent))
    return out


def check(cfg: Config, where: Where) -> Iterator[Finding]:
    unit = units.load(UNIT, where.units)
    if unit.path is None:
        yield ok(AREA, f"no {UNIT}: lbwatch is not run by systemd here, no sandbox to check "
                       "its paths against")  # fmt: skip
        return
    if unit.masked:
        yield ok(AREA, f"{unit.path} is masked: no sandbox to check lbwatch's paths against")
        return
    # systemd follows symlinks in the paths it mounts (namespace.c, follow_symlink): so does this.
    ruleset = [r._replace(path=os.path.realpath(r.path)) for r in unitfs.rules(unit.service)]
    paths = written(cfg)
    found = 0
    for w in paths:
        directory = os.path.realpath(w.directory)
        seen = unitfs.access(ruleset, directory)
        if seen.outcome == "writable":
            continue
        found += 1
        what = f"{w.key}: lbwatch.service cannot write {directory}"
        if w.directory != w.path:
            what = f"{w.key}: {w.path} lives in {directory}, which lbwatch.service cannot write"
        if seen.outcome == "private":
            yield warn(AREA, f"{w.key}: {directory} is private to lbwatch.service: {seen.why}",
                       f"configure {w.key} outside /tmp and /var/tmp")  # fmt: skip
        elif unitfs.opens(ruleset, directory):
            yield error(AREA, f"{what} ({seen.why})", readwrite_fix(directory))
        else:
            yield error(AREA, f"{what} ({seen.why}; a ReadWritePaths= drop-in would not open it)",
                        f"configure {w.key} elsewhere, or change that setting in a drop-in "
                        "(`systemctl edit lbwatch`)")  # fmt: skip
    if not found:
        read = ", ".join(str(p) for p in (unit.path, *unit.dropins))
        yield ok(AREA, f"lbwatch.service ({read}) lets lbwatch write the {len(paths)} paths its "
                       "config names")  # fmt: skip
