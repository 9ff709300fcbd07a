"""Command line: ``main(argv) -> exit code``. The only place that installs log handlers.

Exit codes: 0 fine; 1 the agent failed at run time; 2 bad usage or configuration; 3 the agent is
not running (``status``, as in LSB's status convention).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from lbwatch import __version__
from lbwatch.config import DEFAULT_PATH, Config, ConfigError, load
from lbwatch.status import read_status, set_paused
from lbwatch.sync.cli import sync_lines
from lbwatch.systemd import cgroup_hazards, setup_logging, started_by_systemd

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lbwatch",
        description="Keep keepalived and HAProxy on this node healthy and in step.",
    )
    p.add_argument("--version", action="version", version=f"lbwatch {__version__}")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_PATH, help=f"config file (default {DEFAULT_PATH})"
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    sub.add_parser("run", help="run the agent in the foreground (what the systemd unit does)")
    sub.add_parser("check-config", help="validate the config file; exit 2 on problems")
    st = sub.add_parser("status", help="what the running agent sees now")
    st.add_argument("--json", action="store_true", help="print the raw status document")
    pa = sub.add_parser("pause", help="maintenance pause: keep observing, take no action")
    pa.add_argument("--reason", default="", help="recorded with the pause, shown by status")
    pa.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the agent")
    re = sub.add_parser("resume", help="end the maintenance pause")
    re.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the agent")
    no = sub.add_parser(
        "notify",
        help="keepalived notify-script target: TYPE NAME STATE [PRIORITY]; --test to try channels",
        description="Hand a VRRP event to the running agent through its FIFO and return at once; "
        "with no agent running, spool the resulting messages so they are sent when it starts. "
        'In keepalived.conf: notify "/usr/local/bin/lbwatch notify"',
    )
    no.add_argument("--test", action="store_true", help="send a test message via every channel")
    no.add_argument("event", nargs="*", metavar="TYPE NAME STATE [PRIORITY]")
    sy = sub.add_parser(
        "sync",
        help="config sync: --status prints per-peer state, --now pushes the current config",
        description="Exit 0 when every peer holds this node's version, 1 otherwise, "
        "3 when the agent is not running.",
    )
    how = sy.add_mutually_exclusive_group(required=True)
    how.add_argument("--status", action="store_true", help="print per-peer state")
    how.add_argument("--now", action="store_true", help="check, reload and push the live file")
    sy.add_argument("--wait", type=float, default=30.0, help="seconds --now waits for peers")
    for sp in sub.choices.values():
        # Also accept --config after the verb: `lbwatch status --config F`.
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _load(path: Path) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    if args.verb == "check-config":
        print(f"{args.config}: OK")
        return EXIT_OK
    if args.verb == "run":
        return _run(cfg, args.config)
    if args.verb == "status":
        return _status(cfg, as_json=args.json)
    if args.verb in ("pause", "resume"):
        return _pause(cfg, args.verb == "pause", getattr(args, "reason", ""), args.wait)
    if args.verb == "notify":
        from lbwatch.notify.cli import notify_event, notify_test

        if args.test:
            return notify_test(cfg)
        return notify_event(cfg, args.event)
    if args.verb == "sync":
        from lbwatch.sync.cli import sync_now, sync_status

        return sync_now(cfg, args.wait) if args.now else sync_status(cfg)
    raise AssertionError(args.verb)


def _run(cfg: Config, path: Path) -> int:
    # Imported here so that `lbwatch status` stays light.
    from lbwatch.daemon import Agent, AlreadyRunning

    setup_logging(cfg.agent.log_level)
    # Exit 2 like any config error: the unit's RestartPreventExitStatus=2 keeps systemd from
    # restarting into the same refusal.
    hazards = cgroup_hazards(
        cfg, started_by_systemd(os.environ, os.getpid(), os.getppid()), str(path)
    )
    for line in hazards:
        logging.getLogger("lbwatch").error("%s", line)
    if hazards:
        return EXIT_CONFIG
    try:
        return Agent(cfg, path).run()
    except AlreadyRunning as exc:
        logging.getLogger("lbwatch").error("%s; not starting a second agent", exc)
        return EXIT_FAILED
    except OSError as exc:
        logging.getLogger("lbwatch").error("cannot run: %s", exc)
        return EXIT_FAILED


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _service_line(svc: dict[str, Any], now_wall: float) -> str:
    if svc["running"]:
        text = f"running   pid {svc['pid']}, up {_age(now_wall - svc['started'])}"
        if svc["children"]:
            text += f", children {','.join(map(str, svc['children']))}"
    else:
        text = f"DOWN      {svc['down_reason']}"
    extras = [
        f"{svc['in_progress']} in progress" if svc["in_progress"] else "",
        "GIVEN UP after repeated failures" if svc["given_up"] else "",
        f"next start attempt in {svc['next_attempt_in']:.0f} s"
        if svc["next_attempt_in"] is not None
        else "",
        f"{svc['attempts']} recent start attempt(s)" if svc["attempts"] else "",
        f"last failure: {svc['last_failure']}" if svc["last_failure"] else "",
    ]
    return "; ".join([text, *(e for e in extras if e)])


def _notify_lines(notify: dict[str, Any]) -> list[str]:
    lines = []
    if notify.get("fifo_error"):
        lines.append(f"  {'notify':<11} FIFO UNUSABLE: {notify['fifo_error']}")
    elif notify.get("fifo"):
        bad = notify.get("malformed_lines") or 0
        lines.append(
            f"  {'notify':<11} reading {notify['fifo']}"
            + (f"; {bad} malformed line(s) ignored" if bad else "")
        )
    for name, ch in (notify.get("channels") or {}).items():
        text = f"{ch['delivered']} sent, {ch['waiting']} waiting"
        if ch["dropped"]:
            text += f", {ch['dropped']} DROPPED (spool full)"
        if ch.get("rejected"):
            text += f", {ch['rejected']} REFUSED by the server (kept in spool/rejected)"
        if ch["failures_in_a_row"]:
            text += (
                f"; FAILING x{ch['failures_in_a_row']}: {ch['last_error']}; "
                f"retry in {ch['retry_in']:.0f} s"
            )
        lines.append(f"  {'  ' + name:<11} {text}")
    return lines


def format_status(data: dict[str, Any], now_wall: float) -> str:
    agent = data["agent"]
    lines = [
        f"lbwatch {agent['version']} on {agent['node']} (pid {agent['pid']}, up "
        f"{_age(now_wall - agent['create_time'])}): {data['summary']}"
    ]
    for name, svc in data["services"].items():
        lines.append(f"  {name:<11} {_service_line(svc, now_wall)}")
    health = data["health"]
    if health["url"]:
        lines.append(f"  {'health':<11} {health['state']} ({health['detail'] or 'not probed yet'})")
    pause = data.get("pause") or {}
    if data["paused"]:
        since = time.strftime("%H:%M:%S", time.localtime(pause.get("since", 0)))
        why = f": {pause['reason']}" if pause.get("reason") else ""
        lines.append(f"  {'paused':<11} YES since {since}{why}")
    else:
        lines.append(f"  {'paused':<11} no")
    for inst, vips in data.get("vrrp", {}).items():
        held = ", ".join(vips["held"]) or "none"
        lines.append(f"  {'vrrp':<11} {inst}: holds {held} of {', '.join(vips['vips'])}")
    lines += _notify_lines(data.get("notify") or {})
    lines += sync_lines(data.get("sync"))
    if data["recent_actions"]:
        lines.append("recent actions:")
    for act in data["recent_actions"][-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(act["at"]))
        took = f" {act['duration']:.2f}s" if "duration" in act else ""
        lines.append(f"  {when} {act['action']}: {act['outcome']}{took} - {act['reason']}")
        if act["outcome"] not in ("ok", "in progress"):
            lines.append(f"           {act.get('detail', '')}")
    return "\n".join(lines)


def _status(cfg: Config, as_json: bool) -> int:
    read = read_status(cfg.agent.run_dir)
    if as_json:
        print(
            json.dumps(
                {
                    "agent_running": read.agent_running,
                    "problem": read.problem or None,
                    "status": read.data,
                },
                indent=1,
                sort_keys=True,
            )
        )
        return EXIT_OK if read.agent_running else EXIT_NOT_RUNNING
    if not read.agent_running:
        print(read.problem, file=sys.stderr)
        return EXIT_NOT_RUNNING
    assert read.data is not None
    print(format_status(read.data, time.time()))
    return EXIT_OK


def _pause(cfg: Config, paused: bool, reason: str, wait: float) -> int:
    word = "paused" if paused else "resumed"
    try:
        set_paused(cfg.agent.state_dir, paused, reason)
    except OSError as exc:
        print(
            f"cannot {'set' if paused else 'clear'} the pause flag under "
            f"{cfg.agent.state_dir}: {exc.strerror}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    deadline = time.monotonic() + wait
    while True:
        read = read_status(cfg.agent.run_dir)
        if not read.agent_running:
            print(f"{word}; the agent is not running and will honour this when it starts")
            return EXIT_OK
        if read.data and read.data.get("paused") == paused:
            print(
                f"{word}: lbwatch on {read.data['agent']['node']} "
                + ("observes only and takes no action" if paused else "acts again")
            )
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(
                f"flag written, but the agent has not confirmed within {wait:g} s", file=sys.stderr
            )
            return EXIT_FAILED
        time.sleep(0.05)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
