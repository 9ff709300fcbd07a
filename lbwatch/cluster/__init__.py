"""The group of nodes as one: each agent's view of its node (``nodeview``), written where the
peers read it over the sync key; the watch that keeps each peer's view current (``watch``);
split-brain decisions on them (``splitbrain``); and the service the agent drives (``service``).
"""
