"""`lbwatch doctor` on real files: a keepalived.conf that keepalived itself accepts
(`keepalived -t`), a haproxy.cfg that `haproxy -c` passes, unit files as Debian ships them, a
real SMTP server on loopback and a real sshd with the restricted sync key. The clean setup has
no finding but ok; each planted problem makes its own finding, with the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbwatch import kaconf, vrrpview
from lbwatch.cli import main
from lbwatch.config import load
from lbwatch.doctor import checks
from lbwatch.doctor.checks import Finding, Where
from lbwatch.doctor.peervrrp import compare, peer_vrrp
from lbwatch.doctor.run import findings
from lbwatch.status import write_status
from lbwatch.statusdoc import (
    AgentInfo,
    AuthView,
    ClusterView,
    KeepalivedConfView,
    NodeAgent,
    NodeView,
    PeerNode,
    StatusDoc,
    VrrpSettings,
)
from tests.conftest import SmtpSink, free_port, haproxy_config, needs
from tests.lab.netlab import LBWATCH, keepalived_conf
from tests.sshd import NEEDS_SSHD, Sshd
from tests.test_cluster_sink import ticks_of
from tests.test_sync_channel import receiver_line
from tests.test_unit_file import needs_sandbox, sandboxed

pytestmark = needs("haproxy", "keepalived", "ssh-keygen")

ROOT = Path(__file__).resolve().parents[1]
FIFO = "/run/keepalived-lbwatch.fifo"  # what keepalived_conf(fifo=True) writes
VIP = "192.0.2.100"

# Debian's, but for the pidfile: one of the test's own, so a haproxy running on this machine
# (a lab's) is never the one looked at.
DEBIAN_HAPROXY_UNIT = """[Service]
Environment="CONFIG=/etc/haproxy/haproxy.cfg" "PIDFILE=PIDFILE" "EXTRAOPTS=-S /run/x"
ExecStart=/usr/sbin/haproxy -Ws -f $CONFIG -p $PIDFILE $EXTRAOPTS
Restart=always
Type=notify
"""
DEBIAN_KEEPALIVED_UNIT = """[Service]
Type=notify
ExecStart=/usr/sbin/keepalived --dont-fork $DAEMON_ARGS
"""


def keepalived_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """keepalived's own check of a config (-t)."""
    argv = ["keepalived", "-t", "-f", str(conf)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@dataclass
class Node:
    dir: Path
    ka_conf: Path
    units: Path
    config: Path

    def where(self) -> Where:
        return Where(keepalived_conf=self.ka_conf, units=(self.units,), config_id="lb1")

    def findings(self) -> list[Finding]:
        return findings(load(self.config), self.where())

    def bad(self) -> list[Finding]:
        return [f for f in self.findings() if f.level != "ok"]


def lbwatch_toml(tmp: Path, smtp_port: int, extra: str = "") -> str:
    return f"""
[agent]
node_name = "lb1"
run_dir = "{tmp / "run"}"
state_dir = "{tmp / "state"}"

[haproxy]
pidfile = "{tmp / "haproxy.pid"}"

[haproxy.health]
url = "http://127.0.0.1:{MONITOR}/health"

[keepalived]
config = "{tmp / "keepalived.conf"}"
track_dir = "{tmp / "state" / "track"}"
pidfile = "{tmp / "keepalived.pid"}"  # none runs: a lab's keepalived is never looked at
find_without_pidfile = false

[[vrrp_instances]]
name = "VI_1"
vips = ["{VIP}"]

[notify]
fifo = "{FIFO}"

[notify.email]
host = "127.0.0.1"
port = {smtp_port}
security = "plain"
sender = "lbwatch@example.org"
to = ["ops@example.org"]
timeout = 3

[sync]
config = "{tmp / "haproxy.cfg"}"
{extra}"""


MONITOR = 8404


def fast_conf(mode: str, track_dir: Path) -> str:
    """lb1's keepalived.conf from the lab, at priority 254: a backup then takes over within
    50 ms of a priority-0 advertisement (doctor warns about a slower skew); VI_1 tracks
    lbwatch's file in ``track_dir``."""
    conf = keepalived_conf("lb1", mode, fifo=True, track_dir=str(track_dir))
    return re.sub(r"priority \d+", "priority 254", conf)


@pytest.fixture
def node(tmp_path: Path, smtp: SmtpSink) -> Node:
    haproxy_config(tmp_path / "haproxy.cfg", free_port(), MONITOR)
    ka = tmp_path / "keepalived.conf"
    ka.write_text(fast_conf("lbwatch", tmp_path / "state" / "track"))
    units = tmp_path / "units"
    units.mkdir()
    (units / "haproxy.service").write_text(
        DEBIAN_HAPROXY_UNIT.replace("PIDFILE=PIDFILE", f"PIDFILE={tmp_path / 'haproxy.pid'}")
    )
    (units / "keepalived.service").write_text(DEBIAN_KEEPALIVED_UNIT)
    shipped = (ROOT / "systemd" / "lbwatch.service").read_text()
    (units / "lbwatch.service").write_text(shipped.replace("/usr/local/bin/lbwatch", LBWATCH))
    # The node keeps its files in the test's directory, under /tmp: the drop-in an operator
    # would write lets the shipped unit write there, outside a /tmp of its own.
    (units / "lbwatch.service.d").mkdir()
    (units / "lbwatch.service.d" / "paths.conf").write_text(
        f"[Service]\nPrivateTmp=no\nReadWritePaths={tmp_path}\n"
    )
    config = tmp_path / "lbwatch.toml"
    config.write_text(lbwatch_toml(tmp_path, smtp.port))
    return Node(tmp_path, ka, units, config)


def test_keepalived_takes_the_configs_the_tests_plant_problems_in(node: Node) -> None:
    """The control: keepalived itself accepts the clean keepalived.conf."""
    done = subprocess.run(
        ["keepalived", "-t", "-f", str(node.ka_conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_clean_node_has_nothing_but_ok(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """Every area looked at, nothing wrong: exit 0, and --json lists the same findings."""
    found = node.findings()
    assert [f for f in found if f.level != "ok"] == []
    areas = {f.area for f in found}
    assert {"keepalived", "haproxy", "systemd", "notify"} <= areas
    where = node.where()
    from lbwatch.doctor import run

    assert run.main(load(node.config), as_json=True, where=where) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [f["what"] for f in listed] == [f.what for f in found]


def plant(node: Node, problem: str) -> str:  # noqa: C901 - one branch per problem, a table
    """Make ``problem`` true on ``node``; the text its finding must contain."""
    ka = node.ka_conf.read_text()
    if problem == "no notify_fifo":
        node.ka_conf.write_text(ka.replace(f"    notify_fifo {FIFO}\n", ""))
        return "does not tell lbwatch its VRRP transitions"
    if problem == "another fifo":
        node.ka_conf.write_text(ka.replace(FIFO, "/run/other.fifo"))
        return f"writes its notify FIFO /run/other.fifo, lbwatch reads {FIFO}"
    if problem == "pidof":
        node.ka_conf.write_text(
            fast_conf("vrrp_script", node.dir / "state" / "track").replace(
                "/usr/bin/killall -0 haproxy", "/usr/bin/pidof haproxy"
            )
        )
        return "keepalived resolves the pidof symlink to killall5"
    if problem == "track_process":
        node.ka_conf.write_text(ka + "\nvrrp_track_process haproxy {\n    process haproxy\n}\n")
        return "needs the kernel's proc connector"
    if problem == "vips differ":
        node.ka_conf.write_text(ka.replace(f"{VIP}/24", "192.0.2.101/24"))
        return f"VIPs of VI_1: lbwatch has {VIP}, keepalived has 192.0.2.101"
    if problem == "instance unknown":
        node.ka_conf.write_text(ka.replace("VI_1", "web"))  # its track file too
        return "lbwatch's VRRP instance VI_1 is not in keepalived's config"
    if problem == "no master-worker":
        unit = node.units / "haproxy.service"
        unit.write_text(unit.read_text().replace(" -Ws ", " "))
        return "haproxy does not run in master-worker mode"
    if problem == "another pidfile":
        unit = node.units / "haproxy.service"
        text = unit.read_text()
        unit.write_text(text.replace(str(node.dir / "haproxy.pid"), str(node.dir / "h.pid")))
        return f"writes the pidfile {node.dir / 'h.pid'}, lbwatch watches {node.dir}/haproxy.pid"
    if problem == "no health frontend":
        cfg = node.dir / "haproxy.cfg"
        cfg.write_text(cfg.read_text().replace("monitor-uri /health", "monitor-uri /up"))
        return "has no frontend binding port 8404 with `monitor-uri /health`"
    if problem == "haproxy -c fails":
        cfg = node.dir / "haproxy.cfg"
        cfg.write_text(cfg.read_text().replace("mode http", "mode htp"))
        return "fails: [ALERT]"
    if problem == "keepalived Restart=always":
        unit = node.units / "keepalived.service"
        unit.write_text(unit.read_text() + "Restart=always\n")
        return "Restart=always: when lbwatch stops keepalived"
    if problem == "keepalived Restart=always in a drop-in":
        (node.units / "keepalived.service.d").mkdir()
        (node.units / "keepalived.service.d" / "override.conf").write_text(
            "[Service]\nRestart=always\n"
        )
        return "Restart=always: when lbwatch stops keepalived"
    if problem == "lbwatch unit not installed binary":
        unit = node.units / "lbwatch.service"
        unit.write_text(unit.read_text().replace(LBWATCH, "/usr/local/bin/nowhere/lbwatch"))
        return "which is not an installed lbwatch"
    if problem == "textfile outside the unit's paths":
        node.config.write_text(node.config.read_text() + METRICS)
        return (
            "metrics.textfile: /srv/metrics/lbwatch.prom lives in /srv/metrics, which "
            "lbwatch.service cannot write (ProtectSystem=strict makes / read-only)"
        )
    if problem == "smtp down":
        text = node.config.read_text()
        node.config.write_text(text.replace("port = ", f"port = {free_port()}  # ", 1))
        return "email: 127.0.0.1:"
    raise AssertionError(problem)


PROBLEMS = [
    "no notify_fifo",
    "another fifo",
    "pidof",
    "track_process",
    "vips differ",
    "instance unknown",
    "no master-worker",
    "another pidfile",
    "no health frontend",
    "haproxy -c fails",
    "keepalived Restart=always",
    "keepalived Restart=always in a drop-in",
    "lbwatch unit not installed binary",
    "textfile outside the unit's paths",
    "smtp down",
]
METRICS = '\n[metrics]\ntextfile = "/srv/metrics/lbwatch.prom"\n'


def test_a_drop_in_lets_the_unit_write_the_textfile(node: Node) -> None:
    """The fix doctor gives for a textfile outside the unit's paths, written as a drop-in of
    its own: the node is clean again."""
    node.config.write_text(node.config.read_text() + METRICS)
    (bad,) = node.bad()
    assert bad.fix is not None and "`ReadWritePaths=-/srv/metrics`" in bad.fix
    (node.units / "lbwatch.service.d" / "metrics.conf").write_text(
        "[Service]\nReadWritePaths=-/srv/metrics\n"
    )
    assert node.bad() == []


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_planted_problem_is_found_with_its_fix(node: Node, problem: str) -> None:
    said = plant(node, problem)
    bad = node.bad()
    assert len(bad) == 1, bad
    assert said in bad[0].what, bad[0]
    assert bad[0].fix
    if problem in ("no notify_fifo", "another fifo", "pidof", "vips differ", "instance unknown"):
        # Still a config keepalived accepts: the problem is in how it works with lbwatch.
        done = subprocess.run(
            ["keepalived", "-t", "-f", str(node.ka_conf)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0


def own_start(node: Node) -> None:
    """haproxy's start command in lbwatch's config (writing the test's pidfile): the command
    line reads this machine's unit files, and Debian's haproxy unit writes /run/haproxy.pid."""
    text = node.config.read_text()
    argv = ["haproxy", "-W", "-D", "-f", f"{node.dir}/haproxy.cfg", "-p", f"{node.dir}/haproxy.pid"]
    start = f"start = {json.dumps(argv)}"
    node.config.write_text(text.replace("[haproxy]\n", f"[haproxy]\n{start}\n", 1))


def test_the_exit_code_says_whether_anything_is_wrong(node: Node) -> None:
    """`lbwatch doctor`: 0 on the clean node, 1 once a problem is planted (through the command
    line, keepalived's config path from lbwatch's own config; the units are this machine's
    own, Debian's haproxy and keepalived units, which are fine, lbwatch's installed or not: a
    warning)."""
    own_start(node)
    argv = ["--config", str(node.config), "doctor", "--json"]
    assert main(argv) == 0
    plant(node, "pidof")
    assert main(argv) == 1


@NEEDS_SSHD[0]
@NEEDS_SSHD[1]
def test_a_peer_whose_key_runs_anything_is_an_error(
    node: Node, tmp_path: Path, control_dir: Path
) -> None:
    """Sync peers over a real sshd: with the receiver's restricted entry, the peer answers and
    a forbidden command is refused (ok); with the bare key, the command runs: an error."""
    for line, expect in (
        (receiver_line, "ok"),
        (lambda staging, pub: pub, "error"),  # no restriction at all
    ):
        base = tmp_path / f"peer-{expect}"
        sshd = Sshd(base, line)
        try:
            key = node.dir / f"key-{expect}"
            shutil.copy(sshd.client_key, key)
            key.chmod(0o600)
            node.config.write_text(
                lbwatch_toml(node.dir, 25, f"""
ssh_key = "{key}"
known_hosts = "{sshd.known_hosts}"
control_dir = "{control_dir}"
staging_dir = "{node.dir / "staging"}"
peers = [{{ name = "lb2", host = "127.0.0.1", port = {sshd.port} }}]
""")
            )  # fmt: skip
            sync = [f for f in node.findings() if f.area == "sync"]
            restricted = [f for f in sync if "sync key runs" in f.what]
            assert len(restricted) == 1, sync
            assert restricted[0].level == expect, restricted
            if expect == "ok":
                assert any("answers through lbwatch's receiver" in f.what for f in sync), sync
        finally:
            sshd.stop()


def test_doctor_runs_as_a_command(node: Node) -> None:
    """The installed command: one line per finding, the fixes under them."""
    own_start(node)
    done = subprocess.run(
        [sys.executable, "-m", "lbwatch", "--config", str(node.config), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    haproxy    `haproxy -c -f" in done.stdout
    assert done.stderr.startswith("0 error(s)")


# -- keepalived's settings against the peers', from the agent's status ------------------------


def status_with_peer(
    node: Node, mine: dict[str, VrrpSettings], theirs: dict[str, VrrpSettings] | None,
    state: str = "up",
) -> None:  # fmt: skip
    """The running agent's status (this test process standing in for the agent), with lb2's
    view as its cluster watch heard it."""
    conf = KeepalivedConfView(path="/etc/keepalived/keepalived.conf", instances=mine)
    peer_conf = KeepalivedConfView(path="x", instances=theirs) if theirs is not None else None
    view = NodeView(
        node="lb2", agent=NodeAgent(pid=1, start_ticks=1, version="t"), keepalived_conf=peer_conf
    )
    doc = StatusDoc(
        agent=AgentInfo(
            pid=os.getpid(), start_ticks=ticks_of(os.getpid()), create_time=0.0, node="lb1",
            version="t",
        ),
        summary="ok",
        keepalived_conf=conf,
        cluster=ClusterView(peers={"lb2": PeerNode(state=state, since=0.0, view=view)}),
    )  # fmt: skip
    write_status(node.dir / "run", doc)
    text = node.config.read_text()
    if "peers = " not in text:  # named only: the check asks nothing of the peer itself
        node.config.write_text(text + '\npeers = [{ name = "lb2", host = "192.0.2.12" }]\n')


def peer_findings(node: Node) -> list[Finding]:
    return list(peer_vrrp(load(node.config)))


A = VrrpSettings(
    state="BACKUP", priority=100, advert_int=1.0, vrid=51, vips=[VIP], auth=AuthView(), tracks=[]
)
B = A.model_copy(update={"priority": 97})


@pytest.mark.parametrize(
    ("theirs", "said"),
    [
        (B, None),
        (A, "priority 100 on both"),
        (B.model_copy(update={"advert_int": 0.1}), "advert_int is 1 on lb1"),
        (B.model_copy(update={"advert_int": None, "version": 3}), "VRRP version is 2 on lb1"),
    ],
)
def test_keepalived_settings_are_compared_with_each_peers(
    node: Node, theirs: VrrpSettings, said: str | None
) -> None:
    """Priorities must differ; advert_int and VRRP version must be equal (keepalived's
    defaults, 1 s and 2, when not written)."""
    status_with_peer(node, {"VI_1": A}, {"VI_1": theirs})
    found = peer_findings(node)
    if said is None:
        assert [f.level for f in found] == ["ok"], found
    else:
        assert [f.level for f in found] == ["error"] and said in found[0].what, found


def test_master_on_both_is_an_error_and_a_peer_not_heard_a_warning(node: Node) -> None:
    master = A.model_copy(update={"state": "MASTER"})
    status_with_peer(node, {"VI_1": master}, {"VI_1": master.model_copy(update={"priority": 97})})
    found = peer_findings(node)
    assert [f.level for f in found] == ["error"] and "`state MASTER` on both" in found[0].what
    status_with_peer(node, {"VI_1": A}, None, state="unreachable")
    found = peer_findings(node)
    assert [f.level for f in found] == ["warn"]
    assert "not compared with lb2: unreachable" in found[0].what


@pytest.mark.parametrize("example", ["keepalived.conf", "keepalived-fast.conf"])
def test_the_shipped_keepalived_examples_work_with_the_shipped_lbwatch_config(
    example: str,
) -> None:
    """config/keepalived*.conf: keepalived accepts them, doctor finds nothing wrong with them
    beside config/lbwatch.toml, and lb2's copy (priorities swapped, as their headers say)
    agrees with lb1's."""
    path = ROOT / "config" / example
    assert keepalived_test(path).returncode == 0
    cfg = load(ROOT / "config" / "lbwatch.toml")
    found = list(checks.keepalived(cfg, Where(keepalived_conf=path, config_id="lb1")))
    assert [f for f in found if f.level != "ok"] == [], found
    lb1 = vrrpview.settings(kaconf.read(path, "lb1"))
    swapped = {"VI_1": lb1["VI_2"].priority, "VI_2": lb1["VI_1"].priority}
    lb2 = {n: s.model_copy(update={"priority": swapped[n]}) for n, s in lb1.items()}
    compared = list(compare("lb1", lb1, "lb2", lb2))
    assert [f.level for f in compared] == ["ok", "ok"], compared


def received_findings(node: Node, extra: str = "") -> list[Finding]:
    """doctor's look at how a peer's version would fare here (sync on, no peers needed)."""
    text = node.config.read_text()
    node.config.write_text(text + ("" if "enabled = true" in text else "enabled = true\n") + extra)
    return list(checks.received(load(node.config)))


@needs("bwrap", "setpriv", "prlimit")
def test_received_versions_are_checked_confined(node: Node) -> None:
    """Positive control: with bubblewrap there and the node's own config fit for a peer's
    version, doctor says the check is confined and passes."""
    (found,) = received_findings(node)
    assert found.level == "ok" and "checked confined (as haproxy)" in found.what, found


RECEIVED = """
import sys
from pathlib import Path
from lbwatch.config import load
from lbwatch.doctor import checks
for found in checks.received(load(Path(sys.argv[1]))):
    print(found.level, found.what)
"""


@needs_sandbox
@needs("bwrap", "setpriv", "prlimit", "choom")
def test_received_versions_are_checked_confined_under_the_unit(node: Node) -> None:
    """The same finding with doctor run under the unit's restrictions (tests/sandbox.py:
    ProtectKernelTunables= makes /proc/sys read-only, as in containers): the confined check
    runs there and passes."""
    received_findings(node)  # sync on
    done = subprocess.run(
        [*sandboxed(), sys.executable, "-c", RECEIVED, str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.stdout.startswith("ok versions from peers are checked confined"), (
        done.stdout + done.stderr
    )


@needs("bwrap", "setpriv", "prlimit")
def test_own_config_a_peer_could_not_send_is_a_warning(node: Node) -> None:
    """A live config using a directive that runs code (its operator's own lua-load) would be
    refused coming from a peer: a warning naming the line, and the allow entry as its fix."""
    lua = node.dir / "hello.lua"
    lua.write_text("core.register_service('hello', 'http', function(a) end)\n")
    cfg = node.dir / "haproxy.cfg"
    cfg.write_text(cfg.read_text().replace("global\n", f"global\n    lua-load {lua}\n", 1))
    (found,) = received_findings(node)
    assert found.level == "warn" and f"line 2: lua-load {lua}: runs code" in found.what, found
    assert found.fix is not None and f'allow = ["lua-load {lua}"]' in found.fix
    (allowed,) = received_findings(node, f'received = {{ allow = ["lua-load {lua}"] }}\n')
    assert allowed.level == "error" and "readable by haproxy" in str(allowed.fix), allowed


@needs("bwrap", "setpriv", "prlimit")
def test_a_file_only_root_reads_fails_the_confined_check(node: Node) -> None:
    """A map the config loads that only root can read passes haproxy -c as root but not as
    the check user: an error naming the user, with the fix; with sandbox = false a warning."""
    secret = node.dir / "secret.map"
    secret.write_text("k v\n")
    secret.chmod(0o600)
    cfg = node.dir / "haproxy.cfg"
    text = cfg.read_text().replace(
        "http-request return",
        f"http-request set-header X %[str(k),map({secret})]\n    http-request return",
    )
    cfg.write_text(text)
    assert (
        subprocess.run(
            ["haproxy", "-c", "-f", str(cfg)], capture_output=True, check=False
        ).returncode
        == 0
    )
    (found,) = received_findings(node)
    assert found.level == "error" and "as haproxy, no network" in found.what, found
    (unconfined,) = received_findings(node, "received = { sandbox = false }\n")
    assert unconfined.level == "warn" and "unconfined" in unconfined.what


def test_doctor_from_a_shell_logs_in_with_the_units_credential(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`password_credential` outside the unit (doctor run by an operator, no
    $CREDENTIALS_DIRECTORY): the password is taken from the file the unit's LoadCredential=
    names, in a drop-in as an operator writes it, and the server's login is checked with it.
    The control: the server takes that password and refuses another; without the unit's line,
    doctor says to add it."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    sink = SmtpSink(free_port(), auth=("lbwatch", "s3cret"))
    sink.start()
    try:
        secret = node.dir / "smtp-password"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        config = lbwatch_toml(node.dir, sink.port).replace(
            "timeout = 3\n",
            'timeout = 3\nusername = "lbwatch"\npassword_credential = "smtp-password"\n'
            "allow_plain_password = true\n",
        )
        node.config.write_text(config)
        said = [f for f in node.findings() if f.area == "notify"]
        assert [f.level for f in said] == ["error"], said
        assert "LoadCredential" in said[0].what
        (node.units / "lbwatch.service.d" / "credential.conf").write_text(
            f"[Service]\nLoadCredential=smtp-password:{secret}\n"
        )
        said = [f for f in node.findings() if f.area == "notify"]
        assert [f.level for f in said] == ["ok", "ok"], said
        assert "logged in as lbwatch" in said[1].what and str(secret) in said[0].what
        secret.write_text("wrong\n")
        said = [f for f in node.findings() if f.area == "notify"]
        assert said[-1].level == "error" and "login refused" in said[-1].what, said
        assert "CREDENTIALS_DIRECTORY" not in os.environ
    finally:
        sink.stop()
