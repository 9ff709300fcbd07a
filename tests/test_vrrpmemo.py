"""The VRRP states an agent keeps for the next one (``notify.vrrpmemo``): taken over only from
the same keepalived (boot, PID, start time), with what the FIFO says over them."""

from __future__ import annotations

from pathlib import Path

from lbwatch.events import ProcId
from lbwatch.notify.vrrpmemo import MEMO, VrrpMemory

A = ProcId(pid=812, start_ticks=450, name="keepalived", started=0.0)
A_LATER = ProcId(pid=812, start_ticks=9000, name="keepalived", started=0.0)  # PID reused


def test_the_next_agent_takes_the_states_of_the_same_keepalived(tmp_path: Path) -> None:
    first = VrrpMemory(tmp_path, boot="boot-1")
    heard = {"INSTANCE:VI_1": "MASTER", "GROUP:G1": "MASTER"}
    assert first.states(heard, A) == heard
    assert (tmp_path / MEMO).exists()
    nxt = VrrpMemory(tmp_path, boot="boot-1")
    assert nxt.states({}, A) == heard
    # What the FIFO says now (its backlog, a new transition) goes over what was kept.
    assert nxt.states({"INSTANCE:VI_1": "BACKUP"}, A) == {
        "INSTANCE:VI_1": "BACKUP",
        "GROUP:G1": "MASTER",
    }
    assert VrrpMemory(tmp_path, boot="boot-1").states({}, A)["INSTANCE:VI_1"] == "BACKUP"


def test_another_keepalived_or_another_boot_starts_from_nothing(tmp_path: Path) -> None:
    VrrpMemory(tmp_path, boot="boot-1").states({"INSTANCE:VI_1": "MASTER"}, A)
    assert VrrpMemory(tmp_path, boot="boot-1").states({}, A_LATER) == {}
    VrrpMemory(tmp_path, boot="boot-1").states({"INSTANCE:VI_1": "MASTER"}, A)
    # The same PID and start time after a reboot: boot order makes that likely.
    assert VrrpMemory(tmp_path, boot="boot-2").states({}, A) == {}


def test_nothing_is_kept_or_taken_while_keepalived_is_not_running(tmp_path: Path) -> None:
    memory = VrrpMemory(tmp_path, boot="boot-1")
    assert memory.states({"INSTANCE:VI_1": "STOP"}, None) == {"INSTANCE:VI_1": "STOP"}
    assert not (tmp_path / MEMO).exists()


def test_a_damaged_memo_is_no_memo(tmp_path: Path) -> None:
    (tmp_path / MEMO).write_text("{not json")
    assert VrrpMemory(tmp_path, boot="boot-1").states({}, A) == {}
