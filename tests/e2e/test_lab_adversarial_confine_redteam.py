"""End to end, red team of the walls a received version passes (issue 23, finding 1): with lb1's
sync key, by hand over lb2's sshd and receiver, one PUT each, no file planted. lb2 must refuse
both versions; on the code of today it applies them and its reload does what they ask, as root.

- ``program\\x00``: a program section to haproxy (a word ends at a NUL), not to lbwatch's scanner;
- ``.if defined(HAPROXY_MWORKER)``: false in lbwatch's check, true at every master-worker
  reload, so the check never sees what the live haproxy does.
"""

from __future__ import annotations

import hashlib
import sys
import time

from lbwatch.sync.versions import Version
from tests.e2e.test_lab_adversarial_confine import decided, push_as_lb1
from tests.e2e.test_lab_sync import cfg_path, current_of, save_like_vim, served
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.e2e.test_lab_sync_trust import both_serve, lab_with
from tests.lab.netlab import LB_ADDR, Lab, haproxy_cfg, sh
from tests.util import wait_for

pytestmark = sync_marks


def push_version(lab: Lab, text: str) -> str:
    """A version of haproxy.cfg from "lb1", one above what lb2 holds, put into lb2's staging
    with lb1's key; its digest, once the receiver said OK."""
    content = text.encode("latin-1")
    v = Version(
        "haproxy.cfg",
        "lb1",
        current_of(lab.nodes["lb2"]).counter + 1,
        time.time_ns(),
        hashlib.sha256(content).hexdigest(),
    )
    answers = push_as_lb1(lab, v.staged_name(), content)
    assert answers.endswith(b"\nOK\n"), answers
    return v.digest


def body_from_client(lab: Lab, addr: str) -> str:
    """The body of one GET of http://ADDR/ from the lab's client ("" on no answer)."""
    fetch = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    sys.stdout.write(urllib.request.urlopen('http://{addr}/', timeout=2).read()"
        ".decode('latin-1'))\n"
        "except Exception:\n"
        "    pass\n"
    )
    out = sh("ip", "netns", "exec", lab.ns("cl"), sys.executable, "-c", fetch, check=False)
    return out.stdout


def test_a_program_hidden_by_a_nul_never_runs_on_the_peer() -> None:
    """Positive control first (an edit on lb1 is served by lb2); then one PUT of a version that
    ends with ``program\\x00 pwn`` / ``command`` in a block only the live master-worker reads:
    lb2 refuses it and the command never runs (today: applied, and ``uid=0(root)`` in the
    marker right after the reload); the next real edit still reaches lb2."""
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        save_like_vim(cfg_path(lb1), haproxy_cfg("before-the-attack"))
        wait_for(lambda: both_serve(lab, "before-the-attack"), 20, what="the control edit")

        marker = lb2.dir / "pwned"
        text = haproxy_cfg("attack") + (
            ".if defined(HAPROXY_MWORKER)\n"
            "program\\x00 pwn\n"
            f'    command /bin/sh -c "id > {marker}"\n'
            ".endif\n"
        )
        digest = push_version(lab, text)
        wait_for(lambda: decided(lb2, digest) is not None, 20, what="lb2 decides on it")
        result = decided(lb2, digest)
        time.sleep(2)  # a program runs right after the reload
        assert not marker.exists(), f"{result} -> {marker.read_text().strip()}"
        assert result is not None and result[0] == "rejected", result
        assert served(lab, lb2) == "before-the-attack"

        save_like_vim(cfg_path(lb1), haproxy_cfg("after-the-attack"))
        wait_for(lambda: both_serve(lab, "after-the-attack"), 20, what="the next edit")
        assert not marker.exists()


def test_the_peer_never_serves_its_own_sync_key() -> None:
    """One PUT whose ``frontend web`` answers every request with lb2's private sync key, in a
    block the check skips (``.if defined(HAPROXY_MWORKER)``): lb2 refuses it and a client never
    gets the key (today: applied, and the lab's client reads lb2's key over HTTP, the key that
    lets the attacker push to lb1 as lb2 in turn)."""
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        save_like_vim(cfg_path(lb1), haproxy_cfg("before-the-attack"))
        wait_for(lambda: both_serve(lab, "before-the-attack"), 20, what="the control edit")

        key = lb2.dir / "ssh" / "sync_key"
        assert "PRIVATE KEY" in key.read_text()
        leak = (
            "    bind :80\n"
            ".if defined(HAPROXY_MWORKER)\n"
            f"    http-request return status 200 content-type text/plain file {key}\n"
            ".endif\n"
        )
        text = haproxy_cfg("attack").replace("    bind :80\n", leak, 1)
        digest = push_version(lab, text)
        wait_for(lambda: decided(lb2, digest) is not None, 20, what="lb2 decides on it")
        result = decided(lb2, digest)
        body = body_from_client(lab, LB_ADDR["lb2"])
        assert "PRIVATE KEY" not in body, f"{result} -> a client got: {body[:80]!r}..."
        assert result is not None and result[0] == "rejected", result
        assert served(lab, lb2) == "before-the-attack"
