"""ICMP echo payload shapes: ping tools' patterns versus tunnels."""

from __future__ import annotations

import math
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, Raw

from egress.identify import icmp

T = 1_767_225_600  # a fixed time for timestamps


def iputils(size: int = 56, seq: int = 1, timeval: int = 16) -> bytes:
    """Linux iputils: byte i is i, the first ``timeval`` bytes a little-endian timeval."""
    data = bytearray(i & 0xFF for i in range(size))
    if size >= timeval:
        stamp = struct.pack("<qq", T + seq, 123_456 + seq) if timeval == 16 \
            else struct.pack("<ii", T + seq, 123_456 + seq)
        data[:timeval] = stamp
    return bytes(data)


def bsd(size: int = 56, seq: int = 1) -> bytes:
    """FreeBSD and macOS: a big-endian struct tv32, then byte i is i from 8 on."""
    return struct.pack(">ii", T + seq, 654_321 + seq) + bytes(i & 0xFF for i in range(8, size))


def windows(size: int = 32) -> bytes:
    return bytes(ord("a") + i % 23 for i in range(size))


def busybox(size: int = 56, seq: int = 1, fill: int = 0) -> bytes:
    """busybox: a 4-byte host-order timestamp, then the pattern byte."""
    return struct.pack("<I", 1_000_000 * seq + 4242) + bytes([fill]) * (size - 4)


def pattern(size: int, pat: bytes, seq: int = 1) -> bytes:
    """iputils ``-p``: the pattern repeated from the start, then the timestamp over it."""
    data = bytearray((pat * size)[:size])
    data[:16] = struct.pack("<qq", T + seq, seq)
    return bytes(data)


def echo(payloads: list[bytes], *, v6: bool = False) -> list[tuple[str, bytes]]:
    """Echo requests and their kernel replies, built as scapy packets, as (direction, data)."""
    out = []
    for seq, data in enumerate(payloads):
        if v6:
            request = IPv6(src="fd00::2", dst="2001:db8::1") / ICMPv6EchoRequest(id=7, seq=seq, data=data)
            reply = IPv6(src="2001:db8::1", dst="fd00::2") / ICMPv6EchoReply(id=7, seq=seq, data=data)
            out += [(icmp.OUT, bytes(request[ICMPv6EchoRequest].data)),
                    (icmp.IN, bytes(reply[ICMPv6EchoReply].data))]
        else:
            request = IP(src="10.213.0.2", dst="192.0.2.1") / ICMP(type=8, id=7, seq=seq) / Raw(data)
            reply = IP(src="192.0.2.1", dst="10.213.0.2") / ICMP(type=0, id=7, seq=seq) / Raw(data)
            out += [(icmp.OUT, bytes(request[ICMP].payload)), (icmp.IN, bytes(reply[ICMP].payload))]
    return out


# --------------------------------------------------------------------------
# Patterns of ping tools


@pytest.mark.parametrize("data, name", [
    (iputils(), "incrementing"), (iputils(timeval=8), "incrementing"),
    (iputils(1400), "incrementing"), (iputils(12), "incrementing"), (bsd(), "incrementing"),
    (bsd(120), "incrementing"), (windows(), "windows"), (windows(64), "windows"),
    (busybox(), "repeating"), (busybox(fill=0xFF), "repeating"), (busybox(12), "repeating"), (bytes(56), "repeating"),
    (pattern(56, b"\xff"), "repeating"), (pattern(100, b"\xde\xad\xbe\xef"), "repeating"),
    (pattern(120, bytes(range(16))), "repeating"), (b"", "empty"),
])
def test_ping_patterns(data, name):
    assert icmp.ping_pattern(data) == name


def test_windows_payload_text():
    assert windows() == b"abcdefghijklmnopqrstuvwabcdefghi"


@pytest.mark.parametrize("data", [
    bytes(random.Random(1).randbytes(56)), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2,
    iputils()[:16] + b"exfiltrated data here: x", b"abcdefghijklmnopqrstuvwXbcdefghi",
    bytes(range(20, 76)), iputils(16)])
def test_not_ping_patterns(data):
    assert icmp.ping_pattern(data) is None


@pytest.mark.parametrize("make, v6", [(iputils, False), (iputils, True), (bsd, False),
                                      (windows, False), (busybox, False)])
def test_ping_sessions_are_ping_shaped(make, v6):
    shape = icmp.echo_shape(echo([make(seq=s) if make is not windows else make()
                                  for s in range(8)], v6=v6))
    assert shape.packets == 16 and shape.requests == shape.replies == 8
    assert shape.bytes_out == shape.bytes_in and shape.unechoed_replies == 0
    assert shape.nonstandard == 0 and not shape.embeds_ip
    assert icmp.ping_shaped(shape)


def test_other_tools_small_payloads_are_ping_shaped():
    # A timestamp-only payload (ping -s 16) and nmap's empty echo.
    shape = icmp.echo_shape(echo([iputils(16, seq=s) for s in range(5)] + [b""]))
    assert shape.nonstandard == 10 and shape.max_nonstandard == 16
    assert icmp.ping_shaped(shape)


def test_mtu_probe_with_large_standard_payloads():
    shape = icmp.echo_shape(echo([iputils(1472, seq=s) for s in range(3)]))
    assert shape.max_payload == 1472 and icmp.ping_shaped(shape)


# --------------------------------------------------------------------------
# Tunnels


def test_ip_packets_inside_are_a_tunnel():
    inner = bytes(IP(src="10.0.0.2", dst="203.0.113.5") / TCP(dport=443, flags="S"))
    for wrapped in (inner, b"hans\x01" + inner, b"\x00\x00\x08\x00" + inner):
        assert icmp.embedded_ip(wrapped)
    inner6 = bytes(IPv6(src="fd00::2", dst="2001:db8::5") / UDP(dport=53) / b"q")
    assert icmp.embedded_ip(inner6)
    shape = icmp.echo_shape(echo([inner]))
    assert shape.embeds_ip and not icmp.ping_shaped(shape)


def test_zero_length_ipv6_look_alike_in_a_timestamp_is_not_ip():
    # Here tv_usec starts with 0x60 and its high bytes are zero: read from offset 8,
    # 40 bytes of "IPv6 header" with payload length 0 fill the rest exactly.
    data = iputils(48, seq=32)
    assert data[8] == 0x60 and data[12:14] == b"\0\0"
    assert not icmp.embedded_ip(data) and icmp.ping_pattern(data) == "incrementing"


def test_ip_header_needs_a_valid_checksum():
    header = bytearray(bytes(IP(src="10.0.0.2", dst="203.0.113.5") / TCP()))
    header[10] ^= 0xFF
    assert not icmp.embedded_ip(bytes(header))
    assert not any(icmp.embedded_ip(p) for p in (iputils(), bsd(), windows(), busybox()))


def test_replies_that_do_not_echo_are_a_tunnel():
    rng = random.Random(7)
    payloads = [(icmp.OUT, iputils(seq=1)), (icmp.IN, iputils(seq=1)),
                (icmp.OUT, iputils(seq=2)), (icmp.IN, iputils(seq=9))]
    shape = icmp.echo_shape(payloads)
    assert shape.unechoed_replies == 1 and not icmp.ping_shaped(shape)
    download = [(icmp.OUT, b"poll"), (icmp.IN, rng.randbytes(1024)), (icmp.OUT, b"poll"),
                (icmp.IN, rng.randbytes(1024))]
    shape = icmp.echo_shape(download)
    assert shape.bytes_out == 8 and shape.bytes_in == 2048
    assert shape.unechoed_replies == 2 and not icmp.ping_shaped(shape)


def test_high_entropy_requests_are_not_ping_even_when_echoed():
    rng = random.Random(3)
    shape = icmp.echo_shape(echo([rng.randbytes(512) for _ in range(4)]))
    assert shape.mean_entropy > 7.0 and shape.max_nonstandard == 512
    assert not icmp.ping_shaped(shape)
    small = icmp.echo_shape(echo([rng.randbytes(48) for _ in range(4)]))
    assert small.nonstandard_entropy > icmp.LOW_ENTROPY and not icmp.ping_shaped(small)


def test_entropy():
    assert icmp.entropy(b"") == 0.0 and icmp.entropy(b"aaaa") == 0.0
    assert icmp.entropy(bytes(range(256))) == pytest.approx(8.0)
    assert icmp.entropy(b"abab") == pytest.approx(1.0)


def test_empty_and_unknown_directions():
    assert icmp.echo_shape([]) == icmp.EchoShape()
    assert icmp.ping_shaped(icmp.EchoShape())
    shape = icmp.echo_shape([("sideways", b"x" * 100), (icmp.OUT, iputils()), ([1], b"x"),
                             (icmp.IN, "text"), (icmp.IN,), None])
    assert shape.packets == 1


# --------------------------------------------------------------------------
# Properties


DIRECTIONS = st.sampled_from([icmp.OUT, icmp.IN, "other"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(DIRECTIONS, st.binary(max_size=300)), max_size=12))
def test_random_payloads_never_raise(payloads):
    shape = icmp.echo_shape(payloads)
    assert 0 <= shape.mean_entropy <= 8 and 0 <= shape.nonstandard_entropy <= 8
    assert shape.packets == shape.requests + shape.replies == shape.standard + shape.nonstandard
    assert shape.max_payload >= shape.max_nonstandard
    assert shape.unechoed_replies <= shape.replies
    assert isinstance(icmp.ping_shaped(shape), bool)


@settings(max_examples=200, deadline=None)
@given(st.integers(24, 1472), st.sampled_from([8, 16]), st.integers(0, 65535), st.booleans())
def test_iputils_of_any_size_is_ping_shaped(size, timeval, seq, v6):
    shape = icmp.echo_shape(echo([iputils(size, seq, timeval), iputils(size, seq + 1, timeval)],
                                 v6=v6))
    assert shape.patterns == {"incrementing"} and icmp.ping_shaped(shape)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(65, 1400))
def test_random_data_is_not_ping_shaped(seed, size):
    # Seeded rather than drawn: hypothesis shrinks drawn bytes towards zeros, a fill pattern.
    rng = random.Random(seed)
    shape = icmp.echo_shape(echo([rng.randbytes(size) for _ in range(3)]))
    assert not icmp.ping_shaped(shape)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([icmp.OUT, icmp.IN]))
def test_embedded_ip_is_never_ping_shaped(prefix, direction):
    inner = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(dport=53) / b"tunnelled")
    data = prefix[:icmp.IP_SCAN] + inner
    shape = icmp.echo_shape([(direction, data)])
    assert shape.embeds_ip and not icmp.ping_shaped(shape)


def test_thresholds_sit_between_timestamps_and_random_data():
    # Random data of 32 bytes already exceeds LOW_ENTROPY on average; timestamps stay under.
    rng = random.Random(11)
    mean32 = sum(icmp.entropy(rng.randbytes(32)) for _ in range(200)) / 200
    assert mean32 > icmp.LOW_ENTROPY > max(icmp.entropy(iputils(16, s)) for s in range(100))
    assert math.log2(icmp.SMALL_PAYLOAD) >= icmp.LOW_ENTROPY
