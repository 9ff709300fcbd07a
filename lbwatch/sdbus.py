"""Method calls to systemd over its private socket, without spawning systemctl (10-30 ms each)
and without a D-Bus library: written from the D-Bus specification (wire format, SASL EXTERNAL).

/run/systemd/private is what systemctl uses as root: peer-to-peer D-Bus to PID 1, no bus daemon,
so no Hello and no DESTINATION; only root may connect (the socket is 0600). Calls go out
little-endian; replies are read in either byte order.

The authentication goes out with the first calls in one write, without waiting for the server's
OK, so the agent's loop can write its question and a worker read the answer later. systemd 252's
sd-bus parks a pipelined BEGIN until its OK is written and only looks again when more bytes come
(fixed later: systemd PR #24875, "Process server authentication after write"); its first read
takes 256 bytes, so the first write is made longer with Peer.Ping calls that ask for no reply,
whose bytes wake it (tests/systemd/test_sdbus.py shows the stall without them). Keep the
connection open until the reply is read: closed before systemd has written its OK, the connection
is dropped with its calls unrun.

systemd sends its signals to every private connection (src/core/dbus.c, bus_foreach_bus), so a
reply may come after signals: they are passed over.

A caller sees ``BusError`` for an error reply (``name``: its D-Bus error name) or a message that
cannot be read (``name`` ""); ``TimeoutError`` when a reply is not in by its deadline; ``OSError``
from the socket (no socket: FileNotFoundError; not root: PermissionError; systemd gone:
ConnectionError).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Union

PRIVATE = "/run/systemd/private"
SYSTEMD = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
# The interface of each property unitjob reads. Job is "(uo)": (id, path), (0, "/") for none.
INTERFACE = {"Job": UNIT, "ActiveState": UNIT, "SubState": UNIT, "LoadState": UNIT}
INTERFACE.update({"Result": SERVICE, "NRestarts": SERVICE, "MainPID": SERVICE})
INTERFACE.update({"RestartUSec": SERVICE, "ExecMainExitTimestampMonotonic": SERVICE})
# How systemd answers a Get on a job that is gone (sd-bus: no object at that path).
NO_JOB = ("org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.systemd1.NoSuchJob")

Value = Union[int, str, tuple["Value", ...], list["Value"]]

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1
FIRST_READ = 256  # sd-bus's first read of a new connection (bus-socket.c, bus_socket_read_auth)
MAX_MESSAGE = 1 << 27  # the specification's limit
MAX_DEPTH = 64  # nested containers (the specification's: 32 arrays and 32 structs)
FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "h": "I"}
ALIGN = {"y": 1, "g": 1, "v": 1, "n": 2, "q": 2, "x": 8, "t": 8, "(": 8, "{": 8}  # else 4


class BusError(Exception):
    """An error reply (``name``: its D-Bus error name), or a message that cannot be read
    (``name`` "")."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}" if name else message)
        self.name = name


def unit_path(name: str) -> str:
    """The unit's object path: systemd's bus-label escaping (every byte but [A-Za-z0-9] as
    _xx); a name without a '.' is taken as a service, as systemctl does."""
    if "." not in name:
        name += ".service"
    label = "".join(chr(b) if chr(b).isalnum() and b < 128 else f"_{b:02x}" for b in name.encode())
    return f"{SYSTEMD}/unit/{label}"


def _put(buf: bytearray, code: str, value: object) -> None:
    """One value of the basic types calls use (s, o, g, u), aligned from ``buf``'s start."""
    if code == "g":
        data = str(value).encode()
        buf += bytes([len(data)]) + data + b"\0"
        return
    buf += b"\0" * (-len(buf) % 4)
    if code in "so":
        data = str(value).encode()
        buf += struct.pack("<I", len(data)) + data + b"\0"
    elif code == "u" and isinstance(value, int):
        buf += struct.pack("<I", value)
    else:
        raise TypeError(f"cannot marshal {value!r} as {code!r}")


def call_message(
    serial: int,
    path: str,
    iface: str,
    member: str,
    sig: str,
    args: Sequence[object],
    flags: int = 0,
) -> bytes:
    """A METHOD_CALL with header fields PATH, INTERFACE, MEMBER and SIGNATURE (when ``sig``)."""
    if len(sig) != len(args) or not set(sig) <= set("sogu"):
        raise TypeError(f"signature {sig!r} does not fit {len(args)} arguments")
    body = bytearray()
    for code, arg in zip(sig, args):
        _put(body, code, arg)
    fields = [(1, "o", path), (2, "s", iface), (3, "s", member)] + ([(8, "g", sig)] if sig else [])
    head = bytearray(struct.pack("<BBBBIII", ord("l"), METHOD_CALL, flags, 1, len(body), serial, 0))
    for field, kind, value in fields:
        head += b"\0" * (-len(head) % 8) + bytes([field])  # each field a struct: 8-aligned
        _put(head, "g", kind)
        _put(head, kind, value)
    struct.pack_into("<I", head, 12, len(head) - 16)  # the array's length, padding excluded
    return bytes(head + b"\0" * (-len(head) % 8) + body)


def _type_end(sig: str, i: int) -> int:
    """Where the complete type that starts at ``sig[i]`` ends (recursion bounded by its
    length)."""
    c = sig[i] if i < len(sig) else ""
    if c == "a":
        return _type_end(sig, i + 1)
    if c in ("(", "{"):
        j = i + 1
        while j < len(sig) and sig[j] not in ")}":  # each turn takes at least one character
            j = _type_end(sig, j)
        if j == i + 1 or j >= len(sig) or sig[j] != {"(": ")", "{": "}"}[c]:
            raise BusError("", f"bad signature {sig!r}")
        return j + 1
    if not c or (c not in FIXED and c not in "sogv"):
        raise BusError("", f"bad signature {sig!r}")
    return i + 1


def types(sig: str) -> list[str]:
    """The signature's complete types, in order."""
    out, i = [], 0
    while i < len(sig):  # each turn takes at least one character
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


class _Reader:
    """Values read off one message, aligned from its start."""

    def __init__(self, data: bytes, order: str, pos: int) -> None:
        self.data, self.order, self.pos = data, order, pos

    def _fixed(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        self.pos += -self.pos % size
        if self.pos + size > len(self.data):
            raise BusError("", "message truncated")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def _text(self, size: int) -> str:
        end = self.pos + size
        if end >= len(self.data) or self.data[end] != 0:
            raise BusError("", "a string without its NUL")
        text = self.data[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return text

    def read(self, t: str, depth: int = 0) -> Value:
        """One value of the complete type ``t``; a variant reads as the value it holds."""
        c = t[0]
        if depth > MAX_DEPTH:
            raise BusError("", "values nested too deep")
        if c in FIXED:
            return self._fixed(FIXED[c])
        if c in "so":
            return self._text(self._fixed("I"))
        if c == "g":
            return self._text(self._fixed("B"))
        if c == "v":
            inner = types(str(self.read("g")))
            if len(inner) != 1:
                raise BusError("", f"a variant of {len(inner)} types")
            return self.read(inner[0], depth + 1)
        if c in "({":
            self.pos += -self.pos % 8
            return tuple(self.read(e, depth + 1) for e in types(t[1:-1]))
        size = self._fixed("I")  # an array: its length, then padding to its first element
        self.pos += -self.pos % ALIGN.get(t[1], 4)
        end, items = self.pos + size, []
        if end > len(self.data):
            raise BusError("", "an array past the message's end")
        while self.pos < end:  # each element takes at least one byte
            items.append(self.read(t[1:], depth + 1))
        return items


class Message:
    """A message as read: its type, the serial it replies to, its error name and its body (read
    for replies only)."""

    def __init__(self, data: bytes) -> None:
        order = {ord("l"): "<", ord("B"): ">"}.get(data[0], "")
        if not order or data[3] != 1:
            raise BusError("", f"not a D-Bus 1 message: {data[:4]!r}")
        self.kind = data[1]
        r = _Reader(data, order, 12)
        array = r.read("a(yv)")
        fields = (
            {f[0]: f[1] for f in array if isinstance(f, tuple)} if isinstance(array, list) else {}
        )
        r.pos += -r.pos % 8
        self.reply_to = fields.get(5, 0)
        self.error = str(fields.get(4, ""))
        self.body: tuple[Value, ...] = ()
        if self.kind in (METHOD_RETURN, ERROR):
            self.body = tuple(r.read(t) for t in types(str(fields.get(8, ""))))


def frame_size(head: bytes | bytearray) -> int:
    """A message's whole size, from its first 16 bytes."""
    order = ">" if head[0] == ord("B") else "<"
    body, _, fields = struct.unpack_from(order + "III", head, 4)
    size = int(16 + fields + (-fields % 8) + body)
    if size > MAX_MESSAGE:
        raise BusError("", f"a message of {size} bytes")
    return size


class Connection:
    """``with Connection.open() as conn:`` a connection to systemd. ``queue`` and ``send``
    calls; ``reply`` reads one's answer. The authentication goes out with the first write."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        uid = str(os.getuid()).encode().hex().encode()
        self._out = bytearray(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n")
        self._in = bytearray()
        self._first, self._authed, self._serial = True, False, 0
        self._pending: set[int] = set()
        self._replies: dict[int, Message] = {}

    @classmethod
    def open(cls, path: str = PRIVATE, timeout: float = 1.0) -> Connection:
        """Connected, nothing sent (a Unix socket's connect does not wait for the server);
        ``timeout`` bounds each write."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except socket.timeout as e:  # on Python 3.9 not yet a TimeoutError
            sock.close()
            raise TimeoutError("systemd did not take the connection in time") from e
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close; calls whose reply is not read may be lost if systemd's OK was not read yet."""
        self._sock.close()

    def queue(self, path: str, iface: str, member: str, sig: str, args: Sequence[object]) -> int:
        """A call put in the buffer that ``flush`` writes; its serial."""
        self._serial += 1
        self._out += call_message(self._serial, path, iface, member, sig, args)
        self._pending.add(self._serial)
        return self._serial

    def flush(self) -> None:
        """Write what is queued, in one write; the first, longer than sd-bus's first read."""
        while self._first and len(self._out) <= FIRST_READ:  # 88 bytes a turn
            self._serial += 1
            ping = ("/", "org.freedesktop.DBus.Peer", "Ping", "", ())
            self._out += call_message(self._serial, *ping, flags=NO_REPLY_EXPECTED)
        if self._out:
            try:
                self._sock.sendall(self._out)
            except socket.timeout as e:  # on Python 3.9 not yet a TimeoutError
                raise TimeoutError("systemd did not take the calls in time") from e
            self._out.clear()
            self._first = False

    def send(self, path: str, iface: str, member: str, sig: str, args: Sequence[object]) -> int:
        """A call written now; its serial."""
        serial = self.queue(path, iface, member, sig, args)
        self.flush()
        return serial

    def reply(self, serial: int, deadline: float) -> tuple[Value, ...]:
        """The body of call ``serial``'s reply, read by ``deadline`` (time.monotonic()); an
        error reply raises BusError with its name."""
        self.flush()
        while serial not in self._replies:  # each turn reads a message, or raises
            msg = self._next(deadline)
            if msg.kind in (METHOD_RETURN, ERROR) and msg.reply_to in self._pending:
                self._pending.discard(msg.reply_to)
                self._replies[msg.reply_to] = msg
            elif msg.kind in (METHOD_CALL, METHOD_RETURN, ERROR):
                raise BusError("", f"unexpected message (type {msg.kind}, to {msg.reply_to})")
            # else a signal, or a type the specification says to ignore
        msg = self._replies.pop(serial)
        if msg.kind == ERROR:
            raise BusError(msg.error or "(no name)", str(msg.body[0]) if msg.body else "")
        return msg.body

    def _next(self, deadline: float) -> Message:
        """The next message, after the server's OK."""
        while True:  # each turn takes a line or a message, or receives (by the deadline)
            if not self._authed and b"\r\n" in self._in:
                line, _, rest = bytes(self._in).partition(b"\r\n")
                if not line.startswith(b"OK "):
                    raise BusError("", f"authentication refused: {line[:100]!r}")
                self._in[:], self._authed = rest, True
                continue
            if not self._authed and len(self._in) > 512:
                raise BusError("", "no line where the server's OK should be")
            if self._authed and len(self._in) >= 16 and len(self._in) >= frame_size(self._in):
                size = frame_size(self._in)
                msg = Message(bytes(self._in[:size]))
                del self._in[:size]
                return msg
            self._receive(deadline)

    def _receive(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("systemd did not answer in time")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except socket.timeout as e:  # on Python 3.9 not yet a TimeoutError
            raise TimeoutError("systemd did not answer in time") from e
        if not data:
            raise ConnectionResetError("systemd closed the connection")
        self._in += data


def get_properties(
    conn: Connection, unit: str, names: Sequence[str], deadline: float
) -> dict[str, Value]:
    """The unit's properties (``INTERFACE`` has each one's interface), one Properties.Get a
    property, written at once. A unit systemd does not know reads as LoadState "not-found",
    inactive/dead, not as an error."""
    return read_properties(conn, ask_properties(conn, unit, names), deadline)


def ask_properties(conn: Connection, unit: str, names: Sequence[str]) -> dict[str, int]:
    """``get_properties``'s calls written now, nothing read: each property's call serial."""
    path = unit_path(unit)
    serials = {n: conn.queue(path, PROPERTIES, "Get", "ss", (INTERFACE[n], n)) for n in names}
    conn.flush()
    return serials


def read_properties(conn: Connection, serials: dict[str, int], deadline: float) -> dict[str, Value]:
    """The answers to ``ask_properties``'s calls, by property."""
    return {n: conn.reply(s, deadline)[0] for n, s in serials.items()}


def job_type(conn: Connection, job_path: str, deadline: float) -> str | None:
    """The job's JobType ("start", "stop", "restart", ...); None when the job is gone."""
    serial = conn.send(
        job_path, PROPERTIES, "Get", "ss", ("org.freedesktop.systemd1.Job", "JobType")
    )
    try:
        return str(conn.reply(serial, deadline)[0])
    except BusError as e:
        if e.name in NO_JOB:
            return None
        raise


def stop_unit_send(conn: Connection, unit: str) -> int:
    """Manager.StopUnit(unit, "replace") written now; its serial. The reply is the job's path."""
    return conn.send(SYSTEMD, MANAGER, "StopUnit", "ss", (unit, "replace"))
