"""What the files beside the agent say, as the events the policy folds: the maintenance pause
and the drain (flags an operator's ``lbwatch pause`` / ``drain`` leaves in the state
directory) and keepalived's track files (``trackfile``). Read on every scan and whenever the
state directory changes; only what differs from the policy's state is an event.
"""

from __future__ import annotations

from lbwatch import drain, trackfile
from lbwatch.config import Config
from lbwatch.events import DrainChanged, PauseChanged, TrackSeen
from lbwatch.status import is_paused
from lbwatch.supervision import State


def news(cfg: Config, state: State) -> list[PauseChanged | DrainChanged | TrackSeen]:
    out: list[PauseChanged | DrainChanged | TrackSeen] = []
    paused = is_paused(cfg.agent.state_dir)
    if paused != state.paused:
        out.append(PauseChanged(paused))
    flag = drain.read(cfg.agent.state_dir)
    if flag != state.drain:
        out.append(DrainChanged(flag))
    values = trackfile.read(cfg.keepalived.track_dir, (i.name for i in state.vrrp))
    if values != state.track:
        out.append(TrackSeen(values))
    return out
