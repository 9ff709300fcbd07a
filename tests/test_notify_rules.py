"""Routing, duplicate suppression and flap digests, as pure decisions."""

from __future__ import annotations

import pytest

from lbwatch.notify.parse import LvsEvent, VrrpEvent
from lbwatch.notify.rules import (
    AgentAlert,
    Routed,
    RouterState,
    channels_for,
    first_read_done,
    flush,
    route,
    spooled,
)
from tests.fakes import config

EMAIL = {"host": "127.0.0.1", "sender": "lb@example.org", "to": ["ops@example.org"]}
HOOK = {"name": "chat", "url": "http://127.0.0.1:9/hook"}
CFG = config(
    notify={"email": EMAIL, "webhooks": [HOOK], "flap_window": 60, "flap_max": 3},
    vrrp_instances=[{"name": "VI_1", "vips": ["192.0.2.100"]}],
)


def run(events: list[tuple[float, object]], cfg=CFG) -> tuple[RouterState, list[Routed]]:
    return run_from(RouterState(), events, cfg)


def run_from(
    state: RouterState, events: list[tuple[float, object]], cfg=CFG
) -> tuple[RouterState, list[Routed]]:
    results = []
    for now, ev in events:
        r = route(state, ev, now, 1_700_000_000.0 + now, "lb1", cfg)  # type: ignore[arg-type]
        state = r.state
        results.append(r)
    return state, results


def vi(state: str, prio: int = 100) -> VrrpEvent:
    return VrrpEvent("INSTANCE", "VI_1", state, prio)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("vrrp:MASTER", ("email", "chat")),
        ("vrrp:FAULT", ("email", "chat")),
        ("vrrp:BACKUP", ()),
        ("agent:giveup", ("email", "chat")),
        ("lvs:DOWN", ()),
    ],
)
def test_default_routes(event: str, expected: tuple[str, ...]) -> None:
    """By default: MASTER, FAULT and lbwatch's own failures, to every channel."""
    assert channels_for(event, CFG.notify) == expected


def test_custom_routes_pick_channels() -> None:
    """A route sends matching events to the channels it names, wildcards included."""
    cfg = config(
        notify={
            "email": EMAIL,
            "webhooks": [HOOK],
            "routes": [
                {"events": ["vrrp:*"], "channels": ["chat"]},
                {"events": ["lvs:DOWN", "agent:*"], "channels": ["email"]},
            ],
        }
    )
    assert channels_for("vrrp:BACKUP", cfg.notify) == ("chat",)
    assert channels_for("lvs:DOWN", cfg.notify) == ("email",)
    assert channels_for("lvs:UP", cfg.notify) == ()


def test_master_message_names_node_instance_transition_priority_vips() -> None:
    """Subject and body carry node, instance, old -> new state, priority and the VIPs."""
    _, (first, second) = run([(0.0, vi("BACKUP", 97)), (5.0, vi("MASTER", 97))])
    assert first.out == ()
    (out,) = second.out
    n = out.notification
    assert n.subject == "[lbwatch] lb1: VI_1 BACKUP -> MASTER (priority 97)"
    assert "VIPs:        192.0.2.100" in n.body and "Node:        lb1" in n.body
    assert n.event == "vrrp:MASTER" and out.channels == ("email", "chat")


def test_same_state_twice_is_a_duplicate() -> None:
    """The FIFO and the notify script both reporting one transition: one message."""
    _, results = run([(0.0, vi("MASTER")), (0.01, vi("MASTER"))])
    assert len(results[0].out) == 1 and results[1].out == ()


def test_flapping_collapses_into_one_digest() -> None:
    """Beyond flap_max messages in the window the instance's transitions are held and sent as
    one digest when the window has passed."""
    states = ["MASTER", "BACKUP"] * 5
    state, results = run([(float(i), vi(s)) for i, s in enumerate(states)])
    sent = [o.notification.subject for r in results for o in r.out]
    assert len(sent) == 3  # MASTER at 0, 2 and 4 (BACKUP is not routed); from 6 on, held
    assert results[-1].wake_at == pytest.approx(6.0 + 60)
    early = flush(state, 65.0, 0.0, "lb1", CFG)
    assert early.out == ()
    late = flush(state, 66.0, 0.0, "lb1", CFG)
    (digest,) = late.out
    assert "flapping, 4 more transitions in 60 s, now BACKUP" in digest.notification.subject
    assert digest.channels == ("email", "chat")
    assert late.state.held == {} and late.wake_at is None


def test_agent_alert_repeats_suppressed_within_window() -> None:
    """The same alert twice within dedupe_window is sent once; after it, again."""
    alert = AgentAlert("giveup", "giving up on haproxy")
    _, results = run([(0.0, alert), (30.0, alert), (61.0, alert)])
    assert [len(r.out) for r in results] == [1, 0, 1]


def test_lvs_changes_routed_when_asked() -> None:
    """Real-server changes go out when a route asks for them, once per change."""
    cfg = config(notify={"email": EMAIL, "routes": [{"events": ["lvs:*"]}]})
    rs = LvsEvent("RS", "[192.0.2.20]:tcp:80", "[192.0.2.100]:tcp:80", False)
    _, results = run([(0.0, rs), (1.0, rs)], cfg)
    assert [len(r.out) for r in results] == [1, 0]
    assert results[0].out[0].notification.subject == (
        "[lbwatch] lb1: real server [192.0.2.20]:tcp:80 in [192.0.2.100]:tcp:80 DOWN"
    )


def test_failover_and_heal_is_not_a_flap() -> None:
    """BACKUP, MASTER, STOP, BACKUP, MASTER in seconds: both MASTER messages go out at once."""
    seq = ["BACKUP", "MASTER", "STOP", "BACKUP", "MASTER"]
    _, results = run([(float(i), vi(s)) for i, s in enumerate(seq)])
    sent = [o.notification.subject for r in results for o in r.out]
    assert sent == ["[lbwatch] lb1: VI_1 BACKUP -> MASTER (priority 100)"] * 2


def test_script_reports_late_and_reordered_do_not_hide_the_next_master() -> None:
    """FIFO says MASTER, BACKUP; the notify script says BACKUP, MASTER a moment later: the
    instance is BACKUP, and the real MASTER of the failover is mailed."""

    def script(state: str) -> VrrpEvent:
        return VrrpEvent("INSTANCE", "VI_1", state, 97, "script")

    events = [
        (0.0, vi("MASTER", 97)),
        (0.0, vi("BACKUP", 97)),  # the FIFO, in order
        (0.3, script("BACKUP")),
        (0.4, script("MASTER")),  # the scripts, late and reordered
        (3.0, vi("MASTER", 97)),
        (3.2, script("MASTER")),  # the failover, both sources
    ]
    state, results = run(events)
    assert [len(r.out) for r in results] == [1, 0, 0, 0, 1, 0]
    assert state.last["INSTANCE:VI_1"] == "MASTER"


def test_script_alone_is_enough() -> None:
    """Without the FIFO, the notify script's reports are used, duplicates dropped."""
    script = [VrrpEvent("INSTANCE", "VI_2", s, 97, "script") for s in ("BACKUP", "MASTER")]
    _, results = run([(0.0, script[0]), (1.0, script[1]), (1.1, script[1])])
    assert [len(r.out) for r in results] == [0, 1, 0]


def test_mail_body_reads_as_the_readme_shows() -> None:
    """The VRRP line has a space after its colon: "VRRP instance: VI_1", "VRRP group: G1"."""
    from lbwatch.notify.message import vrrp

    body = vrrp("lb2", "INSTANCE", "VI_1", "BACKUP", "MASTER", 97, [], 1.7e9).body
    assert "\nVRRP instance: VI_1\n" in body
    assert "\nVRRP group: G1\n" in vrrp("lb2", "GROUP", "G1", None, "FAULT", 0, [], 1.7e9).body


def test_transitions_scripts_spooled_before_start_are_not_sent_again_from_the_fifo() -> None:
    """Boot: scripts spooled MASTER twice (BACKUP is not routed, so not spooled); the FIFO's
    first reading holds MASTER, BACKUP, MASTER: nothing is sent from it, and the instance
    ends MASTER."""
    state = spooled(RouterState(), [("INSTANCE:VI_1", "MASTER"), ("INSTANCE:VI_1", "MASTER")])
    state, results = run_from(
        state, [(0.0, vi("MASTER")), (0.0, vi("BACKUP")), (0.0, vi("MASTER"))]
    )
    assert [len(r.out) for r in results] == [0, 0, 0]
    assert state.last["INSTANCE:VI_1"] == "MASTER"


def test_a_fifo_transition_the_script_did_not_spool_is_sent() -> None:
    """The FIFO's first reading has FAULT, which no script spooled (its fork failed): FAULT is
    sent, the spooled MASTER after it is still matched."""
    state = spooled(RouterState(), [("INSTANCE:VI_1", "MASTER")])
    _, results = run_from(state, [(0.0, vi("FAULT")), (0.0, vi("MASTER"))])
    assert [len(r.out) for r in results] == [1, 0]


def test_after_the_first_reading_a_spooled_state_matches_nothing() -> None:
    """keepalived restarted while no agent ran (its FIFO lines are gone): the spooled MASTER
    is sent from the spool, and a MASTER the FIFO reports after start is a new transition."""
    state = first_read_done(spooled(RouterState(), [("INSTANCE:VI_1", "MASTER")]))
    _, results = run_from(state, [(5.0, vi("MASTER"))])
    assert [len(r.out) for r in results] == [1]


def test_a_script_report_never_consumes_a_spooled_state() -> None:
    """Only the FIFO's copy is a duplicate of a spooled script report; another script report
    is its own transition (keepalived runs the script once per transition)."""
    state = spooled(RouterState(), [("INSTANCE:VI_1", "MASTER")])
    _, results = run_from(state, [(0.0, VrrpEvent("INSTANCE", "VI_1", "MASTER", 100, "script"))])
    assert [len(r.out) for r in results] == [1]
