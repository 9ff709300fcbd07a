"""`lbwatch doctor` reads keepalived.conf as keepalived does: each row is a real keepalived.conf
that the real `keepalived -t` accepts or refuses (run here, every time), and the findings
doctor must give for it, written out by hand. Cross-node rows compare two real files' published
settings (as the node views carry them); pure rows pin the arithmetic."""

from __future__ import annotations

import importlib
import os
import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from lbwatch import kaconf, trackfile, vrrpview
from lbwatch.cluster import nodeview
from lbwatch.config import Config
from lbwatch.doctor import katest, keepalived, peervrrp
from lbwatch.doctor.checks import Where
from tests.conftest import needs

# Under CI a skip is a failure (tests/conftest.py): keepalived must be there.
pytestmark = needs("keepalived")

ROOT = Path(__file__).resolve().parents[1]
GLOBAL = """global_defs {
    router_id lb1
    enable_script_security
    script_user root
}
"""


def inst(
    name: str = "VI_1",
    vrid: int = 51,
    prio: int = 254,
    extra: str = "",
    vip: str = "192.0.2.100/24",
    state: str = "BACKUP",
    advert: str = "1",
    iface: str = "eth0",
) -> str:
    return f"""
vrrp_instance {name} {{
    state {state}
    interface {iface}
    virtual_router_id {vrid}
    priority {prio}
    advert_int {advert}
{extra}    virtual_ipaddress {{
        {vip} dev eth0
    }}
}}
"""


CLEAN = GLOBAL + inst("VI_1", 51, 254) + inst("VI_2", 52, 253, vip="192.0.2.101/24")
AUTH = "    authentication {{\n        auth_type PASS\n        auth_pass {}\n    }}\n"
UNICAST = "    unicast_peer {{\n        {}\n    }}\n"
V3 = GLOBAL.replace("router_id lb1", "router_id lb1\n    vrrp_version 3")
SCRIPT = 'vrrp_script chk {\n    script "/bin/true"\n    interval 1\n    weight -5\n}\n'

# (id, keepalived.conf, keepalived -t exits 0, [(level, words the finding says)]): every
# finding but the ok ones, in order. F is the file under test, named in keepalived's lines.
# Line numbers: GLOBAL is lines 1-5, an instance opens on line 7 (state 8, interface 9,
# virtual_router_id 10, priority 11, advert_int 12, its extra lines from 13).
ROWS = [
    ("clean 254/253", CLEAN, True, []),
    (
        "one VRID for two instances on one interface",
        GLOBAL + inst("VI_1", 51, 254) + inst("VI_2", 51, 253, vip="192.0.2.101/24"),
        False,
        [
            ("error", "keepalived -t: F: VI_1 and VI_2 both use VRID 51 with IPv4 on interface"),
            ("error", "VI_1 (F:7) and VI_2 (F:18) both use virtual_router_id 51 on eth0"),
        ],
    ),
    (
        "one VRID for IPv4 and IPv6: two protocols, no clash",
        GLOBAL + inst("VI_1", 51, 254) + inst("VI_6", 51, 253, vip="2001:db8::100/64"),
        True,
        [],
    ),
    (
        "skew of priority 97 at advert_int 1",
        GLOBAL + inst("VI_1", 51, 97),
        True,
        [
            (
                "warn",
                "VI_1 (F:7): priority 97 (VRRPv2, any advert_int): skew 0.621 s: after a "
                "priority-0 advertisement this node takes over 0.621 s later",
            )
        ],
    ),
    (
        "skew of priority 97 at advert_int 0.1 (VRRPv3)",
        V3 + inst("VI_1", 51, 97, advert="0.1"),
        True,
        [("warn", "priority 97 (VRRPv3, advert_int 0.1 s): skew 0.062 s")],
    ),
    (
        "priority 250 at advert_int 3, VRRPv2: 6/256 s, whatever advert_int",
        GLOBAL + inst("VI_1", 51, 250, advert="3"),
        True,
        [],
    ),
    (
        "priority 250 at advert_int 3, VRRPv3: 18/256 s",
        V3 + inst("VI_1", 51, 250, advert="3"),
        True,
        [("warn", "priority 250 (VRRPv3, advert_int 3 s): skew 0.070 s")],
    ),
    (
        "priority 250 at advert_int 3, the instance's own `version 3`",
        GLOBAL + inst("VI_1", 51, 250, advert="3", extra="    version 3\n"),
        True,
        [("warn", "priority 250 (VRRPv3, advert_int 3 s): skew 0.070 s")],
    ),
    ("priority 128 at 0.1: exactly 50 ms", V3 + inst("VI_1", 51, 128, advert="0.1"), True, []),
    (
        "auth_pass of 12 characters",
        GLOBAL + inst(extra=AUTH.format("abcdefgh1234")),
        False,
        [
            ("warn", "keepalived -t: F:15: Truncating auth_pass to 8 characters"),
            ("warn", "VI_1 (F:7): auth_pass is 12 characters, keepalived uses the first 8"),
        ],
    ),
    ("auth_pass of 8 characters", GLOBAL + inst(extra=AUTH.format("abcdefgh")), True, []),
    (
        "state MASTER with nopreempt",
        GLOBAL + inst(state="MASTER", extra="    nopreempt\n"),
        False,
        [
            ("warn", "keepalived -t: F: (VI_1) Warning - nopreempt will not work with initial"),
            ("warn", "VI_1 (F:7): nopreempt with `state MASTER`: keepalived ignores nopreempt"),
        ],
    ),
    ("state BACKUP with nopreempt", GLOBAL + inst(extra="    nopreempt\n"), True, []),
    (
        "unicast_peer that is not the sync peer",
        GLOBAL + inst(extra=UNICAST.format("192.0.2.13")),
        True,
        [("warn", "unicast_peer misses lb2 (192.0.2.12); lists 192.0.2.13, none of lbwatch's")],
    ),
    ("unicast_peer: the sync peer", GLOBAL + inst(extra=UNICAST.format("192.0.2.12")), True, []),
    (
        "a typo keepalived ignores: priority falls back to 100",
        GLOBAL + inst(extra="    priorty 254\n").replace("    priority 254\n", ""),
        False,
        [
            ("error", "keepalived -t: F:12: Unknown keyword 'priorty'"),
            ("warn", "VI_1 (F:7): priority 100 (VRRPv2, any advert_int): skew 0.609 s"),
        ],
    ),
    (
        "a VRID out of range",
        GLOBAL + inst(vrid=300),
        False,
        [
            ("error", "keepalived -t: F:10: number '300' outside range [1, 255]"),
            ("error", "keepalived -t: F:10: (VI_1): VRID '300' not valid - must be between 1"),
            ("error", "keepalived -t: F: (VI_1) the virtual router id must be set"),
        ],
    ),
    (
        "an interface that does not exist",
        GLOBAL + inst(iface="lbwnone0"),
        False,
        [
            ("warn", "keepalived -t: F:9: WARNING - interface lbwnone0 for vrrp_instance VI_1"),
            ("error", "keepalived -t: F: Non-existent interface specified in configuration"),
        ],
    ),
]


def lbwatch_cfg() -> Config:
    """lbwatch's config with one sync peer, lb2 at 192.0.2.12 (named by address: no lookup)."""
    return Config.model_validate({"sync": {"peers": [{"name": "lb2", "host": "192.0.2.12"}]}})


def keepalived_t(conf: Path) -> int:
    done = subprocess.run(
        ["keepalived", "-t", "-f", str(conf)], capture_output=True, timeout=30, check=False
    )
    return done.returncode


@pytest.mark.parametrize(("text", "accepted", "expected"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])  # fmt: skip
def test_each_rule_on_a_real_keepalived_conf(
    tmp_path: Path, text: str, accepted: bool, expected: list[tuple[str, str]]
) -> None:
    """doctor's keepalived findings on a file are keepalived's own messages (with file and
    line) and its rules' findings, exactly those of the row; keepalived -t agrees on whether
    the file is clean."""
    conf = tmp_path / "keepalived.conf"
    conf.write_text(text)
    assert (keepalived_t(conf) == 0) is accepted
    found = list(keepalived.check(lbwatch_cfg(), Where(keepalived_conf=conf, config_id="lb1")))
    # The rows leave lbwatch's track file out; its rule has tests of its own (below).
    bad = [(f.level, f.what) for f in found if f.level != "ok" and "lbwatch drain" not in f.what]
    assert len(bad) == len(expected), bad
    for (level, what), (want_level, words) in zip(bad, expected):
        assert level == want_level and words.replace("F", str(conf)) in what, (what, words)
    assert all(f.fix for f in found if f.level != "ok")
    if not expected:
        assert any("accepts it" in f.what for f in found), found


def lever(name: str, path: str, weight: str = "    weight 1\n") -> str:
    return f'track_file lbwatch_{name} {{\n    file "{path}"\n{weight}    init_file 0\n}}\n'


TRACKS = "    track_file {{\n        lbwatch_{}\n    }}\n"


def lever_findings(tmp_path: Path, text: str) -> list[tuple[str, str, str]]:
    conf = tmp_path / "keepalived.conf"
    conf.write_text(text)
    assert keepalived_t(conf) == 0  # keepalived accepts every file below
    cfg = Config.model_validate({"keepalived": {"track_dir": str(tmp_path / "track")}})
    found = keepalived.check(cfg, Where(keepalived_conf=conf, config_id="lb1"))
    return [
        (f.level, f.what, f.fix or "")
        for f in found
        if "tracks lbwatch's file" in f.what or "lbwatch drain" in f.what
    ]


def test_the_lever_tracked_with_weight_1_is_ok(tmp_path: Path) -> None:
    """An instance tracking lbwatch's file with weight 1 (the shipped examples' way): ok."""
    text = GLOBAL + lever("VI_1", f"{tmp_path}/track/VI_1") + inst(extra=TRACKS.format("VI_1"))
    (only,) = lever_findings(tmp_path, text)
    assert only[0] == "ok" and "VI_1: tracks lbwatch's file" in only[1]


@pytest.mark.parametrize(
    ("desc", "text", "words"),
    [
        ("no track_file at all", GLOBAL + inst(), "does not track"),
        (
            "another file",
            GLOBAL + lever("VI_1", "/srv/other") + inst(extra=TRACKS.format("VI_1")),
            "does not track",
        ),
        (
            "weight 0 (FAULT on any value: a drain would be a FAULT)",
            GLOBAL
            + lever("VI_1", "TRACK/VI_1", "    weight 0\n")
            + inst(extra=TRACKS.format("VI_1")),
            "with weight 0",
        ),
        (
            "the instance's own weight overrides the block's",
            GLOBAL
            + lever("VI_1", "TRACK/VI_1")
            + inst(extra="    track_file {\n        lbwatch_VI_1 weight 2\n    }\n"),
            "with weight 2",
        ),
    ],
)
def test_a_missing_or_wrong_lever_is_a_warning_with_the_lines_to_add(
    tmp_path: Path, desc: str, text: str, words: str
) -> None:
    """No lever, another file, or a weight other than 1: a warning whose fix is the blocks."""
    text = text.replace("TRACK", f"{tmp_path}/track")
    (only,) = lever_findings(tmp_path, text)
    level, what, fix = only
    assert level == "warn" and words in what, what
    assert "lbwatch drain` cannot move it" in what
    assert f'file "{tmp_path}/track/VI_1"' in fix and "lbwatch_VI_1" in fix


def test_the_shipped_examples_carry_the_lever(tmp_path: Path) -> None:
    """config/keepalived*.conf track lbwatch's default files, weight 1, every instance."""
    for name in ("keepalived.conf", "keepalived-fast.conf"):
        conf = kaconf.read(ROOT / "config" / name, "lb1")
        for instance in conf.instances:
            assert trackfile.lever(conf, instance.name, Config().keepalived.track_dir) == ""


def test_a_message_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    """keepalived names the included file it read a bad line in; doctor passes it on."""
    (tmp_path / "conf.d").mkdir()
    part = tmp_path / "conf.d" / "vi1.conf"
    part.write_text(inst(extra="    priorty 254\n"))
    conf = tmp_path / "keepalived.conf"
    conf.write_text(GLOBAL + f"include {tmp_path}/conf.d/*.conf\n")
    found = list(keepalived.check(lbwatch_cfg(), Where(keepalived_conf=conf, config_id="lb1")))
    said = [f.what for f in found if f.level == "error"]
    assert said == [f"keepalived -t: {part}:8: Unknown keyword 'priorty'"], found


@pytest.mark.parametrize("example", ["keepalived.conf", "keepalived-fast.conf"])
def test_the_shipped_examples_are_clean(example: str) -> None:
    """config/keepalived*.conf as they are in the repository: keepalived -t accepts them and
    doctor finds neither an error nor a warning (their backups' skew is under 50 ms)."""
    path = ROOT / "config" / example
    assert keepalived_t(path) == 0
    found = list(keepalived.check(lbwatch_cfg(), Where(keepalived_conf=path, config_id="lb1")))
    assert [f for f in found if f.level in ("error", "warn")] == [], found


def test_no_keepalived_is_one_finding() -> None:
    """Without a keepalived binary: one error that says so, not a traceback."""
    (only,) = katest.findings(None, Path("/etc/keepalived/keepalived.conf"), True)
    assert only.level == "error" and "keepalived is not installed" in only.what


@pytest.fixture
def fresh_katest() -> Iterator[None]:
    """katest as imported under the PATH a test sets (an older katest read PATH at import),
    and again after it, under the PATH the monkeypatch restored."""
    yield
    importlib.reload(katest)


@pytest.mark.parametrize("path", [None, "", ".", "bin", f".{os.pathsep}/nonexistent"])
def test_a_keepalived_in_the_current_directory_is_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_katest: None, path: str | None
) -> None:
    """doctor runs as root: PATH unset (no entry, not the current directory), empty or with a
    relative entry must not make it run the current directory's keepalived; /usr/sbin's is
    run (by its absolute path), or none."""
    marker = tmp_path / "ran"
    for d in (tmp_path, tmp_path / "bin"):
        d.mkdir(exist_ok=True)
        fake = d / "keepalived"
        fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
        fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    if path is None:
        monkeypatch.delenv("PATH", raising=False)
    else:
        monkeypatch.setenv("PATH", path)
    importlib.reload(katest)
    ran = katest.run(tmp_path / "keepalived.conf", None)
    assert not marker.exists()
    assert ran is None or (os.path.isabs(ran.argv[0]) and ran.failed is None), ran


def test_a_keepalived_that_cannot_be_started_is_one_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_katest: None
) -> None:
    """An executable keepalived that exec refuses (here: its interpreter does not exist) is
    one error that says what to do, not a traceback. The command shown is quoted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "keepalived"
    fake.write_text("#!/nonexistent/interpreter\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    importlib.reload(katest)
    conf = tmp_path / "my keepalived.conf"
    ran = katest.run(conf, "lb1")
    assert ran is not None and ran.argv[0] == str(fake) and ran.failed, ran
    (only,) = katest.findings(ran, conf, True)
    assert only.level == "error", only
    assert only.what.startswith(f"{fake} could not be run ("), only
    assert "apt-get install --reinstall keepalived" in (only.fix or ""), only
    timed_out = katest.Ran(ran.argv, None, "")
    (late,) = katest.findings(timed_out, conf, True)
    assert late.what.startswith(f"`keepalived -t -f '{conf}' -i lb1` did not finish"), late


# -- across nodes: this node's published settings against the peer's ---------------------------

LB2_CLEAN = GLOBAL + inst("VI_1", 51, 253) + inst("VI_2", 52, 254, vip="192.0.2.101/24")


def tracked(weight: str) -> str:
    """VI_1 at 254 tracking vrrp_script chk (its own weight -5), with ``weight`` after it."""
    return SCRIPT + inst(
        "VI_1", 51, 254, extra=f"    track_script {{\n        chk{weight}\n    }}\n"
    )


# (id, lb1's conf, lb2's conf, [(level, words)]): every finding of VI_1's comparison.
CROSS = [
    ("agree", CLEAN, LB2_CLEAN, [("ok", "VI_1: settings agree with lb2's")]),
    (
        "neither sets priority: both run at keepalived's 100",
        GLOBAL + inst().replace("    priority 254\n", ""),
        GLOBAL + inst().replace("    priority 254\n", ""),
        [("error", "VI_1 has priority 100 on both lb1 and lb2")],
    ),
    (
        "priority unset on lb1 (100), 100 on lb2",
        GLOBAL + inst().replace("    priority 254\n", ""),
        GLOBAL + inst(prio=100),
        [("error", "VI_1 has priority 100 on both lb1 and lb2")],
    ),
    (
        "VRID differs",
        CLEAN,
        GLOBAL + inst("VI_1", 61, 253),
        [("error", "VI_1: virtual_router_id is 51 on lb1 and 61 on lb2: they are two virtual")],
    ),
    (
        "VIPs differ",
        CLEAN,
        GLOBAL + inst("VI_1", 51, 253, vip="192.0.2.110/24"),
        [("error", "VI_1: VIPs are 192.0.2.100 on lb1 and 192.0.2.110 on lb2")],
    ),
    (
        "auth_pass differs",
        GLOBAL + inst(extra=AUTH.format("secret1")),
        GLOBAL + inst(prio=253, extra=AUTH.format("secret2")),
        [("error", "VI_1: auth_pass differs between lb1 and lb2 (compared by an 8-bit check")],
    ),
    (
        "authentication on one node only",
        GLOBAL + inst(extra=AUTH.format("secret1")),
        GLOBAL + inst(prio=253),
        [("error", "VI_1: authentication is PASS on lb1 and none on lb2")],
    ),
    (
        "advert_int differs",
        CLEAN,
        GLOBAL + inst(prio=253, advert="2"),
        [("error", "VI_1: advert_int is 1 on lb1 and 2 on lb2")],
    ),
    (
        "VRRP version differs",
        CLEAN,
        V3 + inst(prio=253),
        [("error", "VI_1: VRRP version is 2 on lb1 and 3 on lb2")],
    ),
    (
        "negative weight that only ties",
        GLOBAL + tracked(" weight -1"),
        GLOBAL + inst(prio=253),
        [
            ("warn", "VI_1: track_script chk (weight -1) cannot move the VIP: priority 254 here"),
            ("ok", "VI_1: settings agree"),
        ],
    ),
    (
        "the script's own weight -5 moves it",
        GLOBAL + tracked(""),
        GLOBAL + inst(prio=253),
        [("ok", "VI_1: settings agree")],
    ),
    (
        "positive weight capped at 254 on both",
        GLOBAL + tracked(" weight 5"),
        GLOBAL + inst(prio=253),
        [
            ("warn", "with both healthy both are at 254 (keepalived caps there)"),
            ("ok", "VI_1: settings agree"),
        ],
    ),
    (
        "weight 0: FAULT moves it",
        GLOBAL + tracked(" weight 0"),
        GLOBAL + inst(prio=253),
        [("ok", "VI_1: settings agree")],
    ),
]


@pytest.mark.parametrize(("lb1", "lb2", "expected"), [r[1:] for r in CROSS],
                         ids=[r[0] for r in CROSS])  # fmt: skip
def test_each_instance_agrees_with_the_peers(
    tmp_path: Path, lb1: str, lb2: str, expected: list[tuple[str, str]]
) -> None:
    """Two real files keepalived accepts, published as the agents do and read back through the
    node view's JSON: VRID, VIPs, advert_int, version and authentication must be the same, and
    a tracker's weight must be able to move the VIP."""
    views = {}
    for node, text in (("lb1", lb1), ("lb2", lb2)):
        conf = tmp_path / f"{node}.conf"
        conf.write_text(text)
        assert keepalived_t(conf) == 0, node
        views[node] = vrrpview.settings(kaconf.read(conf, node))
    mine = {"VI_1": views["lb1"]["VI_1"]}
    found = list(peervrrp.compare("lb1", mine, "lb2", views["lb2"]))
    assert len(found) == len(expected), found
    for f, (level, words) in zip(found, expected):
        assert f.level == level and words in f.what, (f, words)


def test_a_peer_on_an_older_lbwatch_cannot_be_compared() -> None:
    """A view without the newer fields (an older lbwatch's JSON) is read, and its VRID, VIPs
    and authentication are said not compared: a warning, no error, no crash."""
    old = (
        b'{"node": "lb2", "agent": {"pid": 1, "start_ticks": 1, "version": "0.9"},'
        b' "keepalived_conf": {"path": "/etc/keepalived/keepalived.conf", "instances":'
        b' {"VI_1": {"state": "BACKUP", "priority": 253, "advert_int": 1.0}}}}'
    )
    view = nodeview.parse(old)
    assert view is not None and view.keepalived_conf is not None
    theirs = view.keepalived_conf.instances
    assert theirs["VI_1"].vrid is None and theirs["VI_1"].auth is None
    mine = {"VI_1": theirs["VI_1"].model_copy(update={"priority": 254, "vrid": 51})}
    mine["VI_1"] = mine["VI_1"].model_copy(update={"vips": ["192.0.2.100"], "auth": {}})
    found = list(peervrrp.compare("lb1", mine, "lb2", theirs))
    assert [f.level for f in found] == ["warn", "ok"], found
    assert "cannot be compared with lb2: lb2's lbwatch does not publish them" in found[0].what


def test_the_password_is_never_published(tmp_path: Path) -> None:
    """The node view carries the auth type and a two-digit check, not the password."""
    conf = tmp_path / "k.conf"
    conf.write_text(GLOBAL + inst(extra=AUTH.format("s3cr3tpw")))
    settings = vrrpview.settings(kaconf.read(conf, "lb1"))["VI_1"]
    assert settings.auth is not None and settings.auth.type == "PASS"
    assert settings.auth.check is not None and len(settings.auth.check) == 2
    assert "s3cr3tpw" not in settings.model_dump_json()


def test_instances_sharing_a_password_publish_one_check(tmp_path: Path) -> None:
    """One password gives one byte however many instances use it: k instances sharing it must
    not publish k independent bytes (k x 8 bits of an offline oracle in status.json). Other
    passwords still differ: s3cr3tpw and s3cr3tpx, a fixed pair whose checks differ (5f, 4f;
    1 pair in 256 would not)."""
    conf = tmp_path / "k.conf"
    conf.write_text(
        GLOBAL
        + inst("VI_1", 51, extra=AUTH.format("s3cr3tpw"))
        + inst("VI_2", 52, extra=AUTH.format("s3cr3tpw"), vip="192.0.2.101/24")
        + inst("VI_3", 53, extra=AUTH.format("s3cr3tpx"), vip="192.0.2.102/24")
    )
    views = vrrpview.settings(kaconf.read(conf, "lb1"))
    checks = {n: s.auth.check if s.auth is not None else None for n, s in views.items()}
    assert checks == {"VI_1": "5f", "VI_2": "5f", "VI_3": "4f"}


# -- the arithmetic, by hand ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "advert", "prio", "skew_ms", "fast"),
    [
        # VRRPv2 (RFC 3768 6.1): (256 - priority) / 256 s, whatever advert_int; the fix is
        # always 244 (256 - 0.05 x 256 = 243.2 -> 244).
        (2, "1", 97, "621.094", 244),  # 159/256 s
        (2, "1", 244, "46.875", 244),  # 12/256 s
        (2, "1", 243, "50.781", 244),  # 13/256 s: over
        (2, "3", 250, "23.438", 244),  # 6/256 s: advert_int 3 does not stretch it
        (2, "10", 254, "7.812", 244),  # 2/256 s
        (2, "0.1", 97, "621.094", 244),  # 159/256 s: advert_int 0.1 does not shrink it
        # VRRPv3 (RFC 5798 6.1): (256 - priority) x advert_int / 256.
        (3, "1", 97, "621.094", 244),  # equal to v2's at advert_int 1
        (3, "0.1", 97, "62.109", 128),  # 15.9/256 s; 256 - 128 = 128 exactly
        (3, "0.1", 128, "50.000", 128),  # 12.8/256 s
        (3, "3", 250, "70.312", 252),  # 18/256 s; 256 - 12.8/3 = 251.73 -> 252
        (3, "10", 254, "78.125", None),  # 20/256 s; 255 would be needed, the owner's
    ],
)
def test_skew_and_the_priority_that_fixes_it(
    version: int, advert: str, prio: int, skew_ms: str, fast: int | None
) -> None:
    """Skew = (256 - priority) / 256 s in VRRPv2, x advert_int in VRRPv3; the fix is the
    smallest priority at or under 50 ms, never 255."""
    adv = Fraction(advert)
    assert f"{float(keepalived.skew(prio, adv, version) * 1000):.3f}" == skew_ms
    assert keepalived.fast_priority(adv, version) == fast


@pytest.mark.parametrize(
    ("mine", "theirs", "weight", "stuck"),
    [
        (254, 253, 0, False),  # FAULT gives the VIP up
        (254, 253, -1, True),  # 253 ties: the IP address decides
        (254, 253, -2, False),
        (253, 254, -1, False),  # the lower node: its failure cannot make it MASTER
        (200, 100, -50, True),  # 150 stays above 100
        (200, 100, -101, False),
        (254, 253, 5, True),  # both capped at 254 while healthy
        (200, 100, 50, True),  # 100 + 50 < 200
        (200, 100, 101, False),
        (100, 200, 101, False),  # the same pair seen from the lower node
    ],
)
def test_when_a_trackers_weight_can_move_the_vip(
    mine: int, theirs: int, weight: int, stuck: bool
) -> None:
    """The rule of peervrrp.stuck, case by case."""
    assert (peervrrp.stuck(mine, theirs, weight) is not None) is stuck
