"""lbwatch.sdbus against systemd 252 itself: a node booted by systemd in a container (no package
needed, so the node is not the tier's installed pair), lbwatch/sdbus.py copied in and run by the
node's own /usr/bin/python3 as root over /run/systemd/private, its answers compared with
systemctl's."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbwatch import unitjob
from tests.lab.syslab import SysLab, SysNode
from tests.systemd.conftest import skip_marks
from tests.util import wait_for

pytestmark = skip_marks()

MODULE = Path(__file__).resolve().parents[2] / "lbwatch" / "sdbus.py"
SITE = "/root/lbw-sdbus"  # in the node's tree; its /run is the container's own tmpfs
PROPS = ["Job", "ActiveState", "SubState", "Result", "NRestarts", "MainPID"]


@pytest.fixture(scope="module")
def node() -> Iterator[SysNode]:
    """One node booted by systemd with Debian's haproxy.service running; sdbus.py in it."""
    with SysLab(Path("/dev/null"), nodes=1) as lab:  # the package is never installed here
        node = lab.sysnodes["lb1"]
        node.put(f"{SITE}/sdbus.py", MODULE.read_text())
        wait_for(lambda: node.main_pid("haproxy") > 0, 20, what="haproxy running")
        yield node


def sd(node: SysNode, code: str) -> Any:
    """``code`` run by the node's Python with ``sdbus`` imported and ``soon()`` a deadline 2 s
    away; what it leaves in ``out``, through JSON."""
    prelude = (
        f"import json, statistics, sys, time\nsys.path.insert(0, {SITE!r})\nimport sdbus\n"
        "def soon():\n    return time.monotonic() + 2\n"
    )
    said = node.run("/usr/bin/python3", "-c", prelude + code + "\nprint(json.dumps(out))")
    return json.loads(said)


def shown(node: SysNode, unit: str, names: list[str]) -> dict[str, str]:
    text = node.systemctl("show", *(f"--property={n}" for n in names), "--", unit)
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def as_shown(props: dict[str, Any]) -> dict[str, str]:
    """sdbus's values as `systemctl show` prints them (Job= prints the id, "" for none)."""
    job_id = props["Job"][0]
    return {**{k: str(v) for k, v in props.items()}, "Job": str(job_id) if job_id else ""}


def test_properties_are_systemctls(node: SysNode) -> None:
    """The six properties unitjob reads, for the running haproxy.service: the values `systemctl
    show` prints, the main PID among them."""
    got = sd(
        node,
        "with sdbus.Connection.open() as c:\n"
        f"    out = sdbus.get_properties(c, 'haproxy.service', {PROPS!r}, soon())",
    )
    assert as_shown(got) == shown(node, "haproxy.service", PROPS)
    assert got["ActiveState"] == "active" and got["MainPID"] > 0 and got["Job"] == [0, "/"]


def test_unitjob_reads_the_bus_as_it_reads_systemctl(node: SysNode) -> None:
    """unitjob's view of haproxy.service from sdbus's answer equals its view from `systemctl
    show`, every property it reads: RestartUSec comes in microseconds over the bus and as a
    timespan from systemctl, the main process's exit on the monotonic clock (kept while the
    unit is stopped; a start clears it)."""
    names = list(unitjob.PROPERTIES)
    node.systemctl("stop", "haproxy")
    try:
        got = sd(
            node,
            "with sdbus.Connection.open() as c:\n"
            f"    out = sdbus.get_properties(c, 'haproxy.service', {names!r}, soon())",
        )
        text = node.systemctl("show", f"--property={','.join(names)}", "--", "haproxy.service")
    finally:
        node.systemctl("start", "haproxy")
    got["Job"] = tuple(got["Job"])  # JSON made the (uo) a list
    view = unitjob.read_unit(text)
    assert unitjob.read_bus(got) == (view, "")
    assert view.restart_usec is not None and view.exited_usec > 0  # both were read


def test_a_unit_systemd_does_not_know_reads_as_not_found(node: SysNode) -> None:
    """A unit that does not exist is not an error: systemd loads it for the question and
    answers LoadState not-found, inactive/dead, as `systemctl show` does; an unknown property is
    a BusError with systemd's error name."""
    code = (
        "with sdbus.Connection.open() as c:\n"
        f"    out = sdbus.get_properties(c, 'lbw-nosuch', {[*PROPS, 'LoadState']!r}, soon())\n"
        "    s = c.send(sdbus.unit_path('haproxy'), sdbus.PROPERTIES, 'Get', 'ss',"
        " (sdbus.UNIT, 'NoSuchProperty'))\n"
        "    try:\n"
        "        c.reply(s, soon())\n"
        "    except sdbus.BusError as e:\n"
        "        out['error'] = e.name\n"
    )
    got = sd(node, code)
    error = got.pop("error")
    assert as_shown(got) == shown(node, "lbw-nosuch.service", [*PROPS, "LoadState"])
    assert got["LoadState"] == "not-found" and got["ActiveState"] == "inactive"
    assert error == "org.freedesktop.DBus.Error.UnknownProperty"


def sleeper(node: SysNode, unit: str) -> None:
    node.run("systemd-run", "--quiet", f"--unit={unit}", "--", "sleep", "600")
    assert node.systemctl("is-active", unit, check=False).strip() == "active"


def stopped(node: SysNode, unit: str) -> bool:
    """Inactive and not failed (a transient unit is then unloaded: Result reads "success")."""
    state = node.systemctl("is-active", unit, check=False).strip()
    return state == "inactive" and node.prop(unit, "Result") == "success"


def test_pipelined_stop_unit_needs_no_read(node: SysNode) -> None:
    """StopUnit in the connection's first write, with the authentication: the unit is stopped
    (inactive, not failed) before the client reads anything, as the agent's urgent path does
    it; the reply read afterwards is the job's path."""
    sleeper(node, "lbw-sleeper")
    code = (
        "import subprocess\n"
        "def active():\n"
        "    argv = ['systemctl', 'is-active', 'lbw-sleeper']\n"
        "    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()\n"
        "with sdbus.Connection.open() as c:\n"
        "    s = sdbus.stop_unit_send(c, 'lbw-sleeper.service')\n"
        "    for _ in range(200):\n"
        "        if active() != 'active':\n"
        "            break\n"
        "        time.sleep(0.05)\n"
        "    out = [active(), c.reply(s, soon())[0]]\n"
    )
    state, job = sd(node, code)
    assert state in ("deactivating", "inactive"), state
    assert re.fullmatch(r"/org/freedesktop/systemd1/job/\d+", job), job
    wait_for(lambda: stopped(node, "lbw-sleeper"), 10, what="lbw-sleeper stopped, not failed")


def test_a_connection_closed_before_systemds_ok_loses_its_calls(node: SysNode) -> None:
    """The hazard the caller must know: closed right after the write, before systemd's OK is
    read, the connection is dropped with its StopUnit unrun (systemd cannot write its OK, so
    never leaves the authentication)."""
    sleeper(node, "lbw-dropped")
    sd(node, "with sdbus.Connection.open() as c:\n    out = sdbus.stop_unit_send(c, 'lbw-dropped')")
    time.sleep(0.5)
    assert node.systemctl("is-active", "lbw-dropped", check=False).strip() == "active"
    node.systemctl("stop", "lbw-dropped")


def test_systemd_252_stalls_on_a_short_pipelined_write(node: SysNode) -> None:
    """Why sdbus pads its first write: without the pings, a lone Properties.Get pipelined with
    the authentication is never answered (sd-bus 252 parks BEGIN until its OK is written, then
    waits for more bytes); the next write on the connection releases it."""
    code = (
        "sdbus.FIRST_READ = 0\n"
        "with sdbus.Connection.open() as c:\n"
        "    s = c.send(sdbus.unit_path('haproxy'), sdbus.PROPERTIES, 'Get', 'ss',"
        " (sdbus.UNIT, 'ActiveState'))\n"
        "    try:\n"
        "        out = ['answered', c.reply(s, time.monotonic() + 0.5)]\n"
        "    except TimeoutError:\n"
        "        out = ['stalled']\n"
        "    t = c.send(sdbus.unit_path('haproxy'), sdbus.PROPERTIES, 'Get', 'ss',"
        " (sdbus.UNIT, 'SubState'))\n"
        "    out += [c.reply(s, soon())[0], c.reply(t, soon())[0]]\n"
    )
    assert sd(node, code) == ["stalled", "active", "running"]


def test_round_trips(node: SysNode) -> None:
    """Measured, not asserted beyond sanity: the six properties on a new connection and on an
    open one, StopUnit to its reply on a new connection (20 sleepers), and `systemctl show` for
    comparison; medians of 20 (5 for systemctl)."""
    units = [f"lbw-timed-{i}" for i in range(20)]
    for unit in units:
        sleeper(node, unit)
    code = (
        "def ms(f, n=20):\n"
        "    t = []\n"
        "    for i in range(n):\n"
        "        a = time.perf_counter(); f(i); t.append(time.perf_counter() - a)\n"
        "    return round(statistics.median(t) * 1000, 3)\n"
        "def fresh(i):\n"
        "    with sdbus.Connection.open() as c:\n"
        f"        sdbus.get_properties(c, 'haproxy.service', {PROPS!r}, soon())\n"
        "c = sdbus.Connection.open()\n"
        f"def kept(i):\n    sdbus.get_properties(c, 'haproxy.service', {PROPS!r}, soon())\n"
        "def stop(i):\n"
        "    with sdbus.Connection.open() as c:\n"
        "        c.reply(sdbus.stop_unit_send(c, f'lbw-timed-{i}.service'), soon())\n"
        "import subprocess\n"
        "def show(i):\n"
        f"    subprocess.run(['systemctl', 'show', '-p', {','.join(PROPS)!r}, 'haproxy'],"
        " check=True, capture_output=True)\n"
        "out = {'properties, new connection': ms(fresh), 'properties, open connection': ms(kept),"
        " 'StopUnit to reply, new connection': ms(stop), 'systemctl show': ms(show, 5)}\n"
    )
    times = sd(node, code)
    print("sdbus round trips inside the node, median ms:", times)
    assert all(0 < t < 1000 for t in times.values()), times
    for unit in units:
        wait_for(lambda u=unit: stopped(node, u), 10, what=f"{unit} stopped")
