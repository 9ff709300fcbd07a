"""Prometheus metrics of a running agent (tests/test_agent.py's Rig: real haproxy, a stand-in
keepalived), scraped over HTTP and read from its node_exporter textfile, parsed with
prometheus_client's own text parser (not lbwatch's code), and linted by promtool."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, needs
from tests.test_agent import Rig
from tests.util import wait_for

PROMTOOL = Path(__file__).resolve().parents[1] / ".tools" / "promtool"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# No proxy from the environment: urlopen's shared opener keeps the one it first saw.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int) -> str:
    with DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        return str(r.read().decode())


def write_fifo(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


@pytest.fixture
def metered(rig: Rig, tmp_path: Path) -> tuple[Rig, int, Path]:
    port = free_port()
    textfile = tmp_path / "textfile" / "lbwatch.prom"
    rig.write_config(
        extra=f"""
[[vrrp_instances]]
name = "VI_1"
vips = ["192.0.2.100"]

[metrics]
listen = "127.0.0.1:{port}"
textfile = "{textfile}"
textfile_interval = 0.2
"""
    )
    return rig, port, textfile


def test_a_scrape_shows_services_actions_health_vrrp_and_failovers(
    metered: tuple[Rig, int, Path],
) -> None:
    """Up, starts, actions by verb and outcome, the probe's histogram and state, the VRRP state
    the FIFO reported and the VIPs held; after haproxy is killed: one failover lbwatch caused
    and one haproxy restart."""
    rig, port, _ = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    s = parse(scrape(port))
    assert value(s, "lbwatch_agent_up") == 1
    assert value(s, "lbwatch_service_up", service="haproxy") == 1
    assert value(s, "lbwatch_service_up", service="keepalived") == 1
    assert value(s, "lbwatch_service_start_attempts_total", service="haproxy") == 1
    ok = value(s, "lbwatch_actions_total", service="haproxy", verb="start", outcome="ok")
    assert ok == 1
    assert value(s, "lbwatch_service_given_up", service="keepalived") == 0
    assert value(s, "lbwatch_health_state", state="up") == 1
    assert value(s, "lbwatch_health_state", state="down") == 0
    assert (value(s, "lbwatch_health_probe_duration_seconds_count", result="ok") or 0) >= 1
    assert value(s, "lbwatch_vrrp_state", kind="instance", vrrp="VI_1", state="unknown") == 1
    assert value(s, "lbwatch_vip_held", vrrp="VI_1", vip="192.0.2.100") == 0
    assert value(s, "lbwatch_vip_kept") == 0
    assert (value(s, "process_resident_memory_bytes") or 0) > 0  # the agent's own process
    # keepalived reports a transition on the FIFO: the next scrape shows it.
    write_fifo(rig.tmp / "run" / "keepalived.fifo", 'INSTANCE "VI_1" MASTER 100')

    def master() -> bool:
        got = parse(scrape(port))
        return value(got, "lbwatch_vrrp_state", kind="instance", vrrp="VI_1", state="MASTER") == 1

    wait_for(master, 10, what="MASTER in the scrape")
    # haproxy dies: lbwatch stops keepalived (a failover it caused) and haproxy comes back.
    ha = rig.pid("haproxy")
    assert ha is not None
    for p in [ha, *(c.pid for c in psutil.Process(ha).children())]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    wait_for(lambda: rig.pid("haproxy") not in (None, ha) and rig.both_up(), 15, what="healed")

    def counted() -> bool:
        got = parse(scrape(port))
        return (
            value(got, "lbwatch_failovers_total", reason="haproxy_down") == 1
            and value(got, "lbwatch_service_restarts_total", service="haproxy") == 1
        )

    wait_for(counted, 10, what="one failover and one restart counted")
    s = parse(scrape(port))
    assert value(s, "lbwatch_failovers_total", reason="haproxy_unhealthy") == 0
    assert value(s, "lbwatch_actions_total", service="keepalived", verb="stop", outcome="ok") == 1


def test_the_textfile_is_kept_current_and_says_when_the_agent_stopped(
    metered: tuple[Rig, int, Path],
) -> None:
    """node_exporter's textfile: written while the agent runs, with the same metrics; on a
    clean stop it says lbwatch_agent_up 0."""
    rig, _, textfile = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    wait_for(
        lambda: (
            textfile.exists()
            and value(parse(textfile.read_text()), "lbwatch_service_up", service="keepalived") == 1
        ),
        10,
        what="the textfile with keepalived up",
    )
    s = parse(textfile.read_text())
    assert value(s, "lbwatch_agent_up") == 1
    assert value(s, "process_resident_memory_bytes") is None  # the listener's only
    assert rig.stop_agent(signal.SIGTERM) == 0
    assert parse(textfile.read_text()) == {("lbwatch_agent_up", frozenset()): 0.0}


def test_metrics_are_off_unless_configured(rig: Rig) -> None:
    """No [metrics]: no listener (the agent's sockets are none but its own) and no file."""
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    pid = rig.agent_pid()
    assert pid is not None
    listening = [c for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]
    assert listening == []


def test_promtool_finds_nothing_to_lint(metered: tuple[Rig, int, Path]) -> None:
    """`promtool check metrics` (Prometheus's own linter: names, units, _total, help) passes
    on a real scrape."""
    if not PROMTOOL.exists():
        pytest.skip("promtool is installed by `make tools` (from Debian's prometheus package)")
    rig, port, _ = metered
    rig.start()
    wait_for(rig.both_up, 15, what="both services up")
    text = scrape(port)
    lint = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# The exporter in a process of its own, inside a mount namespace where the textfile's directory
# is a read-only bind mount: what ProtectSystem=strict does to a path outside ReadWritePaths=.
READ_ONLY_TEXTFILE = """
import logging, sys, time
from pathlib import Path
from lbwatch.config import MetricsCfg
from lbwatch.metrics.output import Exporter
from lbwatch.metrics.tally import Counts
from lbwatch.statusdoc import AgentInfo, StatusDoc
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
exporter = Exporter(MetricsCfg(textfile=Path(sys.argv[1]), textfile_interval=0.1))
doc = StatusDoc(agent=AgentInfo(pid=1, start_ticks=1, create_time=0.0, node="lb1", version="t"),
                summary="ok")
for _ in range(5):
    exporter.update(doc, Counts())
    time.sleep(0.2)
exporter.close()
"""


def write_read_only(directory: Path, exec_pid: str) -> list[str]:
    """The exporter's log lines, $SYSTEMD_EXEC_PID set to ``exec_pid`` ("$$": its own PID, as
    systemd sets it for the unit's process)."""
    root = Path(__file__).resolve().parents[1]
    script = (
        f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} && "
        f'exec env SYSTEMD_EXEC_PID={exec_pid} "$0" -c "$1" {directory}/lbwatch.prom'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, READ_ONLY_TEXTFILE],
        capture_output=True, text=True, timeout=60, check=False, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")
@needs("unshare", "mount")
def test_a_read_only_textfile_directory_is_said_once_with_the_fix(tmp_path: Path) -> None:
    """Every write into a read-only directory fails; the agent says so once, at error level,
    with the drop-in that lets its unit write there (doctor's fix), and not again at stop; not
    the unit's process, it says the error alone."""
    lines = write_read_only(tmp_path, "$$")
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 1, lines
    assert f"cannot write {tmp_path}/lbwatch.prom: [Errno 30] Read-only file system" in errors[0]
    assert f"`ReadWritePaths=-{tmp_path}`" in errors[0]
    assert "`lbwatch doctor`" in errors[0]
    (alone,) = [line for line in write_read_only(tmp_path, "1") if line.startswith("ERROR")]
    assert "Read-only file system" in alone and "ReadWritePaths" not in alone, alone
    assert not (tmp_path / "lbwatch.prom").exists()


def test_the_textfile_is_never_written_empty(tmp_path: Path) -> None:
    """Before the agent's first snapshot there is nothing to say: no textfile is written (an
    empty one would tell node_exporter that lbwatch has no metrics, for a whole interval after
    each start). The first snapshot is written at once, with the agent up."""
    from lbwatch.config import MetricsCfg
    from lbwatch.metrics.output import Exporter
    from lbwatch.metrics.tally import Counts
    from lbwatch.statusdoc import AgentInfo, StatusDoc

    path = tmp_path / "lbwatch.prom"
    exporter = Exporter(MetricsCfg(textfile=path, textfile_interval=30.0))
    try:
        # The writer thread runs its first turn at once; give it many turns' time to do wrong.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert not path.exists(), path.read_text()
            time.sleep(0.01)
        info = AgentInfo(pid=1, start_ticks=1, create_time=0.0, node="lb1", version="t")
        exporter.update(StatusDoc(agent=info, summary="ok"), Counts())
        wait_for(path.exists, 5, what="the first textfile")
        assert value(parse(path.read_text()), "lbwatch_agent_up") == 1
    finally:
        exporter.close()
