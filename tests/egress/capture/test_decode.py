"""Decoding: every link type, IPv4 options, IPv6 extension headers, fragments, damage."""

from __future__ import annotations

import socket
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6,
                                IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, fragment6)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from egress.capture import decode as decode_module
from egress.capture.decode import LINK_DECODERS, Decoder
from tests.egress.capture.build import (FRAMERS, MACS, decode, ethernet, loop, nflog, null_be,
                                        null_le, payload_of, sll, sll2)

A4, B4 = "10.0.0.1", "192.0.2.7"
A6, B6 = "2001:db8::1", "2001:db8::2"


def packed(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def tcp4(payload: bytes = b"GET / HTTP/1.1\r\n\r\n", **fields):
    return (IP(src=A4, dst=B4) / TCP(sport=40000, dport=443, flags="PA", seq=1000, **fields)
            / payload)


def udp6(payload: bytes = b"\x12\x34 a query"):
    return IPv6(src=A6, dst=B6) / UDP(sport=5353, dport=53) / payload


def expect(pkt, proto, sport, dport, flags=0, seq=0, payload=b"", iplen=None):
    """The decoded tuple's fields (buf and offsets replaced by the payload bytes)."""
    ver = 6 if IPv6 in pkt else 4
    src, dst = (A6, B6) if ver == 6 else (A4, B4)
    return (ver, packed(src), packed(dst), proto, sport, dport, flags, seq,
            len(bytes(pkt)) if iplen is None else iplen, payload)


def fields(decoded):
    return None if decoded is None else decoded[:9] + (payload_of(decoded),)


# ---------------------------------------------------------------- link types

def test_every_link_decoder_has_a_framer_here():
    assert set(FRAMERS) == set(LINK_DECODERS) | {1}


LINK_CASES = [(lt, ver) for lt in sorted(FRAMERS) for ver in (4, 6)
              if not (lt == 228 and ver == 6) and not (lt == 229 and ver == 4)]


@pytest.mark.parametrize("linktype,ver", LINK_CASES, ids=[f"link{lt}-v{v}" for lt, v in LINK_CASES])
def test_each_link_type_reaches_the_transport(linktype, ver):
    pkt = tcp4() if ver == 4 else udp6()
    want = (expect(pkt, 6, 40000, 443, flags=0x18, seq=1000, payload=b"GET / HTTP/1.1\r\n\r\n")
            if ver == 4 else expect(pkt, 17, 5353, 53, payload=b"\x12\x34 a query"))
    d = Decoder()
    assert fields(decode(pkt, linktype, d)) == want
    assert not d.malformed and not d.other


@pytest.mark.parametrize("framer,family", [
    (null_le, 2), (null_le, 10), (null_le, 24), (null_le, 28), (null_le, 30),
    (null_be, 2), (null_be, 10), (null_be, 24), (null_be, 28), (null_be, 30),
])
def test_bsd_loopback_family_in_either_byte_order(framer, family):
    pkt = tcp4() if family == 2 else udp6()
    raw = framer(bytes(pkt), family)
    got = Decoder().decode(0, 0, raw, 0, len(raw))
    assert got is not None and got[0] == (4 if family == 2 else 6)


@pytest.mark.parametrize("family", [2, 24, 28, 30])
def test_openbsd_loopback_family(family):
    pkt = tcp4() if family == 2 else udp6()
    raw = loop(bytes(pkt), family)
    got = Decoder().decode(108, 0, raw, 0, len(raw))
    assert got is not None and got[0] == (4 if family == 2 else 6)


def test_ethernet_with_one_vlan_tag():
    pkt = tcp4()
    raw = bytes(Ether(**MACS) / Dot1Q(vlan=42) / pkt)
    assert raw[12:14] == b"\x81\x00"
    assert fields(Decoder().decode(1, 0, raw, 0, len(raw))) == \
        expect(pkt, 6, 40000, 443, 0x18, 1000, bytes(pkt[TCP].payload))


@pytest.mark.parametrize("outer", [0x88A8, 0x9100, 0x8100])
def test_ethernet_with_two_vlan_tags(outer):
    pkt = udp6()
    if outer == 0x88A8:
        raw = bytes(Ether(**MACS) / Dot1AD(vlan=7) / Dot1Q(vlan=42) / pkt)
    else:
        raw = bytes(Ether(**MACS, type=outer) / Dot1Q(vlan=7, type=0x8100) / Dot1Q(vlan=42) / pkt)
    assert raw[12:14] == outer.to_bytes(2, "big") and raw[16:18] == b"\x81\x00"
    assert fields(Decoder().decode(1, 0, raw, 0, len(raw))) == \
        expect(pkt, 17, 5353, 53, payload=b"\x12\x34 a query")


def test_ethernet_padding_is_not_payload():
    pkt = IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"hi"
    raw = bytes(Ether(**MACS) / pkt)
    raw += b"\0" * (60 - len(raw))               # the minimum frame size
    assert fields(Decoder().decode(1, 0, raw, 0, len(raw))) == expect(pkt, 17, 1, 2, payload=b"hi")


# ------------------------------------------------------------------------ IP

def test_ipv4_options_are_skipped():
    pkt = IP(src=A4, dst=B4, options=[IPOption_RR(routers=["198.51.100.1", "198.51.100.2"])]) \
        / UDP(sport=123, dport=123) / b"ntp"
    assert bytes(pkt)[0] & 15 > 5
    assert fields(decode(pkt)) == expect(pkt, 17, 123, 123, payload=b"ntp")


def test_ipv6_extension_headers_are_walked():
    pkt = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrRouting(addresses=["2001:db8::3"]) / IPv6ExtHdrDestOpt()
           / TCP(sport=40001, dport=22, flags="S", seq=77) / b"SSH-2.0-x\r\n")
    assert fields(decode(pkt)) == expect(pkt, 6, 40001, 22, 0x02, 77, b"SSH-2.0-x\r\n")


def test_ipv6_authentication_header_is_walked():
    # AH's length counts 4-byte words minus 2: 12 fixed bytes + a 12-byte ICV = 24 -> 4.
    pkt = IPv6(src=A6, dst=B6) / AH(nh=17, payloadlen=4, spi=1, icv=b"\0" * 12) \
        / UDP(sport=500, dport=500) / b"ike"
    assert fields(decode(pkt)) == expect(pkt, 17, 500, 500, payload=b"ike")


def test_ipv6_atomic_fragment_decodes_at_once():
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=9, offset=0, m=0) \
        / UDP(sport=5353, dport=53) / b"q"
    got = decode(pkt)
    assert got is not None and fields(got)[3:6] == (17, 5353, 53) and payload_of(got) == b"q"


# ----------------------------------------------------------------- fragments

V4_DATAGRAM = (IP(src=A4, dst=B4, id=0x4242) / UDP(sport=5353, dport=53)
               / Raw(bytes(range(256)) * 12))
V4_FRAGMENTS = [bytes(f) for f in fragment(V4_DATAGRAM, fragsize=800)]
V6_DATAGRAM = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=0x1234)
               / UDP(sport=5353, dport=53) / Raw(bytes(range(256)) * 12))
V6_FRAGMENTS = [bytes(f) for f in fragment6(V6_DATAGRAM, 1280)]
V6_UNFRAGMENTED = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / UDP(sport=5353, dport=53)
                   / Raw(bytes(range(256)) * 12))
ORIGINAL_PAYLOAD = bytes(range(256)) * 12


def feed(decoder, pieces, ts=0):
    """Decode each piece; the results in order."""
    return [decoder.decode(101, ts, p, 0, len(p)) for p in pieces]


def test_fragments_were_built_as_intended():
    assert len(V4_FRAGMENTS) >= 3 and len(V6_FRAGMENTS) >= 3
    assert all(IPv6ExtHdrFragment in IPv6(f) for f in V6_FRAGMENTS)


@pytest.mark.parametrize("order", ["in order", "reversed", "last first", "duplicated"])
@pytest.mark.parametrize("ver", [4, 6])
def test_fragments_reassemble_whatever_the_order(ver, order):
    frags = V4_FRAGMENTS if ver == 4 else V6_FRAGMENTS
    idx = list(range(len(frags)))
    pieces = {"in order": idx, "reversed": idx[::-1], "last first": idx[-1:] + idx[:-1],
              "duplicated": [0, 0, 1] + idx[1:-1] + [1, 0] + idx[-1:]}[order]
    d = Decoder()
    results = feed(d, [frags[i] for i in pieces])
    assert results[:-1] == [None] * (len(pieces) - 1)
    got = results[-1]
    assert got is not None
    assert got[:6] == (ver, packed(A4 if ver == 4 else A6), packed(B4 if ver == 4 else B6),
                       17, 5353, 53)
    assert payload_of(got) == ORIGINAL_PAYLOAD
    if ver == 4:
        assert got[8] == len(bytes(V4_DATAGRAM))
    d.finish()
    assert not d.malformed


def test_reassembled_ipv6_length_is_the_unfragmented_datagram():
    got = feed(Decoder(), V6_FRAGMENTS)[-1]
    assert got[8] == len(bytes(V6_UNFRAGMENTED))


def test_ipv6_headers_after_the_fragment_header_are_walked_after_reassembly():
    whole = IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / TCP(sport=40002, dport=443, seq=5) \
        / Raw(b"x" * 1500)
    fragmentable = bytes(whole)[40:]                 # destination options, TCP, data
    cut = 1000
    pieces = [bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=60, id=77, offset=0, m=1)
                    / Raw(fragmentable[:cut])),
              bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=60, id=77, offset=cut // 8, m=0)
                    / Raw(fragmentable[cut:]))]
    got = feed(Decoder(), pieces)[-1]
    assert got is not None and got[3:6] == (6, 40002, 443) and payload_of(got) == b"x" * 1500


def test_reassembled_length_is_what_was_sent_when_the_last_fragment_was_cut():
    d = Decoder()
    feed(d, V4_FRAGMENTS[:-1])
    last = V4_FRAGMENTS[-1]
    got = d.decode(101, 0, last, 0, 100)
    assert got is not None and got[8] == len(bytes(V4_DATAGRAM))
    assert ORIGINAL_PAYLOAD.startswith(payload_of(got))


@pytest.mark.parametrize("ver", [4, 6])
def test_a_missing_fragment_never_yields_and_finish_counts_it(ver):
    frags = V4_FRAGMENTS if ver == 4 else V6_FRAGMENTS
    d = Decoder()
    pieces = frags[:1] + frags[2:]
    assert feed(d, pieces + pieces) == [None] * (2 * len(pieces))
    assert not d.malformed
    d.finish()
    assert d.malformed == Counter({"fragments never completed": 1})
    d.finish()                                       # counted once
    assert d.malformed == Counter({"fragments never completed": 1})


def test_two_datagrams_reassemble_independently():
    other = [bytes(f) for f in fragment(IP(src=A4, dst=B4, id=0x4243) / UDP(sport=1, dport=2)
                                        / Raw(b"z" * 2000), fragsize=800)]
    d = Decoder()
    mixed = [p for pair in zip(V4_FRAGMENTS, other) for p in pair] + V4_FRAGMENTS[len(other):]
    done = [r for r in feed(d, mixed) if r is not None]
    assert sorted(payload_of(r) for r in done) == sorted([ORIGINAL_PAYLOAD, b"z" * 2000])


def test_overlapping_fragments_that_differ_are_counted():
    first = bytearray(V4_FRAGMENTS[0])
    first[-1] ^= 0xFF
    d = Decoder()
    feed(d, [V4_FRAGMENTS[0], bytes(first)])
    assert d.malformed == Counter({"overlapping fragments that differ": 1})


def test_fragments_older_than_thirty_seconds_start_over():
    d = Decoder()
    assert d.decode(101, 0, V4_FRAGMENTS[0], 0, len(V4_FRAGMENTS[0])) is None
    late = 30_000_001
    assert feed(d, V4_FRAGMENTS[1:], ts=late) == [None] * (len(V4_FRAGMENTS) - 1)
    assert d.malformed == Counter({"fragments timed out": 1})
    d.finish()
    assert d.malformed["fragments never completed"] == 1


def test_fragments_within_thirty_seconds_complete():
    d = Decoder()
    d.decode(101, 0, V4_FRAGMENTS[0], 0, len(V4_FRAGMENTS[0]))
    assert feed(d, V4_FRAGMENTS[1:], ts=29_000_000)[-1] is not None


def test_too_many_datagrams_in_reassembly_drops_the_oldest(monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_FRAGMENT_SETS", 2)
    sets = [[bytes(f) for f in fragment(IP(src=A4, dst=B4, id=100 + i) / UDP(sport=i, dport=9)
                                        / Raw(b"y" * 1000), fragsize=800)] for i in range(3)]
    d = Decoder()
    for s in sets:
        assert d.decode(101, 0, s[0], 0, len(s[0])) is None
    assert d.malformed == Counter({"fragments never completed": 1})
    assert feed(d, sets[0][1:]) == [None]            # the oldest was dropped
    assert feed(d, sets[2][1:])[0][4] == 2


# ----------------------------------------------------------------- transport

def test_tcp_fields_flags_and_options():
    pkt = IP(src=A4, dst=B4) / TCP(sport=1234, dport=80, flags=0x1D2, seq=0xFFFFFFFE,
                                   options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b""),
                                            ("Timestamp", (1, 2))]) / b"body"
    assert fields(decode(pkt)) == expect(pkt, 6, 1234, 80, 0x1D2, 0xFFFFFFFE, b"body")


@pytest.mark.parametrize("pkt,typ,code,ident,payload", [
    (IP(src=A4, dst=B4) / ICMP(type=8, id=0x1234, seq=3) / b"ping", 8, 0, 0x1234, b"ping"),
    (IP(src=A4, dst=B4) / ICMP(type=0, id=0xBEEF, seq=3) / b"pong", 0, 0, 0xBEEF, b"pong"),
    (IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=7, seq=1, data=b"v6"), 128, 0, 7, b"v6"),
    (IPv6(src=A6, dst=B6) / ICMPv6EchoReply(id=8, seq=1, data=b"v6r"), 129, 0, 8, b"v6r"),
], ids=["echo", "echo-reply", "echo6", "echo6-reply"])
def test_icmp_echo_fields(pkt, typ, code, ident, payload):
    proto = 58 if IPv6 in pkt else 1
    assert fields(decode(pkt)) == expect(pkt, proto, typ, code, 0, ident, payload)


def test_icmp_not_an_echo_has_no_identifier():
    quoted = bytes(IP(src=B4, dst=A4) / UDP(sport=53, dport=5353))[:28]
    pkt = IP(src=A4, dst=B4) / ICMP(type=3, code=3) / Raw(quoted)
    got = decode(pkt)
    assert fields(got)[:9] == expect(pkt, 1, 3, 3, 0, -1)[:9]
    assert payload_of(got) == bytes(pkt[ICMP])[4:]          # from after type, code, checksum


def test_icmp6_not_an_echo_has_no_identifier():
    pkt = IPv6(src=A6, dst=B6) / ICMPv6DestUnreach(code=4) / Raw(b"q" * 48)
    assert fields(decode(pkt))[3:8] == (58, 1, 4, 0, -1)


def test_icmp_echo_too_short_for_an_identifier():
    pkt = IP(src=A4, dst=B4, proto=1) / Raw(b"\x08\x00\x00\x00\x12\x34")
    got = decode(pkt)
    assert fields(got)[3:8] == (1, 8, 0, 0, -1) and payload_of(got) == b"\x12\x34"


def test_other_ip_protocol_has_no_ports():
    pkt = IP(src=A4, dst=B4, proto=47) / Raw(b"\x00\x00\x08\x00GRE body")
    assert fields(decode(pkt)) == expect(pkt, 47, None, None, 0, 0, b"\x00\x00\x08\x00GRE body")


def test_iplen_is_the_sent_length_when_the_snaplen_cut_it():
    pkt = tcp4(payload=b"A" * 1000)
    raw = ethernet(bytes(pkt))
    got = Decoder().decode(1, 0, raw, 0, 14 + 20 + 20 + 100)
    assert got[8] == len(bytes(pkt)) == 1040
    assert payload_of(got) == b"A" * 100


def test_ipv4_total_length_zero_is_what_was_captured():
    raw = bytearray(bytes(tcp4(payload=b"B" * 300)))
    raw[2:4] = b"\0\0"                    # segmentation offload on the capturing host
    got = decode(bytes(raw))
    assert got[8] == len(raw) and payload_of(got) == b"B" * 300


def test_ipv6_payload_length_zero_is_what_was_captured():
    raw = bytearray(bytes(udp6(b"C" * 200)))
    raw[4:6] = b"\0\0"
    got = decode(bytes(raw))
    assert got[8] == len(raw) and payload_of(got) == b"C" * 200


def test_decode_reads_the_packet_where_the_buffer_says():
    pkt = tcp4()
    framed = ethernet(bytes(pkt))
    buf = b"\xff" * 37 + framed + b"\xee" * 50
    got = Decoder().decode(1, 0, buf, 37, len(framed))
    assert fields(got) == expect(pkt, 6, 40000, 443, 0x18, 1000, bytes(pkt[TCP].payload))


# --------------------------------------------------------------------- damage

def _ip(pkt) -> bytes:
    return bytes(pkt)


def _patched(raw: bytes, at: int, value: bytes) -> bytes:
    return raw[:at] + value + raw[at + len(value):]


TCP4 = bytes(tcp4())
UDP4 = bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"data")
IP6 = bytes(udp6())

MALFORMED = [
    ("short ethernet header", 1, ethernet(TCP4)[:13]),
    ("short VLAN tag", 1, bytes(Ether(**MACS, type=0x8100)) + b"\x00\x2a"),
    ("short VLAN tag", 1, bytes(Ether(**MACS) / Dot1Q(vlan=1, type=0x88A8)) + b"\x00"),
    ("short IPv4 header", 101, TCP4[:19]),
    ("short IPv4 header", 1, ethernet(TCP4)[:14 + 10]),                 # cut by the snaplen
    ("bad IPv4 header", 101, _patched(UDP4, 0, b"\x44")),               # IHL 16 bytes
    ("bad IPv4 header", 101, _patched(UDP4, 0, b"\x4f")),               # IHL past the end
    ("bad IPv4 header", 1, ethernet(IP6, 0x0800)),                      # version 6 as IPv4
    ("IPv4 total length below header", 101, _patched(UDP4, 2, b"\x00\x0c")),
    ("short IPv6 header", 101, IP6[:39]),
    ("bad IPv6 header", 1, ethernet(_ip(IP(src=A4, dst=B4) / UDP() / (b"x" * 30)), 0x86DD)),
    ("short IPv6 extension header", 101, bytes(IPv6(src=A6, dst=B6, nh=0, plen=0))),
    ("IPv6 extension header beyond packet", 101,
     bytes(IPv6(src=A6, dst=B6, nh=0, plen=8)) + bytes([59, 10]) + b"\0" * 6),
    ("short IPv6 fragment header", 101, bytes(IPv6(src=A6, dst=B6, nh=44, plen=4)) + b"\x11\0\0\1"),
    ("short TCP header", 101, _ip(IP(src=A4, dst=B4, proto=6) / Raw(b"\0" * 19))),
    ("short TCP header", 1, ethernet(TCP4)[:14 + 20 + 12]),             # cut by the snaplen
    ("bad TCP header length", 101, _ip(IP(src=A4, dst=B4) / TCP(dataofs=4))),
    ("bad TCP header length", 101, _ip(IP(src=A4, dst=B4) / TCP(dataofs=15) / b"short")),
    ("short UDP header", 101, _ip(IP(src=A4, dst=B4, proto=17) / Raw(b"\0" * 7))),
    ("short ICMP header", 101, _ip(IP(src=A4, dst=B4, proto=1) / Raw(b"\x08\0\0"))),
    ("short ICMP header", 101, _ip(IPv6(src=A6, dst=B6, nh=58) / Raw(b"\x80\0"))),
    ("empty packet", 101, b""),
    ("IP version 5", 101, b"\x50" + b"\0" * 30),
    ("short cooked header", 113, sll(TCP4)[:15]),
    ("short cooked header", 276, sll2(TCP4)[:19]),
    ("short loopback header", 0, b"\x02\0\0"),
    ("short loopback header", 108, b"\0\0\0"),
    ("short NFLOG header", 239, b"\x02\0\0"),
    ("NFLOG without payload", 239, nflog(TCP4, with_payload=False)),
]


@pytest.mark.parametrize("reason,linktype,raw", MALFORMED,
                         ids=[f"{i}-{m[0]}" for i, m in enumerate(MALFORMED)])
def test_malformed_is_counted_by_reason(reason, linktype, raw):
    d = Decoder()
    assert d.decode(linktype, 0, raw, 0, len(raw)) is None
    assert d.malformed == Counter({reason: 1}) and not d.other


OTHER = [
    ("ethertype 0x0806", 1, bytes(Ether(**MACS) / ARP(psrc=A4, pdst=B4, hwsrc=MACS["src"]))),
    ("link type 147", 147, TCP4),
    ("loopback family 7", 0, null_le(TCP4, 7)),
    ("loopback family 7", 108, loop(TCP4, 7)),
    ("NFLOG family 7", 239, nflog(TCP4, 7)),
    ("ethertype 0x88cc", 113, sll(TCP4)[:14] + b"\x88\xcc" + b"\0" * 30),
]


@pytest.mark.parametrize("kind,linktype,raw", OTHER, ids=[o[0] for o in OTHER])
def test_not_ip_is_counted_as_other(kind, linktype, raw):
    d = Decoder()
    assert d.decode(linktype, 0, raw, 0, len(raw)) is None
    assert d.other == Counter({kind: 1}) and not d.malformed


# ---------------------------------------------------------------- properties

ALL_LINKTYPES = sorted(FRAMERS) + [147]


def check_shape(got, buf_len=None):
    if got is None:
        return
    assert isinstance(got, tuple) and len(got) == 12
    ipver, src, dst, proto = got[:4]
    buf, poff, plen = got[9:12]
    assert ipver in (4, 6) and len(src) == len(dst) == (4 if ipver == 4 else 16)
    assert 0 <= proto <= 255 and got[8] >= 0
    assert poff >= 0 and plen >= 0 and poff + plen <= len(buf)


SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(linktype=st.sampled_from(ALL_LINKTYPES), raw=st.binary(max_size=200))
def test_random_bytes_never_raise(linktype, raw):
    d = Decoder()
    check_shape(d.decode(linktype, 0, raw, 0, len(raw)))
    d.finish()


BASES = [
    tcp4(), udp6(), V4_FRAGMENTS[0], V6_FRAGMENTS[1],
    IP(src=A4, dst=B4, options=[IPOption_RR()]) / ICMP(type=8, id=3) / b"ping",
    IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:db8::3"])
    / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest(id=2, data=b"x"),
]
FRAMED = [(lt, FRAMERS[lt](bytes(b))) for lt in sorted(FRAMERS) for b in BASES]


@SETTINGS
@given(case=st.sampled_from(FRAMED), cut=st.integers(min_value=0, max_value=2000),
       flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=6))
def test_truncated_or_mutated_packets_never_raise(case, cut, flips):
    linktype, raw = case
    mutated = bytearray(raw[:cut])
    for pos, value in flips:
        if mutated:
            mutated[pos % len(mutated)] = value
    d = Decoder()
    for ts in (0, 1):                   # twice: the second meets fragment state of the first
        check_shape(d.decode(linktype, ts, bytes(mutated), 0, len(mutated)))
    d.finish()


@SETTINGS
@given(case=st.sampled_from(FRAMED), cut=st.integers(min_value=0, max_value=2000),
       before=st.binary(max_size=40), after=st.binary(max_size=40))
def test_nothing_outside_the_packet_is_read(case, cut, before, after):
    linktype, raw = case
    raw = raw[:cut]
    alone, inside = Decoder(), Decoder()
    a = alone.decode(linktype, 0, raw, 0, len(raw))
    b = inside.decode(linktype, 0, before + raw + after, len(before), len(raw))
    assert fields(a) == fields(b)
    assert alone.malformed == inside.malformed and alone.other == inside.other


@settings(max_examples=100, deadline=None)
@given(ver=st.sampled_from([4, 6]), data=st.data())
def test_any_order_with_duplicates_reassembles_once(ver, data):
    frags = V4_FRAGMENTS if ver == 4 else V6_FRAGMENTS
    order = data.draw(st.permutations(range(len(frags))))
    extra = data.draw(st.lists(st.sampled_from(range(len(frags))), max_size=4))
    # Duplicates go in before the last new piece, so the datagram completes exactly once.
    last = order[-1]
    sequence = list(order[:-1]) + [i for i in extra if i != last] + [last]
    d = Decoder()
    results = feed(d, [frags[i] for i in sequence])
    assert results[:-1] == [None] * (len(sequence) - 1)
    assert payload_of(results[-1]) == ORIGINAL_PAYLOAD
    d.finish()
    assert not d.malformed


def test_nflog_tlv_padding_is_honoured():
    # The prefix TLV has an odd length: the payload TLV starts at the next 4-byte boundary.
    raw = nflog(TCP4)
    assert struct.unpack_from("<H", raw, 4 + 8)[0] % 4 != 0
    assert payload_of(Decoder().decode(239, 0, raw, 0, len(raw))) == bytes(tcp4()[TCP].payload)
