"""haproxy config sync between nodes: watch (inotify, debounce), and, to come, validate, push to
peers, receive and apply. Only the watcher exists so far."""
