"""Command line: ``main(argv) -> exit code``. The only place that installs log handlers.

Exit codes: 0 fine; 1 the agent failed at run time; 2 bad usage or configuration; 3 the agent is
not running (``status``, as in LSB's status convention).

Imported light: keepalived runs ``lbwatch notify`` on every VRRP transition, and ``main`` first
tries the hand-off (``lbwatch.notify.handoff``), which must not wait for pydantic, the config
model or argparse. Everything else is imported by the functions that use it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from lbwatch.notify.handoff import handoff

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from lbwatch.config import Config
    from lbwatch.status import StatusRead

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3


def _drain_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dr = sub.add_parser(
        "drain",
        help="move this node's VRRP instances to the peers, keepalived and haproxy running",
        description="Lower the priority of the instances (all, or those named) through "
        "keepalived's track files so that a peer takes their VIPs over; kept across restarts "
        "and reboots until `lbwatch undrain`. Refused (exit 1, one line why) when no peer can "
        "be shown able to take one over.",
    )
    dr.add_argument("instances", nargs="*", metavar="INSTANCE", help="default: every instance")
    dr.add_argument("--wait", action="store_true", help="wait until the peers hold the VIPs")
    dr.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits (30)")
    dr.add_argument("--force", action="store_true", help="drain even when it looks unsafe")
    dr.add_argument("--reason", default="", help="recorded with the drain, shown by status")
    un = sub.add_parser("undrain", help="end the drain: the instances' priorities as configured")
    un.add_argument("--wait", action="store_true", help="(accepted; undrain waits for the agent)")


def _parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    from lbwatch import __version__
    from lbwatch.config import DEFAULT_PATH

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
    dr = sub.add_parser(
        "doctor",
        help="check this node's setup end to end (keepalived, haproxy, systemd, sync, notify)",
        description="One line per finding with its fix; exit 1 when any is an error. Asks each "
        "sync peer over ssh and each notification channel's server (nothing is sent).",
    )
    dr.add_argument("--json", action="store_true", help="the findings as a JSON list")
    st = sub.add_parser("status", help="what the running agent sees now")
    st.add_argument("--json", action="store_true", help="print the raw status document")
    st.add_argument(
        "--cluster",
        action="store_true",
        help="one table for the group: this node and its peers as the agent last heard them",
    )
    pa = sub.add_parser("pause", help="maintenance pause: keep observing, take no action")
    pa.add_argument("--reason", default="", help="recorded with the pause, shown by status")
    pa.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the agent")
    re = sub.add_parser("resume", help="end the maintenance pause")
    re.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the agent")
    _drain_parsers(sub)
    no = sub.add_parser(
        "notify",
        help="keepalived notify-script target: TYPE NAME STATE [PRIORITY]; --test to try channels",
        description="Hand a VRRP event to the running agent through its FIFO and return at once; "
        "with no agent running, spool the resulting messages so they are sent when it starts. "
        'In keepalived.conf: notify "/usr/bin/lbwatch notify" (/usr/local/bin after pip install)',
    )
    no.add_argument("--test", action="store_true", help="send a test message via every channel")
    no.add_argument(
        "--retry-rejected",
        action="store_true",
        help="put the messages a server refused for good (spool/rejected/) back in the queue",
    )
    no.add_argument("event", nargs="*", metavar="TYPE NAME STATE [PRIORITY]")
    sy = sub.add_parser(
        "sync",
        help="config sync: --status prints per-peer state, --now pushes the current config",
        description="Exit 0 when the live config is fine (not invalid, refused at reload, "
        "deleted or missing) and every peer holds the current version, whichever node made "
        "it (each node delivers what it holds and reads each peer's status back). Exit 1 "
        "otherwise, 3 when the agent is not running.",
    )
    how = sy.add_mutually_exclusive_group()
    how.add_argument("--status", action="store_true", help="print per-peer state")
    how.add_argument("--now", action="store_true", help="check, reload and push the live file")
    sy.add_argument(
        "setup",
        nargs="?",
        choices=["setup"],
        help="setup [PEER...]: create the sync key, trust each peer's host key, print (or "
        "--install) its restricted authorized_keys entry, then check it works",
    )
    sy.add_argument("peers", nargs="*", metavar="PEER", help="peers to set up (default: all)")
    sy.add_argument("--install", action="store_true", help="setup: install the entry over ssh")
    sy.add_argument("--accept", action="store_true", help="setup: trust the host keys shown")
    sy.add_argument("--identity", type=Path, help="setup --install: your own ssh login key")
    sy.add_argument(
        "--authorized-keys",
        default="~/.ssh/authorized_keys",
        help="setup --install: the file on the peer (default ~/.ssh/authorized_keys)",
    )
    sy.add_argument(
        "--program", default="lbwatch", help="setup: the lbwatch command as sshd finds it there"
    )
    sy.add_argument("--staging", type=Path, help="setup: the peer's staging (default: ours)")
    sy.add_argument("--wait", type=float, default=30.0, help="seconds --now waits for peers")
    sy.add_argument(
        "--json",
        action="store_true",
        help='one JSON document instead: {"ok", "exit", "problems", "peers", "node", "sync"}, '
        "same exit code",
    )
    rc = sub.add_parser(
        "receive",
        help="the sync key's forced command on this node (run by sshd, never by hand)",
        description="Take the config versions a peer's lbwatch pushes over ssh into STAGING, "
        "and give back the status file; nothing else. In the peer's sync key's entry in "
        'authorized_keys: restrict,command="lbwatch receive --peer lb1 /var/lib/lbwatch/incoming" '
        "... (--peer: whose key it is, for its limit of sessions at once)",
    )
    rc.add_argument("--peer", metavar="NAME", help="the peer whose sync key the line is for")
    rc.add_argument("staging", metavar="STAGING")
    for sp in sub.choices.values():
        # Also accept --config after the verb: `lbwatch status --config F`.
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _load(path: Path) -> Config | None:
    from lbwatch.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _quick(words: list[str]) -> int | None:
    """The calls that must not wait for argparse, pydantic or the config: keepalived's notify
    (handed to the running agent) and sshd's start of the receiver for each sync connection."""
    if handoff(words) == "delivered":
        return EXIT_OK
    if words[:1] == ["receive"] and _receiver_words(words[1:]):
        from lbwatch.sync import sink

        return sink.main(words[1:])
    return None


def _receiver_words(words: list[str]) -> bool:
    """``STAGING`` or ``--peer NAME STAGING``: the forced command's, as sync setup writes it."""
    if len(words) == 3 and words[0] == "--peer":
        words = words[2:]
    return len(words) == 1 and not words[0].startswith("-")


def main(argv: list[str] | None = None) -> int:
    quick = _quick(sys.argv[1:] if argv is None else argv)
    if quick is not None:
        return quick
    args = _parser().parse_args(argv)
    if args.verb == "receive":
        from lbwatch.sync import sink

        return sink.main([*(["--peer", args.peer] if args.peer else []), args.staging])
    if args.verb in ("status", "pause", "resume"):
        return _operate(args)
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    if args.verb == "check-config":
        print(f"{args.config}: OK")
        return EXIT_OK
    if args.verb == "run":
        return _run(cfg, args.config)
    if args.verb in ("drain", "undrain"):
        from lbwatch import draincli

        return draincli.main(cfg, args)
    return _verbs(args, cfg)


def _verbs(args: argparse.Namespace, cfg: Config) -> int:
    """The verbs that need a valid config and are not the agent itself."""
    if args.verb == "notify":
        from lbwatch.notify.cli import notify_event, notify_test, retry_rejected

        if args.test:
            return notify_test(cfg)
        if args.retry_rejected:
            return retry_rejected(cfg)
        return notify_event(cfg, args.event)
    if args.verb == "sync" and args.setup:
        from lbwatch.sync import setup

        return setup.main(
            cfg,
            setup.Options(
                tuple(args.peers),
                args.install,
                args.accept,
                args.identity,
                args.authorized_keys,
                args.program,
                args.staging,
            ),
        )
    if args.verb == "sync":
        from lbwatch.sync.cli import sync_now, sync_status

        if args.now:
            return sync_now(cfg, args.wait, as_json=args.json)
        if args.status:
            return sync_status(cfg, as_json=args.json)
        print("lbwatch sync: give --status, --now or setup", file=sys.stderr)
        return EXIT_CONFIG
    if args.verb == "doctor":
        from lbwatch.doctor import run

        return run.main(cfg, as_json=args.json)
    raise AssertionError(args.verb)


def _run(cfg: Config, path: Path) -> int:
    # Imported here so that `lbwatch status` stays light.
    import logging

    from lbwatch.daemon import Agent, AlreadyRunning
    from lbwatch.systemd import own_cgroup_hazards, setup_logging

    setup_logging(cfg.agent.log_level)
    # Exit 2 like any config error: the unit's RestartPreventExitStatus=2 keeps systemd from
    # restarting into the same refusal.
    hazards = own_cgroup_hazards(cfg, str(path))
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


def _operate(args: argparse.Namespace) -> int:
    """status, pause and resume: they need only the agent's run and state directories, so they
    keep working while the file on disk is broken and the agent runs on its last good config."""
    from lbwatch.config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        return _operate_on_running_agent(args, exc.problems)
    if args.verb == "status":
        return _status(cfg.agent.run_dir, as_json=args.json, cluster=args.cluster)
    return _pause(cfg.agent.run_dir, cfg.agent.state_dir, args)


def _operate_on_running_agent(args: argparse.Namespace, problems: list[str]) -> int:
    """Without a valid config: the run dir the file still names (or the default), and the state
    dir the agent running there publishes in its status. No running agent: the config problems,
    exit 2, as for every other verb."""
    from pathlib import Path

    from lbwatch.config import run_dir_hint
    from lbwatch.status import read_status

    run_dir = run_dir_hint(args.config)
    read = read_status(run_dir)
    published = read.data.agent.state_dir if read.data else ""
    state_dir = Path(published) if published else None
    if read.agent_running and args.verb == "status":
        _warn_config_ignored(problems, run_dir)
        return _status(run_dir, as_json=args.json, cluster=args.cluster)
    if read.agent_running and state_dir is not None:
        _warn_config_ignored(problems, run_dir)
        return _pause(run_dir, state_dir, args)
    for line in problems:
        print(line, file=sys.stderr)
    return EXIT_CONFIG


def _warn_config_ignored(problems: list[str], run_dir: Path) -> None:
    more = f" (+{len(problems) - 1} more, see check-config)" if len(problems) > 1 else ""
    print(
        f"warning: {problems[0]}{more}; using the running agent's own settings ({run_dir})",
        file=sys.stderr,
    )


def _status(run_dir: Path, as_json: bool, cluster: bool = False) -> int:
    import json
    import time

    from lbwatch.status import read_status
    from lbwatch.status_text import format_status
    from lbwatch.statusdoc import StatusReport

    read = read_status(run_dir)
    if cluster:
        return _cluster(read, as_json)
    if as_json:
        report = StatusReport(
            agent_running=read.agent_running, problem=read.problem or None, status=read.data
        )
        shown = report.model_dump(mode="json", by_alias=True)
        print(json.dumps(shown, indent=1, sort_keys=True))
        return EXIT_OK if read.agent_running else EXIT_NOT_RUNNING
    if not read.agent_running:
        print(read.problem, file=sys.stderr)
        return EXIT_NOT_RUNNING
    assert read.data is not None
    print(format_status(read.data, time.time()))
    return EXIT_OK


def _cluster(read: StatusRead, as_json: bool) -> int:
    import time

    from lbwatch.cluster.table import format_cluster, report

    if not read.agent_running or read.data is None:
        print(read.problem, file=sys.stderr)
        return EXIT_NOT_RUNNING
    rep = report(read.data)
    if as_json:
        print(rep.model_dump_json(by_alias=True, indent=1))
    else:
        print(format_cluster(rep, time.time()))
    return EXIT_OK


def _pause(run_dir: Path, state_dir: Path, args: argparse.Namespace) -> int:
    """pause or resume: write or remove the flag, then wait for the agent to confirm it."""
    import time

    from lbwatch.status import read_status, set_paused

    paused = args.verb == "pause"
    word = "paused" if paused else "resumed"
    wait: float = args.wait
    try:
        set_paused(state_dir, paused, getattr(args, "reason", ""))
    except OSError as exc:
        print(
            f"cannot {'set' if paused else 'clear'} the pause flag under "
            f"{state_dir}: {exc.strerror}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    deadline = time.monotonic() + wait
    while True:
        read = read_status(run_dir)
        if not read.agent_running:
            print(f"{word}; the agent is not running and will honour this when it starts")
            return EXIT_OK
        if read.data and read.data.paused == paused:
            print(
                f"{word}: lbwatch on {read.data.agent.node} "
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
