"""The chaos soak's pure parts (bench/chaos_*.py) that the systemd tier changed: the plan, the
mail check over several VRRP instances, and what counts as a haproxy master."""

from __future__ import annotations

from bench.chaos_mail import Mail, check
from bench.chaos_plan import BARE_KINDS, KINDS, plan
from bench.chaos_procs import NodeProcs, Proc


def mail(subject: str, date: float, ident: str) -> Mail:
    return Mail(subject, ident, date, date, "")


def test_bare_plan_has_no_systemd_only_kind() -> None:
    """The bare lab's default plan is over BARE_KINDS: the systemd-only lbwatch_stop never
    appears in it, and a seed's schedule is the one it was before that kind existed."""
    assert "lbwatch_stop" in KINDS and "lbwatch_stop" not in BARE_KINDS
    assert tuple(k for k in KINDS if k != "lbwatch_stop") == BARE_KINDS
    assert plan(2398, 120) == plan(2398, 120, BARE_KINDS)
    assert all(f.kind != "lbwatch_stop" for f in plan(2398, 600))


def test_mail_check_matches_each_instance_on_its_own() -> None:
    """A VI_2 mail does not stand for a VI_1 transition: each (node, instance, state) is
    matched separately, and a line without an instance is VI_1's."""
    transitions = {"lb2": [(100.2, "MASTER", "VI_1"), (100.4, "MASTER", "VI_2")]}
    only_vi2 = [mail("[lbwatch] lb2: VI_2 BACKUP -> MASTER (priority 254)", 100.0, "<a>")]
    got = check(transitions, only_vi2)
    assert got.transitions == 2 and got.mailed == 1
    assert [(n, s) for _, n, s in got.not_mailed] == [("lb2", "VI_1 MASTER")]
    both = [*only_vi2, mail("[lbwatch] lb2: VI_1 BACKUP -> MASTER (priority 253)", 100.0, "<b>")]
    assert check(transitions, both).not_mailed == []


def test_a_config_check_or_an_exiting_haproxy_is_no_master() -> None:
    """Under systemd, haproxy.service's ExecReload= `haproxy -c` is PID 1's child like the
    master; it, and a haproxy exiting (no command line left), are not counted as masters."""
    procs = NodeProcs(
        (
            Proc(10, 1, "S", "haproxy"),
            Proc(11, 10, "S", "haproxy"),
            Proc(12, 1, "R", "haproxy", check=True),
        ),
        init=1,
    )
    assert procs.haproxy_masters() == [10]
    assert procs.haproxy_workers() == [11]
