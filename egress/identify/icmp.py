"""The shape of ICMP and ICMPv6 echo payloads, for telling ping from a tunnel.

Ping tools fill the echo data with fixed patterns, and the peer's kernel
echoes it back unchanged (RFC 792, RFC 4443 §4.2). Tunnels (icmptunnel,
hans, ptunnel, icmpsh) carry varied, often encrypted, data, sometimes whole
IP packets, and the far end answers with data of its own. The known patterns:

- Linux iputils: byte i of the data is ``i & 0xff``, the first bytes
  overwritten by a ``struct timeval`` (16 bytes on 64-bit, 8 on 32-bit), so
  the default 56 bytes are a timestamp then 0x10, 0x11, ... 0x37.
- FreeBSD, macOS (and other BSDs): an 8-byte ``struct tv32`` timestamp, then
  byte i is ``i`` again: 0x08, 0x09, ...
- Windows: ``abcdefghijklmnopqrstuvw`` repeated (32 bytes by default:
  ``abcdefghijklmnopqrstuvwabcdefghi``).
- busybox: a 4-byte timestamp, then one fill byte (0 by default); fping,
  hping, nmap: zeros or nothing; ``ping -p``: a pattern of up to 16 bytes
  repeated. All are "a short prefix, then a short period".

``echo_shape`` is pure: payload bytes in, numbers out.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field

OUT = "out"
"""From the initiator: the echo requests of a task that pings."""
IN = "in"
"""From the responder: the echo replies."""

PREFIX_MAX = 16
"""Longest timestamp (or other header) a ping tool puts before its pattern."""
PATTERN_MIN = 8
"""Bytes of pattern needed after the prefix to recognise one."""
PERIOD_MAX = 16
"""Longest repeated pattern (iputils ``-p`` takes up to 16 bytes)."""
IP_SCAN = 32
"""How deep into a payload we look for an embedded IP header (tunnels put a
few bytes of their own first: hans 5)."""

SMALL_PAYLOAD = 64
"""Unknown payloads up to this size may still be ping (other tools, timestamps)."""
LOW_ENTROPY = 4.0
"""Bits per byte below which a small unknown payload counts as ping-like: 16
random bytes reach about 3.7, 32 about 4.4, 64 about 5.0; timestamps and fills
stay lower."""

_WINDOWS = b"abcdefghijklmnopqrstuvw"


@dataclass(frozen=True, kw_only=True)
class EchoShape:
    packets: int = 0
    """Echo payloads looked at (both directions)."""
    requests: int = 0
    """Payloads from the initiator."""
    replies: int = 0
    """Payloads from the responder."""
    bytes_out: int = 0
    """Payload bytes from the initiator."""
    bytes_in: int = 0
    """Payload bytes from the responder."""
    max_payload: int = 0
    """The largest payload, in bytes."""
    mean_entropy: float = 0.0
    """Mean Shannon entropy of the non-empty payloads, in bits per byte (0 to 8)."""
    standard: int = 0
    """Payloads with a known ping pattern (empty ones included)."""
    nonstandard: int = 0
    """Payloads without one."""
    max_nonstandard: int = 0
    """The largest payload without a known pattern."""
    nonstandard_entropy: float = 0.0
    """Mean entropy of the payloads without a known pattern, bits per byte."""
    patterns: frozenset[str] = field(default_factory=frozenset)
    """The patterns seen: empty, incrementing (iputils, BSD), windows, repeating."""
    embeds_ip: bool = False
    """Some payload carries an IPv4 header (checksum valid) or a whole IPv6 packet."""
    unechoed_replies: int = 0
    """Replies whose payload equals no request's payload (a kernel echoes it verbatim)."""


def echo_shape(payloads: list[tuple[str, bytes]]) -> EchoShape:
    """The shape of a flow's echo payloads, given as (``"out"`` or ``"in"``, data).

    Entries with another direction, or not of that shape, are ignored.
    """
    requests: set[bytes] = set()
    replies: list[bytes] = []
    counts = {OUT: 0, IN: 0}
    sizes = {OUT: 0, IN: 0}
    max_payload = standard = nonstandard = max_nonstandard = 0
    entropies: list[float] = []
    odd_entropies: list[float] = []
    patterns: set[str] = set()
    embeds_ip = False
    for entry in payloads:
        direction, data = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
        if direction not in (OUT, IN) or not isinstance(data, (bytes, bytearray)):
            continue
        data = bytes(data)
        counts[direction] += 1
        sizes[direction] += len(data)
        (requests.add if direction == OUT else replies.append)(data)
        max_payload = max(max_payload, len(data))
        h = entropy(data)
        if data:
            entropies.append(h)
        pattern = ping_pattern(data)
        if pattern:
            standard += 1
            patterns.add(pattern)
        else:
            nonstandard += 1
            max_nonstandard = max(max_nonstandard, len(data))
            odd_entropies.append(h)
        embeds_ip = embeds_ip or embedded_ip(data)
    return EchoShape(
        packets=counts[OUT] + counts[IN], requests=counts[OUT], replies=counts[IN],
        bytes_out=sizes[OUT], bytes_in=sizes[IN], max_payload=max_payload,
        mean_entropy=_mean(entropies), standard=standard, nonstandard=nonstandard,
        max_nonstandard=max_nonstandard, nonstandard_entropy=_mean(odd_entropies),
        patterns=frozenset(patterns), embeds_ip=embeds_ip,
        unechoed_replies=sum(1 for r in replies if r not in requests))


def ping_shaped(shape: EchoShape) -> bool:
    """Whether the echo traffic looks like ping rather than a tunnel.

    - No payload may carry an IP packet: that is a tunnel by construction.
    - Every reply must echo a request's payload: kernels answer echo requests
      by copying the data, only a tunnel's far end writes its own.
    - Payloads must have a known ping pattern, except small ones (at most
      ``SMALL_PAYLOAD`` bytes) of low entropy (under ``LOW_ENTROPY`` bits per
      byte): other tools' timestamps and fills, but not encrypted data of any
      size worth tunnelling.
    """
    if shape.embeds_ip or shape.unechoed_replies:
        return False
    if shape.nonstandard == 0:
        return True
    return shape.max_nonstandard <= SMALL_PAYLOAD and shape.nonstandard_entropy < LOW_ENTROPY


def entropy(data: bytes) -> float:
    """Shannon entropy of the byte values, bits per byte; 0.0 for no data."""
    n = len(data)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values()) + 0.0


def ping_pattern(data: bytes) -> str | None:
    """The name of the known ping pattern ``data`` has, or None."""
    if not data:
        return "empty"
    if data == (_WINDOWS * (len(data) // len(_WINDOWS) + 1))[:len(data)]:
        return "windows"
    if _incrementing(data):
        return "incrementing"
    if _repeating(data):
        return "repeating"
    return None


def _incrementing(data: bytes) -> bool:
    """Byte i is ``i & 0xff`` from some offset at most PREFIX_MAX, for PATTERN_MIN bytes or more."""
    n = len(data)
    start = n
    while start > 0 and data[start - 1] == (start - 1) & 0xFF:
        start -= 1
    return start <= PREFIX_MAX and n - start >= PATTERN_MIN


def _repeating(data: bytes) -> bool:
    """After a prefix of 0, 4, 8 or 16 bytes (the timestamps tools use), a period of at
    most PERIOD_MAX bytes repeats, seen at least twice."""
    n = len(data)
    # Cheap rejection: in a periodic tail the last byte recurs one period earlier.
    if n < PATTERN_MIN or data[-1] not in data[-PERIOD_MAX - 1:-1]:
        return False
    for period in range(1, PERIOD_MAX + 1):
        # A tail periodic from a shorter prefix is periodic from a longer one too,
        # so only the longest prefix that leaves enough tail needs a look.
        need = max(PATTERN_MIN, 2 * period)
        for prefix in (16, 8, 4, 0):
            if n - prefix >= need:
                if data[prefix + period:] == data[prefix:n - period]:
                    return True
                break
        else:
            return False
    return False


def embedded_ip(data: bytes) -> bool:
    """Whether an IPv4 header (valid checksum, length fits) or a whole IPv6 packet
    (filling the rest of the payload) starts within the first IP_SCAN bytes of ``data``."""
    n = len(data)
    for at in range(0, min(IP_SCAN, n - 20) + 1):
        version = data[at] >> 4
        if version == 4 and _ipv4_at(data, at):
            return True
        if version == 6 and _ipv6_at(data, at):
            return True
    return False


# Next headers a tunnelled IPv6 packet starts with: hop-by-hop, TCP, UDP, IPv6,
# routing, fragment, GRE, ESP, AH, ICMPv6, destination options, SCTP.
_IPV6_NEXT = frozenset({0, 6, 17, 41, 43, 44, 47, 50, 51, 58, 60, 132})


def _ipv6_at(data: bytes, at: int) -> bool:
    # No checksum to check: the packet must fill the rest exactly, carry at
    # least an 8-byte header, and have a plausible next header and hop limit.
    if len(data) - at < 48:
        return False
    payload_length, next_header, hop_limit = struct.unpack_from(">HBB", data, at + 4)
    return (payload_length >= 8 and 40 + payload_length == len(data) - at
            and next_header in _IPV6_NEXT and hop_limit > 0)


def _ipv4_at(data: bytes, at: int) -> bool:
    ihl = (data[at] & 0x0F) * 4
    if ihl < 20 or len(data) - at < ihl:
        return False
    (total_length,) = struct.unpack_from(">H", data, at + 2)
    if not ihl <= total_length <= len(data) - at:
        return False
    return _checksum(data[at:at + ihl]) == 0


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
