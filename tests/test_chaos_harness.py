"""The chaos soak's pure parts (bench/chaos_*.py): the plan (the systemd tier's kinds, the
pair's opt-in faults), the mail check over several VRRP instances, what counts as a haproxy
master, the pair's invariants (bench/chaos_pair.py) and the comparison with the seed's scripts
(bench/chaos_compare.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.chaos_compare import goal
from bench.chaos_compare import render as compare
from bench.chaos_mail import Mail, check
from bench.chaos_observer import Observations, Snap
from bench.chaos_pair import (
    changes_to_spans,
    drain_outcome,
    election_time,
    intersect,
    pair_invariants,
    subtract,
    union,
)
from bench.chaos_plan import (
    BARE_KINDS,
    BOTH,
    KINDS,
    OVERLAP_WITHIN,
    PAIR_KINDS,
    SYSTEMD_KINDS,
    Fault,
    plan,
)
from bench.chaos_procs import NodeProcs, Proc
from bench.chaos_report import RunData, availability


def mail(subject: str, date: float, ident: str) -> Mail:
    return Mail(subject, ident, date, date, "")


def test_bare_plan_has_no_systemd_only_kind() -> None:
    """The bare lab's default plan is over BARE_KINDS: the systemd-only lbwatch_stop never
    appears in it, and a seed's schedule is the one it was before that kind existed."""
    assert "lbwatch_stop" in KINDS and "lbwatch_stop" not in BARE_KINDS
    assert tuple(k for k in SYSTEMD_KINDS if k != "lbwatch_stop") == BARE_KINDS
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


# -- the plan: the pair's faults are opt-in -----------------------------------------------------

# sha256 of repr(plan(seed, seconds, kinds)) before the pair's faults existed: the schedules
# that earlier runs, the README's figures and tests/e2e/test_lab_chaos.py name.
OLD_PLANS = {
    (1, 300, "bare"): "85c8cf3f60ca76bc",
    (2398, 120, "bare"): "6bcabccbfa20f86e",
    (7, 1800, "bare"): "c700a5f06ab04493",
    (21, 600, "systemd"): "4e745b7c36b5323b",
}


def test_old_seeds_keep_their_schedules() -> None:
    """Adding the pair's faults changed no schedule made without them: bare and systemd
    defaults give, seed for seed, the faults they gave before."""
    kinds = {"bare": BARE_KINDS, "systemd": SYSTEMD_KINDS}
    for (seed, seconds, tier), digest in OLD_PLANS.items():
        got = hashlib.sha256(repr(plan(seed, seconds, kinds[tier])).encode()).hexdigest()
        assert got[:16] == digest, (seed, seconds, tier)
    assert not set(PAIR_KINDS) & set(BARE_KINDS + SYSTEMD_KINDS)
    assert tuple(KINDS)[-len(PAIR_KINDS) :] == PAIR_KINDS


def test_both_faults_reach_the_other_node_within_seconds_and_block_either_node() -> None:
    """A BOTH fault names its first node and reaches the other within OVERLAP_WITHIN; while
    it is active no other fault on that resource starts on either node, and its hold (a
    freeze) outlasts the second node's start."""
    faults = plan(3, 1800, BARE_KINDS + PAIR_KINDS)
    both = [f for f in faults if f.kind in BOTH]
    assert {f.kind for f in both} == set(BOTH)
    for f in both:
        assert OVERLAP_WITHIN[0] <= f.second_after <= OVERLAP_WITHIN[1]
        assert f.other != f.node and f.ends >= f.at + f.second_after
        if f.hold:
            assert f.hold > f.second_after
        for g in faults:
            if g is not f and g.resource()[0] == f.resource()[0]:
                assert g.ends <= f.at or g.at >= f.ends, (f, g)


def test_clashes_are_per_node_unless_a_fault_is_on_both() -> None:
    """Two haproxy faults on different nodes may overlap; a haproxy fault on both nodes
    clashes with one on either."""
    a = Fault(1, "haproxy_master_kill", "lb1", 1.0, 0.0)
    b = Fault(2, "haproxy_master_stop", "lb2", 1.0, 2.0)
    both = Fault(3, "both_haproxy_kill", "lb2", 1.0, 0.0, 1.5)
    assert not a.clashes(b)
    assert both.clashes(a) and a.clashes(both) and both.clashes(b)
    assert not both.clashes(Fault(4, "keepalived_parent_kill", "lb1", 1.0, 0.0))
    assert both.label() == "#3 both_haproxy_kill on lb2, then lb1 +1.50 s"


# -- the pair's invariants -------------------------------------------------------------------------


def snap(master: int | None, state: str = "S", keepalived: bool = True) -> Snap:
    masters = (master,) if master else ()
    kl = (900,) if keepalived else ()
    return Snap(masters, state if master else "", (), kl, kl)


def judge(
    vip: list[tuple[float, tuple[str, ...]]],
    procs: dict[str, list[tuple[float, Snap]]],
    transitions: dict[str, list[tuple[float, str, str]]] | None = None,
    drains: list[tuple[float, float, str, str]] | None = None,
    drain_lowers: bool = True,
    link_down: dict[str, list[tuple[float, float]]] | None = None,
) -> tuple[dict, list[dict]]:
    bad: list[dict] = []
    fig = pair_invariants(
        t0=0.0,
        end=100.0,
        vip=vip,
        procs=procs,
        transitions=transitions or {},
        drains=drains or [],
        advert_int=1.0,
        priorities=(254, 253),
        bad=bad,
        drain_lowers=drain_lowers,
        link_down=link_down,
    )
    return fig, bad


SERVING = {"lb1": [(0.0, snap(10))], "lb2": [(0.0, snap(20))]}


def test_election_time_is_three_adverts_and_the_lowest_priority_skew() -> None:
    """3 x advert_int + (256 - priority) / 256 x advert_int, for the lowest priority."""
    assert election_time(1.0, (254, 253)) == 3 + 3 / 256
    assert abs(election_time(0.1, (254,)) - (0.3 + 0.1 * 2 / 256)) < 1e-9
    assert election_time(1.0, (1,)) == 3 + 255 / 256


def test_spans_union_and_intersection() -> None:
    """Spans from a condition's changes (the last open one closed at the end); union merges
    touching spans, intersection keeps what both cover."""
    assert changes_to_spans([(1, True), (2, True), (3, False), (5, True)], 9) == [(1, 3), (5, 9)]
    assert union([(4, 6), (1, 2), (2, 3)]) == [(1, 3), (4, 6)]
    assert intersect([(0, 5), (7, 9)], [(4, 8)]) == [(4, 5), (7, 8)]
    assert subtract([(0, 10)], [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]


def test_vip_on_no_node_counts_only_while_some_haproxy_could_serve() -> None:
    """Nobody holds the VIP from 10 s to 20 s; both haproxy masters are dead until 15 s and
    lb2's is back then: 5 s without a holder while it could serve, over the 3.51 s allowed."""
    procs = {
        "lb1": [(0.0, snap(10)), (9.0, snap(None))],
        "lb2": [(0.0, snap(20)), (9.5, snap(None)), (15.0, snap(21))],
    }
    fig, bad = judge([(0.0, ("lb1",)), (10.0, ()), (20.0, ("lb2",))], procs)
    assert fig["episodes"] == 1 and fig["over_allowed"] == 1 and fig["worst_s"] == 5.0
    assert [b["invariant"] for b in bad] == ["VIP on no node"]
    assert "lb2's haproxy could serve" in bad[0]["text"] and bad[0]["at"] == 15.0


def test_a_stopped_master_cannot_serve_and_a_short_gap_is_allowed() -> None:
    """A SIGSTOPped master is no haproxy that could serve; a gap within the election time +
    0.5 s is counted, not a violation."""
    procs = {"lb1": [(0.0, snap(10, "T"))], "lb2": [(0.0, snap(20, "T"))]}
    fig, bad = judge([(0.0, ("lb1",)), (10.0, ()), (30.0, ("lb1",))], procs)
    assert fig["episodes"] == 0 and not bad
    fig, bad = judge([(0.0, ("lb1",)), (10.0, ()), (13.4, ("lb2",))], SERVING)
    assert fig["episodes"] == 1 and fig["over_allowed"] == 0 and not bad


def test_a_node_whose_link_is_down_cannot_serve() -> None:
    """Nobody holds the VIP for 10 s while lb1's haproxy runs on a node the soak took off the
    network and lb2's is dead: no haproxy could serve. Once lb1's link is back it could."""
    procs = {"lb1": [(0.0, snap(10))], "lb2": [(0.0, snap(None))]}
    vip = [(0.0, ("lb1",)), (10.0, ()), (20.0, ("lb1",))]
    fig, bad = judge(vip, procs, link_down={"lb1": [(9.0, 21.0)]})
    assert fig["episodes"] == 0 and not bad
    fig, bad = judge(vip, procs, link_down={"lb1": [(9.0, 12.0)]})
    assert fig["worst_s"] == 8.0 and [b["at"] for b in bad] == [12.0]


def test_fault_on_both_nodes_ends_with_keepalived_gone() -> None:
    """VI_1 in FAULT on lb1 from 10 s and on lb2 from 12 s to 14 s: both at once for 2 s. A
    FAULT whose keepalived was then killed (no transition written) ends when it is gone."""
    transitions = {
        "lb1": [(10.0, "FAULT", "VI_1"), (20.0, "BACKUP", "VI_1")],
        "lb2": [(12.0, "FAULT", "VI_1"), (14.0, "MASTER", "VI_1")],
    }
    fig, bad = judge([(0.0, ("lb2",))], SERVING, transitions)
    assert fig["fault_on_both"] == 1 and fig["fault_on_both_worst_s"] == 2.0
    assert [b["invariant"] for b in bad] == ["FAULT on both nodes"]
    procs = {
        "lb1": [(0.0, snap(10)), (11.0, snap(10, keepalived=False))],
        "lb2": [(0.0, snap(20))],
    }
    fig, bad = judge([(0.0, ("lb2",))], procs, transitions)
    assert fig["fault_on_both"] == 0 and not bad


def test_a_drain_is_judged_by_the_gaps_that_begin_during_it() -> None:
    """A refused drain is counted, not judged; an applied one that is followed by no holder
    for 5 s breaks the invariant; a gap already there when the operator drained does not."""
    vip = [(0.0, ("lb1",)), (12.0, ()), (17.0, ("lb2",))]
    drains = [(10.0, 30.0, "lb1", "drained: ..."), (40.0, 50.0, "lb2", "refused: no peer ...")]
    fig, bad = judge(vip, SERVING, drains=drains, drain_lowers=False)
    assert (fig["drains_applied"], fig["drains_refused"], fig["drains_failed"]) == (1, 1, 0)
    assert fig["drains_left_no_holder"] == 1 and fig["drain_worst_no_holder_s"] == 5.0
    assert {b["invariant"] for b in bad} == {"VIP on no node", "a drain left no holder"}
    fig, bad = judge(vip, SERVING, drains=[(13.0, 30.0, "lb1", "drained: ...")])
    assert fig["drains_left_no_holder"] == 0
    assert drain_outcome("lbwatch drain exit 2: ...") == "failed"


def test_a_node_drained_by_lbwatch_is_given_its_priority_1_election_time() -> None:
    """During lbwatch's drain the drained node runs at priority 1: a 4.2 s gap is within its
    election time + 0.5 s (4.50 s), where outside a drain it is not (3.51 s)."""
    vip = [(0.0, ("lb1",)), (12.0, ()), (16.2, ("lb1",))]
    fig, bad = judge(vip, SERVING, drains=[(10.0, 30.0, "lb1", "drained: ...")])
    assert fig["over_allowed"] == 0 and not bad
    fig, bad = judge(vip, SERVING)
    assert fig["over_allowed"] == 1


# -- the comparison ------------------------------------------------------------------------------


def result(downtime: float, longest: float) -> dict:
    pair = {
        "allowed_s": 3.512,
        "over_allowed": 0,
        "worst_s": 0.0,
        "total_s": 0.0,
        "fault_on_both": 0,
        "drains_applied": 1,
        "drains_refused": 0,
        "drains_failed": 0,
        "drains_left_no_holder": 0,
    }
    return {
        "seed": 1,
        "minutes": 5.0,
        "profile": "classic",
        "schedule": ["..."] * 3,
        "availability": {
            "share_200": 0.99,
            "probes": 100,
            "downtime_s": downtime,
            "share_time_up": 1 - downtime / 300,
            "downtime_while_servable_s": downtime / 2,
            "outages": 2,
            "longest_outage_s": longest,
        },
        "keepalived_without_haproxy": {"haproxy_dead_over_1s": 0, "haproxy_stopped_over_1s": 1},
        "pair": pair,
        "vip": {"holder_changes": 4, "both_held_outside_vrrp_cut": 0},
    }


def test_comparison_states_the_ratio_and_the_goal() -> None:
    """lbwatch's downtime over the seed's, and the goal (at most a tenth, and a shorter
    longest outage) met or not, said in the table."""
    assert goal(result(1.0, 0.5), result(20.0, 4.0)) == {
        "downtime_ratio": 0.05,
        "servable_downtime_ratio": 0.05,
        "downtime_goal_met": True,
        "longest_goal_met": True,
    }
    g = goal(result(3.0, 5.0), result(20.0, 4.0))
    assert not g["downtime_goal_met"] and not g["longest_goal_met"]
    assert goal(result(1.0, 1.0), result(0.0, 0.0))["downtime_ratio"] is None
    text = compare(result(3.0, 5.0), result(20.0, 4.0))
    assert "| total downtime (s) | 3.0 | 20.0 |" in text
    assert (
        "| availability (% of the client's probing time answered) | 99.000 % | 93.333 % |" in text
    )
    assert "| downtime ratio lbwatch / seed | 0.150 | |" in text
    assert "| downtime while some haproxy could serve (s) | 1.5 | 10.0 |" in text
    assert "NOT met" in text


def test_downtime_is_split_by_whether_some_haproxy_could_serve() -> None:
    """An outage from 10 s to 20 s while both haproxy masters are stopped until 16 s: 10 s of
    downtime, 4 s of it while some haproxy could serve; the probing time's share says it too."""
    obs = Observations()
    obs.client = [
        {"t": 0.0, "status": 200, "lb": "lb1", "n": 1, "ok": 1},
        {"t": 10.0, "status": 0, "lb": "", "n": 50, "ok": 49},
        {"t": 20.0, "status": 200, "lb": "lb1", "n": 90, "ok": 49},
        {"end": 100.0, "n": 500, "ok": 459},
    ]
    obs.procs = {
        "lb1": [(0.0, snap(10)), (9.0, snap(10, "T")), (16.0, snap(10))],
        "lb2": [(0.0, snap(20, "T"))],
    }
    data = RunData(
        seed=1,
        minutes=1.0,
        profile="classic",
        t0=0.0,
        end=90.0,
        faults=[],
        obs=obs,
        valid_edits=[],
        invalid_edits=[],
        transitions={},
        maildir=Path(),
        logs={},
        wedge_after=2.0,
        observed_until=100.0,
    )
    out: dict = {}
    availability(data, out, [])
    av = out["availability"]
    assert (av["downtime_s"], av["downtime_while_servable_s"]) == (10.0, 4.0)
    assert av["share_time_up"] == 0.9 and av["outage_spans"] == [(10.0, 10.0)]
