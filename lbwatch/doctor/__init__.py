"""``lbwatch doctor``: this node's setup checked end to end, one finding per line with its fix."""
