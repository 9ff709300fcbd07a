"""`lbwatch notify TYPE NAME STATE [PRIORITY]`'s hand-off: with the agent running, the line goes
to the FIFO without pydantic or the config model; anything unusual gets the full path's answer.

The "agent" is this test process: it holds the run dir's lock with the agent's own function and
reads the FIFO with the agent's own reader. The full path is reached with `notify -- WORDS`,
which argparse reads as `notify WORDS` and the hand-off leaves alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch import defaults
from lbwatch.cli import EXIT_CONFIG, EXIT_OK, main
from lbwatch.config import ConfigError, load, parse
from lbwatch.notify.cli import notify_event
from lbwatch.notify.fifo import FifoReader
from lbwatch.notify.grammar import STATES, script_line
from lbwatch.notify.handoff import handoff, notify_call
from lbwatch.notify.spool import Spool
from lbwatch.status import lock_run_dir

EVENT = ["INSTANCE", "VI_1", "MASTER", "100"]
# Routed (vrrp:MASTER goes to every channel by default) and spooled when no agent reads it.
EMAIL = """
[notify.email]
host = "127.0.0.1"
port = 2525
security = "plain"
sender = "lb@example.org"
to = ["ops@example.org"]
"""


@dataclass(frozen=True)
class Node:
    config: Path
    run_dir: Path
    fifo: Path
    spool_dir: Path

    def write(self, agent: str = "", notify: str = "", extra: str = EMAIL) -> None:
        q = json.dumps
        self.config.write_text(
            f'[agent]\nnode_name = "t1"\nstate_dir = {q(str(self.config.parent / "state"))}\n'
            f"{agent or f'run_dir = {q(str(self.run_dir))}'}\n"
            f"[notify]\n{notify or f'fifo = {q(str(self.fifo))}'}\n{extra}"
        )

    def spooled(self) -> list[str]:
        spool = Spool(self.spool_dir, 100)
        notes = [spool.load(path) for path in spool.pending()]
        return [note.subject for note in notes if note is not None]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(
        tmp_path / "lbwatch.toml",
        tmp_path / "run",
        tmp_path / "keepalived.fifo",
        tmp_path / "state" / "spool",
    )
    n.write()
    n.run_dir.mkdir()
    return n


@contextlib.contextmanager
def running_agent(run_dir: Path, fifo: Path, reading: bool = True) -> Iterator[FifoReader]:
    """What a running agent shows the notify verb: its lock held and its FIFO open to read."""
    lock = lock_run_dir(run_dir)
    reader = FifoReader(fifo)
    try:
        if reading:
            reader.open()
        yield reader
    finally:
        reader.close()
        os.close(lock)


def drain(reader: FifoReader) -> bytes:
    """Everything in the pipe now, newlines included."""
    chunks = []
    while True:
        try:
            chunk = os.read(reader.fileno(), 65536)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str  # without the import-time lines
    imported: frozenset[str]


def lbwatch(*args: str) -> Run:
    """The command keepalived runs, in a fresh interpreter, with the modules it imported."""
    script = Path(sys.executable).parent / "lbwatch"  # the console script, lbwatch.cli:main
    entry = [str(script)] if script.exists() else ["-m", "lbwatch"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    imported, other = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.split("|")[-1].strip())
        else:
            other.append(line)
    return Run(done.returncode, "\n".join(other), frozenset(imported))


HEAVY = {"pydantic", "lbwatch.config", "argparse"}


def test_event_reaches_the_running_agent_without_loading_the_config_model(node: Node) -> None:
    """With the agent running, the event's line is in its FIFO and the command imported neither
    pydantic, nor the config model, nor argparse; the full path (the control) imports them."""
    with running_agent(node.run_dir, node.fifo) as reader:
        fast = lbwatch("--config", str(node.config), "notify", *EVENT)
        assert fast.returncode == 0, fast.stderr
        assert drain(reader) == b'SCRIPT INSTANCE "VI_1" MASTER 100\n'
        assert HEAVY.isdisjoint(fast.imported), sorted(HEAVY & fast.imported)

        full = lbwatch("--config", str(node.config), "notify", "--", *EVENT)
        assert full.returncode == 0, full.stderr
        assert drain(reader) == b'SCRIPT INSTANCE "VI_1" MASTER 100\n'
        assert HEAVY.issubset(full.imported)
    assert node.spooled() == []


@pytest.mark.parametrize(
    "words",
    [
        ["INSTANCE", "VI_1", "MASTER", "100"],
        ["instance", "vi_1", "backup", "0100"],  # upper-cased type and state, priority read
        ["GROUP", "G1", "FAULT"],
        ["INSTANCE", "web front Wébserver ☃", "MASTER_RX_LOWER_PRI", "7"],
        ["INSTANCE", "VI_1", "BACKUP", "50\r"],  # the parser drops a trailing CR
    ],
)
def test_line_is_byte_identical_to_the_full_paths(node: Node, words: list[str]) -> None:
    """The hand-off writes to the FIFO exactly the bytes the full path writes for the same
    arguments."""
    with running_agent(node.run_dir, node.fifo) as reader:
        fast = lbwatch("--config", str(node.config), "notify", *words)
        fast_bytes = drain(reader)
        full = lbwatch("--config", str(node.config), "notify", "--", *words)
        full_bytes = drain(reader)
    assert (fast.returncode, full.returncode) == (0, 0), fast.stderr + full.stderr
    assert "lbwatch.config" not in fast.imported and "lbwatch.config" in full.imported
    assert fast_bytes == full_bytes and full_bytes.count(b"\n") == 1


_SPACE = st.sampled_from(["", " ", "\t", "\r", "\n", "\x85"])
# Arguments near the valid ones, where a rule followed differently would show.
_KIND = st.one_of(
    st.sampled_from(["INSTANCE", "GROUP", "instance", "Group", "VS", "RS"]), st.text()
)
_NAME = st.one_of(st.sampled_from(["VI_1", "web front", 'a"b', "x\x85y"]), st.text(max_size=12))
_STATE = st.one_of(st.sampled_from(sorted(STATES)).map(str.lower), st.sampled_from(sorted(STATES)))
_PRIO = st.one_of(
    st.tuples(_SPACE, st.from_regex(r"-?[0-9]{0,6}", fullmatch=True), _SPACE).map("".join),
    st.text(max_size=6),
)
_WORDS = st.one_of(
    st.tuples(_KIND, _NAME, st.one_of(_STATE, st.text(max_size=8))).map(list),
    st.tuples(_KIND, _NAME, _STATE, _PRIO).map(list),
    st.lists(st.text(max_size=8), min_size=2, max_size=5),
)


def test_line_rules_match_the_full_path_for_any_words(tmp_path: Path) -> None:
    """For any words, the line the hand-off would write is the one the full path's notify_event
    writes to the FIFO, and where the full path refuses the words, so does it."""
    run_dir, fifo = tmp_path / "run", tmp_path / "fifo"
    run_dir.mkdir()
    cfg = parse({"agent": {"run_dir": str(run_dir)}, "notify": {"fifo": str(fifo)}}, "test")

    with running_agent(run_dir, fifo) as reader:

        @settings(max_examples=400, deadline=None)
        @given(_WORDS)
        def check(words: list[str]) -> None:
            code = notify_event(cfg, words)
            written = drain(reader)
            line = script_line(words)
            if line is None:
                assert (code, written) == (2, b"")
            else:
                assert (code, written) == (0, line.encode() + b"\n")

        check()


def test_no_agent_running_spools_as_before(node: Node) -> None:
    """No agent holds the lock (its FIFO is even open): the hand-off leaves the event to the
    full path, which routes and spools the message, as before."""
    args = ["--config", str(node.config), "notify", *EVENT]
    with running_agent(node.run_dir, node.fifo) as reader:
        assert handoff(args) == "delivered"  # the positive control
        drain(reader)
    reader = FifoReader(node.fifo)
    reader.open()
    try:
        assert handoff(args) == "agent not running"
        run = lbwatch(*args)
        assert run.returncode == 0, run.stderr
        assert drain(reader) == b""
    finally:
        reader.close()
    assert node.spooled() == ["[lbwatch] t1: VI_1 MASTER (priority 100)"]


def test_fifo_nobody_reads_spools_as_before(node: Node) -> None:
    """The lock is held but nobody reads the FIFO: nothing is lost, the full path spools."""
    args = ["--config", str(node.config), "notify", *EVENT]
    os.mkfifo(node.fifo, 0o600)
    with running_agent(node.run_dir, node.fifo, reading=False):
        assert handoff(args) == "fifo write failed"
        assert main(args) == EXIT_OK
    assert node.spooled() == ["[lbwatch] t1: VI_1 MASTER (priority 100)"]


@pytest.mark.parametrize(
    ("agent", "notify"),
    [
        ("run_dir = [{run_dir}]", ""),
        ("run_dir = 5", ""),
        ("", "fifo = {{ path = {fifo} }}"),
        ("", "fifo = true"),
    ],
)
def test_wrong_typed_value_gets_the_full_paths_answer(
    node: Node, capsys: pytest.CaptureFixture[str], agent: str, notify: str
) -> None:
    """A run_dir or fifo of the wrong type (here holding the right path, where a loose reader
    would deliver): the hand-off declines and the full path's config problems come out, exit 2,
    nothing delivered or spooled, exactly as with the full path alone."""
    q = json.dumps
    node.write(
        agent=agent.format(run_dir=q(str(node.run_dir))),
        notify=notify.format(fifo=q(str(node.fifo))),
    )
    with pytest.raises(ConfigError) as refused:
        load(node.config)
    args = ["--config", str(node.config), "notify"]
    with running_agent(node.run_dir, node.fifo) as reader:
        assert handoff([*args, *EVENT]) == "config"
        assert main([*args, *EVENT]) == EXIT_CONFIG
        answer = capsys.readouterr()
        assert main([*args, "--", *EVENT]) == EXIT_CONFIG
        assert capsys.readouterr() == answer
        assert drain(reader) == b""
    assert answer.err.splitlines() == refused.value.problems
    assert node.spooled() == []


@pytest.mark.parametrize(
    "words",
    [
        ["INSTANCE", 'VI"1', "MASTER"],
        ["INSTANCE", "VI_1"],
        ["INSTANCE", "VI_1", "HAPPY", "1"],
        ["VS", "[192.0.2.10]:tcp:80", "UP"],
        ["INSTANCE", "VI_1", "MASTER", "1", "extra"],
        ["INSTANCE", "VI_\udcff", "MASTER", "100"],  # a name that is not UTF-8, as argv gives it
    ],
)
def test_bad_words_get_the_full_paths_usage(
    node: Node, capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    """Words the parser refuses: nothing is written, and the full path's message and exit 2
    come out."""
    args = ["--config", str(node.config), "notify"]
    with running_agent(node.run_dir, node.fifo) as reader:
        assert handoff([*args, *words]) == "not an event"
        assert main([*args, *words]) == 2
        answer = capsys.readouterr()
        assert main([*args, "--", *words]) == 2
        assert capsys.readouterr() == answer
        assert drain(reader) == b""
    assert answer.err.startswith(("lbwatch notify: ", "usage: lbwatch notify"))


def test_unreadable_or_odd_config_is_left_to_the_full_path(node: Node) -> None:
    """A missing file, a directory, bytes that are not UTF-8, TOML that is not valid, and TOML
    nested beyond what tomllib can read (RecursionError): never delivered by the hand-off."""
    with running_agent(node.run_dir, node.fifo) as reader:
        assert handoff(["--config", str(node.config), "notify", *EVENT]) == "delivered"
        drain(reader)
        bad = node.config.parent / "bad.toml"
        for path, content in [
            (node.config.parent / "missing.toml", None),
            (node.config.parent, None),
            (bad, b'[agent]\nnode_name = "\xff"\n'),
            (bad, b"[agent\n"),
        ]:
            if content is not None:
                bad.write_bytes(content)
            assert handoff(["--config", str(path), "notify", *EVENT]) == "config", path
        bad.write_text("x = " + "[" * 100_000 + "]" * 100_000)
        assert handoff(["--config", str(bad), "notify", *EVENT]) == "error"
        assert drain(reader) == b""


def test_config_broken_elsewhere_still_reaches_the_running_agent(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one difference from the full path, by design: the hand-off validates only run_dir
    and fifo, so a file broken elsewhere, which the full path refuses (exit 2, event dropped),
    still gets the event to the running agent, which runs on its last good config."""
    node.write(extra=EMAIL + "\n[policy]\nstop_retry = 0\n")
    args = ["--config", str(node.config), "notify"]
    with running_agent(node.run_dir, node.fifo) as reader:
        assert main([*args, "--", *EVENT]) == EXIT_CONFIG
        assert "policy.stop_retry" in capsys.readouterr().err
        assert drain(reader) == b""
        assert main([*args, *EVENT]) == EXIT_OK
        assert drain(reader) == b'SCRIPT INSTANCE "VI_1" MASTER 100\n'


@pytest.mark.parametrize(
    "argv",
    [
        ["notify", *EVENT],
        ["--config", "F", "notify", *EVENT],
        ["--config=F", "notify", *EVENT],
        ["notify", "--config", "F", *EVENT],
        ["notify", "--config=F", *EVENT],
    ],
)
def test_the_forms_keepalived_runs_are_read_as_argparse_reads_them(argv: list[str]) -> None:
    """`[--config F] notify [--config F] WORDS`: the file (the default without the option) and
    the words, as argparse would give them."""
    path = defaults.CONFIG_PATH if argv[0] == "notify" and len(argv) == 5 else "F"
    assert notify_call(argv) == (path, EVENT)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["--version"],
        ["status"],
        ["--config", "F", "status"],
        ["notify", "--test"],
        ["notify", "--retry-rejected"],
        ["notify", "--", *EVENT],
        ["notify", *EVENT[:3], "-1"],
        ["--conf", "F", "notify", *EVENT],  # argparse's abbreviation
        ["--config", "F", "notify", "--config", "G", *EVENT],
        ["--config", "notify", *EVENT],  # "notify" is the file; argparse then sees a verb INSTANCE
        ["--config", "-F", "notify", *EVENT],
        ["notify", *EVENT, "--config", "F"],
    ],
)
def test_every_other_command_line_is_left_to_argparse(argv: list[str]) -> None:
    """Other verbs, options and anything argparse might read differently: not handed off."""
    assert notify_call(argv) is None
    assert handoff(argv) == "not an event call"
