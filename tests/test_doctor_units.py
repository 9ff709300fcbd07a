"""lbwatch's unit and its drop-ins read as systemd 252 reads them (``lbwatch.doctor.units``):
which unit file, which drop-ins (masked by file name, the unit's own directories before the
top-level service.d), in what order, with what resets.

The expected answers are written out by hand from systemd.unit(5) and systemd 252's
src/shared/dropin.c. Systemd's own loader answers too, without running as PID 1: `systemd-
analyze security --offline=true --root=DIR` loads a unit with its drop-ins, and its ProtectHome=
and PrivateTmp= lines are compared with what lbwatch read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lbwatch.doctor import units

# -- the unit and its drop-ins, found as systemd finds them -------------------------------------

# Four directories of the search path, in systemd's order: /etc, /run, /lib, /usr/lib
# (Debian's split-usr /lib before /usr/lib).
ORDER = (
    "etc/systemd/system",
    "run/systemd/system",
    "lib/systemd/system",
    "usr/lib/systemd/system",
)


def search(root: Path) -> tuple[Path, ...]:
    return tuple(root / d for d in ORDER)


def put(root: Path, where: str, name: str, text: str) -> Path:
    path = root / where / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


UNIT = "[Service]\nExecStart=/bin/true\nProtectSystem=strict\nReadWritePaths=/run\n"


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    """lbwatch.service in /lib with drop-ins in every place systemd looks, some of them
    same-named: which one applies is written next to each."""
    r = tmp_path
    put(r, ORDER[2], "lbwatch.service", UNIT)
    # 10-a.conf in /etc masks /lib's: /etc-a applies, /lib-a and its reset do not.
    put(r, ORDER[0], "lbwatch.service.d/10-a.conf", "[Service]\nReadWritePaths=/etc-a\n")
    put(r, ORDER[2], "lbwatch.service.d/10-a.conf",
        "[Service]\nReadWritePaths=\nReadWritePaths=/lib-a\n")  # fmt: skip
    # 20-b.conf only in /lib: applies.
    put(r, ORDER[2], "lbwatch.service.d/20-b.conf", "[Service]\nReadWritePaths=/lib-b\n")
    # 30-off.conf in /run is a link to /dev/null: it masks /lib's, which would reset the list.
    put(r, ORDER[2], "lbwatch.service.d/30-off.conf", "[Service]\nReadWritePaths=\n")
    (r / ORDER[1] / "lbwatch.service.d").mkdir(parents=True)
    (r / ORDER[1] / "lbwatch.service.d" / "30-off.conf").symlink_to("/dev/null")
    # Top-level service.d: 05-top.conf applies (first by name); /etc's 20-b.conf is masked by
    # the unit's own 20-b.conf in /lib, which comes first in systemd's order however low /lib is.
    put(r, ORDER[0], "service.d/05-top.conf", "[Service]\nReadWritePaths=/top\n")
    put(r, ORDER[0], "service.d/20-b.conf", "[Service]\nReadWritePaths=\n")
    # Not a drop-in: another suffix.
    put(r, ORDER[0], "lbwatch.service.d/99-z.conf.bak", "[Service]\nReadWritePaths=\n")
    return r


def test_drop_ins_are_masked_by_name_and_applied_in_name_order(layered: Path) -> None:
    """The drop-ins that apply and their order, as written by hand: one per file name (the
    unit's own directories before the top-level service.d, then /etc before /run before /lib),
    sorted by file name."""
    unit = units.load("lbwatch.service", search(layered))
    assert unit.path == layered / ORDER[2] / "lbwatch.service"
    assert [str(p.relative_to(layered)) for p in unit.dropins] == [
        f"{ORDER[0]}/service.d/05-top.conf",
        f"{ORDER[0]}/lbwatch.service.d/10-a.conf",
        f"{ORDER[2]}/lbwatch.service.d/20-b.conf",
        f"{ORDER[1]}/lbwatch.service.d/30-off.conf",
    ]
    # /lib-a and the resets in /lib's 10-a.conf and 30-off.conf and /etc's top-level 20-b.conf
    # are not read.
    assert unit.service["ReadWritePaths"] == ["/run", "/top", "/etc-a", "/lib-b"]


def test_the_unit_file_found_first_is_the_one_read(tmp_path: Path) -> None:
    """/etc's copy of the unit replaces /lib's, drop-ins still apply; a link to /dev/null in
    /etc masks the unit."""
    put(tmp_path, ORDER[2], "lbwatch.service", UNIT)
    put(tmp_path, ORDER[0], "lbwatch.service", "[Service]\nProtectSystem=full\n")
    put(tmp_path, ORDER[2], "lbwatch.service.d/x.conf", "[Service]\nPrivateTmp=yes\n")
    unit = units.load("lbwatch.service", search(tmp_path))
    assert unit.path == tmp_path / ORDER[0] / "lbwatch.service"
    assert (unit.get("ProtectSystem"), unit.get("PrivateTmp")) == ("full", "yes")
    (tmp_path / ORDER[0] / "lbwatch.service").unlink()
    (tmp_path / ORDER[0] / "lbwatch.service").symlink_to("/dev/null")
    assert units.load("lbwatch.service", search(tmp_path)).masked


def test_merged_usr_reads_a_drop_in_once(tmp_path: Path) -> None:
    """With /lib a link to usr/lib (merged /usr), the search path names one directory twice: a
    drop-in there is applied once."""
    put(tmp_path, ORDER[3], "lbwatch.service", UNIT)
    put(tmp_path, ORDER[3], "lbwatch.service.d/x.conf", "[Service]\nReadWritePaths=/x\n")
    (tmp_path / "lib").symlink_to("usr/lib")
    unit = units.load("lbwatch.service", search(tmp_path))
    assert len(unit.dropins) == 1
    assert unit.service["ReadWritePaths"] == ["/run", "/x"]


def test_dash_prefixed_drop_in_directories(tmp_path: Path) -> None:
    """foo-bar-baz.service reads foo-bar-.service.d and foo-.service.d too (systemd.unit(5)),
    in each directory the most specific first."""
    assert [p.name for p in units.dropin_dirs("foo-bar-baz.service", (tmp_path,))] == [
        "foo-bar-baz.service.d",
        "foo-bar-.service.d",
        "foo-.service.d",
        "service.d",
    ]
    assert [p.name for p in units.dropin_dirs("lbwatch.service", (tmp_path,))] == [
        "lbwatch.service.d",
        "service.d",
    ]


# -- systemd's own loader as the oracle --------------------------------------------------------

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
HOME_SAID = {
    "full access to home directories": "no",
    "read-only access to home directories": "read-only",
    "no access to home directories": "yes",
    "access to fake empty home directories": "tmpfs",
}


def systemd_reads(root: Path, name: str) -> tuple[str, str]:
    """ProtectHome= and PrivateTmp= of ``name`` as systemd's own unit loader merged them
    (`systemd-analyze security --offline=true --root=ROOT`, systemd >= 250)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    home = re.search(r"ProtectHome=\s+Service has (.*?)\s{2,}", done.stdout)
    tmp = re.search(r"([✓✗]) PrivateTmp=", done.stdout)
    assert home and tmp, done.stdout + done.stderr
    return HOME_SAID[home.group(1)], "yes" if tmp.group(1) == "✓" else "no"


def lbwatch_reads(root: Path, name: str) -> tuple[str, str]:
    unit = units.load(name, tuple(root / str(d).lstrip("/") for d in units.SEARCH))
    return unit.get("ProtectHome") or "no", unit.get("PrivateTmp") or "no"


SCENARIOS = {
    "a same-named drop-in in /etc masks /lib's": {
        f"{ORDER[2]}/x.service": "[Service]\nExecStart=/bin/true\nProtectHome=read-only\n",
        f"{ORDER[2]}/x.service.d/10.conf": "[Service]\nProtectHome=no\nPrivateTmp=yes\n",
        f"{ORDER[0]}/x.service.d/10.conf": "[Service]\nProtectHome=yes\n",
    },
    "the unit's own drop-in in /lib masks a top-level one in /etc": {
        f"{ORDER[2]}/x.service": "[Service]\nExecStart=/bin/true\nPrivateTmp=yes\n",
        f"{ORDER[0]}/service.d/05.conf": "[Service]\nPrivateTmp=yes\nProtectHome=yes\n",
        f"{ORDER[2]}/x.service.d/05.conf": "[Service]\nPrivateTmp=no\n",
    },
    "drop-ins apply in name order across directories": {
        f"{ORDER[2]}/x.service": "[Service]\nExecStart=/bin/true\n",
        f"{ORDER[0]}/x.service.d/20.conf": "[Service]\nProtectHome=tmpfs\n",
        f"{ORDER[2]}/x.service.d/30.conf": "[Service]\nProtectHome=read-only\n",
        f"{ORDER[1]}/service.d/10.conf": "[Service]\nProtectHome=yes\nPrivateTmp=yes\n",
    },
    "a dash prefix's drop-in": {
        f"{ORDER[2]}/x-y.service": "[Service]\nExecStart=/bin/true\n",
        f"{ORDER[0]}/x-.service.d/10.conf": "[Service]\nPrivateTmp=yes\nProtectHome=yes\n",
        f"{ORDER[2]}/service.d/20.conf": "[Service]\nProtectHome=tmpfs\n",
    },
    "the unit in /etc replaces /lib's": {
        f"{ORDER[2]}/x.service": "[Service]\nExecStart=/bin/true\nPrivateTmp=yes\n",
        f"{ORDER[0]}/x.service": "[Service]\nExecStart=/bin/true\nProtectHome=yes\n",
    },
}
EXPECTED = {  # by hand, from the comments above
    "a same-named drop-in in /etc masks /lib's": ("yes", "no"),
    "the unit's own drop-in in /lib masks a top-level one in /etc": ("no", "no"),
    "drop-ins apply in name order across directories": ("read-only", "yes"),
    "a dash prefix's drop-in": ("tmpfs", "yes"),
    "the unit in /etc replaces /lib's": ("yes", "no"),
}


@needs_analyze
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_units_read_as_systemds_own_loader_reads_them(tmp_path: Path, scenario: str) -> None:
    """The merged ProtectHome= and PrivateTmp= are the hand-written answer, by lbwatch's
    reading and by systemd's own loader alike."""
    for where, text in SCENARIOS[scenario].items():
        put(tmp_path, "", where, text)
    name = "x-y.service" if "dash" in scenario else "x.service"
    assert systemd_reads(tmp_path, name) == EXPECTED[scenario]
    assert lbwatch_reads(tmp_path, name) == EXPECTED[scenario]
