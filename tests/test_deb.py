"""The Debian package `make deb` builds (packaging/build-deb), read with dpkg-deb: its control
fields, its files, a unit that differs from the repository's in ExecStart= alone, and a
virtualenv that names /opt/lbwatch and runs on Debian's python3.

The package must have been built from this checkout first (`make deb`; `make test` does it
through deb-check, which also installs it and checks the installed lbwatch); a missing or stale
one is skipped, which CI counts as a failure.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lbwatch

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/opt/lbwatch"
# What the package's venv runs on, whatever Python runs these tests.
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    pytest.mark.deb,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb"),
]


def debian_version(version: str) -> str:
    """PEP 440 to Debian: a pre-release takes a tilde, so it sorts before its release."""
    return re.sub(r"\.?(a|b|rc|dev)(\d+)", r"~\1\2", version)


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


@dataclass(frozen=True)
class Deb:
    path: Path
    tree: Path  # the package's files, extracted
    site: Path  # the venv's site-packages inside tree

    def field(self, name: str) -> str:
        return run("dpkg-deb", "-f", str(self.path), name).strip()


def sources(top: Path) -> dict[str, str]:
    """lbwatch's source files under ``top`` (relative path -> sha256)."""
    return {
        str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deb]:
    arch = run("dpkg", "--print-architecture").strip()
    path = REPO / "dist" / f"lbwatch_{debian_version(lbwatch.__version__)}_{arch}.deb"
    if not path.exists():
        pytest.skip(f"no {path.relative_to(REPO)}: `make deb` builds it")
    tree = tmp_path_factory.mktemp("deb")
    run("dpkg-deb", "-x", str(path), str(tree))
    site = next((tree / PREFIX.lstrip("/")).glob("lib/python3.*/site-packages"))
    if sources(site / "lbwatch") != sources(REPO / "lbwatch"):
        pytest.skip(f"{path.relative_to(REPO)} is older than this checkout: run `make deb`")
    yield Deb(path, tree, site)


def test_control_fields(deb: Deb) -> None:
    """Name, the version lbwatch/__init__.py says, this machine's architecture, a Depends that
    holds python3 to the minor version the venv's compiled wheels were built for (and
    bubblewrap, for the confined check of a received config), and the
    example config as a conffile."""
    minor = run(str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[1])").strip()
    assert deb.field("Package") == "lbwatch"
    assert deb.field("Version") == debian_version(lbwatch.__version__)
    assert deb.field("Architecture") == run("dpkg", "--print-architecture").strip()
    assert deb.field("Depends") == (
        f"python3 (>= 3.{minor}~), python3 (<< 3.{int(minor) + 1}), bubblewrap"
    )
    conffiles = run("dpkg-deb", "-I", str(deb.path), "conffiles").split()
    assert conffiles == ["/etc/lbwatch/lbwatch.toml"]


def test_files_a_node_needs(deb: Deb) -> None:
    """The command on PATH as a link into the venv, the unit, the config, the alert rules, the
    docs and the PEP 561 marker; pip and setuptools left out of the venv."""
    listing = run("dpkg-deb", "-c", str(deb.path))
    assert re.search(r" \./usr/bin/lbwatch -> /opt/lbwatch/bin/lbwatch$", listing, re.M)
    for path in (
        "opt/lbwatch/bin/lbwatch",
        "opt/lbwatch/pyvenv.cfg",
        "lib/systemd/system/lbwatch.service",
        "etc/lbwatch/lbwatch.toml",
        "usr/share/lbwatch/prometheus-rules.yml",
        "usr/share/doc/lbwatch/README.md",
        "usr/share/doc/lbwatch/LICENSE",
        "usr/share/doc/lbwatch/copyright",
    ):
        assert f" ./{path}\n" in listing, path
    assert (deb.site / "lbwatch" / "py.typed").is_file()
    assert (deb.tree / "etc/lbwatch/lbwatch.toml").read_bytes() == (
        REPO / "config" / "lbwatch.toml"
    ).read_bytes()
    assert not list(deb.site.glob("pip*")) and not list(deb.site.glob("setuptools*"))
    assert not (deb.site / f"lbwatch-{lbwatch.__version__}.dist-info/direct_url.json").exists()


def test_unit_differs_from_the_repository_in_exec_start_only(deb: Deb) -> None:
    """The packaged unit is systemd/lbwatch.service with ExecStart= naming /usr/bin/lbwatch,
    every other line as in the repository."""
    packaged = (deb.tree / "lib/systemd/system/lbwatch.service").read_text().splitlines()
    repo = (REPO / "systemd" / "lbwatch.service").read_text().splitlines()
    changed = [(a, b) for a, b in zip(repo, packaged) if a != b]
    assert len(packaged) == len(repo)
    assert changed == [
        (
            "ExecStart=/usr/local/bin/lbwatch --config /etc/lbwatch/lbwatch.toml run",
            "ExecStart=/usr/bin/lbwatch --config /etc/lbwatch/lbwatch.toml run",
        )
    ]


def test_venv_names_its_installed_path(deb: Deb) -> None:
    """The venv was built elsewhere but names /opt/lbwatch: the script's shebang, pyvenv.cfg,
    and the source file names compiled into the .pyc files (what tracebacks show)."""
    venv = deb.tree / PREFIX.lstrip("/")
    assert (venv / "bin/lbwatch").read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg and f" -m venv {PREFIX}\n" in cfg
    assert (venv / "bin/python3").readlink() == SYSTEM_PYTHON
    # The .pyc files are Debian's python3's (marshal's format changes between versions), so
    # their source name is looked for as bytes rather than loaded with this Python's marshal.
    pycs = list((deb.site / "lbwatch").rglob("*.pyc"))
    assert len(pycs) >= len(list((REPO / "lbwatch").rglob("*.py")))
    for pyc in pycs:
        assert f"{PREFIX}/lib/python3.".encode() in pyc.read_bytes(), pyc


def test_venv_runs_on_debians_python(deb: Deb) -> None:
    """The extracted venv (its bin/python is /usr/bin/python3, its packages found through the
    pyvenv.cfg beside it) imports lbwatch's agent and its compiled dependencies."""
    python = deb.tree / PREFIX.lstrip("/") / "bin" / "python"
    code = (
        "import sys, lbwatch, lbwatch.daemon, lbwatch.cli, pydantic_core, psutil; "
        "print(lbwatch.__version__, sys.prefix == sys.base_prefix)"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lbwatch.__version__, "False"]
