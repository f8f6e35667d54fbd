"""The NFQUEUE codec on netlink messages built here as bytes: every packet attribute, the
kernel's unpadded last attribute, errors from the kernel, broken input counted and skipped
(never raised), and the verdict and config messages checked field by field."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from egress.enforce import nfqueue as nfq

PACKET = (3 << 8) | 0                   # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET
IPV4_TCP = bytes.fromhex("450000340001400040060000c6336402c6336401") + bytes(32)
IPV6_HEAD = bytes.fromhex("6000000000140640") + socket.inet_pton(socket.AF_INET6, "2001:db8::2") \
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + bytes(20)


def attr(atype: int, data: bytes, *, pad: bool = True) -> bytes:
    """By hand, independently of nflog.nla: len, type (host order), data, padding."""
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + (b"\0" * (-len(raw) % 4) if pad else b"")


def message(mtype: int, attrs: bytes, *, family: int = 2, res_id: int = 3, flags: int = 0,
            seq: int = 0) -> bytes:
    body = struct.pack("=BB", family, 0) + struct.pack(">H", res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def header(packet_id: int, hw: int = 0x0800, hook: int = 3) -> bytes:
    return attr(1, struct.pack(">IHB", packet_id, hw, hook))          # NFQA_PACKET_HDR


def every_attribute(packet_id: int = 77) -> bytes:
    return (header(packet_id)
            + attr(3, struct.pack(">I", 0x00200010))                  # MARK
            + attr(4, struct.pack(">QQ", 1_700_000_000, 654321))      # TIMESTAMP
            + attr(5, struct.pack(">I", 4)) + attr(6, struct.pack(">I", 9))   # IN/OUTDEV
            + attr(7, struct.pack(">I", 5)) + attr(8, struct.pack(">I", 6))   # PHYS*: ignored
            + attr(9, struct.pack(">HH8s", 6, 0, bytes(range(6)) + b"\0\0"))  # HWADDR: ignored
            + attr(13, struct.pack(">I", 60_000))                     # CAP_LEN
            + attr(14, struct.pack(">I", nfq.NFQA_SKB_CSUMNOTREADY | nfq.NFQA_SKB_GSO))
            + attr(16, struct.pack(">I", 1000)) + attr(17, struct.pack(">I", 1001))  # UID, GID
            + attr(21, struct.pack(">I", 6))                          # PRIORITY: ignored
            + attr(10, IPV4_TCP))                                     # PAYLOAD


# ------------------------------------------------------------------ packets


def test_every_packet_attribute():
    dec = nfq.NfqDecoder()
    [p] = dec.feed(message(PACKET, every_attribute()), now_us=5)
    assert (p.packet_id, p.hw_protocol, p.hook, p.family) == (77, 0x0800, 3, 4)
    assert (p.mark, p.indev, p.outdev, p.uid, p.gid) == (0x00200010, 4, 9, 1000, 1001)
    assert p.time == 1_700_000_000_654_321
    assert (p.payload, p.cap_len, p.skb_info) == (IPV4_TCP, 60_000, 3)
    assert (dec.received, dec.malformed, dec.errors) == (1, 0, 0)


def test_only_the_header_means_defaults_and_now():
    [p] = nfq.NfqDecoder().feed(message(PACKET, header(1)), now_us=42)
    assert (p.packet_id, p.mark, p.indev, p.outdev, p.payload) == (1, 0, 0, 0, b"")
    assert (p.time, p.uid, p.gid, p.cap_len, p.skb_info) == (42, None, None, None, 0)


def test_time_defaults_to_the_clock():
    import time
    [p] = nfq.NfqDecoder().feed(message(PACKET, header(1)))
    assert abs(p.time / 1e6 - time.time()) < 60


@pytest.mark.parametrize("family, hw, payload, want", [
    (socket.AF_INET6, 0x86DD, IPV6_HEAD, 6),
    (0, 0x86DD, IPV6_HEAD, 6),           # from the hardware protocol
    (0, 0, IPV6_HEAD, 6),                # from the payload's version
    (0, 0, IPV4_TCP, 4),
    (0, 0, b"", 0),
    (0, 0, b"\x50", 0),                  # version 5 is no family of ours
])
def test_family(family, hw, payload, want):
    [p] = nfq.NfqDecoder().feed(message(PACKET, header(1, hw) + attr(10, payload),
                                        family=family))
    assert p.family == want


def test_unpadded_last_payload_and_several_messages_in_one_datagram():
    odd = IPV4_TCP[:-3]                 # a length that is not a multiple of 4
    first = message(PACKET, header(1) + attr(10, odd, pad=False))
    assert len(first) % 4 != 0
    data = first + b"\0" * (-len(first) % 4) + message(PACKET, header(2) + attr(10, odd))
    dec = nfq.NfqDecoder()
    assert [(p.packet_id, p.payload) for p in dec.feed(data)] == [(1, odd), (2, odd)]
    # the kernel's very last message may end unpadded too
    assert [p.payload for p in dec.feed(first)] == [odd]
    assert dec.malformed == 0


def test_done_and_other_types_are_skipped():
    done = struct.pack("=IHHII", 20, 3, 2, 0, 0) + b"\0" * 4            # NLMSG_DONE
    other = message((3 << 8) | 2, attr(1, b"\1\0\0\0"))                  # a CONFIG echo
    dec = nfq.NfqDecoder()
    assert [p.packet_id for p in dec.feed(other + message(PACKET, header(9)) + done)] == [9]
    assert (dec.received, dec.malformed, dec.errors) == (1, 0, 0)


def test_kernel_errors_are_counted_and_acks_are_not():
    def error(code: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, 5, 0) + struct.pack("=i", code) + bytes(16)
    dec = nfq.NfqDecoder()
    assert dec.feed(error(0) + error(-2) + error(-22)) == []
    assert (dec.errors, dec.last_error, dec.malformed) == (2, 22, 0)


# ------------------------------------------------------------------ malformed


@pytest.mark.parametrize("data, packets", [
    (struct.pack("=IHHII", 18, PACKET, 0, 0, 0) + b"\2\0", 0),              # nfgenmsg cut
    (message(PACKET, attr(3, struct.pack(">I", 1))), 0),                    # no packet header
    (message(PACKET, attr(1, b"\0\0\0\1\x08")), 0),                          # header too short
    (message(PACKET, header(1) + attr(3, b"\0\0\1")), 1),                   # mark of 3 bytes
    (message(PACKET, header(1) + attr(4, bytes(8))), 1),                    # short timestamp
    (message(PACKET, header(1) + attr(16, bytes(8))), 1),                   # uid of 8 bytes
    (message(PACKET, header(1) + struct.pack("=HH", 40, 10) + b"abcd"), 1),  # attr past the end
    (message(PACKET, header(1) + struct.pack("=HH", 2, 10)), 1),            # attr len < 4
    (message(PACKET, header(1) + b"\0\0"), 1),                              # trailing bytes
    (struct.pack("=IHHII", 200, PACKET, 0, 0, 0) + bytes(20), 0),           # message past end
    (struct.pack("=IHHII", 8, PACKET, 0, 0, 0), 0),                         # length < header
    (message(PACKET, header(1)) + b"\1\2\3", 1),                            # datagram tail
])
def test_malformed_input_is_counted_and_skipped(data, packets):
    dec = nfq.NfqDecoder()
    assert len(dec.feed(data)) == packets == dec.received
    assert dec.malformed >= 1


def test_bad_values_do_not_hide_the_rest_of_the_packet():
    body = header(4) + attr(3, b"\0\0\1") + attr(6, struct.pack(">I", 2)) + attr(10, IPV4_TCP)
    dec = nfq.NfqDecoder()
    [p] = dec.feed(message(PACKET, body))
    assert (p.packet_id, p.mark, p.outdev, p.payload, dec.malformed) == (4, 0, 2, IPV4_TCP, 1)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    dec = nfq.NfqDecoder()
    dec.feed(data, now_us=0)
    dec.feed(message(PACKET, data), now_us=0)
    assert dec.received <= 2


@given(st.binary(max_size=200), st.integers(0, 600))
def test_a_valid_packet_cut_anywhere_never_raises(tail, cut):
    data = (message(PACKET, every_attribute()) + tail)[:cut]
    nfq.NfqDecoder().feed(data, now_us=0)


# ------------------------------------------------------------------ verdicts and config


def fields(msg: bytes) -> tuple:
    """(nlmsghdr, nfgenmsg, [(attr len, attr type, value)]) read back by hand."""
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg)
    family, version, res_id = struct.unpack_from("=BB", msg, 16) + struct.unpack_from(">H", msg, 18)
    out, off = [], 20
    while off < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, off)
        out.append((alen, atype, msg[off + 4:off + alen]))
        off += (alen + 3) & ~3
    assert off == len(msg)
    return (mtype, flags, seq, pid), (family, version, res_id), out


def test_verdict_accept_with_mark_field_by_field():
    msg = nfq.verdict_message(3, 0x01020304, True, 0x00200010)
    assert len(msg) == 16 + 4 + 12 + 8
    nlh, nfgen, attrs = fields(msg)
    assert nlh == ((3 << 8) | 1, 0x0001, 0, 0)             # NFQNL_MSG_VERDICT, NLM_F_REQUEST
    assert nfgen == (0, 0, 3)                              # AF_UNSPEC, NFNETLINK_V0, queue
    assert msg[18:20] == b"\x00\x03"                       # res_id is big-endian
    assert attrs == [(12, 2, struct.pack(">II", 1, 0x01020304)),   # VERDICT_HDR: NF_ACCEPT, id
                     (8, 3, b"\x00\x20\x00\x10")]                   # MARK, big-endian


def test_verdict_drop_without_mark_and_the_batch_form():
    _, nfgen, attrs = fields(nfq.verdict_message(700, 9, False))
    assert nfgen == (0, 0, 700)
    assert attrs == [(12, 2, struct.pack(">II", 0, 9))]             # NF_DROP, no mark
    nlh, _, attrs = fields(nfq.verdict_message(3, 41, True, 0, batch=True))
    assert nlh[0] == (3 << 8) | 3                                    # NFQNL_MSG_VERDICT_BATCH
    assert attrs == [(12, 2, struct.pack(">II", 1, 41)), (8, 3, bytes(4))]  # mark 0 is sent


def test_config_binds_and_sets_gso_never_fail_open_by_default():
    msg = nfq.config_message(3, copy_range=0xFFFF, maxlen=4096, fail_open=False, uid_gid=True,
                             seq=99)
    nlh, nfgen, attrs = fields(msg)
    assert nlh == ((3 << 8) | 2, 0x0005, 99, 0)            # CONFIG, NLM_F_REQUEST | NLM_F_ACK
    assert nfgen == (0, 0, 3)
    assert attrs == [
        (8, 1, bytes([1, 0, 0, 0])),                       # CFG_CMD: BIND, pad, pf 0
        (9, 2, struct.pack(">IB", 0xFFFF, 2)),             # CFG_PARAMS: copy_range, COPY_PACKET
        (8, 3, struct.pack(">I", 4096)),                   # CFG_QUEUE_MAXLEN
        (8, 5, struct.pack(">I", 0x04 | 0x08)),            # CFG_FLAGS: GSO | UID_GID
        (8, 4, struct.pack(">I", 0x01 | 0x04 | 0x08)),     # CFG_MASK: FAIL_OPEN cleared too
    ]
    assert msg[16 + 4 + 8 + 9:16 + 4 + 8 + 12] == b"\0\0\0"  # PARAMS padded to 12


def test_config_fail_open_only_when_asked():
    _, _, attrs = fields(nfq.config_message(5, copy_range=128, maxlen=1, fail_open=True,
                                            uid_gid=False))
    assert attrs[1][2] == struct.pack(">IB", 128, 2)
    assert attrs[3] == (8, 5, struct.pack(">I", 0x01 | 0x04))      # FAIL_OPEN | GSO
    assert attrs[4] == (8, 4, struct.pack(">I", 0x0D))


# ------------------------------------------------------------------ the header


HEADER = Path("/usr/include/linux/netfilter/nfnetlink_queue.h")


@pytest.mark.skipif(not HEADER.exists(), reason="linux/netfilter/nfnetlink_queue.h not installed")
def test_constants_match_the_kernel_header():
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    checked = 0
    for body in re.findall(r"enum \w+ \{(.*?)\};", text, flags=re.S):
        for value, name in enumerate(n.strip().split("=")[0].strip()
                                     for n in body.split(",") if n.strip()):
            if hasattr(nfq, name):
                assert getattr(nfq, name) == value, name
                checked += 1
    for name, value in re.findall(r"#define (NFQA_\w+)\s+\(1 << (\d+)\)", text):
        if hasattr(nfq, name):
            assert getattr(nfq, name) == 1 << int(value), name
            checked += 1
    assert checked >= 45
