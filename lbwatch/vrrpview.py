"""What a node tells its peers of keepalived.conf (``VrrpSettings`` per instance, in its node
view): built here, pure, from ``kaconf``'s reading; the agent publishes it and ``doctor``
compares it with the peers'.

Trust: the view goes to the peers over the sync key and sits in ``status.json`` (mode 0644)
on each node, so anything in it is readable by any local user of either node. The VRRP
password is never in it; ``auth_check`` says what stands for it.
"""

from __future__ import annotations

import hashlib
import hmac

from lbwatch import kaconf
from lbwatch.heartbeat import vip_address
from lbwatch.statusdoc import AuthView, TrackView, VrrpSettings

# keepalived keeps the first 8 bytes of auth_pass (VRRPv2's authentication data field, RFC
# 2338 5.3.11; keepalived 2.2 vrrp_parser.c says "Truncating auth_pass to 8 characters").
PASS_LEN = 8


AUTH_MESSAGE = b"lbwatch vrrp auth"


def auth_check(password: str) -> str:
    """Two hex digits that tell two nodes' passwords apart (255 times in 256) without saying
    them: the first byte of HMAC-SHA256 keyed with the password as keepalived uses it, over a
    constant message.

    Why 8 bits are fine to publish, where a full digest of a password of at most 8 characters
    would not be: a full digest is an offline oracle, and any local user reading status.json
    could try every candidate against it. One byte matches 1 candidate in 256, so it confirms
    no guess and narrows a search by 8 bits only; what it must do, tell a mismatch, it does
    with 99.6 % certainty. (With auth_type PASS the password also crosses the segment in
    clear in every advertisement; with AH every advertisement is an HMAC keyed with it.)

    The message is the same for every instance, so one password gives one byte however many
    instances use it: k instances sharing a password must not publish k independent bytes
    (k x 8 bits of that oracle). The cost: equal checks show which instances (probably) share
    a password. That is acceptable: it says nothing of the password itself, and sharing one
    across instances is what most configurations do anyway."""
    key = password.encode()[:PASS_LEN]
    return hmac.new(key, AUTH_MESSAGE, hashlib.sha256).hexdigest()[:2]


def settings(ka: kaconf.Keepalived) -> dict[str, VrrpSettings]:
    """Each instance's settings as peers must agree on them."""
    return {
        i.name: VrrpSettings(
            state=i.state,
            priority=kaconf.priority(i),  # as keepalived runs it: unset is 100 or 255
            advert_int=i.advert_int,
            version=i.version,
            vrid=i.vrid,
            interface=i.interface,
            vips=sorted({vip_address(v) for v in i.vips}),
            auth=AuthView(
                type=i.auth_type,
                check=auth_check(i.auth_pass) if i.auth_pass is not None else None,
            ),
            tracks=[TrackView(kind=t.kind, name=t.name, weight=t.weight) for t in i.tracks],
        )
        for i in ka.instances
    }
