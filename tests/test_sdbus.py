"""The D-Bus wire format of lbwatch.sdbus, against bytes written apart from it: a call assembled by
hand from the specification, and replies GLib 2.74 made (GDBusMessage.to_blob, Debian 12's
python3-gi), fed to a Connection through a socketpair as systemd would send them."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lbwatch import sdbus
from lbwatch.sdbus import BusError, Connection, call_message, unit_path

# Properties.Get("org.freedesktop.systemd1.Unit", "ActiveState") on haproxy.service, serial 7,
# assembled by hand: the fixed header, then each header field a struct (yv) 8-aligned.
GET_CALL = b"".join(
    [
        b"l\x01\x00\x01",  # little-endian, METHOD_CALL, no flags, version 1
        b"\x34\x00\x00\x00",  # body: 4+29+1, 2 pad, 4+11+1 = 52
        b"\x07\x00\x00\x00",  # serial 7
        b"\x80\x00\x00\x00",  # header fields: offsets 16 to 144 = 128 bytes
        b"\x01\x01o\x00" + b"\x30\x00\x00\x00",  # @16 PATH, variant "o", 48 bytes
        b"/org/freedesktop/systemd1/unit/haproxy_2eservice\x00" + b"\x00" * 7,  # @73, pad to 80
        b"\x02\x01s\x00" + b"\x1f\x00\x00\x00",  # @80 INTERFACE, "s", 31 bytes
        b"org.freedesktop.DBus.Properties\x00",  # ends @120
        b"\x03\x01s\x00" + b"\x03\x00\x00\x00" + b"Get\x00" + b"\x00" * 4,  # @120 MEMBER, to 136
        b"\x08\x01g\x00" + b"\x02ss\x00",  # @136 SIGNATURE "ss", ends @144: the body's start
        b"\x1d\x00\x00\x00org.freedesktop.systemd1.Unit\x00" + b"\x00" * 2,  # 34, pad to 36
        b"\x0b\x00\x00\x00ActiveState\x00",
    ]
)

# Replies from GLib: METHOD_RETURN to serials 1-5, an ERROR to 6, and a signal.
# v((uo)): (123, job 123)
JOB_1 = bytes.fromhex(
    "6c02010132000000e903000010000000080167000176000005017500010000000428756f290000007b000000"
    "210000002f6f72672f667265656465736b746f702f73797374656d64312f6a6f622f31323300"
)
# v(s): "activating"
STATE_2 = bytes.fromhex(
    "6c02010113000000ea0300001000000008016700017600000501750002000000017300000a00000061637469"
    "766174696e6700"
)
# v(u): 4711
PID_3 = bytes.fromhex(
    "6c02010108000000eb03000010000000080167000176000005017500030000000175000067120000"
)
# v(u): 4711, big-endian
PID_BE_4 = bytes.fromhex(
    "4202010100000008000003ec00000010080167000176000005017500000000040175000000001267"
)
# o: what StopUnit answers
PATH_5 = bytes.fromhex(
    "6c02010126000000ed0300001000000008016700016f00000501750005000000210000002f6f72672f667265"
    "656465736b746f702f73797374656d64312f6a6f622f32323200"
)
# ERROR org.freedesktop.systemd1.NoSuchUnit "Unit nosuch.service not loaded."
ERROR_6 = bytes.fromhex(
    "6c03010124000000ee0300004000000004017300230000006f72672e667265656465736b746f702e73797374"
    "656d64312e4e6f53756368556e69740000000000080167000173000005017500060000001f000000556e6974"
    "206e6f737563682e73657276696365206e6f74206c6f616465642e00"
)
# Manager.JobRemoved(uoss), as systemd sends to every private connection
SIGNAL = bytes.fromhex(
    "6c0401014d000000f40300007b00000001016f00190000002f6f72672f667265656465736b746f702f737973"
    "74656d64310000000000000002017300200000006f72672e667265656465736b746f702e73797374656d6431"
    "2e4d616e6167657200000000000000000801670004756f737300000000000000030173000a0000004a6f6252"
    "656d6f766564000000000000de000000210000002f6f72672f667265656465736b746f702f73797374656d64"
    "312f6a6f622f323232000000130000006c62772d736c65657065722e736572766963650004000000646f6e65"
    "00"
)
# ERROR org.freedesktop.DBus.Error.UnknownObject to 4: how systemd answers for a gone job
GONE_4 = bytes.fromhex(
    "6c03010136000000ec0300004800000004017300280000006f72672e667265656465736b746f702e44427573"
    "2e4572726f722e556e6b6e6f776e4f626a656374000000000000000008016700017300000501750004000000"
    "31000000556e6b6e6f776e206f626a65637420272f6f72672f667265656465736b746f702f73797374656d64"
    "312f6a6f622f39272e00"
)
# ERROR org.freedesktop.DBus.Error.AccessDenied to 5
DENIED_5 = bytes.fromhex(
    "6c03010112000000ed0300004000000004017300270000006f72672e667265656465736b746f702e44427573"
    "2e4572726f722e41636365737344656e69656400080167000173000005017500050000000d00000041636365"
    "73732064656e69656400"
)
OK = b"OK 0123456789abcdef0123456789abcdef\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection whose server end the test plays."""
    client, server = socket.socketpair()
    server.settimeout(2)
    with Connection(client) as conn, server:
        yield conn, server


def drain(server: socket.socket) -> bytes:
    """What the client wrote so far."""
    server.settimeout(0.2)
    data = b""
    while True:  # ends at the first quiet 0.2 s
        try:
            chunk = server.recv(65536)
        except socket.timeout:
            return data
        if not chunk:
            return data
        data += chunk


def send_in_pieces(server: socket.socket, data: bytes, size: int) -> None:
    """``data`` in pieces of ``size`` bytes, 1 ms apart, so that reads split messages."""
    for i in range(0, len(data), size):
        server.sendall(data[i : i + size])
        time.sleep(0.001)


def test_call_matches_the_hand_assembled_bytes() -> None:
    """A Properties.Get call marshals to the specification's bytes, alignment included."""
    path = unit_path("haproxy.service")
    got = call_message(7, path, sdbus.PROPERTIES, "Get", "ss", (sdbus.UNIT, "ActiveState"))
    assert got == GET_CALL


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("haproxy.service", "haproxy_2eservice"),
        ("haproxy", "haproxy_2eservice"),  # no '.': a service, as systemctl takes it
        ("lbw-sleeper.service", "lbw_2dsleeper_2eservice"),
        ("getty@tty1.service", "getty_40tty1_2eservice"),
        ("dev-disk-by\\x2dlabel.device", "dev_2ddisk_2dby_5cx2dlabel_2edevice"),
        ("a_b.timer", "a_5fb_2etimer"),
        ("Ab9.slice", "Ab9_2eslice"),
        ("é.service", "_c3_a9_2eservice"),  # each byte of UTF-8
    ],
)
def test_unit_path_escapes_like_systemd(name: str, path: str) -> None:
    """Every byte but [A-Za-z0-9] of a unit's name is _xx in its object path."""
    assert unit_path(name) == "/org/freedesktop/systemd1/unit/" + path


def test_first_write_is_auth_then_calls_longer_than_sd_bus_first_read(
    pair: tuple[Connection, socket.socket],
) -> None:
    """The first write is AUTH EXTERNAL with the uid in hex, BEGIN, the call, and no-reply
    pings making it longer than 256 bytes; later writes are the calls alone."""
    conn, server = pair
    serial = sdbus.stop_unit_send(conn, "keepalived.service")
    first = drain(server)
    uid = str(os.getuid()).encode().hex().encode()
    head = b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n"
    stop = call_message(
        serial, sdbus.SYSTEMD, sdbus.MANAGER, "StopUnit", "ss", ("keepalived.service", "replace")
    )
    assert first.startswith(head + stop)
    assert len(first) > 256
    pings = first[len(head + stop) :]
    assert pings and pings[2] == sdbus.NO_REPLY_EXPECTED and b"Ping\0" in pings
    later = conn.send("/", sdbus.PROPERTIES, "Get", "ss", ("a", "b"))
    assert drain(server) == call_message(later, "/", sdbus.PROPERTIES, "Get", "ss", ("a", "b"))


def test_replies_read_past_signals_in_any_order_and_in_pieces(
    pair: tuple[Connection, socket.socket],
) -> None:
    """Replies are matched to their calls whatever their order, across reads that split them,
    with a signal in between; variants read as the value they hold, either byte order."""
    conn, server = pair
    serials = [conn.queue("/", sdbus.PROPERTIES, "Get", "ss", ("a", "b")) for _ in range(6)]
    assert serials == [1, 2, 3, 4, 5, 6]
    conn.flush()
    stream = OK + SIGNAL + PID_3 + JOB_1 + SIGNAL + PATH_5 + STATE_2 + ERROR_6 + PID_BE_4
    dribble = threading.Thread(target=send_in_pieces, args=(server, stream, 7))
    dribble.start()
    deadline = time.monotonic() + 2
    assert conn.reply(1, deadline) == ((123, "/org/freedesktop/systemd1/job/123"),)
    assert conn.reply(2, deadline) == ("activating",)
    assert conn.reply(3, deadline) == (4711,)
    assert conn.reply(4, deadline) == (4711,)
    assert conn.reply(5, deadline) == ("/org/freedesktop/systemd1/job/222",)
    with pytest.raises(BusError) as err:
        conn.reply(6, deadline)
    assert err.value.name == "org.freedesktop.systemd1.NoSuchUnit"
    assert str(err.value).endswith("Unit nosuch.service not loaded.")
    dribble.join(5)


def test_get_properties_and_job_type(pair: tuple[Connection, socket.socket]) -> None:
    """get_properties asks each property on its interface and gives the held values by name;
    job_type reads a gone job (UnknownObject) as None."""
    conn, server = pair
    server.sendall(OK + JOB_1 + STATE_2 + PID_3)
    got = sdbus.get_properties(
        conn, "haproxy", ["Job", "ActiveState", "MainPID"], time.monotonic() + 2
    )
    assert got == {
        "Job": (123, "/org/freedesktop/systemd1/job/123"),
        "ActiveState": "activating",
        "MainPID": 4711,
    }
    sent = drain(server)
    path = unit_path("haproxy")
    for serial, iface, name in (
        (1, sdbus.UNIT, "Job"),
        (2, sdbus.UNIT, "ActiveState"),
        (3, sdbus.SERVICE, "MainPID"),
    ):
        assert call_message(serial, path, sdbus.PROPERTIES, "Get", "ss", (iface, name)) in sent
    server.sendall(GONE_4 + DENIED_5)
    assert sdbus.job_type(conn, "/org/freedesktop/systemd1/job/9", time.monotonic() + 2) is None
    with pytest.raises(BusError) as err:  # any other error stays one
        sdbus.job_type(conn, "/org/freedesktop/systemd1/job/9", time.monotonic() + 2)
    assert err.value.name == "org.freedesktop.DBus.Error.AccessDenied"


def test_no_answer_is_a_timeout_by_the_deadline(pair: tuple[Connection, socket.socket]) -> None:
    """A server that says nothing: TimeoutError when the deadline passes, not before, not
    much after."""
    conn, server = pair
    serial = conn.send("/", sdbus.PROPERTIES, "Get", "ss", ("a", "b"))
    server.sendall(OK + SIGNAL)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.reply(serial, start + 0.3)
    assert 0.29 < time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("said", "what"),
    [
        (b"REJECTED EXTERNAL\r\n", "authentication refused"),
        (b"x" * 600, "no line"),
        (OK + b"X\x02\x01\x01" + b"\0" * 12, "not a D-Bus 1 message"),
        (OK + b"l\x02\x01\x01\0\0\0\x10\x01\0\0\0\0\0\0\x10", "a message of"),
    ],
)
def test_what_cannot_be_read_is_a_bus_error(
    pair: tuple[Connection, socket.socket], said: bytes, what: str
) -> None:
    """A refused authentication, a server that never says OK, a message of another protocol
    and one beyond the specification's size are each a BusError without a name."""
    conn, server = pair
    serial = conn.send("/", sdbus.PROPERTIES, "Get", "ss", ("a", "b"))
    server.sendall(said)
    with pytest.raises(BusError, match=what) as err:
        conn.reply(serial, time.monotonic() + 2)
    assert err.value.name == ""


def test_a_closed_connection_is_a_connection_error(pair: tuple[Connection, socket.socket]) -> None:
    """systemd closing the connection before replying: ConnectionResetError (an OSError)."""
    conn, server = pair
    serial = conn.send("/", sdbus.PROPERTIES, "Get", "ss", ("a", "b"))
    server.sendall(OK)
    server.close()
    with pytest.raises(ConnectionResetError):
        conn.reply(serial, time.monotonic() + 2)


@pytest.mark.parametrize("sig", ["a", "(", "()", "(u", "(u}", "z", "a{s"])
def test_bad_signatures_are_bus_errors(sig: str) -> None:
    """A signature that is not a sequence of complete types is refused, not read on."""
    with pytest.raises(BusError, match="bad signature"):
        sdbus.types(sig)


def test_signatures_split_into_complete_types() -> None:
    """The control: nested containers are one type each."""
    assert sdbus.types("s(uo)a{sv}aa(ii)v") == ["s", "(uo)", "a{sv}", "aa(ii)", "v"]
