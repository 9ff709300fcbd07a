"""A receiver that cannot serve a connection at all says why in one line (``unready``), and the
sender reads it back: the kind decided from the error met (a table), the line the receiver
itself prints for a staging directory missing or unusable (run here as sshd would start it,
before any request), and its reading amid ssh's words."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

import pytest

from lbwatch.events import Outcome
from lbwatch.services import CommandResult
from lbwatch.sync import limits, sink
from lbwatch.sync.transport import Failure, Peer, diagnose, explain
from lbwatch.sync.unready import Kind, Unready, kind_of, parse


@pytest.mark.parametrize(
    ("code", "opening", "expected"),
    [
        (errno.ENOENT, True, Kind.NO_STAGING),  # not set up for sync there
        (errno.ENOENT, False, Kind.UNUSABLE),  # .receiver gone meanwhile: not a missing staging
        (errno.EACCES, True, Kind.NO_ACCESS),
        (errno.EACCES, False, Kind.NO_ACCESS),  # .receiver root's, the key's user not root
        (errno.EPERM, False, Kind.NO_ACCESS),
        (errno.ENOTDIR, True, Kind.UNUSABLE),  # a file where staging should be
        (errno.ELOOP, False, Kind.UNUSABLE),  # .receiver a symlink
        (errno.EROFS, False, Kind.UNUSABLE),
        (errno.ENOSPC, False, Kind.UNUSABLE),
        (None, False, Kind.UNUSABLE),
    ],
)
def test_the_kind_follows_from_the_error_and_where_it_was_met(
    code: int | None, opening: bool, expected: Kind
) -> None:
    """Only staging itself missing means lbwatch there is not set up for sync; a permission
    refused anywhere is the user's; anything else is an unusable directory."""
    assert kind_of(code, opening) is expected


def _receive(staging: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The receiver as sshd starts it for a sender's connection."""
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", sink.PROTOCOL)
    return sink.main(["--peer", "lb1", str(staging)])


def test_a_missing_staging_is_said_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No staging directory (lbwatch there has no [sync]): exit 1 and one line, read back as
    no-staging with the directory, the receiver's user and the system's words."""
    staging = tmp_path / "incoming"
    assert _receive(staging, monkeypatch) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    user = pwd.getpwuid(os.geteuid()).pw_name
    expected = Unready(Kind.NO_STAGING, user, str(staging), os.strerror(errno.ENOENT))
    assert parse(captured.err) == expected
    assert not staging.exists()  # nothing made in its place


@pytest.mark.parametrize("fault", ["file-at-staging", "receivers-dir-a-symlink"])
def test_an_unusable_staging_is_said_as_such(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    """A positive control first (staging as the agent makes it: the greeting), then staging a
    file, or its receivers' directory a symlink: one line, read back as unusable."""
    staging = tmp_path / "incoming"
    staging.mkdir()
    limits.publish(staging, limits.Limits("haproxy.cfg"))
    control = staging / limits.DIR
    if fault == "file-at-staging":
        staging = tmp_path / "a-file"
        staging.write_text("")
    else:
        control.rename(tmp_path / "elsewhere")
        control.symlink_to(tmp_path / "elsewhere")
    assert _receive(staging, monkeypatch) == 1
    said = parse(capsys.readouterr().err)
    assert said is not None and said.kind is Kind.UNUSABLE and said.staging == str(staging)
    assert said.error, said


def test_the_line_is_read_amid_ssh_words_and_only_as_said() -> None:
    """The receiver's line among ssh's, a kind a newer receiver says (still not served), and
    lines that are not it (the receiver's other refusals, an older one's words)."""
    line = Unready(Kind.NO_ACCESS, "lbsync", "/var/lib/lbwatch/incoming", "Permission denied")
    noise = "Warning: Permanently added '[127.0.0.1]:2222' (ED25519) to the list of known hosts."
    assert parse(f"{noise}\n{line.line()}\n") == line
    newer = "lbwatch receive: unready (no-quota, as root): /srv/in: Disk quota exceeded"
    assert parse(newer) == Unready(Kind.UNUSABLE, "root", "/srv/in", "Disk quota exceeded")
    for other in (
        "lbwatch receive: busy: 8 sessions of lb1's sync key are open here",
        "lbwatch receive: cannot open /var/lib/lbwatch/incoming: No such file or directory",
        "lbwatch receive: refused 'id': this key only takes lbwatch's own sync connections",
        "",
    ):
        assert parse(other) is None, other


@pytest.mark.parametrize(
    ("output", "expected", "detail"),
    [
        (
            "lbwatch receive: unready (no-staging, as root): /var/lib/lbwatch/incoming: "
            "No such file or directory",
            Failure.UNREADY,
            "lbwatch on 192.0.2.12 takes no config sync yet: /var/lib/lbwatch/incoming does "
            "not exist there (its agent makes it once [sync] is configured there)",
        ),
        (
            "lbwatch receive: unready (no-access, as lbsync): /var/lib/lbwatch/incoming: "
            "cannot open .receiver in it: Permission denied",
            Failure.UNREADY,
            "lbwatch's receiver on 192.0.2.12 runs as lbsync, who may not use "
            "/var/lib/lbwatch/incoming there: cannot open .receiver in it: Permission denied",
        ),
        ("sh: 1: lbwatch: not found", Failure.NO_COMMAND, "lbwatch is not found on 192.0.2.12"),
        (
            "bash: line 1: lbwatch: command not found",
            Failure.NO_COMMAND,
            "lbwatch is not found on 192.0.2.12",
        ),
        ("bash: lbwatch: command not found", Failure.NO_COMMAND, "lbwatch is not found"),
        (
            "bash: line 1: /usr/bin/lbwatch: No such file or directory",
            Failure.NO_COMMAND,
            "/usr/bin/lbwatch is not found on 192.0.2.12",
        ),
        ("sh: lbwatch: not found", Failure.NO_COMMAND, "lbwatch is not found"),  # busybox
        ("zsh:1: command not found: lbwatch", Failure.NO_COMMAND, "lbwatch is not found"),
        ("bash: line 1: rrsync: command not found", Failure.NO_COMMAND, "rrsync is not found"),
        (
            "ssh: Could not resolve hostname lb9: Name or service not known",
            Failure.UNRESOLVED,
            "ssh: cannot resolve the host name",
        ),
    ],
)
def test_the_sender_says_what_the_peer_lacks(output: str, expected: Failure, detail: str) -> None:
    """What the peer's receiver or shell said becomes one line about that peer: not set up
    for sync, a user who may not use staging, no such command there; ssh's own words are not
    taken for a shell's."""
    assert diagnose(output)[0] is expected
    result = CommandResult(Outcome.FAILED, "exit 1: " + output, 0.1, output + "\n")
    said = explain(result, Peer("lb2", "192.0.2.12"), None).detail
    assert said.startswith(detail) and "\n" not in said, said
