"""Split-brain decisions (``cluster.splitbrain.decide``): pure, driven by hand-made views and
times. A claim is MASTER or a VIP held; a split brain is declared only on a peer's answer that
came ``after`` seconds into the overlap; it ends with one message from the node that holds the
VIP; a peer that cannot be asked keeps it undecided; a peer whose agent cannot speak claims
only what its kernel holds, never what its last view said."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.cluster.splitbrain import AGENT, KERNEL, NOBODY, Conflict, Heard, decide
from lbwatch.statusdoc import NodeAgent, NodeView, VipsView

AFTER = 3.0
VIP = "192.0.2.100"


def node(
    name: str, state: str = "BACKUP", held: bool = False, inst: str = "VI_1", vip: str = VIP
) -> NodeView:
    return NodeView(
        node=name,
        agent=NodeAgent(pid=1, start_ticks=1, version="t"),
        vrrp={inst: VipsView(state=state, vips=[vip], held=[vip] if held else [])},
    )


def master(name: str, **kw: object) -> NodeView:
    return node(name, "MASTER", True, **kw)  # type: ignore[arg-type]


def up(view: NodeView, answered: float) -> Heard:
    return Heard(view, AGENT, answered)


def silent(last: NodeView, answered: float, holds: bool) -> Heard:
    """A peer whose agent cannot speak: ``last`` is the view it wrote before it stopped; its
    receiver said whether its kernel holds the VIP."""
    return Heard(
        last, KERNEL, answered, "not responding", frozenset({VIP}) if holds else frozenset()
    )


@dataclass
class Run:
    """Decisions fed one after another, as the service does."""

    me: str = "lb1"
    state: dict[str, Conflict] = field(default_factory=dict)
    said: list[tuple[str, str]] = field(default_factory=list)

    def step(self, mine: NodeView, peers: dict[str, Heard], now: float) -> list[tuple[str, str]]:
        d = decide(self.state, mine, peers, now, 1000.0 + now, AFTER)
        self.state = d.state
        new = [(s.kind, s.text) for s in d.said]
        self.said += new
        return new


def test_a_claim_on_two_nodes_is_declared_on_an_answer_after_split_brain_after() -> None:
    """Both MASTER: nothing at first, nothing on an answer 2.9 s in, one alert on the answer at
    3 s, no repeat on the next answers."""
    r = Run()
    assert r.step(master("lb1"), {"lb2": up(master("lb2"), 10.0)}, 10.0) == []
    assert r.step(master("lb1"), {"lb2": up(master("lb2"), 12.9)}, 12.9) == []
    said = r.step(master("lb1"), {"lb2": up(master("lb2"), 13.0)}, 13.0)
    assert [k for k, _ in said] == ["split_brain"]
    assert "VI_1 (VIP 192.0.2.100) is claimed by lb1 and lb2" in said[0][1]
    assert r.step(master("lb1"), {"lb2": up(master("lb2"), 14.0)}, 14.0) == []
    assert r.state["VI_1"].declared


def test_a_stale_view_never_makes_a_split_brain() -> None:
    """A peer that answered last before the overlap began (it lost power holding the VIP, and
    this node took over): however long this node holds the VIP, nothing is declared."""
    r = Run()
    for now in (10.0, 13.0, 20.0, 60.0):
        assert r.step(master("lb1"), {"lb2": up(master("lb2"), 9.5)}, now) == []


def test_an_overlap_shorter_than_split_brain_after_says_nothing() -> None:
    """The overlap of an ordinary failover (2 s) ends without an alert or a resolution."""
    r = Run()
    r.step(master("lb1"), {"lb2": up(master("lb2"), 10.0)}, 10.0)
    r.step(master("lb1"), {"lb2": up(master("lb2"), 11.0)}, 11.0)
    assert r.step(master("lb1"), {"lb2": up(node("lb2"), 12.0)}, 12.0) == []
    assert r.state == {} and r.said == []


def test_the_holder_says_it_is_resolved_and_the_other_node_says_nothing() -> None:
    """After a declared split brain, lb2 steps back: lb1 (holding the VIP) sends one
    "resolved: lb1 holds"; lb2, seeing lb1 hold it, sends nothing."""
    lb1, lb2 = Run("lb1"), Run("lb2")
    for now in (10.0, 13.0):
        lb1.step(master("lb1"), {"lb2": up(master("lb2"), now)}, now)
        lb2.step(master("lb2"), {"lb1": up(master("lb1"), now)}, now)
    assert [k for k, _ in lb1.said] == [k for k, _ in lb2.said] == ["split_brain"]
    said1 = lb1.step(master("lb1"), {"lb2": up(node("lb2"), 15.0)}, 15.0)
    said2 = lb2.step(node("lb2"), {"lb1": up(master("lb1"), 15.0)}, 15.0)
    assert said1 == [
        (
            "split_brain_resolved",
            "resolved: lb1 holds VI_1 (VIP 192.0.2.100) alone, after 5 s of split brain",
        )
    ]
    assert said2 == []
    assert lb1.state == {}
    # lb2 forgets it once lb1's claim is confirmed split_brain_after after it let go.
    assert lb2.step(node("lb2"), {"lb1": up(master("lb1"), 17.9)}, 17.9) == []
    assert "VI_1" in lb2.state
    assert lb2.step(node("lb2"), {"lb1": up(master("lb1"), 18.0)}, 18.0) == []
    assert lb2.state == {}


def test_when_both_step_back_the_first_by_name_says_no_node_holds_it() -> None:
    lb1, lb2 = Run("lb1"), Run("lb2")
    for now in (10.0, 13.0):
        lb1.step(master("lb1"), {"lb2": up(master("lb2"), now)}, now)
        lb2.step(master("lb2"), {"lb1": up(master("lb1"), now)}, now)
    said1 = lb1.step(node("lb1"), {"lb2": up(node("lb2"), 14.0)}, 14.0)
    said2 = lb2.step(node("lb2"), {"lb1": up(node("lb1"), 14.0)}, 14.0)
    assert [t for _, t in said1] == [
        "resolved: no node holds VI_1 (VIP 192.0.2.100) now, after 4 s of split brain"
    ]
    assert said2 == []


def test_when_both_step_back_a_moment_apart_one_node_still_says_no_node_holds_it() -> None:
    """Both nodes let go of the VIP within a tenth of a second (each still saw the other claim
    it when it let go): one "resolved: no node holds" is sent, by the first by name, once it
    hears that the other let go too; not none, as when each left it to the other."""
    lb1, lb2 = Run("lb1"), Run("lb2")
    for now in (10.0, 13.0):
        lb1.step(master("lb1"), {"lb2": up(master("lb2"), now)}, now)
        lb2.step(master("lb2"), {"lb1": up(master("lb1"), now)}, now)
    # lb1 lets go first, lb2 50 ms later: neither has heard of the other's yet.
    assert lb1.step(node("lb1"), {"lb2": up(master("lb2"), 14.0)}, 14.0) == []
    assert lb2.step(node("lb2"), {"lb1": up(master("lb1"), 14.0)}, 14.05) == []
    # Each hears the other's new view a tenth of a second later.
    lb1.step(node("lb1"), {"lb2": up(node("lb2"), 14.15)}, 14.15)
    lb2.step(node("lb2"), {"lb1": up(node("lb1"), 14.1)}, 14.1)
    resolved = [t for k, t in lb1.said + lb2.said if k == "split_brain_resolved"]
    assert resolved == [
        "resolved: no node holds VI_1 (VIP 192.0.2.100) now, after 4 s of split brain"
    ]
    assert [k for k, _ in lb2.said] == ["split_brain"]
    assert lb1.state == lb2.state == {}


def test_the_node_that_let_go_while_the_other_holds_on_says_nothing() -> None:
    """lb1 (first by name) lets go and lb2 holds on: lb2 says it holds it; lb1, once lb2's
    claim is confirmed split_brain_after later, forgets the split brain without a word, and
    says nothing when lb2 lets go much later (an ordinary failover then)."""
    lb1, lb2 = Run("lb1"), Run("lb2")
    for now in (10.0, 13.0):
        lb1.step(master("lb1"), {"lb2": up(master("lb2"), now)}, now)
        lb2.step(master("lb2"), {"lb1": up(master("lb1"), now)}, now)
    assert lb1.step(node("lb1"), {"lb2": up(master("lb2"), 14.0)}, 14.0) == []
    said = lb2.step(master("lb2"), {"lb1": up(node("lb1"), 14.1)}, 14.1)
    assert [k for k, _ in said] == ["split_brain_resolved"]
    for now in (15.0, 16.0, 17.0):
        assert lb1.step(node("lb1"), {"lb2": up(master("lb2"), now)}, now) == []
    assert lb1.state == {}
    assert lb1.step(node("lb1"), {"lb2": up(node("lb2"), 100.0)}, 100.0) == []
    assert [k for k, _ in lb1.said] == ["split_brain"]


def test_a_peer_that_cannot_be_asked_keeps_it_undecided() -> None:
    """A declared split brain whose other claimant stops answering is neither resolved nor
    alerted again; it says what it waits for, and resolves once the peer answers again."""
    r = Run()
    r.step(master("lb1"), {"lb2": up(master("lb2"), 10.0)}, 10.0)
    r.step(master("lb1"), {"lb2": up(master("lb2"), 13.0)}, 13.0)
    gone = {"lb2": Heard(None, NOBODY, 13.0, "unreachable")}
    assert r.step(master("lb1"), gone, 20.0) == []
    assert r.state["VI_1"].waiting == "lb2 cannot be asked"
    assert r.step(master("lb1"), {"lb2": up(node("lb2"), 21.0)}, 21.0)[0][0] == (
        "split_brain_resolved"
    )


def test_a_vip_counts_by_address_whatever_the_peers_instance_is_called() -> None:
    """The peer calls its instance "web" and writes the VIP with a prefix length; holding the
    address is a claim."""
    r = Run()
    peer = node("lb2", "MASTER", True, inst="web", vip=VIP + "/24")
    r.step(master("lb1"), {"lb2": up(peer, 10.0)}, 10.0)
    assert [k for k, _ in r.step(master("lb1"), {"lb2": up(peer, 13.0)}, 13.0)] == ["split_brain"]


def test_an_instance_of_the_same_name_for_other_vips_is_another_groups() -> None:
    """Two VRRP pairs that share their haproxy config (sync peers across the pairs), each with
    the usual instance name VI_1 for its own VIP: the other pair's MASTER is no claim on this
    pair's instance, however long both are MASTER. The same name with the same VIP is."""
    other_pair = node("lb3", "MASTER", True, vip="192.0.2.200")
    r = Run()
    for now in (10.0, 13.0, 16.0):
        assert r.step(master("lb1"), {"lb3": up(other_pair, now)}, now) == []
    assert r.state == {}
    same = Run()
    same.step(master("lb1"), {"lb2": up(node("lb2", "MASTER"), 10.0)}, 10.0)
    said = same.step(master("lb1"), {"lb2": up(node("lb2", "MASTER"), 13.0)}, 13.0)
    assert [k for k, _ in said] == ["split_brain"]


def test_master_without_the_vip_is_a_claim_and_backup_holding_nothing_is_none() -> None:
    r = Run()
    peer_master = node("lb2", "MASTER", held=False)
    r.step(node("lb1", "BACKUP", held=True), {"lb2": up(peer_master, 10.0)}, 10.0)
    said = r.step(node("lb1", "BACKUP", held=True), {"lb2": up(peer_master, 13.0)}, 13.0)
    assert [k for k, _ in said] == ["split_brain"]
    quiet = Run()
    for now in (10.0, 13.0, 16.0):
        assert quiet.step(master("lb1"), {"lb2": up(node("lb2"), now)}, now) == []


def test_a_node_not_claiming_alerts_for_nobody_else() -> None:
    """lb1 sees lb2 and lb3 both claim an instance it does not: their agents alert, not lb1."""
    r = Run()
    peers = {"lb2": up(master("lb2"), 13.0), "lb3": up(master("lb3"), 13.0)}
    r.step(node("lb1"), peers, 10.0)
    assert r.step(node("lb1"), peers, 13.0) == []


def test_a_stopped_agents_last_view_claims_nothing_whatever_it_says() -> None:
    """lb2's agent stopped while its view said MASTER holding the VIP, then its keepalived let
    go and lb1 took over: its receiver answers that its kernel holds nothing, and however long
    lb1 holds the VIP no split brain starts (the finding: lb2 mailed one that was not there)."""
    r = Run()
    for now in (10.0, 11.0, 13.0, 20.0, 60.0):
        assert r.step(master("lb1"), {"lb2": silent(master("lb2"), now, holds=False)}, now) == []
    assert r.state == {}


def test_a_stopped_agents_node_claims_the_vip_its_kernel_holds() -> None:
    """lb2's agent stopped while its view said BACKUP; VRRP is cut and lb2's keepalived takes
    the VIP: its kernel holds it, which is a claim, declared on the answer split_brain_after
    into the overlap, and the alert says whose word it is."""
    r = Run()
    assert r.step(master("lb1"), {"lb2": silent(node("lb2"), 10.0, holds=True)}, 10.0) == []
    assert r.step(master("lb1"), {"lb2": silent(node("lb2"), 12.9, holds=True)}, 12.9) == []
    said = r.step(master("lb1"), {"lb2": silent(node("lb2"), 13.0, holds=True)}, 13.0)
    assert [k for k, _ in said] == ["split_brain"]
    assert "claimed by lb1 and lb2" in said[0][1]
    assert said[0][1].endswith("(lb2: agent not answering, the VIP is on its interfaces)")


def test_a_claim_goes_on_when_its_agent_stops_and_ends_on_the_kernels_word() -> None:
    """An overlap seen through lb2's agent goes on, not started over, when the agent stops and
    its kernel still holds the VIP; declared on time; resolved once its kernel lets go (its
    agent still stopped)."""
    r = Run()
    r.step(master("lb1"), {"lb2": up(master("lb2"), 10.0)}, 10.0)
    r.step(master("lb1"), {"lb2": silent(master("lb2"), 11.0, holds=True)}, 11.0)
    said = r.step(master("lb1"), {"lb2": silent(master("lb2"), 13.0, holds=True)}, 13.0)
    assert [k for k, _ in said] == ["split_brain"]
    said = r.step(master("lb1"), {"lb2": silent(master("lb2"), 15.0, holds=False)}, 15.0)
    assert said == [
        (
            "split_brain_resolved",
            "resolved: lb1 holds VI_1 (VIP 192.0.2.100) alone, after 5 s of split brain",
        )
    ]


def test_master_without_the_vip_counts_only_from_a_current_view() -> None:
    """keepalived's MASTER is the agent's word: from a current view it is a claim, from the view
    of an agent that stopped it is none (its kernel holds no VIP)."""
    told = Run()
    told.step(master("lb1"), {"lb2": up(node("lb2", "MASTER"), 10.0)}, 10.0)
    assert told.step(master("lb1"), {"lb2": up(node("lb2", "MASTER"), 13.0)}, 13.0)
    stopped = Run()
    for now in (10.0, 13.0, 16.0):
        peer = silent(node("lb2", "MASTER"), now, holds=False)
        assert stopped.step(master("lb1"), {"lb2": peer}, now) == []


# -- a property, against an oracle written from the rules, not from the code ---------------------

# What the peer's answer at a step says, if one came: its agent's current view claiming or not;
# its kernel holding the VIP or not (its agent stopped), with a last view that claims or not.
Answer = tuple[str, bool, bool]  # ("agent" | "kernel" | "", claims or holds, last view claims)
Step = tuple[bool, Answer, float]  # I claim, the peer's answer, time passing


@st.composite
def histories(draw: st.DrawFn) -> list[Step]:
    answers = st.tuples(st.sampled_from(["agent", "kernel", ""]), st.booleans(), st.booleans())
    steps = draw(st.lists(st.tuples(st.booleans(), answers), max_size=40))
    gaps = draw(st.lists(st.sampled_from([0.3, 0.5, 1.0, 2.0]), min_size=40, max_size=40))
    return [(mine, answer, g) for (mine, answer), g in zip(steps, gaps)]


def oracle(history: list[Step]) -> list[str]:
    """The alerts lb1 must send, from the rules: the peer claims as its last answer said (its
    agent's view claiming; or, its agent stopped, its kernel holding the VIP, whatever its last
    view says); an overlap starts at the first step where both claim; it is declared at the
    first answer at least AFTER later while both still claim; it ends when either stops
    claiming, and only a declared one ends with "resolved" (lb1 resolves it if it still holds
    the VIP, or if neither does, being first by name). When lb1 lets go while the peer still
    claims it, lb1 keeps it until an answer AFTER later still shows the peer's claim (the peer
    says it holds it), or the peer lets go first (then neither holds it) or lb1 claims it again
    (the split brain goes on)."""
    out: list[str] = []
    now = 0.0
    peer_claims = False
    start: float | None = None
    declared = False
    let_go: float | None = None
    for mine, (by, claims, _decoy), gap in history:
        now += gap
        answers = by != ""
        if answers:
            peer_claims = claims
        if mine and peer_claims:
            if start is None:
                start, declared = now, False
            let_go = None
            if answers and not declared and now >= start + AFTER:
                declared = True
                out.append("split_brain")
            continue
        if start is None:
            continue
        if declared and not mine and peer_claims:
            let_go = now if let_go is None else let_go
            if answers and now >= let_go + AFTER:
                start, let_go = None, None  # the peer holds it, and says so
            continue
        if declared:
            out.append("split_brain_resolved")
        start, let_go = None, None
    return out


@settings(max_examples=300, deadline=None)
@given(histories())
def test_alerts_follow_the_rules_for_any_history(history: list[Step]) -> None:
    """Whatever the order of claims and answers, through the peer's agent or (its agent stopped)
    through its kernel, the alerts are the oracle's."""
    run = Run()
    now = 0.0
    heard = up(node("lb2"), -1.0)
    for mine, (by, claims, decoy), gap in history:
        now += gap
        if by == "agent":
            heard = up(master("lb2") if claims else node("lb2"), now)
        elif by == "kernel":
            heard = silent(master("lb2") if decoy else node("lb2"), now, holds=claims)
        run.step(master("lb1") if mine else node("lb1"), {"lb2": heard}, now)
    assert [k for k, _ in run.said] == oracle(history)


def test_an_overlap_interrupted_by_silence_starts_over() -> None:
    """Both claim, then the peer cannot be asked for 10 s, then it answers claiming still: its
    claim during the silence is unknown, so the overlap counts from its return, not from
    before (declared only split_brain_after later)."""
    r = Run()
    r.step(master("lb1"), {"lb2": up(master("lb2"), 10.0)}, 10.0)
    r.step(master("lb1"), {"lb2": Heard(None, NOBODY, 10.0, "unreachable")}, 11.0)
    assert r.state == {}
    assert r.step(master("lb1"), {"lb2": up(master("lb2"), 21.0)}, 21.0) == []
    assert r.step(master("lb1"), {"lb2": up(master("lb2"), 23.9)}, 23.9) == []
    assert [k for k, _ in r.step(master("lb1"), {"lb2": up(master("lb2"), 24.0)}, 24.0)] == [
        "split_brain"
    ]
