"""A network namespace of a test's own holding one veth pair, the first end with an address
(192.0.2.0/24 only); stale ones of the same name are cleared first, and it is gone after."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


def run(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` inside the namespace; raises when it fails."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=20, check=True)  # fmt: skip


@contextlib.contextmanager
def veth(ns: str, a: str, b: str, address: str) -> Iterator[None]:
    """Namespace ``ns`` with the pair ``a``-``b`` up and ``address`` (a /24) on ``a``."""
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run(ns, "ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for dev in (a, b):
            run(ns, "ip", "link", "set", dev, "up")
        run(ns, "ip", "addr", "add", f"{address}/24", "dev", a)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
