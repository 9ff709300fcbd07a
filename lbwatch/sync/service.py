"""Config sync as one object the agent's loop drives, like ``notify.hub``.

Observers on the loop: the config watcher's inotify fd (local edits) and an inotify fd on the
staging directory (versions pushed by peers). What they find is not acted on here: it becomes a
``SyncJob`` that the agent hands to the policy (``want``), which decides when it runs, on
haproxy's slot, never beside a start of haproxy and never while paused. The policy's SYNC action
comes back to ``execute``, on a worker thread, which runs the job in ``apply``. Executors off the
loop: those jobs, and one ``PeerLink`` thread per peer. Their outcomes come back through the
service's mailbox and are handled here, on the loop.

Each peer link delivers the version this node holds, its own edit or one it received (see
``_set_current``); the rule's total order keeps that free of loops. With ``push_after =
"healthy"`` this node's own version is held (``canary``) until the agent's health probes of
haproxy, told here through ``probe_done``, have passed on it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import inotify_simple

from lbwatch.config import Config
from lbwatch.events import Action, ActionResult, Outcome, ProbeResult, SyncJob, SyncKind
from lbwatch.loop import Mailbox, Selector
from lbwatch.services import reload_haproxy
from lbwatch.status import SYNC_NOW_FLAG
from lbwatch.statusdoc import JobView, ReceivedView, SyncView
from lbwatch.sync import apply, canary, limits, said
from lbwatch.sync.apply import Checked, Context, LocalOutcome, StagedOutcome
from lbwatch.sync.canary import Gate, Step
from lbwatch.sync.channel import Channel
from lbwatch.sync.confine import confine_for
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.ledger import Ledger
from lbwatch.sync.peers import PeerLink, PeerState, PeerView
from lbwatch.sync.receive import ApplySettings
from lbwatch.sync.staging import sweeper_for
from lbwatch.sync.transport import Peer, Transport
from lbwatch.sync.versions import Version, edit, vouched_by, wall_ns
from lbwatch.sync.watch import Change, ConfigWatcher

log = logging.getLogger(__name__)
F = inotify_simple.flags
# A peer unreachable this long raises an alert (once per episode).
UNREACHABLE_ALERT = 60.0
# The rescan asks again for a staged version's job that has not answered in this long (it was
# held by a pause, or failed).
RESCAN_ASK_AGAIN = 30.0


class SyncService:
    def __init__(
        self,
        cfg: Config,
        selector: Selector,
        node: str,
        alert: Callable[[str, str], None],
        changed: Callable[[], None],
        want: Callable[[SyncJob], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        s = cfg.sync
        self.cfg = cfg
        self.node = node
        self.alert = alert
        self.changed = changed  # the agent republishes its status
        self.want = want  # the agent hands the job to the policy
        self.clock = clock
        self._sel = selector
        self.files = FileSet(s.config, tuple(s.extra_files))
        self.live = s.config
        self.staging = cfg.staging_path()
        self.staging.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.sweeper = sweeper_for(cfg, self.files)
        self._receivers_doc = self.staging / limits.DIR / limits.DOC
        self._receivers_told = True  # until a write fails: then said once
        self._tell_receivers()
        self.ledger = Ledger(cfg.agent.state_dir)
        self.watcher = ConfigWatcher(self.files.patterns(), debounce=s.debounce)
        self._inbox = inotify_simple.INotify()
        # The receiver links a whole version in (IN_CREATE); rsync, for a key still on rrsync,
        # renames one in (IN_MOVED_TO).
        self._inbox.add_watch(self.staging, F.MOVED_TO | F.CLOSE_WRITE | F.CREATE)
        # A job's report, a link's view, and a local edit checked before its reload.
        self.mailbox: Mailbox[said.Report | Checked] = Mailbox()
        # The policy runs one sync job at a time; should it give up waiting on a job that hangs
        # (its deadline), the next one still waits here, so two never install at once.
        self._job_lock = threading.Lock()
        # When a job for the staged versions was last asked for and has not answered yet: the
        # rescan does not ask again meanwhile (the file it sees is the one being taken).
        self._staged_asked: float | None = None
        # A staged version waits for an operator's edit still being saved: the local job that
        # follows asks for it again.
        self._staged_deferred = False
        self.transport = Channel(Transport(s.ssh_key, s.control_dir, s.known_hosts, s.timeout))
        self.links = {
            p.name: PeerLink(
                Peer(p.name, p.host, p.port, p.user),
                self.transport,
                s.peer_confirm,
                s.retry_initial,
                s.retry_max,
                self.mailbox.post,
            )
            for p in s.peers
        }
        self.ctx = Context(
            node,
            self.files,
            self.staging,
            self.ledger,
            ApplySettings(
                list(s.check),
                functools.partial(reload_haproxy, cfg.haproxy, s.timeout, s.reload_confirm),
                s.backups,
                s.timeout,
                confine_for(cfg, self.files.config, [Path(p) for p in self.files.patterns()]),
            ),
            self.watcher,
            lambda: self._peers_seen,
            self._ask_peers,
        )
        # The highest edit counter the peers' status files showed (see PeerView).
        self._peers_seen = 0
        self.current: Version | None = None
        # This node's version held back from the peers until its health is proved (the canary).
        self.gate: Gate | None = None
        self.local = JobView(result="starting", at=time.time())
        self.received: ReceivedView | None = None
        self._alerted_unreachable: set[str] = set()
        self._peer_said: dict[str, tuple[PeerState, str]] = {}

    def _tell_receivers(self) -> None:
        """Write what this node's receivers may take (the unit it syncs, [sync]'s limits) for
        them to read at each push: until it is there, they take no version. Said once when it
        cannot be written, and tried again at each rescan (``check_peers``)."""
        said = limits.for_config(self.cfg, self.files.unit)
        try:
            limits.publish(self.staging, said)
        except OSError as exc:
            if self._receivers_told:
                log.error(
                    "cannot write %s for this node's receivers: %s; its peers' versions are "
                    "refused until it is written",
                    self._receivers_doc,
                    exc.strerror or exc,
                )
            self._receivers_told = False
        else:
            self._receivers_told = True

    # -- loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        self._sel.add(self.watcher.fileno(), self._on_watch)
        self._sel.add(self._inbox.fileno(), self._on_inbox)
        self._sel.add(self.mailbox.fileno(), self._on_results)
        for link in self.links.values():
            link.start()
        log.info(
            "config sync: watching %s, staging %s, peers %s",
            self.live,
            self.staging,
            ", ".join(f"{p.name} ({p.host})" for p in self.cfg.sync.peers) or "none",
        )
        # Two jobs, not one: each fits the deadline of one check, reload and roll-back.
        self._want("startup")
        if self._staged_waiting():
            self._want("staged")

    def _want(self, kind: SyncKind, seen_ns: int = 0) -> None:
        if kind == "staged":
            self._staged_asked = self.clock()
        self.want(SyncJob(kind, str(self.live), seen_ns))

    def execute(self, action: Action) -> ActionResult:
        """Run the policy's SYNC action, on a worker thread; what it concluded goes to the
        mailbox, for the loop. A job that raises is reported by the worker as a failure."""
        job = action.job
        assert job is not None
        with self._job_lock:
            return self._execute(action, job)

    def _execute(self, action: Action, job: SyncJob) -> ActionResult:
        started = time.monotonic()
        report: said.Report
        if job.kind == "startup":
            report = apply.reconcile(self.ctx)
        elif job.kind == "local":
            early = self._checked if self.cfg.sync.push_after == "check" else None
            report = apply.apply_local(self.ctx, job.seen_ns, early)
        elif job.kind == "now":
            report = self._adopt_now()
        else:
            report = apply.apply_staged(self.ctx, wall_ns())
        self.mailbox.post(report)
        return ActionResult(action, Outcome.OK, said.action(report), time.monotonic() - started)

    @property
    def wake(self) -> float | None:
        return self.watcher.due()

    def on_timer(self, now: float) -> None:
        changes = self.watcher.collect(now)
        for change in changes:
            if change.kind is Change.DELETED:
                text = f"{change.path} was deleted; the deletion is not propagated to the peers"
                log.error("%s", text)
                self.alert("config_deleted", text)
                if change.path == self.live:
                    self.local = JobView(result="deleted", message=text, at=time.time())
            else:
                # The sync action that follows says it at INFO: one line per cause.
                log.debug("%s changed (sha256 %s)", change.path, (change.digest or "")[:12])
        # One job for all the files that settled together: they are one version. A deleted
        # extra file just drops out of the next version (peers keep theirs).
        if any(c.kind is Change.CHANGED or c.path != self.live for c in changes):
            self._want("local", wall_ns())

    def _adopt_now(self) -> LocalOutcome:
        """`lbwatch sync --now`: make the live file this node's newest version and deliver it to
        every peer, whether or not they seem in sync."""
        outcome = apply.apply_local(self.ctx, wall_ns())
        if outcome.result == "unchanged" and outcome.version is not None:
            # Same content as recorded: claim it as our own latest edit, so it goes out even if
            # it came from a peer (peers that hold the same content only note the later one).
            v = outcome.version
            mine = edit(v.file, self.node, apply.seen(self.ctx), wall_ns(), v.digest)
            content = self.ledger.content(v.file)
            if content is not None:
                apply.record(self.ctx, mine, content, "local-edit", "sync --now")
                said = "pushed on request (sync --now), nothing reloaded: same content"
                return LocalOutcome("applied", said, mine)
        return outcome

    def _checked(self, version: Version) -> None:
        """From the job's thread: a local edit passed its check (``apply_local``)."""
        self.mailbox.post(Checked(version))

    def _on_watch(self) -> None:
        self.watcher.on_readable(self.clock())

    def _on_inbox(self) -> None:
        names = [e.name for e in self._inbox.read(timeout=0)]
        if any(n.startswith(self.files.unit + "@") for n in names):
            self._want("staged")

    def _on_results(self) -> None:
        for result in self.mailbox.results():
            if isinstance(result, Checked):
                # Checked and recorded; haproxy reloads it now, the peers get it meanwhile.
                self._set_current(result.version, fresh=True)
            elif isinstance(result, LocalOutcome):
                self._local_done(result)
            elif isinstance(result, StagedOutcome):
                self._staged_asked = None
                for refused in result.refused:
                    self._say(said.refused(refused))
                if result.local is not None:
                    self._local_done(result.local)
                if result.received is None:
                    self._staged_deferred = True
                else:
                    self._staged_done(result)
            elif isinstance(result, PeerView):
                self._peer_changed(result)
            else:  # None: nothing was staged after all
                self._staged_asked = None
        self.changed()

    def _local_done(self, out: LocalOutcome) -> None:
        self.local = JobView(result=out.result, message=out.message, at=time.time())
        self._say(said.local(out, self.live, said.then(self.cfg)))
        # A failed reload after an early hand-over gives back a version of its own (apply).
        self._set_current(out.version, fresh=out.result in ("applied", "reload-failed"))
        if self._staged_deferred and out.result != "superseded":
            self._staged_deferred = False
            self._want("staged")

    def _staged_done(self, out: StagedOutcome) -> None:
        rec = out.received
        assert rec is not None
        origin = rec.version.origin if rec.version else "?"
        self.received = ReceivedView(
            result=rec.result,
            message=rec.message,
            origin=origin,
            version=said.version_view(rec.version),
            at=time.time(),
        )
        for line in said.staged(out, self.live, self._undelivered(self.current)):
            self._say(line)
        self._set_current(rec.current)

    def _say(self, line: said.Said) -> None:
        log.log(line.level, "%s", line.text)
        if line.alert is not None:
            self.alert(line.alert, line.alert_text or line.text)

    def _undelivered(self, version: Version | None) -> bool:
        """``version`` is this node's own and some peer does not hold it yet."""
        if version is None or version.origin != self.node:
            return False
        return any(
            link.view().state is not PeerState.IN_SYNC or link.view().target != version
            for link in self.links.values()
        )

    def _set_current(self, version: Version | None, fresh: bool = False) -> None:
        if version is None or version == self.current:
            return
        self.current = version
        if self.gate is not None:
            # The newest replaces the held one, whichever node it came from.
            log.debug("held version %s dropped: replaced", self.gate.version.digest[:12])
            self.gate = None
        if version.origin == self.node and self.cfg.sync.push_after == "healthy":
            self.gate = canary.hold(version, fresh, self.clock(), time.time())
            return
        self._hand_over(version, fresh)

    def _hand_over(self, version: Version, fresh: bool) -> None:
        # Every node delivers what it holds, whatever its origin: a node that lost its state, or
        # one holding a version its origin no longer has, is brought in line by whoever holds
        # the winner. Loop-free: a node's current version only moves up the rule's order, so a
        # push either moves the peer up or changes nothing there. A received version is only
        # pushed where the peer's status shows it lacks it (the origin has usually delivered
        # it already): ``fresh`` is for this node's own new edits.
        for link in self.links.values():
            link.set_target(version, self.ledger.content_path(version), fresh)

    def probe_done(self, probe: ProbeResult) -> None:
        """One of the agent's health probes of haproxy finished: the canary counts it."""
        gate, health = self.gate, self.cfg.haproxy.health
        if gate is None or health is None:
            return
        self.gate, step = canary.judge(gate, probe, health.rise, health.fall)
        if step is Step.HEALTHY:
            self.gate = None
            self._hand_over(gate.version, gate.fresh)
        line = said.canary_step(step, self.live, gate, probe, health.rise, self.clock())
        if line is not None:
            self._say(line)

    def probe_wanted(self) -> float | None:
        """When the canary wants the agent's next probe started (None: at its usual time)."""
        return canary.probe_wanted(self.gate) if self.gate is not None else None

    def _peer_changed(self, view: PeerView) -> None:
        if view.peer_counter is not None:
            # What the peer holds, in its own status file: this node vouches for it as it is
            # (a node that lost its state learns the group's counters so, at its first look).
            self._peers_seen = vouched_by(self._peers_seen, view.peer_counter)
        said = (view.state, view.message)
        if self._peer_said.get(view.peer) != said:  # not again for a failed retry's count
            self._peer_said[view.peer] = said
            log.info(
                "peer %s: %s%s",
                view.peer,
                view.state.value,
                f" ({view.message})" if view.message else "",
            )
        if view.state is PeerState.REJECTED:
            self.alert("peer_rejected", f"peer {view.peer} refused our config: {view.message}")
        if view.state is not PeerState.UNREACHABLE:
            self._alerted_unreachable.discard(view.peer)

    def check_peers(self) -> None:
        """At each rescan: pick up a staged version whose inotify event was lost (queue
        overflow, a replaced directory), clean staging of litter, write the receivers' limits
        again if they are gone, and alert once for a peer unreachable too long."""
        asked = self._staged_asked
        if self._staged_waiting() and (asked is None or self.clock() > asked + RESCAN_ASK_AGAIN):
            self._want("staged")
        self.sweeper.sweep(time.time())
        if not self._receivers_told or not self._receivers_doc.exists():
            self._tell_receivers()  # removed by hand, or staging replaced: written again
        for name, link in self.links.items():
            view = link.view()
            if (
                view.state is PeerState.UNREACHABLE
                and time.monotonic() - view.since_mono >= UNREACHABLE_ALERT
                and name not in self._alerted_unreachable
            ):
                self._alerted_unreachable.add(name)
                self.alert(
                    "peer_sync_failing",
                    f"peer {name} unreachable since {time.ctime(view.since)}: {view.message}",
                )

    def _ask_peers(self) -> int:
        """From the sync job's thread (``Context.ask_peers``): what the peers hold now, read
        from their status files one after the other; a peer found unreachable by its link is
        not asked (it would hold the job for the transport's timeout)."""
        held = [
            link.held_now(self.files.unit)
            for link in self.links.values()
            if link.view().state is not PeerState.UNREACHABLE
        ]
        return max((c for c in held if c is not None), default=0)

    def _staged_waiting(self) -> bool:
        try:
            return any(n.startswith(self.files.unit + "@") for n in os.listdir(self.staging))
        except OSError:
            return False

    def check_now_flag(self, state_dir: Path) -> None:
        flag = state_dir / SYNC_NOW_FLAG
        if flag.exists():
            flag.unlink(missing_ok=True)
            log.info("sync requested (lbwatch sync --now)")
            self._want("now")

    def snapshot(self) -> SyncView:
        health = self.cfg.haproxy.health
        held = canary.status(self.gate, health.rise) if self.gate and health else None
        return said.snapshot(
            self.files,
            self.staging,
            self.current,
            said.Outcomes(self.local, self.received, held),
            {name: link.view() for name, link in self.links.items()},
        )

    def close(self) -> None:
        for link in self.links.values():
            link.stop()
        for fd in (self.watcher.fileno(), self._inbox.fileno(), self.mailbox.fileno()):
            self._sel.remove(fd)
        self.watcher.close()
        self._inbox.close()
        self.mailbox.close()
        for peer in self.cfg.sync.peers:
            self.transport.close(Peer(peer.name, peer.host, peer.port, peer.user))


def built_from(cfg: Config) -> tuple[object, ...]:
    """What config sync is built from: its own section, where its state lives, how it finds and
    reloads haproxy (and probes it, for the canary). A change to any of it on SIGHUP rebuilds
    the sync service."""
    ha = cfg.haproxy
    return (
        cfg.sync,
        cfg.staging_path(),
        cfg.agent.state_dir,
        (ha.pidfile, ha.process_name, ha.unit, ha.reload, ha.find_without_pidfile),
        ha.health if cfg.sync.push_after == "healthy" else None,  # the canary's rise and fall
    )


def sync_off(action: Action) -> ActionResult:
    """A sync job queued before a reload switched config sync off."""
    return ActionResult(action, Outcome.OK, "config sync is off; nothing done", 0.0)
