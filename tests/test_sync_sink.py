"""lbwatch's receiver (``lbwatch receive STAGING``, the sync key's forced command), run as sshd
runs it, spoken to in its protocol by hand: what a holder of the sync key can and cannot do.
Each forbidden case comes after the allowed one succeeds on the same connection or setup."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbwatch.sync import limits, sink, slots
from tests.conftest import needs
from tests.lab.netlab import LBWATCH

LIMIT = 64 * 1024 * 1024  # the receiver's limit, as its greeting must say


def name_for(content: bytes, counter: int = 1, file: str = "haproxy.cfg") -> str:
    """A staged version's name, built here from the format (not from lbwatch's code)."""
    return f"{file}@lb1@c{counter}@1700000000000000000@{hashlib.sha256(content).hexdigest()}"


class Conn:
    """One connection to a receiver, as sshd would start it."""

    def __init__(
        self, staging: Path, asked: str | None = "lbwatch-sync 1", max_file: int | None = None
    ) -> None:
        """``max_file``: the largest file the receiver may write (RLIMIT_FSIZE), as a full
        disk would stop it."""
        env = {"PATH": os.environ["PATH"]}
        if asked is not None:
            env["SSH_ORIGINAL_COMMAND"] = asked
        # prlimit execs the receiver, so the process is the receiver itself.
        limit = [] if max_file is None else ["prlimit", f"--fsize={max_file}", "--"]
        self.proc = subprocess.Popen(
            [*limit, LBWATCH, "receive", str(staging)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def greeting(self) -> bytes:
        return self.stdout.readline()

    def send(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def answer(self) -> bytes:
        return self.stdout.readline()

    def put(self, name: str, content: bytes) -> bytes:
        self.send(f"PUT {name} {len(content)}\n".encode() + content)
        return self.answer()

    def get(self, name: str) -> tuple[bytes, bytes]:
        self.send(f"GET {name}\n".encode())
        head = self.answer()
        body = b""
        if head.startswith(b"DATA "):
            body = self.stdout.read(int(head[5:]))
        return head, body

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        """Close our end; the receiver's exit code and what it said on stderr."""
        self.stdin.close()
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.stdout.close()
        self.proc.stderr.close()
        return code, err

    def kill(self) -> None:
        """End the receiver if it still runs, and close our ends (a test's clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.stdin, self.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """A node's staging directory, with what its agent writes there at start for its receivers
    (it syncs haproxy.cfg; the default limits)."""
    path = tmp_path / "base" / "staging"
    path.mkdir(parents=True)
    limits.publish(path, limits.Limits("haproxy.cfg"))
    return path


@pytest.fixture
def conn(staging: Path) -> Iterator[Conn]:
    c = Conn(staging)
    assert c.greeting() == b"LBWATCH-SYNC 1 %d\n" % LIMIT
    yield c
    c.kill()


def listing(root: Path) -> set[str]:
    """Every path under ``root`` but the receivers' own directory in staging (``limits``)."""
    paths = (p.relative_to(root) for p in root.rglob("*"))
    return {str(p) for p in paths if limits.DIR not in p.parts}


def test_version_lands_whole_and_private_and_status_reads_back(staging: Path, conn: Conn) -> None:
    """A version is stored under its name with its content, mode 0600, no temporary file left;
    the status file is read back as it is; a clean end of the stream is exit 0."""
    content = b"global\n    maxconn 100\n"
    assert conn.put(name_for(content), content) == b"OK\n"
    landed = staging / name_for(content)
    assert landed.read_bytes() == content
    assert landed.stat().st_mode & 0o777 == 0o600
    assert listing(staging) == {name_for(content)}
    (staging / "status.json").write_bytes(b'{"haproxy.cfg": {}}')
    assert conn.get("status.json") == (b"DATA 19\n", b'{"haproxy.cfg": {}}')
    # The same version again (a retry) is fine and changes nothing.
    assert conn.put(name_for(content), content) == b"OK\n"
    assert conn.finish() == (0, "")


@pytest.mark.parametrize(
    "name",
    [
        "../escaped@lb1@c1@1@" + "0" * 64,
        "/tmp/escaped",
        "sub/haproxy.cfg",
        "..",
        ".hidden@lb1@c1@1@" + "0" * 64,
        "status.json",
        "authorized_keys",
    ],
)
def test_only_a_staged_version_name_is_taken(
    staging: Path, conn: Conn, tmp_path: Path, name: str
) -> None:
    """A path, a dot file, the status file or any other name is refused, its body consumed so
    the connection goes on: the next version still lands, and nothing appeared anywhere else."""
    (staging / "status.json").write_bytes(b"{}")
    before = listing(tmp_path)
    assert conn.put(name, b"forged\n").startswith(b"ERR not a staged version's name")
    assert listing(tmp_path) == before
    assert (staging / "status.json").read_bytes() == b"{}"
    content = b"after\n"
    assert conn.put(name_for(content), content) == b"OK\n"
    assert (staging / name_for(content)).read_bytes() == content
    assert conn.finish()[0] == 0


def test_content_must_match_the_hash_in_its_name(staging: Path, conn: Conn) -> None:
    """A body that is not what its name's hash says (damaged or forged) never lands."""
    good = b"good\n"
    assert conn.put(name_for(good), good) == b"OK\n"
    assert conn.put(name_for(b"other\n"), b"forged\n").startswith(b"ERR content does not match")
    assert listing(staging) == {name_for(good)}
    assert conn.finish()[0] == 0


def test_symlinks_in_staging_are_never_followed(staging: Path, conn: Conn, tmp_path: Path) -> None:
    """A symlink at a version's name is refused and its target untouched; a status file that
    is a symlink is not read through."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    (staging / "status.json").write_bytes(b"{}")
    assert conn.get("status.json") == (b"DATA 2\n", b"{}")
    content = b"version\n"
    (staging / name_for(content)).symlink_to(secret)
    assert conn.put(name_for(content), content).startswith(b"ERR ")
    assert secret.read_bytes() == b"root's secret\n"
    assert (staging / name_for(content)).is_symlink()
    (staging / "status.json").unlink()
    (staging / "status.json").symlink_to(secret)
    head, body = conn.get("status.json")
    assert head.startswith(b"ERR ") and body == b""
    assert conn.get("../secret")[0].startswith(b"ERR only status.json")
    assert conn.finish()[0] == 0


def test_oversized_transfer_is_refused_before_its_body(staging: Path, conn: Conn) -> None:
    """A size over the limit ends the connection at once, without reading (or storing) the
    body: the receiver exits while the sender has sent only the header."""
    content = b"fine\n"
    assert conn.put(name_for(content), content) == b"OK\n"
    conn.send(f"PUT {name_for(b'x')} {LIMIT + 1}\n".encode())
    assert conn.answer() == f"ERR {LIMIT + 1} bytes is over the limit of {LIMIT}\n".encode()
    assert conn.proc.wait(10) == 1
    assert listing(staging) == {name_for(content)}


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage \x80\n",
        b"HELLO\n",
        b"PUT haproxy.cfg\n",
        b"PUT haproxy.cfg -5\n",
        b"PUT haproxy.cfg 1e9\n",
        b"DELETE status.json\n",
        b"X" * 5000 + b"\n",
    ],
)
def test_garbage_ends_the_connection(staging: Path, conn: Conn, garbage: bytes) -> None:
    """A request that cannot be framed is answered ERR and the connection ends (exit 1), with
    nothing stored."""
    content = b"fine\n"
    assert conn.put(name_for(content), content) == b"OK\n"
    conn.send(garbage)
    assert conn.answer().startswith(b"ERR ")
    code, err = conn.finish()
    assert code == 1 and err.startswith("lbwatch receive: ")
    assert listing(staging) == {name_for(content)}


@pytest.mark.parametrize("cut", ["in the header", "in the body"])
def test_truncated_frame_stores_nothing_and_leaves_no_temporary_file(
    staging: Path, conn: Conn, cut: str
) -> None:
    """A stream that ends inside a request (the sender died) stores nothing, leaves no
    temporary file, and the receiver exits 1."""
    content = b"x" * 100_000
    assert conn.put(name_for(b"before\n"), b"before\n") == b"OK\n"
    if cut == "in the header":
        conn.send(f"PUT {name_for(content)}".encode())
    else:
        conn.send(f"PUT {name_for(content)} {len(content)}\n".encode() + content[:60_000])
    code, _ = conn.finish()
    assert code == 1
    assert listing(staging) == {name_for(b"before\n")}


def test_two_connections_at_once_each_land_whole(staging: Path, conn: Conn) -> None:
    """A second connection while the first is mid-transfer: each version lands whole under its
    own name, and the same version from both lands once."""
    other = Conn(staging)
    try:
        assert other.greeting().startswith(b"LBWATCH-SYNC 1 ")
        a, b = b"a" * 300_000, b"b" * 200_000
        conn.send(f"PUT {name_for(a, 1)} {len(a)}\n".encode() + a[:150_000])
        assert other.put(name_for(b, 2), b) == b"OK\n"
        assert not (staging / name_for(a, 1)).exists()  # not there until it is whole
        conn.send(a[150_000:])
        assert conn.answer() == b"OK\n"
        same = b"same\n"
        conn.send(f"PUT {name_for(same, 3)} {len(same)}\n".encode())
        assert other.put(name_for(same, 3), same) == b"OK\n"
        conn.send(same)
        assert conn.answer() == b"OK\n"
        assert (staging / name_for(a, 1)).read_bytes() == a
        assert (staging / name_for(b, 2)).read_bytes() == b
        assert (staging / name_for(same, 3)).read_bytes() == same
        assert listing(staging) == {name_for(a, 1), name_for(b, 2), name_for(same, 3)}
    finally:
        assert other.finish()[0] == 0


@pytest.mark.parametrize(
    "asked", [None, "rsync --server -logDtpre.iLsfxCIvu . staging/", "sh -c id", "lbwatch-sync 2"]
)
def test_only_lbwatch_sync_connections_are_served(staging: Path, asked: str | None) -> None:
    """The key serves lbwatch's own protocol only: an rsync (an lbwatch older than the
    receiver), a shell command or another protocol version is refused with one line, exit 1,
    before anything is read. The allowed request, on the same receiver, is the fixture's."""
    c = Conn(staging, asked)
    started = time.monotonic()
    code, err = c.finish()
    assert code == 1 and err.startswith("lbwatch receive: refused")
    assert time.monotonic() - started < 10
    assert listing(staging) == set()


@needs("prlimit")
def test_a_version_the_disk_cannot_take_fails_alone_and_the_connection_goes_on(
    staging: Path,
) -> None:
    """A write that fails mid-body (a full disk; here the receiver's file size limit) answers
    ERR for that version only: the rest of its body is consumed, so the next request is read as
    a request, answered on its own, and nothing half-written stays behind."""
    conn = Conn(staging, max_file=100_000)
    try:
        assert conn.greeting().startswith(b"LBWATCH-SYNC 1 ")
        small = b"fits\n"
        assert conn.put(name_for(small, 1), small) == b"OK\n"
        big = b"global\n" + b"#" * 999 + b"\n" * 1_000  # more than one read of the body
        big = big * 1_000
        assert conn.put(name_for(big, 2), big).startswith(b"ERR ")
        after = b"after\n"
        assert conn.put(name_for(after, 3), after) == b"OK\n"
        assert listing(staging) == {name_for(small, 1), name_for(after, 3)}
        assert conn.finish() == (0, "")
    finally:
        conn.kill()


def test_a_status_file_that_is_a_directory_is_refused_without_keeping_it_open(
    staging: Path, conn: Conn
) -> None:
    """A status file that is a directory is refused as not a regular file, and each refusal
    closes what it opened: a kept connection asking again and again holds no more descriptors
    (it would run out, and then take no version either)."""
    (staging / "status.json").write_bytes(b"{}")
    assert conn.get("status.json") == (b"DATA 2\n", b"{}")
    (staging / "status.json").unlink()
    (staging / "status.json").mkdir()
    fds = Path(f"/proc/{conn.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    for _ in range(20):
        assert conn.get("status.json") == (b"ERR status.json is not a regular file\n", b"")
    assert len(list(fds.iterdir())) == before
    content = b"still fine\n"
    assert conn.put(name_for(content), content) == b"OK\n"
    assert conn.finish() == (0, "")


def test_a_status_read_naming_the_held_hash_is_answered_same(staging: Path, conn: Conn) -> None:
    """GET with the hash of the content the sender holds: SAME while the file has it, the whole
    file once it changed or the hash is another."""
    first = b'{"a": 1}'
    (staging / "status.json").write_bytes(first)
    digest = hashlib.sha256(first).hexdigest()
    assert conn.get("status.json") == (b"DATA 8\n", first)
    conn.send(f"GET status.json {digest}\n".encode())
    assert conn.answer() == b"SAME\n"
    assert conn.get(f"status.json {'0' * 64}") == (b"DATA 8\n", first)
    (staging / "status.json").write_bytes(b'{"a": 2}')
    assert conn.get(f"status.json {digest}") == (b"DATA 8\n", b'{"a": 2}')
    assert conn.finish()[0] == 0


def test_without_o_tmpfile_a_body_goes_through_a_dot_file_that_never_stays(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem cannot make an unnamed file, a body is written to a temporary dot
    file, linked under its name without replacing one, and the dot file is removed, for a
    refused body too (in-process: the fallback cannot be chosen from outside)."""
    monkeypatch.setattr(sink, "_TMPFILE", False)
    dirfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        slot = slots.Slot.take(slots.control(dirfd), None, 1)
        assert slot is not None
        session = sink.Session(dirfd, slot, 0)
        content = b"global\n"
        sink._put(session, io.BytesIO(content), name_for(content), len(content))
        assert listing(staging) == {name_for(content)}
        with pytest.raises(sink.Refused, match="does not match the hash"):
            sink._put(session, io.BytesIO(b"forged\n"), name_for(b"other\n"), 7)
        assert listing(staging) == {name_for(content)}
        assert (staging / name_for(content)).read_bytes() == content
    finally:
        os.close(dirfd)
