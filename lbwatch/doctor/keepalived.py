"""keepalived.conf as keepalived reads it: its own test (``katest``), then what it accepts
but a pair of nodes gets wrong. The rules are pure functions of ``kaconf``'s reading; ``check``
is the glue that reads the files and resolves the sync peers' names.

Rules (each a finding with its fix):
- two instances with one ``virtual_router_id`` on one interface (and address family: VRRP for
  IPv4 and IPv6 are separate protocols, RFC 5798 5.2.3) fight over one virtual router: error;
- a priority whose skew time exceeds 50 ms: warning (``skew``, ``fast_priority``; VRRPv2's
  skew is (256 - priority) / 256 s, VRRPv3's that x advert_int);
- ``auth_pass`` longer than 8 characters: keepalived keeps 8, so peers whose passwords differ
  only after that agree, and a password edited past 8 characters changes nothing: warning;
- ``state MASTER`` with ``nopreempt``: keepalived ignores nopreempt then (it clears it unless
  the state is BACKUP; keepalived 2.2 vrrp.c), so the node preempts anyway: warning;
- ``unicast_peer`` addresses that are not the sync peers lbwatch knows ([sync] peers): a
  missing peer never hears this node's advertisements, an extra address gets them: warning;
- an instance that does not track lbwatch's track file (``trackfile``: ``track_file`` ...
  ``weight 1``): ``lbwatch drain`` cannot move it without stopping keepalived: warning, with
  the lines to add.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path

from lbwatch import kaconf, trackfile
from lbwatch.config import Config
from lbwatch.doctor import katest
from lbwatch.doctor.checks import Finding, Where, error, ok, warn
from lbwatch.heartbeat import vip_address
from lbwatch.vrrpview import PASS_LEN

AREA = "keepalived"
SKEW_LIMIT = Fraction(1, 20)  # 50 ms
OWNER = kaconf.OWNER


def check(cfg: Config, where: Where) -> Iterator[Finding]:
    """keepalived's own test of the file it would read, then the rules on what it accepts."""
    path = where.keepalived_conf
    try:
        ka: kaconf.Keepalived | None = kaconf.read(path, where.config_id)
    except kaconf.ConfError:
        ka = None  # checks.keepalived says why; keepalived's own word on it still counts
    single = ka is not None and len(ka.files) == 1
    yield from katest.findings(katest.run(path, where.config_id), path, single)
    if ka is None:
        return
    peers = {p.name: _addresses(p.host) for p in cfg.sync.peers}
    yield from rules(ka, peers, cfg.keepalived.track_dir)


def _addresses(host: str) -> frozenset[str]:
    """``host``'s addresses (itself when it is one); empty when it does not resolve."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        return frozenset(str(a[4][0]) for a in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def rules(
    ka: kaconf.Keepalived, peers: Mapping[str, frozenset[str]], track_dir: Path | None = None
) -> Iterator[Finding]:
    """The findings of every rule on ``ka``; ``peers``: each sync peer's addresses;
    ``track_dir``: lbwatch's track files (None: not checked)."""
    yield from vrids(ka)
    for inst in ka.instances:
        yield from _skew(inst)
        if track_dir is not None:
            yield from _lever(ka, inst, track_dir)
        if inst.auth_pass is not None and len(inst.auth_pass) > PASS_LEN:
            yield warn(
                AREA,
                f"{inst.name} ({inst.where}): auth_pass is {len(inst.auth_pass)} characters, "
                "keepalived uses the first 8: peers whose passwords differ after that agree, "
                "and a change past the 8th character changes nothing",
                "use a password of at most 8 characters, the same on every node",
            )
        if (inst.state or "").upper() == "MASTER" and inst.nopreempt:
            yield warn(
                AREA,
                f"{inst.name} ({inst.where}): nopreempt with `state MASTER`: keepalived ignores "
                "nopreempt unless the state is BACKUP, so this node takes the VIP back",
                "set `state BACKUP` (nopreempt then keeps a MASTER that took over)",
            )
        if inst.unicast_peers and peers:
            yield from _unicast(inst, peers)


def _lever(ka: kaconf.Keepalived, inst: kaconf.Instance, track_dir: Path) -> Iterator[Finding]:
    problem = trackfile.lever(ka, inst.name, track_dir)
    if not problem:
        yield ok(AREA, f"{inst.name}: tracks lbwatch's file {track_dir / inst.name} (drain)")
        return
    yield warn(
        AREA,
        f"{inst.name} ({inst.where}): {problem}: `lbwatch drain` cannot move it without "
        "stopping keepalived",
        "add to keepalived.conf (the track_file block at the top level, the reference in the "
        "instance), then reload keepalived:\n" + trackfile.block(track_dir, inst.name),
    )


def _family(inst: kaconf.Instance) -> int:
    first = vip_address(inst.vips[0]) if inst.vips else ""
    return 6 if ":" in first else 4


def vrids(ka: kaconf.Keepalived) -> Iterator[Finding]:
    """Instances sharing interface, address family and virtual_router_id (unicast ones only
    when they share a peer): they take each other's advertisements as their own. keepalived
    2.2.7 says so itself only when the interface exists as it reads the file (vrrp.c
    ``check_vrid_conflicts``; exit 5, an error keepalived still runs with)."""
    seen: dict[tuple[str, int, int], list[kaconf.Instance]] = {}
    for inst in ka.instances:
        if inst.vrid is None:
            continue  # keepalived -t says "the virtual router id must be set"
        key = (inst.interface or "", _family(inst), inst.vrid)
        others = seen.setdefault(key, [])
        others.append(inst)
        clash = [o for o in others[:-1] if _share_peers(o, inst)]
        if clash:
            first = clash[0]
            yield error(
                AREA,
                f"{first.name} ({first.where}) and {inst.name} ({inst.where}) both use "
                f"virtual_router_id {inst.vrid} on {inst.interface or 'the default interface'}: "
                "they fight over one virtual router (each takes the other's advertisements)",
                f"give {inst.name} a virtual_router_id of its own, the same on every node",
            )


def _share_peers(a: kaconf.Instance, b: kaconf.Instance) -> bool:
    """Whether two instances hear each other: both multicast, or unicast to a common peer."""
    if not a.unicast_peers or not b.unicast_peers:
        return not a.unicast_peers and not b.unicast_peers
    return bool({_normal(x) for x in a.unicast_peers} & {_normal(x) for x in b.unicast_peers})


def advert(inst: kaconf.Instance) -> Fraction:
    """advert_int as keepalived reads it (default 1 s), exact: 0.1 is a tenth, not 0.1000...01."""
    return Fraction(str(inst.advert_int)) if inst.advert_int is not None else Fraction(1)


def version(inst: kaconf.Instance) -> int:
    """The VRRP version keepalived runs ``inst`` with: its own ``version``, else global_defs'
    ``vrrp_version`` (kaconf folds that in), else keepalived's default, 2."""
    return inst.version or 2


def skew(prio: int, advert_int: Fraction, vrrp_version: int) -> Fraction:
    """VRRP's skew time in seconds: how long after the master's priority-0 advertisement a
    backup takes over (keepalived sets its master-down timer to it). VRRPv2 (RFC 3768 6.1):
    (256 - priority) / 256 s, whatever advert_int; VRRPv3 (RFC 5798 6.1): (256 - priority)
    x Master_Adver_Interval / 256. keepalived's VRRP_TIMER_SKEW does the same (v2: TIMER_HZ,
    v3: master_adver_int). The two agree at advert_int 1."""
    interval = advert_int if vrrp_version == 3 else Fraction(1)
    return Fraction(256 - prio, 256) * interval


def fast_priority(advert_int: Fraction, vrrp_version: int) -> int | None:
    """The smallest priority whose skew is at most 50 ms (VRRPv2: always 244); None when even
    254 (255 is the address owner's) is slower."""
    interval = advert_int if vrrp_version == 3 else Fraction(1)
    needed = math.ceil(256 - SKEW_LIMIT * 256 / interval)
    return max(needed, 1) if needed <= OWNER - 1 else None


def _skew(inst: kaconf.Instance) -> Iterator[Finding]:
    """Every instance: in an active-active pair each node backs up some instance, and which
    one changes with every failover."""
    prio, adv, ver = kaconf.priority(inst), advert(inst), version(inst)
    late = skew(prio, adv, ver)
    if prio >= OWNER or late <= SKEW_LIMIT:
        return
    fix = fast_priority(adv, ver)
    said = f"{float(late):.3f} s"
    at = f"advert_int {float(adv):g} s" if ver == 3 else "any advert_int"
    yield warn(
        AREA,
        f"{inst.name} ({inst.where}): priority {prio} (VRRPv{ver}, {at}): skew {said}: after "
        f"a priority-0 advertisement this node takes over {said} later",
        f"priority {fix} or above gives <= 0.05 s (keep the nodes' order: e.g. 254 and 253)"
        if fix is not None
        else f"no priority gives <= 0.05 s at advert_int {float(adv):g} s: lower advert_int",
    )


def _unicast(inst: kaconf.Instance, peers: Mapping[str, frozenset[str]]) -> Iterator[Finding]:
    listed = {_normal(a) for a in inst.unicast_peers}
    known = {a for addrs in peers.values() for a in addrs}
    unknown = sorted(n for n, addrs in peers.items() if not addrs)
    missing = sorted(
        f"{n} ({', '.join(sorted(a))})" for n, a in peers.items() if a and not a & listed
    )
    extra = sorted(listed - known)
    if unknown:
        yield warn(
            AREA,
            f"{inst.name}: unicast_peer not compared with {', '.join(unknown)}: the host does "
            "not resolve",
            "name the sync peers by address in [sync] peers, or make their names resolve",
        )
    if missing or extra:
        parts = ([f"misses {', '.join(missing)}"] if missing else []) + (
            [f"lists {', '.join(extra)}, none of lbwatch's sync peers"] if extra else []
        )
        yield warn(
            AREA,
            f"{inst.name} ({inst.where}): unicast_peer {'; '.join(parts)}: a peer left out "
            "never hears this node's advertisements (both become MASTER)",
            "list every sync peer's address in unicast_peer (and only theirs); if VRRP runs on "
            "other addresses than sync, this warning is about that",
        )


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
