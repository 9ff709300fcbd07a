"""The cluster service resolving a split brain, its watches not started: the views it hears
are set by the test, its clock too. The losing node hands a StandDown to the policy, and the
node left holding the instance an Announce once the loser's view says it stood down."""

from __future__ import annotations

from pathlib import Path

from lbwatch.cluster import splitbrain
from lbwatch.cluster.nodeview import from_status
from lbwatch.cluster.service import ClusterService
from lbwatch.cluster.standdown import STABLE
from lbwatch.events import Announce, StandDown
from lbwatch.loop import Selector
from lbwatch.statusdoc import (
    KeepalivedConfView,
    ServiceView,
    StatusDoc,
    VipsView,
    VrrpSettings,
)
from tests.test_cluster_watch import peering_config, this_agent

VIP = "192.0.2.100"


def doc(node: str, prio: int, holds: bool = True, standing: bool = False) -> StatusDoc:
    base = this_agent(node)
    state = "MASTER" if holds else "FAULT" if standing else "BACKUP"
    return base.model_copy(
        update={
            "services": {
                "haproxy": ServiceView(running=True),
                "keepalived": ServiceView(running=True),
            },
            "vrrp": {"VI_1": VipsView(state=state, vips=[VIP], held=[VIP] if holds else [])},
            "keepalived_conf": KeepalivedConfView(
                path="k", instances={"VI_1": VrrpSettings(priority=prio, vips=[VIP], vrid=51)}
            ),
            "standing_down": {"VI_1": "test"} if standing else {},
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(tmp_path: Path, control: Path, node: str, peer: str, clock: Clock) -> tuple[
    ClusterService, list[object], Selector
]:  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = peering_config(tmp_path, control, watch=True)
    cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"node_name": node})})
    seen: list[object] = []
    sel = Selector()
    svc = ClusterService(cfg, sel, lambda k, t: None, lambda: None, seen.append, clock)
    svc.heard = {peer: splitbrain.Heard(None, splitbrain.NOBODY)}
    return svc, seen, sel


def hear(svc: ClusterService, peer: str, status: StatusDoc, clock: Clock) -> None:
    view = from_status(status).model_copy(update={"node": peer})
    svc.heard[peer] = splitbrain.Heard(view, splitbrain.AGENT, clock())


def test_the_loser_stands_down_and_the_winner_announces(tmp_path: Path, control_dir: Path) -> None:
    """lb2 (253) against lb1 (254), both MASTER on a cut: lb2 hands StandDown(VI_1) once the
    terms are stable and the claims confirmed; lb1, hearing lb2 stood down and let go, hands
    Announce(VI_1); lb1 never stands down."""
    clock = Clock()
    lb2, seen2, sel2 = service(tmp_path / "b", control_dir, "lb2", "lb1", clock)
    lb1, seen1, sel1 = service(tmp_path / "a", control_dir, "lb1", "lb2", clock)
    try:
        for t in range(int(STABLE) + 3):  # both claim, each hears the other, every second
            clock.now = 1000.0 + t
            hear(lb2, "lb1", doc("lb1", 254), clock)
            lb2.local(doc("lb2", 253).model_copy(update={"updated": float(t)}))
            lb2._decide()
            hear(lb1, "lb2", doc("lb2", 253), clock)
            lb1.local(doc("lb1", 254).model_copy(update={"updated": float(t)}))
            lb1._decide()
        stands = [e for e in seen2 if isinstance(e, StandDown)]
        assert [s.names() for s in stands] == [frozenset({"VI_1"})]
        assert "lb1 serves and holds it" in stands[0].instances[0][1]
        assert not [e for e in seen1 if isinstance(e, StandDown)]
        # lb2's keepalived in FAULT: its view says it stood down and holds nothing.
        clock.now += 0.5
        hear(lb1, "lb2", doc("lb2", 253, holds=False, standing=True), clock)
        lb1._decide()
        assert [e for e in seen1 if isinstance(e, Announce)] == [Announce("VI_1", (VIP,))]
    finally:
        for svc, sel in ((lb1, sel1), (lb2, sel2)):
            if svc.listener is not None:
                svc.listener.close()
            sel.close()


def test_an_ordinary_overlap_announces_nothing(tmp_path: Path, control_dir: Path) -> None:
    """The control: lb2 lets go of its own (a failover's overlap, no stand-down): no Announce."""
    clock = Clock()
    lb1, seen1, sel1 = service(tmp_path, control_dir, "lb1", "lb2", clock)
    try:
        hear(lb1, "lb2", doc("lb2", 253), clock)
        lb1.local(doc("lb1", 254))
        lb1._decide()
        clock.now += 0.05
        hear(lb1, "lb2", doc("lb2", 253, holds=False), clock)
        lb1._decide()
        assert not [e for e in seen1 if isinstance(e, Announce)]
    finally:
        sel1.close()
