"""Decoding: link layer to transport, tolerant of anything malformed.

Link types are declared as data in ``LINK_DECODERS``: the whole decode graph
reads at once. ``Decoder.decode`` is called once per packet and returns a
flat tuple (no objects past the decoder) or None, counting the reason.

Returned tuple: ``(ipver, src, dst, proto, sport, dport, flags, seq, iplen,
buf, poff, plen)``: addresses as packed bytes; for TCP, UDP and SCTP the ports,
for ICMP and ICMPv6 ``sport`` is the type, ``dport`` the code and ``seq``
the echo identifier (-1 when not an echo); ``iplen`` is the IP datagram's
length (what conntrack counts); the transport payload is
``buf[poff:poff+plen]`` (fewer bytes than sent when the snap length cut it).
"""

from __future__ import annotations

import struct
from collections import Counter

_H = struct.Struct("!H").unpack_from
_HH = struct.Struct("!HH").unpack_from
_IPV4 = struct.Struct("!BxHHHxBxx4s4s").unpack_from  # vhl, total, id, frag, proto, src, dst
_TCP = struct.Struct("!HHIIH").unpack_from
_I_LE = struct.Struct("<I").unpack_from
_I_BE = struct.Struct("!I").unpack_from
_HH_LE = struct.Struct("<HH").unpack_from

TCP, UDP, ICMP, ICMP6, SCTP = 6, 17, 1, 58, 132
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
IPV6_EXT = {0, 43, 60}          # hop-by-hop, routing, destination options
ECHO_TYPES = {ICMP: (8, 0), ICMP6: (128, 129)}

FRAG_TIMEOUT_US = 30_000_000
"""Fragments of a datagram not completed within this are dropped (Linux: 30 s)."""
MAX_FRAGMENT_SETS = 8192
"""Datagrams being reassembled at once; past it the oldest is dropped and counted."""


class Decoder:
    """Per-capture decoding state: fragment reassembly and the counters of what was skipped."""

    def __init__(self):
        self.malformed: Counter = Counter()
        """Packets dropped as malformed, by reason."""
        self.other: Counter = Counter()
        """Packets that are not IP (ARP, LLDP, ...) or of unknown link types, by kind."""
        self._fragments: dict[tuple, list] = {}

    # ------------------------------------------------------------------ link

    def decode(self, linktype: int, ts: int, buf: bytes, off: int, caplen: int):
        end = off + caplen
        if linktype == 1:  # Ethernet
            if caplen < 14:
                self.malformed["short ethernet header"] += 1
                return None
            (ethertype,) = _H(buf, off + 12)
            off += 14
            if ethertype == ETH_IPV4:        # the common case, without a call more
                return self.ipv4(ts, buf, off, end)
            while ethertype in VLAN_TAGS:
                if off + 4 > end:
                    self.malformed["short VLAN tag"] += 1
                    return None
                (ethertype,) = _H(buf, off + 2)
                off += 4
            return self._ether(ethertype, ts, buf, off, end)
        link = LINK_DECODERS.get(linktype)
        if link is None:
            self.other[f"link type {linktype}"] += 1
            return None
        return link(self, ts, buf, off, end)

    def _ether(self, ethertype, ts, buf, off, end):
        if ethertype == ETH_IPV4:
            return self.ipv4(ts, buf, off, end)
        if ethertype == ETH_IPV6:
            return self.ipv6(ts, buf, off, end)
        self.other[f"ethertype 0x{ethertype:04x}"] += 1
        return None

    def _raw(self, ts, buf, off, end):
        if off >= end:
            self.malformed["empty packet"] += 1
            return None
        version = buf[off] >> 4
        if version == 4:
            return self.ipv4(ts, buf, off, end)
        if version == 6:
            return self.ipv6(ts, buf, off, end)
        self.malformed[f"IP version {version}"] += 1
        return None

    def _sll(self, ts, buf, off, end):       # Linux cooked v1: protocol at 14
        if end - off < 16:
            self.malformed["short cooked header"] += 1
            return None
        return self._ether(_H(buf, off + 14)[0], ts, buf, off + 16, end)

    def _sll2(self, ts, buf, off, end):      # Linux cooked v2: protocol at 0
        if end - off < 20:
            self.malformed["short cooked header"] += 1
            return None
        return self._ether(_H(buf, off)[0], ts, buf, off + 20, end)

    def _null(self, ts, buf, off, end):      # BSD loopback: family in the writer's byte order
        if end - off < 4:
            self.malformed["short loopback header"] += 1
            return None
        family = _I_LE(buf, off)[0]
        if family > 0xFFFF:
            family = _I_BE(buf, off)[0]
        if family == 2:
            return self.ipv4(ts, buf, off + 4, end)
        if family in (10, 24, 28, 30):     # AF_INET6: Linux, NetBSD/OpenBSD, FreeBSD, macOS
            return self.ipv6(ts, buf, off + 4, end)
        self.other[f"loopback family {family}"] += 1
        return None

    def _loop(self, ts, buf, off, end):      # OpenBSD loopback: network byte order
        if end - off < 4:
            self.malformed["short loopback header"] += 1
            return None
        family = _I_BE(buf, off)[0]
        if family == 2:
            return self.ipv4(ts, buf, off + 4, end)
        if family in (10, 24, 28, 30):
            return self.ipv6(ts, buf, off + 4, end)
        self.other[f"loopback family {family}"] += 1
        return None

    def _nflog(self, ts, buf, off, end):     # NFLOG: TLVs in host order; payload is type 9
        if end - off < 4:
            self.malformed["short NFLOG header"] += 1
            return None
        family = buf[off]
        pos = off + 4
        while pos + 4 <= end:
            length, tlv_type = _HH_LE(buf, pos)
            if length < 4 or pos + length > end:
                break
            if tlv_type == 9:
                if family == 2:
                    return self.ipv4(ts, buf, pos + 4, pos + length)
                if family == 10:
                    return self.ipv6(ts, buf, pos + 4, pos + length)
                self.other[f"NFLOG family {family}"] += 1
                return None
            pos += (length + 3) & ~3
        self.malformed["NFLOG without payload"] += 1
        return None

    # -------------------------------------------------------------------- IP

    def ipv4(self, ts, buf, off, end):
        if end - off < 20:
            self.malformed["short IPv4 header"] += 1
            return None
        vhl, total, ident, frag, proto, src, dst = _IPV4(buf, off)
        ihl = (vhl & 15) * 4
        if vhl >> 4 != 4 or ihl < 20 or off + ihl > end:
            self.malformed["bad IPv4 header"] += 1
            return None
        if total < ihl:
            if total == 0:            # segmentation offload on the capturing host
                total = end - off
            else:
                self.malformed["IPv4 total length below header"] += 1
                return None
        pend = off + total if off + total < end else end
        if frag & 0x3FFF:             # MF set or an offset: a fragment
            return self._fragment(ts, 4, src, dst, proto, ident,
                                  (frag & 0x1FFF) * 8, bool(frag & 0x2000),
                                  buf[off + ihl:pend], total - ihl, ihl)
        return self._transport(4, src, dst, proto, total, buf, off + ihl, pend)

    def ipv6(self, ts, buf, off, end):
        if end - off < 40:
            self.malformed["short IPv6 header"] += 1
            return None
        if buf[off] >> 4 != 6:
            self.malformed["bad IPv6 header"] += 1
            return None
        plen, = _H(buf, off + 4)
        nxt = buf[off + 6]
        src = buf[off + 8:off + 24]
        dst = buf[off + 24:off + 40]
        total = 40 + plen if plen else end - off   # jumbograms and offload: what we have
        pend = min(off + total, end)
        chain = self._ipv6_chain(nxt, buf, off + 40, pend)
        if chain is None:
            return None
        nxt, pos = chain
        if nxt == 44:                                 # fragment header
            if pos + 8 > pend:
                self.malformed["short IPv6 fragment header"] += 1
                return None
            offset_flags, = _H(buf, pos + 2)
            ident, = _I_BE(buf, pos + 4)
            # The unfragmentable part is what precedes the fragment header.
            return self._fragment(ts, 6, src, dst, buf[pos], ident, offset_flags & 0xFFF8,
                                  bool(offset_flags & 1), buf[pos + 8:pend],
                                  off + total - pos - 8, pos - off)
        return self._transport(6, src, dst, nxt, total, buf, pos, pend)

    def _ipv6_chain(self, nxt, buf, pos, pend):
        """Walk IPv6 extension headers to the transport (or a fragment header)."""
        while nxt in IPV6_EXT or nxt == 51:
            if pos + 2 > pend:
                self.malformed["short IPv6 extension header"] += 1
                return None
            if nxt == 51:                             # AH counts 4-byte words
                nxt, pos = buf[pos], pos + (buf[pos + 1] + 2) * 4
            else:
                nxt, pos = buf[pos], pos + (buf[pos + 1] + 1) * 8
            if pos > pend:
                self.malformed["IPv6 extension header beyond packet"] += 1
                return None
        return nxt, pos

    def _fragment(self, ts, ipver, src, dst, proto, ident, offset, more, data, claimed,
                  header_len):
        """Hold a fragment; the reassembled datagram once all of it is here.

        ``claimed`` is the fragment's payload length as its header says (more than
        ``data`` when the snap length cut it): the datagram's length is what was sent.
        """
        key = (src, dst, proto, ident)
        entry = self._fragments.get(key)
        if entry is None:
            if len(self._fragments) >= MAX_FRAGMENT_SETS:
                self._expire(ts, force=True)
            entry = self._fragments[key] = [ts, {}, None]  # first seen, pieces, total
        elif ts - entry[0] > FRAG_TIMEOUT_US:
            self.malformed["fragments timed out"] += 1
            entry = self._fragments[key] = [ts, {}, None]
        pieces = entry[1]
        old = pieces.get(offset)
        if old is not None and old[0] != data:
            self.malformed["overlapping fragments that differ"] += 1
        pieces[offset] = (data, max(claimed, len(data)))
        if not more:
            entry[2] = offset + max(claimed, len(data))
        if entry[2] is None:
            return None
        assembled, expect = [], 0
        for start in sorted(pieces):
            piece, length = pieces[start]
            if start > expect:
                return None       # a hole: wait for the rest
            if start + len(piece) > expect:
                assembled.append(piece[expect - start:])
            expect = max(expect, start + length)
        if expect < entry[2]:
            return None
        del self._fragments[key]
        payload = b"".join(assembled)
        iplen = header_len + entry[2]
        if ipver == 6:
            chain = self._ipv6_chain(proto, payload, 0, len(payload))
            if chain is None:
                return None
            proto, pos = chain
            return self._transport(6, src, dst, proto, iplen, payload, pos, len(payload))
        return self._transport(ipver, src, dst, proto, iplen, payload, 0, len(payload))

    def _expire(self, ts, force=False):
        for key, entry in list(self._fragments.items()):
            if force or ts - entry[0] > FRAG_TIMEOUT_US:
                del self._fragments[key]
                self.malformed["fragments never completed"] += 1
                if force:
                    return

    def finish(self) -> None:
        """The capture ended: count datagrams whose fragments never all came."""
        if self._fragments:
            self.malformed["fragments never completed"] += len(self._fragments)
            self._fragments.clear()

    # ------------------------------------------------------------- transport

    def _transport(self, ipver, src, dst, proto, iplen, buf, pos, pend):
        if proto == TCP:
            if pend - pos < 20:
                self.malformed["short TCP header"] += 1
                return None
            sport, dport, seq, _ack, off_flags = _TCP(buf, pos)
            hlen = (off_flags >> 12) * 4
            if hlen < 20 or pos + hlen > pend:
                self.malformed["bad TCP header length"] += 1
                return None
            return (ipver, src, dst, TCP, sport, dport, off_flags & 0x1FF, seq, iplen,
                    buf, pos + hlen, pend - pos - hlen)
        if proto == UDP:
            if pend - pos < 8:
                self.malformed["short UDP header"] += 1
                return None
            sport, dport = _HH(buf, pos)
            return (ipver, src, dst, UDP, sport, dport, 0, 0, iplen, buf, pos + 8, pend - pos - 8)
        if proto == SCTP:             # ports in the common header, like UDP's
            if pend - pos < 12:
                self.malformed["short SCTP header"] += 1
                return None
            sport, dport = _HH(buf, pos)
            return (ipver, src, dst, SCTP, sport, dport, 0, 0, iplen, buf, pos + 12,
                    pend - pos - 12)
        if proto == ICMP or proto == ICMP6:
            if pend - pos < 4:
                self.malformed["short ICMP header"] += 1
                return None
            itype, code = buf[pos], buf[pos + 1]
            echo = itype in ECHO_TYPES[proto] and pend - pos >= 8
            ident = _H(buf, pos + 4)[0] if echo else -1
            return (ipver, src, dst, proto, itype, code, 0, ident, iplen,
                    buf, pos + 8 if echo else pos + 4, pend - pos - (8 if echo else 4))
        return (ipver, src, dst, proto, None, None, 0, 0, iplen, buf, pos, pend - pos)


LINK_DECODERS = {
    # 1 (Ethernet, with VLAN tags) is decoded inline in Decoder.decode: the common case.
    0: Decoder._null,      # BSD loopback (DLT_NULL)
    108: Decoder._loop,    # OpenBSD loopback
    101: Decoder._raw,     # raw IP
    12: Decoder._raw,      # DLT_RAW (OpenBSD)
    14: Decoder._raw,      # DLT_RAW (BSD/OS)
    228: Decoder._raw,     # raw IPv4
    229: Decoder._raw,     # raw IPv6
    113: Decoder._sll,     # Linux cooked v1
    276: Decoder._sll2,    # Linux cooked v2
    239: Decoder._nflog,   # Linux NFLOG
}
