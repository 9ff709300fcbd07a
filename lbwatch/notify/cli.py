"""``lbwatch notify``: keepalived's notify-script target and the channel test.

As a notify script it must return at once and never lose the event: it writes one line to the
agent's FIFO when the agent runs (a single write below PIPE_BUF is atomic), and otherwise routes
and spools the messages itself, for the agent's senders to deliver when it starts.
"""

from __future__ import annotations

import os
import sys
import time

from lbwatch.agentlock import agent_running
from lbwatch.config import Config
from lbwatch.notify import rules
from lbwatch.notify.channels import DeliveryError, build_channels
from lbwatch.notify.fifo import write_line
from lbwatch.notify.grammar import script_text
from lbwatch.notify.message import test as test_message
from lbwatch.notify.parse import Malformed, VrrpEvent, parse_line, printable
from lbwatch.notify.spool import Spool

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def notify_event(cfg: Config, words: list[str]) -> int:
    text = script_text(words)
    if text is None:
        print(
            "usage: lbwatch notify TYPE NAME STATE [PRIORITY]   (as keepalived passes them)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # An argument that was not UTF-8 comes as surrogate escapes: its bytes, as the FIFO would
    # carry them, for the parser to refuse the same way.
    parsed = parse_line(text.encode("utf-8", "surrogateescape"))
    if not isinstance(parsed, VrrpEvent):
        why = parsed.why if isinstance(parsed, Malformed) else "not a VRRP event"
        said = printable(" ".join(words).encode("utf-8", "surrogateescape"), 500)
        print(f"lbwatch notify: {why}: {said}", file=sys.stderr)
        return EXIT_USAGE
    spool = Spool(cfg.spool_path(), cfg.notify.spool_max)
    # Decided and done under the lock an agent's start reads the spool under: see
    # Spool.scripts_lock.
    with spool.scripts_lock():
        if agent_running(cfg.agent.run_dir) and write_line(cfg.fifo_path(), parsed.line()):
            return EXIT_OK
        # No agent to read it: route and spool here; the agent's senders deliver at start-up.
        node = cfg.agent.node_name or os.uname().nodename
        routed = rules.route(rules.RouterState(), parsed, time.monotonic(), time.time(), node, cfg)
        for out in routed.out:
            for channel in out.channels:
                spool.put(channel, out.notification)
    return EXIT_OK


def notify_test(cfg: Config) -> int:
    channels = build_channels(cfg.notify)
    if not channels:
        print(
            "no notification channels configured ([notify.email] or [[notify.webhooks]])",
            file=sys.stderr,
        )
        return EXIT_FAILED
    node = cfg.agent.node_name or os.uname().nodename
    failed = 0
    for name, channel in channels.items():
        started = time.monotonic()
        try:
            receipt = channel.send(test_message(node, name, time.time()))
        except DeliveryError as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}")
        else:
            print(f"{name}: ok: {receipt} ({time.monotonic() - started:.2f} s)")
        finally:
            channel.idle()
    return EXIT_FAILED if failed else EXIT_OK


def retry_rejected(cfg: Config) -> int:
    """`lbwatch notify --retry-rejected`: the messages set aside as refused go back in the
    queue, in their order; a running agent's senders pick them up."""
    spool = Spool(cfg.spool_path(), cfg.notify.spool_max)
    moved = spool.requeue_rejected()
    print(f"{moved} message(s) back in the queue" if moved else "no rejected messages")
    return EXIT_OK
