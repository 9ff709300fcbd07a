"""haproxy config sync between nodes.

``watch`` turns inotify events into settled content changes; ``apply`` runs the jobs (a local
edit: check, reload and confirm, record; versions peers staged here: judge, check, install,
reload; the start-up reconcile) on one worker thread; ``peers`` delivers this node's own
versions to each peer over ``transport`` and reads back what the peer did; ``versions`` holds
the convergence rule; ``service`` is what the agent's loop drives; ``cli`` is `lbwatch sync`.
"""
