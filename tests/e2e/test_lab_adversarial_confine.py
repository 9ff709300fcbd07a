"""End to end, the first finding of the trust-boundaries review as it was found: with lb1's sync
key, by hand over lb2's sshd and receiver, a Lua file is put into lb2's staging, then a
haproxy.cfg version whose ``global`` lua-loads it. Before, lb2's ``haproxy -c`` ran the Lua as
root 0.10 s later. Now the version is refused before anything reads it, with the directive and
its line in lb2's status and log, the Lua never runs, and sync goes on."""

from __future__ import annotations

import hashlib
import time

from lbwatch.sync.versions import Version
from tests.e2e.test_lab_sync import cfg_path, current_of, save_like_vim, served, sync_view
from tests.e2e.test_lab_sync import pytestmark as sync_marks
from tests.e2e.test_lab_sync_trust import both_serve, lab_with
from tests.lab.netlab import LB_ADDR, Lab, Node, haproxy_cfg
from tests.lab.ssh import by_hand, put_request
from tests.util import wait_for

pytestmark = sync_marks


def push_as_lb1(lab: Lab, name: str, content: bytes) -> bytes:
    """A PUT into lb2's staging with lb1's key, not through lbwatch's sender; the answers."""
    lb1 = lab.nodes["lb1"]
    ssh = ["ssh", "-i", str(lb1.dir / "ssh" / "sync_key"), "-o", "BatchMode=yes"]
    ssh += ["-o", f"UserKnownHostsFile={lb1.dir / 'ssh' / 'known_hosts'}"]
    ssh += ["-o", "ControlPath=none"]
    code, answers, said = by_hand(lb1.enter(*ssh, LB_ADDR["lb2"]), put_request(name, content))
    assert code == 0, said
    return answers


def decided(node: Node, digest: str) -> tuple[str, str] | None:
    """What ``node`` made of the version with ``digest``: (result, message), once decided."""
    sync = sync_view(node)
    got = sync.received if sync is not None else None
    if got is None or got.version is None or got.version.digest != digest:
        return None
    return got.result, got.message


def test_lua_through_a_stolen_key_never_runs() -> None:
    """Positive control first (an edit on lb1 is served by lb2, so key, receiver and check
    work); then the two PUTs: lb2 refuses the version naming lua-load and its line, the Lua's
    marker never appears, lb2 keeps serving what it served, and the next real edit still
    reaches it."""
    with lab_with() as lab:
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        save_like_vim(cfg_path(lb1), haproxy_cfg("before-the-attack"))
        wait_for(lambda: both_serve(lab, "before-the-attack"), 20, what="the control edit")

        marker = lb2.dir / "pwned"
        lua = f'local f = io.open("{marker}", "w") f:write(io.popen("id"):read("*a")) f:close()\n'
        plant = f"evil.lua@lb1@c1@1@{hashlib.sha256(lua.encode()).hexdigest()}"
        push_as_lb1(lab, plant, lua.encode())  # taken or refused: the attack goes on either way
        text = haproxy_cfg("attack").replace(
            "global\n", f"global\n    lua-load {lb2.dir / 'staging' / plant}\n", 1
        )
        line = text.splitlines().index(f"    lua-load {lb2.dir / 'staging' / plant}") + 1
        content = text.encode()
        v = Version(
            "haproxy.cfg",
            "lb1",
            current_of(lb2).counter + 1,
            time.time_ns(),
            hashlib.sha256(content).hexdigest(),
        )
        answers = push_as_lb1(lab, v.staged_name(), content)
        assert answers.endswith(b"\nOK\n"), answers
        wait_for(lambda: decided(lb2, v.digest) is not None, 20, what="lb2 decides on it")
        assert not marker.exists(), marker.read_text()  # before: uid=0(root), 0.10 s after
        result = decided(lb2, v.digest)
        assert result is not None and result[0] == "rejected", result
        assert f"refused: line {line}: lua-load" in result[1], result
        assert f"line {line}: lua-load" in lb2.log_text()
        assert not marker.exists()
        assert served(lab, lb2) == "before-the-attack"

        save_like_vim(cfg_path(lb1), haproxy_cfg("after-the-attack"))
        wait_for(lambda: both_serve(lab, "after-the-attack"), 20, what="the next edit")
        assert not marker.exists()
