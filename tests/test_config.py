"""Config validation: defaults, one line per problem naming file and field, the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbwatch.cli import main
from lbwatch.config import ConfigError, load

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lbwatch.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_systemd_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config: systemctl commands, Debian pidfiles."""
    cfg = load(write(tmp_path, ""))
    assert cfg.haproxy.command("reload") == ["systemctl", "reload", "haproxy"]
    assert cfg.keepalived.command("stop") == ["systemctl", "stop", "keepalived"]
    assert cfg.haproxy.pidfile == Path("/run/haproxy.pid")
    assert cfg.policy.on_haproxy_restart == "ensure"


def test_example_config_is_valid() -> None:
    """The shipped config/lbwatch.toml validates."""
    cfg = load(REPO / "config" / "lbwatch.toml")
    assert [i.name for i in cfg.vrrp_instances] == ["VI_1", "VI_2"]
    assert cfg.sync.active() and [p.name for p in cfg.sync.peers] == ["lb2"]
    assert cfg.staging_path() == cfg.agent.state_dir / "incoming"


def test_sync_is_off_without_peers(tmp_path: Path) -> None:
    """No [sync] peers and not enabled: no sync at all (a single node, or sync done elsewhere)."""
    assert not load(write(tmp_path, "")).sync.active()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[haproxy]\npidfile = 3\n", "haproxy.pidfile: Input is not a valid path"),
        ("[haproxy]\nbogus = 1\n", "haproxy.bogus: unknown key"),
        ("[keepalived]\nstart = []\n", "keepalived: start: must be a non-empty argv list"),
        ("[keepalived]\nstart = 'systemctl start keepalived'\n", "keepalived.start: Input should"),
        ("[policy]\non_haproxy_restart = 'sometimes'\n", "policy.on_haproxy_restart: Input should"),
        ("[haproxy.backoff]\nmax_attempts = 0\n", "haproxy.backoff.max_attempts: Input should be"),
        ("[haproxy.health]\nurl = 'ftp://x'\n", "haproxy.health: url must start with http"),
        ("[[vrrp_instances]]\nvips = []\n", "vrrp_instances[0].name: Field required"),
        ("[agent\n", "not valid TOML"),
        ("[sync]\ncheck = []\n", "sync: check: must be a non-empty argv list"),
        ("[sync]\ncontrol_dir = '/" + "x" * 60 + "'\n", "sync: control_dir: keep it under 50"),
        (
            "[sync]\npeers = [{name='a', host='h'}, {name='a', host='i'}]\n",
            "sync: peer names must be unique",
        ),
        ("[[sync.peers]]\nname = 'a b'\nhost = 'h'\n", "sync.peers[0].name: String should"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    """Each problem is one line: the file, the field, what is wrong."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert any(p.startswith(f"{path}: ") and expected in p for p in err.value.problems), (
        err.value.problems
    )


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    """All problems are reported at once, each on its own line."""
    path = write(tmp_path, "[haproxy]\nbogus = 1\n[agent]\nscan_interval = -1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert len(err.value.problems) == 2


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 0 on a good file and 2 with the problems on stderr otherwise."""
    good = write(tmp_path, "")
    assert main(["--config", str(good), "check-config"]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: OK"
    bad = tmp_path / "bad.toml"
    bad.write_text("[haproxy]\nbogus = 1\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"{bad}: haproxy.bogus: unknown key"


def test_unreadable_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config at start-up is a one-line error and exit 2, no traceback."""
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "run"]) == 2
    err = capsys.readouterr().err
    assert err == f"{missing}: cannot read: No such file or directory\n"
