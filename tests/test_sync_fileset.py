"""Config plus extra files as one version: the bundle format, which files belong, and applying
a bundle on a node with the real haproxy checker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lbwatch.services import run_command
from lbwatch.sync.fileset import FileSet, pack, unpack
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.versions import Version
from tests.conftest import free_port, haproxy_config, needs
from tests.fakes import Expectations
from tests.util import confined

CHECK = ["haproxy", "-c", "-f", "{file}"]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    (d / "maps").mkdir(parents=True)
    return d


def with_map(cfg: Path, map_path: Path) -> bytes:
    """A config whose response header comes from ``map_path``."""
    text = haproxy_config(cfg, free_port(), free_port()).read_text()
    return text.replace(
        "    http-request return",
        f"    http-response set-header X-Map %[str(k),map({map_path},none)]\n"
        "    http-request return",
    ).encode()


def test_pack_is_deterministic_and_round_trips() -> None:
    """The same files give the same bytes (so the same hash on every node) and unpack back."""
    files = {Path("/etc/haproxy/b.map"): b"k v\n", Path("/etc/haproxy/haproxy.cfg"): b"\x00\xff"}
    assert pack(files) == pack(dict(reversed(list(files.items()))))
    assert unpack(pack(files)) == files


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"lbwatch-bundle": 2, "files": {}}', b'{"lbwatch-bundle": 1, "files": 3}'],
)
def test_malformed_bundles_are_refused(content: bytes) -> None:
    """Anything but a well-formed bundle is a ValueError, never a crash."""
    with pytest.raises(ValueError):
        unpack(content)


def test_a_bundle_writes_only_files_this_node_syncs(etc: Path) -> None:
    """Paths outside the node's own patterns, relative paths and `..` are refused."""
    fs = FileSet(etc / "haproxy.cfg", (str(etc / "maps" / "*.map"),))
    cfg = etc / "haproxy.cfg"
    assert fs.unpack(pack({cfg: b"x", etc / "maps" / "a.map": b"k v\n"}))
    for evil in (Path("/etc/passwd"), etc / "maps" / "a.txt", etc / "maps" / "x.map~"):
        with pytest.raises(ValueError, match="does not sync"):
            fs.unpack(pack({cfg: b"x", evil: b""}))
    with pytest.raises(ValueError, match="bad path"):
        unpack(b'{"lbwatch-bundle": 1, "files": {"../x": ""}}')
    with pytest.raises(ValueError, match="lacks"):
        fs.unpack(pack({etc / "maps" / "a.map": b""}))


def test_members_leave_out_backups_and_editor_files(etc: Path) -> None:
    """lbwatch's own backups and editor junk beside the maps are not part of a version."""
    fs = FileSet(etc / "haproxy.cfg", (str(etc / "maps" / "*"),))
    (etc / "haproxy.cfg").write_text("x")
    for name in ("a.map", "a.map.lbwatch-20260101T000000.000000", ".a.map.swp", "a.map~"):
        (etc / "maps" / name).write_text("k v\n")
    assert fs.members() == [etc / "haproxy.cfg", etc / "maps" / "a.map"]
    assert fs.unit == "haproxy.cfg.bundle" and FileSet(etc / "haproxy.cfg").unit == "haproxy.cfg"


def stage(staging: Path, content: bytes, unit: str = "haproxy.cfg.bundle") -> Path:
    v = Version(unit, "lb1", 1, 2_000, hashlib.sha256(content).hexdigest())
    path = staging / v.staged_name()
    path.write_bytes(content)
    return path


@needs("haproxy")
def test_config_and_its_new_map_go_live_together(etc: Path, tmp_path: Path) -> None:
    """A bundle with a new config and the map it needs: both installed, checked in place,
    reloaded."""
    staging = tmp_path / "staging"
    staging.mkdir()
    cfg, mp = etc / "haproxy.cfg", etc / "maps" / "lab.map"
    haproxy_config(cfg, free_port(), free_port())
    fs = FileSet(cfg, (str(etc / "maps" / "*.map"),))
    new_cfg = with_map(tmp_path / "new.cfg", mp)
    staged = stage(staging, pack({cfg: new_cfg, mp: b"k v2\n"}))
    settings = ApplySettings(CHECK, lambda: run_command(["true"], 5), 3, 30, confined())
    rec = receive(staged, fs, None, 0, settings, Expectations())
    assert rec.result == "applied", rec.message
    assert cfg.read_bytes() == new_cfg and mp.read_bytes() == b"k v2\n"


@needs("haproxy")
def test_bundle_failing_its_check_in_place_is_undone(etc: Path, tmp_path: Path) -> None:
    """A config naming a map the bundle does not carry fails the check in place: the config
    goes back, a file the bundle created is removed again, nothing is reloaded."""
    staging = tmp_path / "staging"
    staging.mkdir()
    cfg = etc / "haproxy.cfg"
    before = haproxy_config(cfg, free_port(), free_port()).read_bytes()
    fs = FileSet(cfg, (str(etc / "maps" / "*.map"),))
    bad_cfg = with_map(tmp_path / "new.cfg", etc / "maps" / "missing.map")
    other = etc / "maps" / "other.map"
    staged = stage(staging, pack({cfg: bad_cfg, other: b"a b\n"}))
    marker = tmp_path / "reloaded"
    settings = ApplySettings(
        CHECK, lambda: run_command(["touch", str(marker)], 5), 3, 30, confined()
    )
    expect = Expectations()
    rec = receive(staged, fs, None, 0, settings, expect)
    assert rec.result == "rejected" and "missing.map" in rec.message
    assert cfg.read_bytes() == before and not other.exists() and not marker.exists()
    assert expect.forgotten == [other]
