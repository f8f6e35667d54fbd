"""The NFLOG and conntrack parsers on netlink messages built here as bytes: every attribute,
nested tuples, IPv6, sequence gaps, and broken input counted and skipped, never raised."""

from __future__ import annotations

import socket
import struct

from hypothesis import given, strategies as st

from egress.enforce import ctevents as ct
from egress.enforce import nflog as nl


def attr(atype: int, data: bytes, nested: bool = False) -> bytes:
    """By hand, independently of nflog.nla: len, type (host order), data, padding."""
    raw = struct.pack("=HH", 4 + len(data), atype | (0x8000 if nested else 0)) + data
    return raw + b"\0" * ((4 - len(raw) % 4) % 4)


def message(mtype: int, attrs: bytes, *, family: int = 2, res_id: int = 7, flags: int = 0,
            seq: int = 0) -> bytes:
    body = struct.pack("=BB", family, 0) + struct.pack(">H", res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


ULOG_PACKET = (4 << 8) | 0
IPV4_UDP = bytes.fromhex("4500001c0001000040110000c6336402c633640130393039000800007878")
IPV6_HEAD = bytes.fromhex("6000000000081140") + socket.inet_pton(socket.AF_INET6, "2001:db8::2") \
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")


def log_attrs(seq: int, *, payload: bytes = IPV4_UDP, prefix: bytes = b"blocked\0") -> bytes:
    return (attr(1, struct.pack(">HBB", 0x0800, 3, 0))           # PACKET_HDR, hook OUTPUT
            + attr(2, struct.pack(">I", 0x10))                     # MARK
            + attr(3, struct.pack(">QQ", 1_700_000_000, 123456))   # TIMESTAMP
            + attr(4, struct.pack(">I", 0)) + attr(5, struct.pack(">I", 3))
            + attr(9, payload) + attr(10, prefix)
            + attr(11, struct.pack(">I", 1000)) + attr(14, struct.pack(">I", 1001))
            + attr(12, struct.pack(">I", seq)) + attr(13, struct.pack(">I", seq + 40)))


# ------------------------------------------------------------------ NFLOG


def test_every_nflog_attribute():
    dec = nl.NflogDecoder()
    [p] = dec.feed(message(ULOG_PACKET, log_attrs(0)), now_us=5)
    assert (p.time, p.family, p.prefix, p.mark) == (1_700_000_000_123_456, 4, "blocked", 0x10)
    assert (p.indev, p.outdev, p.uid, p.gid, p.hook) == (0, 3, 1000, 1001, 3)
    assert (p.seq, p.seq_global, p.payload) == (0, 40, IPV4_UDP)
    assert (dec.received, dec.lost, dec.malformed) == (1, 0, 0)


def test_no_timestamp_means_now_and_ipv6_from_the_family():
    body = attr(9, IPV6_HEAD) + attr(12, struct.pack(">I", 0))
    [p] = nl.NflogDecoder().feed(message(ULOG_PACKET, body, family=10), now_us=42)
    assert (p.time, p.family, p.payload, p.uid, p.prefix, p.mark) == (42, 6, IPV6_HEAD, None, "", 0)


def test_family_falls_back_to_the_payload_version():
    [p] = nl.NflogDecoder().feed(message(ULOG_PACKET, attr(9, IPV6_HEAD), family=0))
    assert p.family == 6


def test_a_batch_with_done_and_sequence_gaps():
    done = struct.pack("=IHHII", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, 0, 0) + b"\0" * 4
    data = b"".join(message(ULOG_PACKET, log_attrs(s)) for s in (0, 1, 4)) + done
    dec = nl.NflogDecoder()
    assert [p.seq for p in dec.feed(data)] == [0, 1, 4]
    assert (dec.received, dec.lost, dec.malformed) == (3, 2, 0)
    dec.feed(message(ULOG_PACKET, log_attrs(9)))
    assert dec.lost == 6


def test_first_packet_after_a_loss_and_wraparound():
    dec = nl.NflogDecoder()
    dec.feed(message(ULOG_PACKET, log_attrs(3)))
    assert dec.lost == 3                # 0, 1, 2 never came
    dec._next_seq = 0xFFFFFFFF
    dec.feed(message(ULOG_PACKET, attr(12, struct.pack(">I", 0xFFFFFFFF))))
    dec.feed(message(ULOG_PACKET, attr(12, struct.pack(">I", 0))))
    assert dec.lost == 3


def test_a_wrong_length_attribute_is_counted_and_skipped():
    body = attr(2, b"\0\x10") + attr(3, b"\0" * 8) + attr(10, b"x\0") + attr(12, b"\0\0\0\0\0")
    dec = nl.NflogDecoder()
    [p] = dec.feed(message(ULOG_PACKET, body), now_us=9)
    assert (p.mark, p.time, p.prefix, p.seq) == (0, 9, "x", None)
    assert dec.malformed == 3


def test_truncated_attribute_and_message():
    good = message(ULOG_PACKET, log_attrs(0))
    broken_attr = message(ULOG_PACKET, attr(10, b"ok\0") + struct.pack("=HH", 200, 9) + b"abcd")
    dec = nl.NflogDecoder()
    packets = dec.feed(good + broken_attr)
    assert [p.prefix for p in packets] == ["blocked", "ok"] and dec.malformed == 1
    cut = good + good[:30]
    assert len(dec.feed(cut)) == 1 and dec.malformed == 2
    bad_len = struct.pack("=IHHII", 8, ULOG_PACKET, 0, 0, 0)
    assert dec.feed(bad_len) == [] and dec.malformed == 3
    assert dec.feed(message(ULOG_PACKET, b"")[:18]) == [] and dec.malformed == 4


def test_other_message_types_are_ignored_not_malformed():
    dec = nl.NflogDecoder()
    ack = struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert dec.feed(ack + message((4 << 8) | 1, b"")) == [] and dec.malformed == 0


def test_nla_and_nfmsg_agree_with_hand_built_bytes():
    assert nl.nla(10, b"abcde") == attr(10, b"abcde")
    built = nl.nfmsg(4, 0, 0, attr(2, b"\0\0\0\1"), family=2, res_id=7)
    assert built == message(ULOG_PACKET, attr(2, b"\0\0\0\1"))


# ------------------------------------------------------------------ conntrack

CT_NEW, CT_DELETE, CT_GET = (1 << 8) | 0, (1 << 8) | 2, (1 << 8) | 1


def ports(proto: int, sport: int, dport: int) -> bytes:
    return attr(1, bytes([proto])) + attr(2, struct.pack(">H", sport)) \
        + attr(3, struct.pack(">H", dport))


def tuple_v4(src, dst, proto, sport, dport) -> bytes:
    ip = attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst))
    return attr(1, ip, nested=True) + attr(2, ports(proto, sport, dport), nested=True)


def tuple_v6(src, dst, proto, sport, dport) -> bytes:
    v6 = socket.AF_INET6
    ip = attr(3, socket.inet_pton(v6, src)) + attr(4, socket.inet_pton(v6, dst))
    return attr(1, ip, nested=True) + attr(2, ports(proto, sport, dport), nested=True)


def counters(packets: int, nbytes: int) -> bytes:
    return attr(1, struct.pack(">Q", packets)) + attr(2, struct.pack(">Q", nbytes))


def test_new_event_v4_tcp():
    body = (attr(1, tuple_v4("10.99.0.2", "10.99.0.1", 6, 40000, 80), nested=True)
            + attr(2, tuple_v4("10.99.0.1", "10.99.0.2", 6, 80, 40000), nested=True)
            + attr(3, struct.pack(">I", 8)) + attr(8, struct.pack(">I", 0x10))
            + attr(12, struct.pack(">I", 77)))
    dec = ct.CtDecoder()
    [ev] = dec.feed(message(CT_NEW, body, flags=nl.NLM_F_CREATE | nl.NLM_F_EXCL))
    assert ev.kind == "new" and (ev.id, ev.status, ev.mark) == (77, 8, 0x10)
    assert (ev.orig.family, ev.orig.src, ev.orig.dst, ev.orig.proto, ev.orig.sport,
            ev.orig.dport) == (4, "10.99.0.2", "10.99.0.1", 6, 40000, 80)
    assert (ev.reply.src, ev.reply.sport, ev.reply.dport) == ("10.99.0.1", 80, 40000)
    assert ev.orig_bytes is None and ev.start_ns is None
    assert (dec.received, dec.malformed) == (1, 0)


def test_destroy_event_v6_udp_with_counters_and_timestamps():
    body = (attr(1, tuple_v6("2001:db8::2", "2001:db8::1", 17, 5353, 53), nested=True)
            + attr(2, tuple_v6("2001:db8::1", "2001:db8::2", 17, 53, 5353), nested=True)
            + attr(9, counters(3, 2**40 + 5), nested=True) + attr(10, counters(2, 300), nested=True)
            + attr(20, attr(1, struct.pack(">Q", 10**18)) + attr(2, struct.pack(">Q", 10**18 + 7)),
                   nested=True))
    [ev] = ct.CtDecoder().feed(message(CT_DELETE, body, family=10))
    assert ev.kind == "destroy" and ev.orig.family == 6 and ev.orig.dst == "2001:db8::1"
    assert (ev.orig_packets, ev.orig_bytes, ev.reply_packets, ev.reply_bytes) == \
        (3, 2**40 + 5, 2, 300)
    assert (ev.start_ns, ev.stop_ns, ev.mark) == (10**18, 10**18 + 7, 0)


def test_icmp_tuples_and_update_and_dump_kinds():
    icmp = attr(1, attr(1, socket.inet_aton("10.99.0.2")) + attr(2, socket.inet_aton("10.99.0.1")),
                nested=True) + attr(2, attr(1, b"\x01") + attr(4, struct.pack(">H", 999))
                                    + attr(5, b"\x08") + attr(6, b"\x00"), nested=True)
    icmp6 = attr(2, attr(1, b"\x3a") + attr(7, struct.pack(">H", 5)) + attr(8, b"\x80")
                 + attr(9, b"\x00"), nested=True)
    dec = ct.CtDecoder()
    a, b = dec.feed(message(CT_NEW, attr(1, icmp, nested=True))
                    + message(CT_GET, attr(1, icmp6, nested=True), flags=nl.NLM_F_MULTI))
    assert a.kind == "update" and (a.orig.proto, a.orig.icmp_id, a.orig.icmp_type,
                                   a.orig.icmp_code, a.orig.sport) == (1, 999, 8, 0, None)
    assert b.kind == "entry" and (b.orig.proto, b.orig.icmp_id, b.orig.icmp_type) == (58, 5, 128)


def test_conntrack_malformed_attributes_are_counted_and_skipped():
    ip = attr(1, attr(1, b"\x0a\x63\x00") + attr(2, socket.inet_aton("10.99.0.1")), nested=True)
    body = (attr(1, ip + attr(2, attr(1, b"\x06\x00") + attr(3, b"\x00\x50"), nested=True),
                 nested=True)
            + attr(8, b"\0\0\x10") + attr(9, attr(1, b"\0" * 4) + attr(2, struct.pack(">Q", 9)),
                                        nested=True)
            + attr(20, struct.pack("=HH", 40, 1), nested=True))
    dec = ct.CtDecoder()
    [ev] = dec.feed(message(CT_DELETE, body))
    assert (ev.orig.src, ev.orig.dst, ev.orig.proto, ev.orig.dport) == ("", "10.99.0.1", 0, 80)
    assert (ev.mark, ev.orig_packets, ev.orig_bytes, ev.start_ns) == (0, None, 9, None)
    assert dec.malformed == 5           # address, proto, mark, packets, the timestamp nest


def test_other_subsystems_are_ignored():
    dec = ct.CtDecoder()
    assert dec.feed(message((1 << 8) | 5, b"") + message(ULOG_PACKET, log_attrs(0))) == []
    assert (dec.received, dec.malformed) == (0, 0)


def test_dump_request_filters_by_mark_and_never_zeroes():
    req = ct.dump_request(0x10, 0xF0, seq=9)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert length == len(req) and mtype == CT_GET and mtype & 0xFF != 3   # not GET_CTRZERO
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP and seq == 9
    found, bad = nl.attrs(req, 20, len(req))
    assert found == {8: struct.pack(">I", 0x10), 21: struct.pack(">I", 0xF0)} and bad == 0
    zero = nl.attrs(ct.dump_request(0, 0x10), 20, len(ct.dump_request(0, 0x10)))[0]
    assert zero == {8: b"\0\0\0\0", 21: struct.pack(">I", 0x10)}   # mark 0 still filters
    assert nl.attrs(ct.dump_request(0x10), 20, 36)[0][21] == b"\xff" * 4
    assert len(ct.dump_request()) == 20
    outside = ct.dump_request(0x11, 0xF0)          # bits outside the mask could never match
    assert nl.attrs(outside, 20, len(outside))[0][8] == struct.pack(">I", 0x10)


def test_mask_without_mark_is_refused():
    try:
        ct.dump_request(mask=0x10)
    except ValueError:
        return
    raise AssertionError("a mask alone was accepted")


@given(st.binary(max_size=300))
def test_decoders_never_raise(data):
    for dec in (nl.NflogDecoder(), ct.CtDecoder()):
        dec.feed(data)
        dec.feed(message(ULOG_PACKET, data) + message(CT_DELETE, data))
