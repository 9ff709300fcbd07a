"""keepalived's own check of its config, ``keepalived -t -f FILE`` (``-i ID`` as doctor reads
the file), each error and warning it prints made a finding.

What keepalived 2.2 prints and returns (lib/parser.c ``vreport_config_error``, keepalived/core
/main.c ``config_test_exit``; read in v2.2.7, Debian 12's):
- one message a line on stderr (-t sets NO_SYSLOG), ``(FILE: Line N) text`` once more than
  one file was read, ``(Line N) text`` while one was, plain ``text`` when no line is known
  (the same message may come once per parse pass: global, VRRP, checker);
- exit 0: nothing reported; 4: keepalived cannot run it (file not found, an interface that
  does not exist, a fatal error); 5: errors it runs with anyway (an unknown keyword, a value
  out of range, a missing brace; its warnings count here too); 6: scripts it would refuse
  to run (script security). A config file that is missing prints a line and exits 0.
Its text has no severity of its own: a message that says it warns, ignores, truncates or
resets is a warning, any other an error.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lbwatch.doctor.checks import Finding, Level, error, ok
from lbwatch.events import Outcome
from lbwatch.services import run_command

AREA = "keepalived"
TIMEOUT = 30.0  # seconds; -t reads files and asks the kernel for interfaces, nothing slower
MAX_FINDINGS = 20
CANNOT_RUN, RUNS_WITH_ERRORS, SCRIPT_SECURITY = 4, 5, 6
LINE = re.compile(r"^\((?:(?P<file>.+): )?Line (?P<line>\d+)\) (?P<text>.*)$")
WARNS = re.compile(
    r"\bwarning\b|deprecated|truncat|not supported|ignor|resetting|clearing|should", re.I
)
# /usr/sbin is not in every user's PATH (Debian's keepalived lives there).
SBIN = ("/usr/sbin", "/sbin")


def search_path() -> str:
    """Where to look for keepalived, read when it is looked for: PATH's absolute entries, then
    /usr/sbin and /sbin. A relative entry ("", ".", "bin") means a directory that depends on
    where doctor was started, and doctor runs as root: a keepalived there is never run (and an
    unset PATH is no entry at all, not the current directory)."""
    path = os.environ.get("PATH", "")
    return os.pathsep.join([*(d for d in path.split(os.pathsep) if os.path.isabs(d)), *SBIN])


@dataclass(frozen=True)
class Ran:
    """What ``keepalived -t`` did: its exit code (None: timed out, killed, or not started)
    and output; ``failed``: why it could not be started (None: it was)."""

    argv: tuple[str, ...]
    code: int | None
    output: str
    failed: str | None = None


def run(conf: Path, config_id: str | None, timeout: float = TIMEOUT) -> Ran | None:
    """None: no keepalived installed. Run as every command lbwatch runs (``run_command``: a
    session of its own, killed with it when it overruns, its output through a file)."""
    program = shutil.which("keepalived", path=search_path())
    if program is None:
        return None
    argv = (program, "-t", "-f", str(conf), *(("-i", config_id) if config_id else ()))
    res = run_command(list(argv), timeout, keep=1 << 20)
    if res.outcome is Outcome.TIMEOUT:
        return Ran(argv, None, "")
    if res.code is None:  # a broken binary, a bad interpreter line, no permission
        return Ran(argv, None, "", failed=res.detail.rpartition(": ")[2])  # "cannot run X: why"
    return Ran(argv, res.code, res.output)


def findings(ran: Ran | None, conf: Path, single_file: bool) -> Iterator[Finding]:
    """The findings of one run, pure. ``single_file``: keepalived read ``conf`` alone, so a
    ``(Line N)`` is in it (with includes, keepalived names the file)."""
    if ran is None:
        yield error(
            AREA,
            "keepalived is not installed (none in PATH's absolute directories, /usr/sbin or "
            "/sbin): its config cannot be tested",
            "apt-get install keepalived",
        )
        return
    shown = shlex.join(("keepalived", "-t", "-f", *ran.argv[3:]))
    if ran.failed is not None:
        yield error(AREA, f"{ran.argv[0]} could not be run ({ran.failed}): its config cannot "
                    "be tested", f"check that {ran.argv[0]} is keepalived's binary (apt-get "
                    "install --reinstall keepalived), then run `lbwatch doctor` again")  # fmt: skip
        return
    if ran.code is None:
        yield error(AREA, f"`{shown}` did not finish within {TIMEOUT:g} s (killed)",
                    "run it by hand to see where it hangs")  # fmt: skip
        return
    said = list(dict.fromkeys(ln.strip() for ln in ran.output.splitlines() if ln.strip()))
    for text in said[:MAX_FINDINGS]:
        yield _line(text, conf, single_file)
    if len(said) > MAX_FINDINGS:
        yield error(AREA, f"`{shown}` said {len(said) - MAX_FINDINGS} more", f"run `{shown}`")
    if ran.code == 0 and not said:
        yield ok(AREA, f"`{shown}` accepts it")
    elif ran.code == CANNOT_RUN:
        yield error(AREA, f"`{shown}` exits {ran.code}: keepalived cannot run this config",
                    "fix what it says above")  # fmt: skip
    elif ran.code not in (0, RUNS_WITH_ERRORS, SCRIPT_SECURITY) or (ran.code and not said):
        last = said[-1][:200] if said else "no message"
        yield error(AREA, f"`{shown}` exits {ran.code}: {last}", f"run `{shown}`")


def _line(text: str, conf: Path, single_file: bool) -> Finding:
    m = LINE.match(text)
    place, message = str(conf), text
    if m is not None:
        message, number = m.group("text"), m.group("line")
        file = m.group("file") or (str(conf) if single_file else None)
        place = f"{file}:{number}" if file else f"line {number} of {conf} or a file it includes"
    level: Level = "warn" if WARNS.search(message) else "error"
    fix = f"keepalived runs, but not as written: fix {place}" if level == "warn" else f"fix {place}"
    return Finding(level=level, area=AREA, what=f"keepalived -t: {place}: {message}", fix=fix)
