"""What a node's receivers may take (``sync/limits.py``): the document its agent writes, read
leniently and written strictly, the defaults the config and the receiver share, and the quota
decision as a table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lbwatch.config import Sync
from lbwatch.sync import limits
from lbwatch.sync.limits import Limits, Usage, over, parse, render
from tests.fakes import config

MiB = 1024 * 1024


def test_the_config_defaults_are_the_receivers_defaults() -> None:
    """[sync]'s defaults are the ones a receiver takes for a value the document lacks, so an
    agent that writes them and one that does not mean the same."""
    s = Sync()
    assert (s.receiver_sessions, s.staging_max_bytes, s.staging_max_files) == (
        limits.SESSIONS,
        limits.MAX_BYTES,
        limits.MAX_FILES,
    )
    assert limits.MAX_BYTES == 4 * limits.MAX_VERSION == 256 * MiB


def test_what_the_agent_writes_reads_back_the_same(tmp_path: Path) -> None:
    """The document written from a config (its unit, its peers, its limits) reads back as
    written, through the receivers' directory, which is private to root."""
    cfg = config(sync={"peers": [{"name": "lb2", "host": "192.0.2.12"}]})
    said = limits.for_config(cfg, "haproxy.cfg.bundle")
    staging = tmp_path / "staging"
    limits.publish(staging, said)
    assert (staging / limits.DIR).stat().st_mode & 0o777 == 0o700
    fd = os.open(staging / limits.DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert limits.read(fd) == said == Limits("haproxy.cfg.bundle", peers=1)
    finally:
        os.close(fd)
    assert parse(render(said)) == said


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"lbwatch-receiver": 1, "unit": "haproxy.cfg"}', Limits("haproxy.cfg")),
        # Out of range or of the wrong type: the default, never a limit of 0 or a huge one.
        (
            b'{"lbwatch-receiver": 1, "unit": "haproxy.cfg", "receiver_sessions": 0, '
            b'"staging_max_bytes": "1", "staging_max_files": true, "idle": -5}',
            Limits("haproxy.cfg"),
        ),
        (b'{"lbwatch-receiver": 1, "unit": "haproxy.cfg", "later": 1}', Limits("haproxy.cfg")),
        (b'{"lbwatch-receiver": 1}', None),  # no unit: no document
        (b'{"lbwatch-receiver": 1, "unit": "../haproxy.cfg"}', None),
        (b'{"lbwatch-receiver": 2, "unit": "haproxy.cfg"}', None),
        (b"[]", None),
        (b"not json", None),
    ],
)
def test_the_document_is_read_leniently(raw: bytes, expected: Limits | None) -> None:
    """Values out of range take their defaults; a document without a valid unit is none."""
    assert parse(raw) == expected


@pytest.mark.parametrize(
    ("used", "size", "full"),
    [
        (Usage(0, 0), 64 * MiB, False),
        (Usage(192 * MiB, 3), 64 * MiB, False),  # exactly the quota
        (Usage(192 * MiB, 3), 64 * MiB + 1, True),
        (Usage(0, 63), 1, False),
        (Usage(0, 64), 0, True),  # an empty version is a file too
    ],
)
def test_the_quota(used: Usage, size: int, full: bool) -> None:
    """One more version fits while staging, with it, holds at most the quota's bytes and files."""
    why = over(used, size, Limits("haproxy.cfg"))
    assert (why is not None) is full
    assert why is None or why.startswith("staging is full")


def test_a_key_line_without_peer_shares_one_pool_sized_for_every_peer() -> None:
    """A key's pool is ``sessions``; the pool of key lines without --peer is that times the
    node's peers."""
    said = Limits("haproxy.cfg", sessions=8, peers=2)
    assert (said.pool("lb1"), said.pool(None)) == (8, 16)
