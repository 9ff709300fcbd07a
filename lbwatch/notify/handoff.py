"""``lbwatch notify TYPE NAME STATE [PRIORITY]`` while the agent runs, without the config model.

keepalived forks its notify script on every VRRP transition, and the full command line spends
some 200 ms importing pydantic and the config model before it writes one line to the FIFO. Here
only the two values that line needs are read from the file, ``[agent] run_dir`` (whose lock says
an agent runs) and ``[notify] fifo`` (where it reads), and the line is checked by the parser's
own rules (``grammar``) and written. Anything unusual and nothing is written: ``cli.main`` goes
on with the full command line, which validates the whole file and spools, or prints the usage or
the config problems, exactly as before. So the hand-off delivers only where the full path would
deliver the same bytes to the same FIFO, with one difference: it does not validate the rest of
the file. A file broken elsewhere (which the running agent, on its last good config, ignores
until it is fixed) still gets the event to that agent, where the full path would print the
config problems and drop it.

Imports are kept to what ``tomllib`` loads anyway plus lbwatch's light modules;
tests/test_notify_handoff.py checks that pydantic, ``lbwatch.config`` and argparse stay out.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

from lbwatch import defaults
from lbwatch.agentlock import agent_running
from lbwatch.notify.fifo import write_line
from lbwatch.notify.grammar import script_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on RHEL 9 / Debian 11 only
    import tomli as tomllib

# "delivered", or why the full command line must handle it.
Outcome = Literal[
    "delivered",
    "not an event call",  # another verb, an option, a form argparse must read
    "not an event",  # words the parser would refuse: the full path prints why
    "config",  # unreadable, not TOML, or run_dir/fifo not a non-empty string
    "agent not running",
    "fifo write failed",  # nobody reads it, the pipe is full, or it is not a FIFO
    "error",  # an exception: e.g. RecursionError from tomllib on deeply nested arrays
]


def handoff(argv: Sequence[str]) -> Outcome:
    """Write the event ``argv`` (the command line after the program name) to the running
    agent's FIFO, if that is all there is to do."""
    try:
        return _handoff(argv)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full path decides; the write is
        # the last step, so nothing was handed over twice.
        return "error"


def _handoff(argv: Sequence[str]) -> Outcome:
    call = notify_call(argv)
    if call is None:
        return "not an event call"
    config_path, words = call
    line = script_line(words)
    if line is None:
        return "not an event"
    where = fifo_settings(config_path)
    if where is None:
        return "config"
    run_dir, fifo = where
    if not agent_running(run_dir):
        return "agent not running"
    if not write_line(fifo, line):
        return "fifo write failed"
    return "delivered"


def notify_call(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``[--config F] notify [--config F] WORD...``, the form keepalived runs, as argparse reads
    it: the config file and the words. None for anything else, and for any word starting with
    "-", which argparse may take for an option (``--test``, ``-h``, ``--conf`` abbreviated, a
    negative priority): the full command line reads those."""
    before = _config_option(list(argv))
    if before is None or not before[1] or before[1][0] != "notify":
        return None
    after = _config_option(before[1][1:])
    if after is None:
        return None
    given = [path for path in (before[0], after[0]) if path is not None]
    words = after[1]
    if len(given) > 1 or any(word.startswith("-") for word in words):
        return None
    return (given[0] if given else defaults.CONFIG_PATH), words


def _config_option(args: list[str]) -> tuple[str | None, list[str]] | None:
    """A leading ``--config F`` or ``--config=F`` taken off ``args``; None if it is malformed."""
    if args and args[0] == "--config":
        if len(args) < 2 or args[1].startswith("-"):
            return None
        return args[1], args[2:]
    if args and args[0].startswith("--config="):
        return args[0][len("--config=") :], args[1:]
    return None, args


def fifo_settings(config_path: str) -> tuple[str, str] | None:
    """``[agent] run_dir`` and ``[notify] fifo`` from the file, each its default when absent;
    None when the file cannot be read as TOML or either value is not a usable string."""
    try:
        with open(config_path, "rb") as f:
            # As config.load reads it: strict UTF-8, then TOML.
            data = tomllib.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and TOMLDecodeError are ValueErrors
        return None
    run_dir = _string(data, "agent", "run_dir", defaults.RUN_DIR)
    fifo = _string(data, "notify", "fifo", defaults.NOTIFY_FIFO)
    if run_dir is None or fifo is None:
        return None
    return run_dir, fifo


def _string(data: dict[str, Any], section: str, key: str, default: str) -> str | None:
    """The value, the default if the section or the key is absent, None if the value is of
    another type, empty, or holds a NUL (an empty path would be the working directory, a NUL
    no path at all: the full path is left to say what it makes of them)."""
    table = data.get(section, {})
    if not isinstance(table, dict):
        return None
    value = table.get(key, default)
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    return value
