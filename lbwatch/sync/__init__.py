"""haproxy config sync between nodes.

Built so far, each tested on its own: ``watch`` (inotify on the config directories, debounce,
content hashes), ``install`` (validation with haproxy -c, atomic install with backups,
restore), ``transport`` (rsync over ssh with a persistent connection, into a peer's staging
directory behind an rrsync-restricted key), ``versions`` (the convergence rule) and ``receive``
(the peer's judge, validate, install, reload or restore, and status.json). Not yet: the agent
wiring (observers and executors in the loop), per-peer state with retries, `lbwatch sync`, the
lab end to end and the benchmark.
"""
