"""Defaults that ``lbwatch notify``'s hand-off to the running agent (``lbwatch.notify.handoff``)
needs without loading the config model: defined here once, imported by ``config`` too.

Plain strings: the hand-off runs in a fresh process on every VRRP transition, where importing
pathlib alone costs several milliseconds; ``config`` wraps them in ``Path``.
"""

from __future__ import annotations

CONFIG_PATH = "/etc/lbwatch/lbwatch.toml"
RUN_DIR = "/run/lbwatch"  # [agent] run_dir
# [notify] fifo. Directly under /run, not in agent.run_dir: after a reboot keepalived usually
# starts before lbwatch, opens its notify_fifo only at its own start, and could not create the
# FIFO in a /run/lbwatch that does not exist yet.
NOTIFY_FIFO = "/run/keepalived-lbwatch.fifo"
