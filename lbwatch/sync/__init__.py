"""haproxy config sync between nodes.

So far: ``watch`` (inotify on the config directories, debounce, content hashes) and ``install``
(validation with haproxy -c, atomic install with backups, restore). To come: the push to peers
over rsync/ssh into a staging directory, the peer's apply, and the agent wiring.
"""
