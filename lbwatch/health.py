"""The optional HTTP health probe of haproxy (a ``monitor-uri`` or the stats page), so that a
hung haproxy counts as down. One probe is one blocking GET on a worker thread; the fall/rise
counting is policy (``policy._apply_probe``), not here.

The GET is written on a plain socket, not with an HTTP library: requests (with urllib3) costs
about 6 MiB of resident memory, which put the probing agent over its 40 MB target, and even
http.client imports ssl and the email package when it is imported. One request line out and
one status line back need neither; ssl is imported only for an https URL.

What a probe guarantees:
- one deadline, ``timeout`` after the start, bounds the whole exchange (connect, TLS handshake,
  request, the answer's head and up to ``BODY_LIMIT`` bytes of body): every blocking socket call
  gets the time left as its timeout, so a server that trickles bytes cannot stretch it (the
  name lookup of a host name is the one step without a timeout; use an address or /etc/hosts);
- only a 2xx counts; a redirect is not followed, it fails the probe (``HTTP 302``);
- no proxy, whatever ``http_proxy`` says: the probe targets this host;
- https verifies the certificate and the host name against the system's CAs;
- one connection per probe, closed after the answer. A kept-alive connection would skip what a
  client goes through (haproxy accepting a new connection), would stay on the old worker after
  a reload, and would fail spuriously when haproxy closes it as idle between two probes.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from lbwatch.config import Health
from lbwatch.events import ProbeResult

if TYPE_CHECKING:
    import ssl

# haproxy's monitor-uri answer is about 100 bytes; a stats page can be larger than BODY_LIMIT,
# and what is past it is not read (the status is known by then).
HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})[ \t\r\n]")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([0-9]+)", re.IGNORECASE)
# Characters kept as they are in the request target; the rest (spaces, controls, non-ASCII) is
# percent-encoded, as requests did, so no URL can break the request line.
_SAFE = "!#$%&'()*+,/:;=?@[]~"


class BadAnswer(Exception):
    """The server answered, but not with HTTP/1.x."""


@dataclass(frozen=True)
class Target:
    """What the URL says to connect to and send, worked out once per config."""

    host: str
    port: int
    tls: bool
    request: bytes


def parse_url(url: str) -> Target:
    """The connection and the request for ``url``; ValueError with the reason if unusable."""
    parts = urlsplit(url)
    host = parts.hostname  # lower case, without the brackets of an IPv6 literal
    if not host:
        raise ValueError("no host")
    if not host.isascii() or any(c <= " " for c in host):
        raise ValueError("the host must be an address or an ASCII name")
    host.encode("idna")  # what getaddrinfo will do: UnicodeError (a ValueError) for "a..b"
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    port = parts.port  # ValueError for a port out of range
    if port is None:
        port = default_port
    # Host as http.client writes it: brackets around an IPv6 literal (without its zone), the
    # port only when it is not the scheme's.
    host_header = f"[{host.partition('%')[0]}]" if ":" in host else host
    if port != default_port:
        host_header += f":{port}"
    target = quote(parts.path or "/", safe=_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_SAFE)
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host_header}",
        "User-Agent: lbwatch-probe",
        "Accept: */*",
        "Connection: close",
    ]
    if parts.username is not None:
        # user:password@ in the URL (a stats page behind `stats auth`), as requests sent it.
        import base64

        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines.append("Authorization: Basic " + base64.b64encode(pair.encode()).decode())
    return Target(host, port, tls, ("\r\n".join(lines) + "\r\n\r\n").encode())


class Prober:
    """Probes ``cfg.url``; holds no connection and no state between probes, so ``probe`` may
    run on a worker while the loop replaces or closes this prober."""

    def __init__(self, cfg: Health) -> None:
        self.cfg = cfg
        self._tls: ssl.SSLContext | None = None
        self._tls_errors: tuple[type[Exception], ...] = ()
        self._target: Target | None = None
        self._invalid = ""
        try:
            self._target = parse_url(cfg.url)
        except ValueError as exc:
            # Reported by every probe, as requests' InvalidURL was: the agent keeps running.
            self._invalid = str(exc)
        if self._target is not None and self._target.tls:
            import ssl

            # Certificate and host name checked against the system's CAs (SSL_CERT_FILE and
            # SSL_CERT_DIR are honoured); there is no option to turn the check off.
            self._tls = ssl.create_default_context()
            self._tls_errors = (ssl.SSLError,)  # certificate errors included

    def probe(self) -> ProbeResult:
        url, timeout = self.cfg.url, self.cfg.timeout
        if self._target is None:
            return ProbeResult(False, f"GET {url}: invalid URL ({self._invalid})")
        try:
            status = self._get(self._target, time.monotonic() + timeout)
        except socket.timeout:  # TimeoutError from 3.10; an OSError subclass on 3.9
            return ProbeResult(False, f"GET {url}: no answer within {timeout:g} s")
        except BadAnswer as exc:
            return ProbeResult(False, f"GET {url}: {exc}")
        except self._tls_errors as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
            return ProbeResult(False, f"GET {url}: TLS failed ({reason or type(exc).__name__})")
        except OSError:
            return ProbeResult(False, f"GET {url}: connection failed")
        return ProbeResult(200 <= status < 300, f"GET {url}: HTTP {status}")

    def close(self) -> None:
        """Nothing to release: each probe closes its own connection."""

    def _get(self, target: Target, deadline: float) -> int:
        sock = _connect(target.host, target.port, deadline)
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(
                    sock,
                    server_hostname=target.host.partition("%")[0],  # no IPv6 zone
                    do_handshake_on_connect=False,
                )
                # One call, one timeout: _ssl bounds the whole handshake by it (Python >= 3.5).
                sock.settimeout(_left(deadline))
                sock.do_handshake()
            # sendall's timeout bounds the whole send (Python >= 3.5).
            sock.settimeout(_left(deadline))
            sock.sendall(target.request)
            return _read_answer(sock, deadline)
        finally:
            sock.close()


def _left(deadline: float) -> float:
    """Seconds until ``deadline``; socket.timeout once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    return left


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A connected TCP socket, trying each address of ``host`` in the time left."""
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(addr)
        except socket.timeout:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


def _recv(sock: socket.socket, deadline: float, size: int) -> bytes:
    sock.settimeout(_left(deadline))
    return sock.recv(size)


def _read_answer(sock: socket.socket, deadline: float) -> int:
    """The status code, once the head and (for a 2xx) the first BODY_LIMIT bytes of the body,
    up to its Content-Length or the server's close, have arrived."""
    head = bytearray()
    end = -1
    while end < 0:
        data = _recv(sock, deadline, HEAD_LIMIT + 1 - len(head))
        if not data:
            if not head:
                raise ConnectionResetError("closed without an answer")
            raise BadAnswer("incomplete HTTP answer")
        head += data
        if b"\n" in head and not _STATUS_LINE.match(head):
            raise BadAnswer("not an HTTP answer")  # at once, not at the deadline
        end = _head_end(head)
        if end < 0 and len(head) > HEAD_LIMIT:
            raise BadAnswer(f"HTTP head longer than {HEAD_LIMIT} bytes")
    match = _STATUS_LINE.match(head)
    assert match is not None  # checked when the first line arrived
    status = int(match.group(1))
    if not 200 <= status < 300 or status == 204:
        return status  # a failure whatever the body says; or a 204, which has no body
    length = _CONTENT_LENGTH.search(head, 0, end)
    want = min(int(length.group(1)), BODY_LIMIT) if length else BODY_LIMIT
    have = len(head) - end
    while have < want:
        data = _recv(sock, deadline, min(want - have, 16 * 1024))
        if not data:
            break  # the server closed: the end of a body without Content-Length
        have += len(data)
    return status


def _head_end(head: bytearray) -> int:
    """Index just past the blank line that ends the head (CRLF or bare LF), or -1."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := head.find(sep)) >= 0]
    return min(ends, default=-1)
