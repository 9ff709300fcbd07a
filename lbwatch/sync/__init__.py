"""haproxy config sync between nodes.

So far: ``watch`` (inotify on the config directories, debounce, content hashes), ``install``
(validation with haproxy -c, atomic install with backups, restore) and ``transport`` (rsync over
ssh with a persistent connection, to a peer's staging directory behind an rrsync-restricted
key). To come: the peer's apply, the convergence rule, per-peer state and the agent wiring.
"""
