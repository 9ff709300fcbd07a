"""Notifications: keepalived's notify FIFO in, routed and spooled messages out (email, webhooks).

Modules, in the order data flows: ``parse`` (FIFO lines -> frozen events), ``fifo`` (the FIFO
itself), ``rules`` (pure routing, flap digests, duplicate suppression), ``message`` (subjects and
bodies), ``spool`` (durable queue on disk), ``channels`` (SMTP, webhooks), ``sender`` (delivery
thread with backoff).
"""
