"""The chaos soak's fault schedule: pure, a function of the seed and the duration alone, so a
run is repeated by giving the same seed (what the daemons do in reply is not repeatable; what
is injected and when is).

Each fault has a kind, a node (or none for the lab-wide ones), when it is injected (seconds
from the start) and how long until its heal (0: nothing to heal, the agents heal it). Faults
come every few seconds; at most ``MAX_ACTIVE`` are active at once, and two faults on the same
resource never overlap (one config edit at a time, one lbwatch restart per node at a time).

The pair's faults (``PAIR_KINDS``, opt-in: ``bench/chaos.py --overlap``) are after every other
kind in ``KINDS`` and in no default set, so a seed's schedule without them is the one it always
was: the same fault on both nodes on purpose (``BOTH``: haproxy frozen, haproxy's master
killed, keepalived's parent killed; on the fault's node first, on the other ``arg`` seconds
later), an operator's drain of one node and its undrain at the heal, and one node deaf to VRRP
(multicast no longer flooded to its bridge port only: it hears no advertisement, the other
still hears it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NODES = ("lb1", "lb2")
MAX_ACTIVE = 2
GAP = (3.0, 8.0)  # seconds between injections

# kind -> (needs a node, hold range in seconds: (0, 0) when the heal is the agents' job)
KINDS: dict[str, tuple[bool, tuple[float, float]]] = {
    "haproxy_master_kill": (True, (0.0, 0.0)),
    "haproxy_worker_kill": (True, (0.0, 0.0)),
    "haproxy_master_stop": (True, (1.0, 3.0)),
    "haproxy_reload": (True, (0.0, 0.0)),
    "haproxy_restart": (True, (0.0, 0.0)),
    "keepalived_parent_kill": (True, (0.0, 0.0)),
    "keepalived_child_kill": (True, (0.0, 0.0)),
    "lbwatch_kill": (True, (1.0, 4.0)),
    "sshd_down": (True, (3.0, 10.0)),
    "smtp_down": (False, (5.0, 15.0)),
    "edit_valid": (True, (0.0, 0.0)),
    "edit_invalid": (True, (3.0, 6.0)),
    "edit_both": (False, (0.0, 0.0)),
    "vrrp_cut": (False, (4.0, 8.0)),
    "link_flap": (True, (1.0, 4.0)),
    "clock_step": (True, (5.0, 20.0)),
    "disk_full": (True, (3.0, 12.0)),
    # systemd tier only: lbwatch frozen until systemd's watchdog (WatchdogSec=10s) ends it and
    # Restart= brings it back; the hold covers that, the heal only waits for it.
    "lbwatch_stop": (True, (12.0, 16.0)),
    # The pair's faults (``--overlap``). A BOTH kind's hold is counted from its first node's
    # injection; the freeze's heal thaws both nodes.
    "both_haproxy_stop": (True, (4.0, 8.0)),
    "both_haproxy_kill": (True, (0.0, 0.0)),
    "both_keepalived_kill": (True, (0.0, 0.0)),
    "drain": (True, (5.0, 15.0)),
    "vrrp_deaf": (True, (4.0, 8.0)),
}
BOTH = ("both_haproxy_stop", "both_haproxy_kill", "both_keepalived_kill")
PAIR_KINDS = (*BOTH, "drain", "vrrp_deaf")
OVERLAP_WITHIN = (0.0, 3.0)  # seconds from a BOTH fault's first node to its second
# The bare lab's kinds, in the order that fixes its schedules (a seed's plan is unchanged).
BARE_KINDS = tuple(k for k in KINDS if k != "lbwatch_stop" and k not in PAIR_KINDS)
# The systemd tier's, likewise.
SYSTEMD_KINDS = tuple(k for k in KINDS if k not in PAIR_KINDS)

# Faults on one resource never overlap: the key is (resource, node or "").
_RESOURCE = {
    "haproxy_master_kill": "haproxy",
    "haproxy_worker_kill": "haproxy",
    "haproxy_master_stop": "haproxy",
    "haproxy_reload": "haproxy",
    "haproxy_restart": "haproxy",
    "keepalived_parent_kill": "keepalived",
    "keepalived_child_kill": "keepalived",
    "lbwatch_kill": "lbwatch",
    "lbwatch_stop": "lbwatch",
    "clock_step": "lbwatch",
    "sshd_down": "sshd",
    "smtp_down": "smtp",
    "edit_valid": "config",
    "edit_invalid": "config",
    "edit_both": "config",
    "vrrp_cut": "net",
    "link_flap": "net",
    "disk_full": "disk",
    "both_haproxy_stop": "haproxy",
    "both_haproxy_kill": "haproxy",
    "both_keepalived_kill": "keepalived",
    "drain": "drain",
    "vrrp_deaf": "net",
}
LAB_WIDE = ("config", "net", "smtp")  # resources that involve both nodes whatever the fault


@dataclass(frozen=True)
class Fault:
    n: int  # its number in the schedule, from 1
    kind: str
    node: str  # "" for lab-wide faults
    at: float  # seconds from the start
    hold: float  # seconds until the heal; 0: none
    arg: float = 0.0  # clock_step: the offset in seconds; a BOTH kind: the second node's delay

    @property
    def ends(self) -> float:
        return self.at + max(self.hold, self.second_after)

    @property
    def second_after(self) -> float:
        """A BOTH fault: seconds after ``at`` that the other node gets it (0 otherwise)."""
        return self.arg if self.kind in BOTH else 0.0

    @property
    def other(self) -> str:
        """A BOTH fault's second node."""
        return next(n for n in NODES if n != self.node)

    def resource(self) -> tuple[str, str]:
        # Config edits and network cuts are lab-wide: they involve both nodes; so does the
        # same fault on both nodes.
        res = _RESOURCE[self.kind]
        return (res, "" if res in LAB_WIDE or self.kind in BOTH else self.node)

    def clashes(self, other: Fault) -> bool:
        """Whether the two may not overlap: the same resource on the same node, or on both."""
        (res, node), (res2, node2) = self.resource(), other.resource()
        return res == res2 and (node == node2 or "" in (node, node2))

    def label(self) -> str:
        where = f" on {self.node}" if self.node else ""
        if self.kind in BOTH:
            where += f", then {self.other} +{self.arg:.2f} s"
        extra = f" ({self.arg:+.0f} s)" if self.kind == "clock_step" else ""
        return f"#{self.n} {self.kind}{where}{extra}"


def plan(seed: int, seconds: float, kinds: tuple[str, ...] = BARE_KINDS) -> list[Fault]:
    """The faults of a run of ``seconds`` (the last heals before the end)."""
    rng = random.Random(seed)
    out: list[Fault] = []
    t = rng.uniform(*GAP)
    while True:
        kind = rng.choice(kinds)
        needs_node, (lo, hi) = KINDS[kind]
        node = rng.choice(NODES) if needs_node else ""
        hold = round(rng.uniform(lo, hi), 2) if hi else 0.0
        arg = rng.choice((-1, 1)) * round(rng.uniform(60, 7200)) if kind == "clock_step" else 0.0
        if kind in BOTH:  # drawn for these kinds alone: the others' draws are as they were
            arg = round(rng.uniform(*OVERLAP_WITHIN), 2)
        fault = Fault(len(out) + 1, kind, node, round(t, 2), hold, float(arg))
        # Wait for the faults it may not overlap; agent-healed faults count as active for a
        # few seconds (their heal is a restart).
        while True:
            active = [f for f in out if max(f.ends, f.at + 2.0) > fault.at]
            clash = [f for f in active if f.clashes(fault)]
            if len(active) < MAX_ACTIVE and not clash:
                break
            later = min(max(f.ends, f.at + 2.0) for f in (clash or active))
            fault = Fault(fault.n, kind, node, round(later + 0.5, 2), hold, float(arg))
        if fault.ends > seconds:
            return out
        out.append(fault)
        t = fault.at + rng.uniform(*GAP)
