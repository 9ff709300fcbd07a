"""Config validation: defaults, one line per problem naming file and field, the CLI's exit codes."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from lbwatch.cli import main
from lbwatch.config import Config, ConfigError, load
from tests.lab.netlab import lbwatch_toml, sync_toml

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


def test_haproxy_via_its_unit_only_with_systemctl_commands(tmp_path: Path) -> None:
    """haproxy counts as managed through its unit while its start, stop and restart commands
    are `systemctl VERB unit`, left out or written so; any other command, or another unit,
    and it does not. The restart grace defaults to 5 s and 0 turns it off."""
    cfg = load(write(tmp_path, ""))
    assert cfg.haproxy.via_unit() and cfg.policy.restart_grace == 5.0
    written = '[haproxy]\nstart = ["/usr/bin/systemctl", "start", "haproxy"]\n'
    assert load(write(tmp_path, written)).haproxy.via_unit()
    for other in (
        '[haproxy]\nstart = ["haproxy", "-W", "-D", "-f", "/etc/haproxy/haproxy.cfg"]\n',
        '[haproxy]\nrestart = ["systemctl", "restart", "haproxy@edge"]\n',
        '[haproxy]\nstop = ["systemctl", "kill", "haproxy"]\n',
    ):
        assert not load(write(tmp_path, other)).haproxy.via_unit(), other
    assert load(write(tmp_path, "[policy]\nrestart_grace = 0\n")).policy.restart_grace == 0


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
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML: nested too deeply"),
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


# Every duration in the config: (TOML table header, keys that table needs anyway, field, floor).
DURATIONS = [
    ("[agent]", "", "agent.scan_interval", 0.1),
    ("[haproxy]", "", "haproxy.command_timeout", 0.1),
    ("[haproxy.health]", "url = 'http://127.0.0.1/h'", "haproxy.health.interval", 0.1),
    ("[haproxy.health]", "url = 'http://127.0.0.1/h'", "haproxy.health.timeout", 0.1),
    ("[haproxy.backoff]", "", "haproxy.backoff.initial", 0.1),
    ("[haproxy.backoff]", "", "haproxy.backoff.max", 0.1),
    ("[haproxy.backoff]", "", "haproxy.backoff.stable_after", 0.1),
    ("[haproxy.backoff]", "", "haproxy.backoff.window", 0.1),
    ("[haproxy.backoff]", "", "haproxy.backoff.giveup_retry", 1.0),
    ("[keepalived]", "", "keepalived.command_timeout", 0.1),
    ("[keepalived.backoff]", "", "keepalived.backoff.initial", 0.1),
    ("[keepalived.backoff]", "", "keepalived.backoff.giveup_retry", 1.0),
    ("[policy]", "", "policy.keepalived_start_delay", 0.0),
    ("[policy]", "", "policy.stop_retry", 0.1),
    ("[policy]", "", "policy.start_confirm", 0.1),
    ("[policy]", "", "policy.restart_grace", 0.0),
    ("[policy]", "", "policy.kept_alert_after", 0.1),
    ("[notify]", "", "notify.flap_window", 0.1),
    ("[notify]", "", "notify.dedupe_window", 0.0),
    ("[notify]", "", "notify.retry_initial", 0.1),
    ("[notify]", "", "notify.retry_max", 0.1),
    (
        "[notify.email]",
        "host = 'h'\nsender = 'a@b.c'\nto = ['d@e.f']",
        "notify.email.timeout",
        0.1,
    ),
    (
        "[notify.email]",
        "host = 'h'\nsender = 'a@b.c'\nto = ['d@e.f']",
        "notify.email.keep_open",
        0.0,
    ),
    ("[[notify.webhooks]]", "url = 'http://127.0.0.1/w'", "notify.webhooks[0].timeout", 0.1),
    ("[sync]", "", "sync.timeout", 0.1),
    ("[sync]", "", "sync.debounce", 0.0),
    ("[sync]", "", "sync.reload_confirm", 0.1),
    ("[sync]", "", "sync.peer_confirm", 0.1),
    ("[sync]", "", "sync.retry_initial", 0.1),
    ("[sync]", "", "sync.retry_max", 0.1),
    ("[sync]", "", "sync.staging_grace", 0.1),
    ("[cluster]", "", "cluster.split_brain_after", 2.5),
    ("[metrics]", "", "metrics.textfile_interval", 0.1),
]


def _bad_values(floor: float) -> list[tuple[str, str]]:
    """TOML literals every duration refuses, with the message; the floor decides the rest."""
    finite = "Input should be a finite number"
    low = f"must be at least {floor:g} s"
    cases = [("inf", finite), ("-inf", finite), ("nan", finite), ("-1", low), ("1e7", "at most")]
    if floor > 0:
        cases += [("0", low), ("1e-9", low), (repr(floor / 2), low)]
    else:
        cases += [("-1e-9", low)]
    return cases


def _text(header: str, needs: str, field: str, value: str) -> str:
    key = field.rsplit(".", 1)[1]
    return f"{header}\n{needs}\n{key} = {value}\n"


@pytest.mark.parametrize(
    ("header", "needs", "field", "value", "expected"),
    [
        pytest.param(header, needs, field, value, msg, id=f"{field}={value}")
        for header, needs, field, floor in DURATIONS
        for value, msg in _bad_values(floor)
    ],
)
def test_bad_durations_one_line_naming_the_field(
    tmp_path: Path, header: str, needs: str, field: str, value: str, expected: str
) -> None:
    """A non-finite, negative, below-floor or absurdly long duration is refused in one line that
    names the file and the field."""
    path = write(tmp_path, _text(header, needs, field, value))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert len(err.value.problems) == 1, err.value.problems
    assert err.value.problems[0].startswith(f"{path}: {field}: "), err.value.problems
    assert expected in err.value.problems[0], err.value.problems


@pytest.mark.parametrize(("header", "needs", "field", "floor"), DURATIONS)
def test_durations_at_their_bounds_are_accepted(
    tmp_path: Path, header: str, needs: str, field: str, floor: float
) -> None:
    """The floor itself and one day are valid values (the positive control for the table)."""
    for value in (repr(floor), "86400"):
        load(write(tmp_path, _text(header, needs, field, value)))


def _float_fields(model: type[BaseModel], prefix: str) -> set[str]:
    found = set()
    for name, info in model.model_fields.items():
        for tp in (info.annotation, *typing.get_args(info.annotation)):
            if tp is float:
                found.add(prefix + name)
            elif isinstance(tp, type) and issubclass(tp, BaseModel):
                inner = "[0]" if typing.get_origin(info.annotation) is list else ""
                found |= _float_fields(tp, f"{prefix}{name}{inner}.")
    return found


def test_table_covers_every_duration() -> None:
    """Every float in the config is in the table above (backoff.factor is a ratio, not seconds),
    so a duration added later cannot skip the bounds test."""
    tabled = {field for _, _, field, _ in DURATIONS}
    tabled |= {"keepalived.backoff." + k for k in ("max", "stable_after", "window")}
    every = _float_fields(Config, "") - {"haproxy.backoff.factor", "keepalived.backoff.factor"}
    assert every == tabled


@pytest.mark.parametrize("value", ["inf", "nan", "1e-9"])
def test_check_config_refuses_bad_scan_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """`lbwatch check-config` exits 2 with one line naming the file and agent.scan_interval."""
    good = write(tmp_path, "[agent]\nscan_interval = 0.5\n")
    assert main(["--config", str(good), "check-config"]) == 0
    capsys.readouterr()
    bad = write(tmp_path, f"[agent]\nscan_interval = {value}\n")
    assert main(["--config", str(bad), "check-config"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{bad}: agent.scan_interval: "), err


def test_lab_configs_are_valid(tmp_path: Path) -> None:
    """The durations the namespace lab runs with (both nodes, sync on, the slow probe of the
    benchmark) are within the bounds."""
    for node, peer in (("lb1", "lb2"), ("lb2", "lb1")):
        for probe in (0.5, 1.0):
            text = lbwatch_toml(tmp_path, node, probe_interval=probe) + sync_toml(
                tmp_path, node, [peer]
            )
            cfg = load(write(tmp_path, text))
            assert cfg.haproxy.health is not None and cfg.haproxy.health.interval == probe
