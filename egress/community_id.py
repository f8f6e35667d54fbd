"""Community ID v1 (corelight/community-id-spec): a flow id other tools compute too.

SHA-1 over seed (2 bytes) . saddr . daddr . proto (1) . 0 (1) . sport (2) .
dport (2), all in network byte order, with the endpoints ordered so both
directions of a flow give the same id; ``"1:"`` and base64 (or hex) of the
digest. TCP, UDP and SCTP hash their ports; ICMP and ICMPv6 hash type and
code mapped the way Zeek maps them, so that a request and its reply (echo,
timestamp, neighbour solicitation, ...) share an id and other messages keep
their direction; every other protocol hashes the addresses and the protocol
only. Computed once per flow.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP6 = 58
PROTO_SCTP = 132

PORT_PROTOS = frozenset({PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP})
"""Protocols hashed with ports (type and code for the ICMPs); the rest without."""

# Zeek's ICMP counterparts (ICMP4_counterpart / ICMP6_counterpart): a type in
# these tables is two-way, its "destination port" is the counterpart type and
# the code is ignored; any other type is one-way and keeps its code.
ICMP4_COUNTERPART = {
    8: 0, 0: 8,        # echo request, echo reply
    13: 14, 14: 13,    # timestamp, timestamp reply
    15: 16, 16: 15,    # information request, reply
    10: 9, 9: 10,      # router solicitation, advertisement
    17: 18, 18: 17,    # address mask request, reply
}
ICMP6_COUNTERPART = {
    128: 129, 129: 128,  # echo request, echo reply
    130: 131, 131: 130,  # multicast listener query, report
    133: 134, 134: 133,  # router solicitation, advertisement
    135: 136, 136: 135,  # neighbour solicitation, advertisement
    139: 140, 140: 139,  # node information query, reply (who-are-you)
    144: 145, 145: 144,  # home agent address discovery request, reply
}

_SEED = struct.Struct("!H")
_PROTO_PAD = struct.Struct("!BB")
_PORTS = struct.Struct("!HH")
_PREFIX = "1:"


def icmp_ports(proto: int, icmp_type: int, icmp_code: int) -> tuple[int, int, bool]:
    """ICMP type and code as (sport, dport, one_way), as the spec maps them."""
    table = ICMP4_COUNTERPART if proto == PROTO_ICMP else ICMP6_COUNTERPART
    counterpart = table.get(icmp_type)
    if counterpart is None:
        return icmp_type, icmp_code, True
    return icmp_type, counterpart, False


def community_id_packed(proto: int, saddr: bytes, daddr: bytes, sport: int | None,
                        dport: int | None, seed: int = 0, b64: bool = True) -> str:
    """Community ID from packed addresses (4 or 16 bytes each, as decoded from packets).

    For ICMP (1) and ICMPv6 (58) ``sport`` and ``dport`` are the type and code.
    Raises ValueError for addresses of different families or sizes, a missing
    or out-of-range port of a port protocol, or a seed outside 0..65535.
    """
    if len(saddr) != len(daddr) or len(saddr) not in (4, 16):
        raise ValueError("community id: addresses must both be IPv4 or both IPv6")
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"community id: seed {seed} not in 0..65535")
    if not 0 <= proto <= 0xFF:
        raise ValueError(f"community id: protocol {proto} not in 0..255")
    if proto in PORT_PROTOS:
        if sport is None or dport is None:
            raise ValueError(f"community id: protocol {proto} needs both ports")
        if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
            raise ValueError("community id: port not in 0..65535")
        one_way = False
        if proto == PROTO_ICMP or proto == PROTO_ICMP6:
            sport, dport, one_way = icmp_ports(proto, sport, dport)
        if not one_way and (saddr > daddr or (saddr == daddr and sport > dport)):
            saddr, daddr, sport, dport = daddr, saddr, dport, sport
        tail = _PORTS.pack(sport, dport)
    else:
        # The spec hashes other protocols without ports, whatever was passed.
        if saddr > daddr:
            saddr, daddr = daddr, saddr
        tail = b""
    digest = hashlib.sha1(_SEED.pack(seed) + saddr + daddr + _PROTO_PAD.pack(proto, 0)
                          + tail).digest()
    if b64:
        return _PREFIX + base64.b64encode(digest).decode("ascii")
    return _PREFIX + digest.hex()


def community_id(proto: int, saddr: str, daddr: str, sport: int | None, dport: int | None,
                 seed: int = 0, b64: bool = True) -> str:
    """Community ID of a flow given by address text (IPv4 or IPv6, any spelling)."""
    try:
        src = ipaddress.ip_address(saddr).packed
        dst = ipaddress.ip_address(daddr).packed
    except ValueError:
        raise ValueError(f"community id: not an address: {saddr!r} or {daddr!r}") from None
    return community_id_packed(proto, src, dst, sport, dport, seed=seed, b64=b64)
