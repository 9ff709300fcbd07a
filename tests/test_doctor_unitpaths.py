"""Which paths lbwatch's unit lets it write, as systemd 252 would set up its mount namespace
(``lbwatch.doctor.unitfs``), and doctor's check of every path the config names against the unit
and its drop-ins (``lbwatch.doctor.unitpaths``).

The expected answers are written out by hand, case by case, from systemd.exec(5) and systemd
252's src/core/namespace.c; none is computed with lbwatch's code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lbwatch.config import Config, parse
from lbwatch.doctor import unitfs, unitpaths, units
from lbwatch.doctor.checks import Where
from tests.test_doctor_units import ORDER, UNIT, put, search

STRICT = "[Service]\nProtectSystem=strict\n"

# (the unit's text, then its drop-ins' in the order they apply), path, outcome, the setting
# that decides it (None: no setting holds the path)
CASES: list[tuple[str, list[str], str, str, str | None]] = [
    ("no sandbox", ["[Service]\nExecStart=/bin/true\n"], "/etc/x", "writable", None),
    ("strict", [STRICT], "/etc/x", "read-only", "ProtectSystem=strict"),
    ("strict, /var too", [STRICT], "/var/lib/x", "read-only", "ProtectSystem=strict"),
    ("strict opened", [STRICT + "ReadWritePaths=/srv\n"], "/srv/a/b", "writable",
     "ReadWritePaths=/srv"),
    ("'-' prefix", [STRICT + "ReadWritePaths=-/srv\n"], "/srv/a", "writable",
     "ReadWritePaths=-/srv"),
    ("'+' prefix", [STRICT + "ReadWritePaths=+/srv\n"], "/srv/a", "writable",
     "ReadWritePaths=+/srv"),
    ("'-+' prefix", [STRICT + "ReadWritePaths=-+/srv\n"], "/srv/a", "writable",
     "ReadWritePaths=-+/srv"),
    ("by component, not by string", [STRICT + "ReadWritePaths=/srv/data\n"],
     "/srv/database", "read-only", "ProtectSystem=strict"),
    ("trailing slash", [STRICT + "ReadWritePaths=/srv/\n"], "/srv/x", "writable",
     "ReadWritePaths=/srv/"),
    ("relative ignored", [STRICT + "ReadWritePaths=srv\n"], "/srv", "read-only",
     "ProtectSystem=strict"),
    ("two words, two lines", [STRICT + "ReadWritePaths=/a /b\nReadWritePaths=/c\n"], "/b/x",
     "writable", "ReadWritePaths=/b"),
    ("continued line", [STRICT + "ReadWritePaths=/a \\\n# a comment\n  /b\n"], "/b",
     "writable", "ReadWritePaths=/b"),
    ("comment", [STRICT + "#ReadWritePaths=/a\n;ReadWritePaths=/b\n"], "/a", "read-only",
     "ProtectSystem=strict"),
    ("another section", ["[Unit]\nReadWritePaths=/a\n" + STRICT], "/a", "read-only",
     "ProtectSystem=strict"),
    ("strict leaves the API trees", [STRICT], "/proc/x", "writable", "ProtectSystem=strict"),
    ("strict leaves /home to ProtectHome=", [STRICT], "/home/u", "writable",
     "ProtectSystem=strict"),
    ("yes: /usr", ["[Service]\nProtectSystem=yes\n"], "/usr/local/x", "read-only",
     "ProtectSystem=yes"),
    ("yes: /boot", ["[Service]\nProtectSystem=yes\n"], "/boot/x", "read-only",
     "ProtectSystem=yes"),
    ("yes: split-usr /lib", ["[Service]\nProtectSystem=yes\n"], "/lib/x", "read-only",
     "ProtectSystem=yes"),
    ("yes: not /etc", ["[Service]\nProtectSystem=yes\n"], "/etc/x", "writable", None),
    ("true is yes", ["[Service]\nProtectSystem=true\n"], "/usr/x", "read-only",
     "ProtectSystem=true"),
    ("full: /etc", ["[Service]\nProtectSystem=full\n"], "/etc/x", "read-only",
     "ProtectSystem=full"),
    ("full: not /var", ["[Service]\nProtectSystem=full\n"], "/var/x", "writable", None),
    ("no", ["[Service]\nProtectSystem=no\n"], "/usr/x", "writable", None),
    ("a drop-in's later value wins", [STRICT, "[Service]\nProtectSystem=full\n"], "/var/x",
     "writable", None),
    ("an empty value resets", [STRICT, "[Service]\nProtectSystem=\n"], "/var/x", "writable",
     None),
    ("home yes", ["[Service]\nProtectHome=yes\n"], "/root/x", "inaccessible",
     "ProtectHome=yes"),
    ("home yes: /run/user", [STRICT + "ProtectHome=yes\n"], "/run/user/0", "inaccessible",
     "ProtectHome=yes"),
    ("nothing below an inaccessible path counts",
     [STRICT + "ProtectHome=yes\nReadWritePaths=/root/.ssh\n"], "/root/.ssh/x", "inaccessible",
     "ProtectHome=yes"),
    ("home read-only", [STRICT + "ProtectHome=read-only\n"], "/home/u/x", "read-only",
     "ProtectHome=read-only"),
    ("read-only nested writable", [STRICT + "ProtectHome=read-only\nReadWritePaths=/root/.ssh\n"],
     "/root/.ssh/known_hosts", "writable", "ReadWritePaths=/root/.ssh"),
    ("read-only beside the nested one",
     [STRICT + "ProtectHome=read-only\nReadWritePaths=/root/.ssh\n"], "/root/x", "read-only",
     "ProtectHome=read-only"),
    ("home tmpfs", [STRICT + "ProtectHome=tmpfs\n"], "/home/u", "read-only", "ProtectHome=tmpfs"),
    ("a path below tmpfs is not there",
     [STRICT + "ProtectHome=tmpfs\nReadWritePaths=-/home/u\n"], "/home/u/x", "read-only",
     "ProtectHome=tmpfs"),
    ("same path: read-write wins over tmpfs, read-only all the same",
     [STRICT + "ProtectHome=tmpfs\nReadWritePaths=/home\n"], "/home/u", "read-only",
     "ProtectHome=tmpfs"),
    ("same path: read-only wins over read-write",
     [STRICT + "ReadWritePaths=/srv\nReadOnlyPaths=/srv\n"], "/srv/x", "read-only",
     "ReadOnlyPaths=/srv"),
    ("read-only inside read-write", [STRICT + "ReadWritePaths=/srv\nReadOnlyPaths=/srv/ro\n"],
     "/srv/ro/x", "read-only", "ReadOnlyPaths=/srv/ro"),
    ("read-write inside read-only", ["[Service]\nReadOnlyPaths=/srv\nReadWritePaths=/srv/rw\n"],
     "/srv/rw/x", "writable", "ReadWritePaths=/srv/rw"),
    ("inaccessible wins over all on its path",
     [STRICT + "ReadWritePaths=/srv\nInaccessiblePaths=-/srv\n"], "/srv/x", "inaccessible",
     "InaccessiblePaths=-/srv"),
    ("private tmp", [STRICT + "PrivateTmp=yes\n"], "/tmp/x", "private", "PrivateTmp=yes"),
    ("private var/tmp", [STRICT + "PrivateTmp=yes\n"], "/var/tmp/x", "private",
     "PrivateTmp=yes"),
    ("no private tmp: read-only under strict", [STRICT + "PrivateTmp=no\n"], "/tmp/x",
     "read-only", "ProtectSystem=strict"),
    ("read-write below a private /tmp is not there",
     [STRICT + "PrivateTmp=yes\nReadWritePaths=/tmp/x\n"], "/tmp/x", "private",
     "PrivateTmp=yes"),
    ("same path: the private /tmp wins over read-write",
     [STRICT + "PrivateTmp=yes\nReadWritePaths=/tmp\n"], "/tmp/x", "private", "PrivateTmp=yes"),
    ("private tmp made read-only", [STRICT + "PrivateTmp=yes\nReadOnlyPaths=/tmp\n"], "/tmp/x",
     "read-only", "ReadOnlyPaths=/tmp"),
    ("StateDirectory=", [STRICT + "StateDirectory=foo\n"], "/var/lib/foo/x", "writable",
     "StateDirectory=foo"),
    ("StateDirectory= is that directory only", [STRICT + "StateDirectory=foo\n"],
     "/var/lib/foobar", "read-only", "ProtectSystem=strict"),
    ("RuntimeDirectory= nested", [STRICT + "RuntimeDirectory=a/b\n"], "/run/a/b/c", "writable",
     "RuntimeDirectory=a/b"),
    ("RuntimeDirectory= nested: not its parent", [STRICT + "RuntimeDirectory=a/b\n"], "/run/a",
     "read-only", "ProtectSystem=strict"),
    ("LogsDirectory=", [STRICT + "LogsDirectory=lbwatch\n"], "/var/log/lbwatch", "writable",
     "LogsDirectory=lbwatch"),
    ("CacheDirectory=", [STRICT + "CacheDirectory=x y\n"], "/var/cache/y", "writable",
     "CacheDirectory=y"),
    ("ConfigurationDirectory=", [STRICT + "ConfigurationDirectory=lbwatch\n"],
     "/etc/lbwatch/x", "writable", "ConfigurationDirectory=lbwatch"),
    ("a directory with a symlink", [STRICT + "StateDirectory=foo:bar\n"], "/var/lib/foo",
     "writable", "StateDirectory=foo:bar"),
    ("a directory read-only all the same",
     [STRICT + "StateDirectory=foo\nReadOnlyPaths=/var/lib/foo\n"], "/var/lib/foo", "read-only",
     "ReadOnlyPaths=/var/lib/foo"),
    ("a directory below an inaccessible one",
     [STRICT + "StateDirectory=foo\nInaccessiblePaths=/var/lib\n"], "/var/lib/foo",
     "inaccessible", "InaccessiblePaths=/var/lib"),
    ("an empty assignment resets the list",
     [STRICT + "ReadWritePaths=/srv\n", "[Service]\nReadWritePaths=\nReadWritePaths=/opt\n"],
     "/srv/x", "read-only", "ProtectSystem=strict"),
    ("the assignment after the reset counts",
     [STRICT + "ReadWritePaths=/srv\n", "[Service]\nReadWritePaths=\nReadWritePaths=/opt\n"],
     "/opt/x", "writable", "ReadWritePaths=/opt"),
    ("a reset of the directories",
     [STRICT + "StateDirectory=foo\n", "[Service]\nStateDirectory=\n"], "/var/lib/foo",
     "read-only", "ProtectSystem=strict"),
    ("drop-ins add to the list",
     [STRICT + "ReadWritePaths=/srv\n", "[Service]\nReadWritePaths=/opt\n"], "/srv/x",
     "writable", "ReadWritePaths=/srv"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("texts", "path", "outcome", "setting"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_what_the_sandbox_lets_the_unit_write(
    texts: list[str], path: str, outcome: str, setting: str | None
) -> None:
    """Each case: the outcome and the setting that decides it, as written by hand."""
    got = unitfs.access_in(texts, path)
    assert (got.outcome, got.rule.setting if got.rule else None) == (outcome, setting), got.why
    assert (setting or "no setting") in got.why


@pytest.mark.parametrize(
    ("texts", "path", "opens"),
    [
        ([STRICT], "/srv/x", True),
        ([STRICT + "ProtectHome=yes\n"], "/root/x", False),  # below an inaccessible path
        ([STRICT + "PrivateTmp=yes\n"], "/tmp/x", False),  # below the private /tmp
        ([STRICT + "ReadOnlyPaths=/srv/x\n"], "/srv/x", False),  # read-only wins on the path
        ([STRICT + "ProtectHome=read-only\n"], "/root/x", True),  # nested inside read-only
    ],
)
def test_whether_a_read_write_paths_drop_in_would_open_a_path(
    texts: list[str], path: str, opens: bool
) -> None:
    """`ReadWritePaths=` in a drop-in opens a path under ProtectSystem= and ProtectHome=read-only,
    not below an inaccessible or private directory, nor where ReadOnlyPaths= names the path."""
    assert unitfs.opens(unitfs.rules(units.parse(texts)), path) is opens


# -- the doctor check --------------------------------------------------------------------------


def where(root: Path) -> Where:
    return Where(units=search(root))


def config(**sections: dict[str, object]) -> Config:
    return parse(sections, "test")


def test_a_path_the_unit_cannot_write_is_an_error_with_its_key_and_fix(tmp_path: Path) -> None:
    """A textfile outside ReadWritePaths=: an error naming the key, the path, the setting that
    decides, and the drop-in line that fixes it; the other paths pass."""
    put(tmp_path, ORDER[2], "lbwatch.service", (Path(__file__).parents[1] / "systemd" /
                                                "lbwatch.service").read_text())  # fmt: skip
    cfg = config(metrics={"textfile": "/srv/metrics/lbwatch.prom"})
    (found,) = list(unitpaths.check(cfg, where(tmp_path)))
    assert found.level == "error"
    assert found.what == (
        "metrics.textfile: /srv/metrics/lbwatch.prom lives in /srv/metrics, which "
        "lbwatch.service cannot write (ProtectSystem=strict makes / read-only)"
    )
    assert found.fix is not None
    assert "`systemctl edit lbwatch`" in found.fix
    assert "`ReadWritePaths=-/srv/metrics`" in found.fix


def test_a_drop_in_opens_the_path(tmp_path: Path) -> None:
    """The fix doctor gives, as a drop-in in /etc: then every path passes."""
    put(tmp_path, ORDER[2], "lbwatch.service", UNIT)
    put(tmp_path, ORDER[0], "lbwatch.service.d/metrics.conf",
        "[Service]\nReadWritePaths=-/srv/metrics\nStateDirectory=lbwatch\n")  # fmt: skip
    cfg = config(metrics={"textfile": "/srv/metrics/lbwatch.prom"})
    (found,) = list(unitpaths.check(cfg, where(tmp_path)))
    assert found.level == "ok", found
    assert "lets lbwatch write the 6 paths" in found.what
    assert "metrics.conf" in found.what


def test_a_drop_in_that_resets_the_list_is_seen(tmp_path: Path) -> None:
    """`ReadWritePaths=` alone in a drop-in takes /run away: the FIFO's directory is said."""
    put(tmp_path, ORDER[2], "lbwatch.service", UNIT + "StateDirectory=lbwatch\n")
    put(tmp_path, ORDER[0], "lbwatch.service.d/reset.conf", "[Service]\nReadWritePaths=\n")
    bad = [f for f in unitpaths.check(Config(), where(tmp_path)) if f.level != "ok"]
    assert [f.what.split(":")[0] for f in bad] == ["agent.run_dir", "notify.fifo"], bad


def test_a_path_no_read_write_paths_can_open(tmp_path: Path) -> None:
    """Below ProtectHome=yes: an error whose fix is to move the path or change that setting,
    not a ReadWritePaths= line that would not help; in the private /tmp, a warning."""
    put(tmp_path, ORDER[2], "lbwatch.service",
        UNIT + "StateDirectory=lbwatch\nRuntimeDirectory=lbwatch\nProtectHome=yes\n"
        "PrivateTmp=yes\n")  # fmt: skip
    cfg = config(metrics={"textfile": "/root/lbwatch.prom"}, notify={"fifo": "/tmp/ka.fifo"})
    found = {f.what.split(":")[0]: f for f in unitpaths.check(cfg, where(tmp_path))}
    assert found["metrics.textfile"].level == "error"
    assert "ProtectHome=yes makes /root inaccessible" in found["metrics.textfile"].what
    assert "ReadWritePaths" not in str(found["metrics.textfile"].fix)
    assert found["notify.fifo"].level == "warn"
    assert "no other process sees it" in found["notify.fifo"].what


def test_without_a_unit_the_check_passes_and_says_so(tmp_path: Path) -> None:
    """lbwatch not installed as a unit (started by hand, in a container): one ok finding."""
    (found,) = list(unitpaths.check(Config(), where(tmp_path)))
    assert found.level == "ok" and "not run by systemd here" in found.what


def test_symlinks_are_followed_as_systemd_follows_them(tmp_path: Path) -> None:
    """A textfile directory that is a link into a writable one passes: systemd mounts the
    target, and the agent's write lands there."""
    real = tmp_path / "run-like"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    put(tmp_path, ORDER[2], "lbwatch.service",
        UNIT + f"ReadWritePaths={real}\nStateDirectory=lbwatch\n")  # fmt: skip
    cfg = config(metrics={"textfile": f"{link}/lbwatch.prom"})
    assert [f.level for f in unitpaths.check(cfg, where(tmp_path))] == ["ok"]
    assert os.path.realpath(link) == str(real)
