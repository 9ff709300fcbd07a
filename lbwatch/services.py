"""Carry out actions on services: configured argv commands (default ``systemctl VERB UNIT``), a
direct SIGTERM through a pidfd as the last resort for stopping keepalived, and the question to
systemd about a unit (``unitjob``).

Everything here blocks and runs on a worker thread, never on the event loop. Every command has a
timeout and is killed as a whole process group when it overruns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from lbwatch import sdbus, trackfile, unitjob
from lbwatch.config import Config, ServiceCfg
from lbwatch.events import Action, ActionResult, Outcome, ProcId, Service, UnitPlan, Verb
from lbwatch.procs import identify, open_pidfd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    outcome: Outcome
    detail: str
    duration: float
    output: str = ""  # the end of what the command printed (stdout and stderr, at most 4 KiB)
    # reload_haproxy only: haproxy re-read its config (a new worker or master was seen). OK
    # without it means there was no haproxy to reload.
    reloaded: bool = False
    code: int | None = None  # run_command: the exit status (-N: signal N); None: none came


def _last_line(data: bytes, limit: int = 300) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def run_command(
    argv: list[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    give: Sequence[int] = (),
    keep: int = 4096,
) -> CommandResult:
    """Run ``argv`` without a shell (``env``: its whole environment; None: lbwatch's); its output
    goes to a temporary file, not a pipe, because a daemon it starts may inherit the descriptor
    and hold a pipe open long after it returned. ``give``: descriptors it inherits, at their
    numbers; they are the command's, closed here as soon as it started (or could not).
    ``keep``: how many of the last bytes it printed are kept in ``output``."""
    started = time.monotonic()
    held = list(give)
    try:
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=held,
                    env=env,
                )
            except OSError as exc:
                return CommandResult(
                    Outcome.FAILED,
                    f"cannot run {argv[0]}: {exc.strerror}",
                    time.monotonic() - started,
                )
            _close(held)
            return _wait(proc, out, argv, timeout, started, keep)
    finally:
        _close(held)


def _close(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _wait(
    proc: subprocess.Popen[bytes],
    out: IO[bytes],
    argv: list[str],
    timeout: float,
    started: float,
    keep: int,
) -> CommandResult:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return CommandResult(
            Outcome.TIMEOUT,
            f"{argv[0]} timed out after {timeout:g} s and was killed",
            time.monotonic() - started,
        )
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - keep))
    raw = out.read()
    tail = _last_line(raw)
    output = raw.decode("utf-8", "replace")
    duration = time.monotonic() - started
    if code == 0:
        return CommandResult(Outcome.OK, "exit 0", duration, output, code=0)
    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    detail = f"{how}: {tail}" if tail else how
    return CommandResult(Outcome.FAILED, detail, duration, output, code=code)


def _signalled(target: ProcId, sig: signal.Signals) -> int | None:
    """Send ``sig`` to ``target`` through a pidfd (immune to PID reuse) and return that pidfd,
    for the caller to close; None when the process is already gone. OSError when the signal
    could not be sent."""
    fd = open_pidfd(target)
    if fd is None:
        return None
    try:
        signal.pidfd_send_signal(fd, sig)
    except BaseException:
        os.close(fd)
        raise
    return fd


def terminate(target: ProcId, timeout: float) -> CommandResult:
    """SIGTERM ``target`` and wait for it to exit."""
    started = time.monotonic()
    try:
        fd = _signalled(target, signal.SIGTERM)
    except OSError as exc:
        return CommandResult(Outcome.FAILED, f"SIGTERM {target}: {exc.strerror}", 0.0)
    if fd is None:
        return CommandResult(Outcome.OK, f"{target} already gone", time.monotonic() - started)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return CommandResult(
            Outcome.TIMEOUT, f"{target} still running {timeout:g} s after SIGTERM", timeout
        )
    return CommandResult(Outcome.OK, f"{target} exited after SIGTERM", time.monotonic() - started)


Asked = tuple[sdbus.Connection, dict[str, int]]  # the question written, answers not yet read


def _stopped_anyway(target: ProcId, res: CommandResult) -> CommandResult:
    """A stop command that failed after ``begin``'s SIGTERM had already ended ``target``: the
    stop is done (a `start-stop-daemon --stop` without --oknodo, a `kill $(cat pidfile)` or a
    pkill find nothing left to stop, and say so with an error)."""
    fd = open_pidfd(target)
    if fd is not None:
        os.close(fd)
        return res  # still running: the failure stands
    return CommandResult(
        Outcome.OK,
        f"{target} had exited on lbwatch's SIGTERM; the stop command: {res.detail}",
        res.duration,
    )


def ask_send(unit: str, bus: str, timeout: float) -> Asked:
    """``ask_unit``'s question to systemd written now; the connection to read the answer on. A
    Unix socket's connect and a write of a few hundred bytes do not wait for systemd: this may
    run on the event loop."""
    conn = sdbus.Connection.open(bus, timeout)
    try:
        return conn, sdbus.ask_properties(conn, unit, unitjob.PROPERTIES)
    except BaseException:
        conn.close()
        raise


def ask_unit(
    unit: str, dead: ProcId, timeout: float, bus: str = sdbus.PRIVATE, asked: Asked | None = None
) -> tuple[CommandResult, UnitPlan]:
    """What systemd is doing with ``unit`` now that its main process ``dead`` is gone: the
    unit's state, then its job's type if it has one; both within ``timeout``. Asked over
    systemd's private socket ``bus`` (about 1 ms; ``asked``: already sent by ``ask_send``), or
    with `systemctl show` (10-30 ms) where that cannot be reached."""
    started = time.monotonic()
    deadline = started + timeout
    try:
        conn, serials = asked if asked is not None else ask_send(unit, bus, timeout)
        with conn:
            props = sdbus.read_properties(conn, serials, deadline)
            view, job_path = unitjob.read_bus(props, time.monotonic_ns() // 1000)
            job_type = sdbus.job_type(conn, job_path, deadline) if job_path else None
        how = ""
    except TimeoutError:
        return CommandResult(Outcome.TIMEOUT, f"systemd did not answer within {timeout:g} s",
                             time.monotonic() - started), UnitPlan.UNKNOWN  # fmt: skip
    except (OSError, sdbus.BusError) as exc:
        res, shown, job_type = _ask_systemctl(unit, deadline)
        if shown is None:
            return res, UnitPlan.UNKNOWN
        view = shown
        how = f" (by systemctl: {bus}: {getattr(exc, 'strerror', None) or exc})"
    plan = unitjob.classify(view, job_type, dead.pid)
    detail = unitjob.describe(view, job_type) + how
    return CommandResult(Outcome.OK, detail, time.monotonic() - started), plan


def _ask_systemctl(
    unit: str, deadline: float
) -> tuple[CommandResult, unitjob.UnitView | None, str | None]:
    """The same question with `systemctl show`: the unit, then its job's type."""
    res = run_command(unitjob.unit_query(unit), max(0.1, deadline - time.monotonic()))
    if res.outcome is not Outcome.OK:
        return res, None, None
    view = unitjob.read_unit(res.output, time.monotonic_ns() // 1000)
    job_type = None
    if view.job:
        job = run_command(unitjob.job_query(view.job), max(0.1, deadline - time.monotonic()))
        # A job that finished meanwhile is no longer there to ask (exit 1): no type.
        job_type = unitjob.read_job_type(job.output) if job.outcome is Outcome.OK else None
    return res, view, job_type


def reload_haproxy(cfg: ServiceCfg, timeout: float, confirm: float) -> CommandResult:
    """Reload haproxy and confirm the reload took: a new worker under the same master (or a new
    master). The reload command alone proves nothing: ``systemctl reload`` and a USR2 return
    before haproxy re-reads its config, and a master that fails to load the new config keeps
    its old workers (haproxy 2.x master-worker "wait mode") while the command says success.

    No haproxy running: there is nothing to reload, the new file takes effect at its next
    start; that counts as done, with ``reloaded`` False and the detail saying so.
    """
    started = time.monotonic()
    before = identify(cfg)
    if before.main is None:
        return CommandResult(Outcome.OK, "haproxy not running, takes effect at its next start", 0.0)
    res = run_command(cfg.command("reload"), timeout)
    if res.outcome is not Outcome.OK:
        return res
    deadline = time.monotonic() + confirm
    # haproxy 2.6's master ignores a USR2 that lands while it is still settling from its start
    # or its previous reload (seen right around "Loading success"): with no new worker halfway
    # through the wait, the reload is asked once more. A config that cannot load fails both.
    again_at: float | None = time.monotonic() + confirm / 2
    while True:
        now = identify(cfg, before.child_ids)
        if now.main is not None and not now.main.same_process(before.main):
            return CommandResult(
                Outcome.OK,
                f"haproxy restarted as {now.main.pid}",
                time.monotonic() - started,
                reloaded=True,
            )
        new = now.children - before.children
        if now.main is not None and new:
            workers = ", ".join(str(p) for p in sorted(new))
            return CommandResult(
                Outcome.OK, f"new worker(s) {workers}", time.monotonic() - started, reloaded=True
            )
        if time.monotonic() >= deadline:
            return CommandResult(
                Outcome.FAILED,
                f"reload not confirmed: no new haproxy worker within {confirm:g} s",
                time.monotonic() - started,
            )
        if again_at is not None and time.monotonic() >= again_at:
            again_at = None
            log.debug("no new haproxy worker yet; asking for the reload once more")
            run_command(cfg.command("reload"), timeout)
        time.sleep(0.02)


def with_reload(done: str, res: CommandResult) -> str:
    """What a step that ended in a successful ``reload_haproxy`` did, in words that claim a
    reload only when there was one: "installed and reloaded (new worker(s) 7)", or "installed;
    haproxy not running, takes effect at its next start"."""
    return f"{done} and reloaded ({res.detail})" if res.reloaded else f"{done}; {res.detail}"


class Controller(Protocol):
    """Carries out one action: ``begin`` on the event loop as it is issued, never blocking, then
    ``execute`` off the loop, which blocks and says how it went."""

    def begin(self, action: Action) -> None: ...

    def execute(self, action: Action) -> ActionResult: ...


class CommandController:
    """The real controller: argv commands from the config."""

    def __init__(self, cfg: Config, bus: str = sdbus.PRIVATE) -> None:
        self.cfg = cfg
        self.bus = bus  # systemd's private socket, for an ASK
        self._asked: dict[int, Asked] = {}  # an ASK's question sent by ``begin``, by its seq

    def _svc(self, service: Service) -> ServiceCfg:
        return self.cfg.haproxy if service is Service.HAPROXY else self.cfg.keepalived

    def begin(self, action: Action) -> None:
        """A STOP's target gets SIGTERM now (``Action.target`` says why); an ASK's question goes
        to systemd now, its answer read by ``execute`` (a worker thread started, and the loop's
        logging, would delay it by milliseconds). A process already gone, a signal refused or a
        socket that cannot be reached is only logged: ``execute`` follows either way."""
        if action.verb is Verb.ASK:
            try:
                self._asked[action.seq] = ask_send(self._svc(action.service).unit, self.bus, 0.1)
            except (OSError, sdbus.BusError) as exc:
                log.debug("asking systemd at once failed (%s); asked again off the loop", exc)
            return
        if action.verb is not Verb.STOP or action.target is None:
            return
        try:
            fd = _signalled(action.target, signal.SIGTERM)
        except ProcessLookupError:
            return  # it exited between the pidfd and the signal
        except OSError as exc:
            log.warning("SIGTERM to %s failed (%s); the stop command follows", action.target,
                        exc.strerror)  # fmt: skip
            return
        if fd is not None:
            os.close(fd)
            log.debug("SIGTERM sent to %s; the stop command follows", action.target)

    def execute(self, action: Action) -> ActionResult:
        svc = self._svc(action.service)
        if action.verb is Verb.ASK:
            assert action.target is not None
            asked = self._asked.pop(action.seq, None)
            res, plan = ask_unit(svc.unit, action.target, unitjob.ASK_TIMEOUT, self.bus, asked)
            return ActionResult(action, res.outcome, res.detail, res.duration, plan=plan)
        if action.verb is Verb.TRACK:
            return write_track(action, self.cfg.keepalived.track_dir)
        if action.verb is Verb.ANNOUNCE:
            return announce(action)
        if action.verb is Verb.TERMINATE:
            assert action.target is not None
            res = terminate(action.target, svc.command_timeout)
        else:
            res = run_command(svc.command(action.verb.value), svc.command_timeout)
        if action.verb is Verb.STOP and res.outcome is not Outcome.OK and action.target:
            res = _stopped_anyway(action.target, res)
        return ActionResult(action, res.outcome, res.detail, res.duration)


def announce(action: Action) -> ActionResult:
    """An ANNOUNCE: gratuitous ARP for the VIPs (``garp``, imported when first needed: a
    split brain's end is rare, the agent's memory is not)."""
    from lbwatch import garp

    started = time.monotonic()
    try:
        sent = garp.announce(action.announce)
    except OSError as exc:
        detail = f"cannot send gratuitous ARP: {exc.strerror or exc}"
        return ActionResult(action, Outcome.FAILED, detail, time.monotonic() - started)
    return ActionResult(action, Outcome.OK, "; ".join(sent), time.monotonic() - started)


def write_track(action: Action, track_dir: Path) -> ActionResult:
    """A TRACK: each instance's value into its track file (``trackfile``); keepalived reads it.
    One file that cannot be written does not keep the others from being written."""
    started = time.monotonic()
    written, failed = [], []
    for instance, value in action.track:
        try:
            trackfile.write(track_dir, instance, value)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            failed.append(f"{instance}: {why}")
        else:
            written.append(f"{instance}={value}")
    took = time.monotonic() - started
    if failed:
        detail = f"cannot write the track file under {track_dir}: {'; '.join(failed)}"
        if written:
            detail += f" (written: {', '.join(written)})"
        return ActionResult(action, Outcome.FAILED, detail, took)
    return ActionResult(action, Outcome.OK, f"written: {', '.join(written)}", took)
