"""Capture files: pcap and pcapng in either byte order, every timestamp resolution, gzip, damage."""

from __future__ import annotations

import gzip

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import EDecimal, wrpcap

from egress.capture import files
from egress.capture.files import CaptureError, open_capture
from tests.egress.capture.build import (MACS, epb, idb, isb, nrb, opb, pcap_file, pcap_header,
                                        pcap_record, read_all, shb, sll, spb)

SEC = 1_700_000_000


def frames(n: int = 3) -> list[bytes]:
    """Ethernet frames of different sizes (odd ones too, so pcapng padding matters)."""
    return [bytes(Ether(**MACS) / IP(src="10.0.0.1", dst="192.0.2.7")
                  / UDP(sport=5000 + i, dport=53) / (b"q" * (i * 7 + 1))) for i in range(n)]


def write(tmp_path, data: bytes, name: str = "c.pcap"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------- pcap

@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_pcap_microseconds_either_byte_order(tmp_path, order):
    data = frames()
    fracs = [0, 123_456, 999_999]
    path = write(tmp_path, pcap_file([(SEC + i, fracs[i], d) for i, d in enumerate(data)],
                                     order=order))
    packets, stats = read_all(path)
    assert packets == [(1, (SEC + i) * 1_000_000 + fracs[i], d, len(d))
                       for i, d in enumerate(data)]
    assert stats.packets == 3 and stats.truncated is None and stats.linktypes == {1}


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_pcap_nanoseconds_become_whole_microseconds(tmp_path, order):
    data = frames()
    nanos = [1, 123_456_789, 999_999_999]
    path = write(tmp_path, pcap_file([(SEC, ns, d) for ns, d in zip(nanos, data)],
                                     order=order, nano=True))
    packets, _ = read_all(path)
    assert [ts for _, ts, _, _ in packets] == [SEC * 1_000_000 + 0, SEC * 1_000_000 + 123_456,
                                               SEC * 1_000_000 + 999_999]


@pytest.mark.parametrize("nano,endianness", [(False, "<"), (True, ">")])
def test_pcap_written_by_scapy(tmp_path, nano, endianness):
    pkts = [Ether(**MACS) / IP() / TCP(dport=443) / b"hello",
            Ether(**MACS) / IPv6() / UDP() / b"x"]
    pkts[0].time = EDecimal("1700000000.000001")
    pkts[1].time = EDecimal("1700000002.5")
    wrpcap(str(tmp_path / "s.pcap"), pkts, nano=nano, endianness=endianness)
    packets, _ = read_all(tmp_path / "s.pcap")
    assert packets == [(1, 1_700_000_000_000_001, bytes(pkts[0]), len(pkts[0])),
                       (1, 1_700_000_002_500_000, bytes(pkts[1]), len(pkts[1]))]


def test_pcap_snapped_records_keep_the_original_length(tmp_path):
    full = frames(1)[0]
    path = write(tmp_path, pcap_header(snaplen=40) +
                 pcap_record(SEC, 0, full[:40], origlen=len(full)))
    (packet,), _ = read_all(path)
    assert packet[2] == full[:40] and packet[3] == len(full)


def test_pcap_link_type_is_taken_from_the_header(tmp_path):
    ip = bytes(IP() / UDP())
    path = write(tmp_path, pcap_file([(SEC, 0, ip)], linktype=101))
    packets, stats = read_all(path)
    assert packets[0][0] == 101 and stats.linktypes == {101}


def test_pcap_fcs_bits_are_not_part_of_the_link_type(tmp_path):
    # libpcap's LT_FCS_DATALINK_EXT(4) | LINKTYPE_ETHERNET: "Ethernet, 4-byte FCS".
    path = write(tmp_path, pcap_file([(SEC, 0, frames(1)[0] + b"\xde\xad\xbe\xef")],
                                     linktype=(4 << 28) | 0x04000000 | 1))
    packets, stats = read_all(path)
    assert packets[0][0] == 1 and stats.linktypes == {1}


def test_records_larger_than_a_read_chunk(tmp_path, monkeypatch):
    """Records straddling read boundaries come out whole, whatever the chunk size."""
    data = frames(6)
    pcap = pcap_file([(SEC, i, d) for i, d in enumerate(data)])
    pcapng = shb() + idb(1) + b"".join(epb(0, i, d) for i, d in enumerate(data))
    expected = [(1, SEC * 1_000_000 + i, d, len(d)) for i, d in enumerate(data)]
    expected_ng = [(1, i, d, len(d)) for i, d in enumerate(data)]
    monkeypatch.setattr(files, "CHUNK", 7)
    assert read_all(write(tmp_path, pcap))[0] == expected
    assert read_all(write(tmp_path, pcapng, "c.pcapng"))[0] == expected_ng
    assert read_all(write(tmp_path, gzip.compress(pcap), "c.pcap.gz"))[0] == expected


# ------------------------------------------------------------------- pcapng

def test_pcapng_interfaces_link_types_resolutions_and_sections(tmp_path):
    eth, ip4, ip6 = frames(1)[0], bytes(IP() / UDP() / b"a"), bytes(IPv6() / UDP() / b"bb")
    cooked = sll(ip4)
    first = (shb() + idb(1)                           # default resolution: microseconds
             + idb(101, tsresol=9)                    # nanoseconds
             + idb(113, tsresol=0x80 | 10)            # 2^-10 s
             + nrb() + isb()
             + epb(0, 1_700_000_000_123_456, eth)
             + epb(1, 1_700_000_000_123_456_789, ip4)
             + epb(2, 1024 * 5 + 512, cooked, origlen=len(cooked) + 100)
             + opb(1, 7_000, ip4))
    # A second section, big-endian: its interfaces replace the first section's.
    second = (shb(">") + idb(229, snaplen=30, tsresol=3, order=">")     # milliseconds
              + epb(0, 42, ip6, order=">")
              + spb(ip6, order=">"))
    packets, stats = read_all(write(tmp_path, first + second, "c.pcapng"))
    assert packets == [
        (1, 1_700_000_000_123_456, eth, len(eth)),
        (101, 1_700_000_000_123_456, ip4, len(ip4)),
        (113, 5_500_000, cooked, len(cooked) + 100),
        (101, 7, ip4, len(ip4)),
        (229, 42_000, ip6, len(ip6)),
        (229, 0, ip6[:30], len(ip6)),      # a Simple Packet Block: no time, cut at the snaplen
    ]
    assert stats.packets == 6 and stats.skipped_blocks == 2
    assert stats.linktypes == {1, 101, 113, 229} and stats.truncated is None


def test_pcapng_two_to_the_minus_ten_resolution_rounds_down(tmp_path):
    data = frames(1)[0]
    ticks = 3 * 1024 + 1            # 3 s and 1/1024 s = 976.5625 us
    packets, _ = read_all(write(tmp_path, shb() + idb(1, tsresol=0x8A) + epb(0, ticks, data),
                                "c.pcapng"))
    assert packets[0][1] == 3_000_976


def test_pcapng_packet_for_an_unknown_interface_is_skipped(tmp_path):
    a, b = frames(2)
    packets, stats = read_all(write(tmp_path, shb() + idb(1) + epb(3, 1, a) + epb(0, 2, b),
                                    "c.pcapng"))
    assert packets == [(1, 2, b, len(b))] and stats.packets == 1


def test_pcapng_captured_length_beyond_the_block_is_not_a_packet(tmp_path):
    data = b"\x11" * 8
    bad = epb(0, 1, data, caplen=64)          # the block holds 8 bytes and options; 64 runs past it
    packets, _ = read_all(write(tmp_path, shb() + idb(1) + bad, "c.pcapng"))
    assert packets == []


# --------------------------------------------------------------------- gzip

def test_gzip_pcap_and_pcapng_are_read_transparently(tmp_path):
    data = frames()
    pcap = pcap_file([(SEC, i, d) for i, d in enumerate(data)])
    pcapng = shb() + idb(1, tsresol=6) + b"".join(epb(0, i, d) for i, d in enumerate(data))
    assert read_all(write(tmp_path, gzip.compress(pcap), "a.pcap.gz"))[0] == \
        read_all(write(tmp_path, pcap, "a.pcap"))[0]
    assert read_all(write(tmp_path, gzip.compress(pcapng), "a.pcapng.gz"))[0] == \
        [(1, i, d, len(d)) for i, d in enumerate(data)]


def test_gzip_cut_off_yields_the_packets_before(tmp_path):
    data = frames(40)
    compressed = gzip.compress(pcap_file([(SEC, i, d) for i, d in enumerate(data)]))
    path = write(tmp_path, compressed[:len(compressed) * 3 // 4], "cut.pcap.gz")
    packets, stats = read_all(path)
    assert 0 < len(packets) < len(data)
    assert packets == [(1, SEC * 1_000_000 + i, d, len(d)) for i, d in enumerate(data)][
        :len(packets)]
    assert stats.truncated


def test_gzip_header_with_garbage_is_a_capture_error(tmp_path):
    path = write(tmp_path, b"\x1f\x8b" + b"\xff" * 40, "bad.gz")
    with pytest.raises(CaptureError) as err:
        read_all(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------- damage

def test_pcap_cut_off_inside_a_packet(tmp_path):
    data = frames(3)
    whole = pcap_file([(SEC, i, d) for i, d in enumerate(data)])
    packets, stats = read_all(write(tmp_path, whole[:-5]))
    assert [p[2] for p in packets] == data[:2]
    assert stats.packets == 2 and stats.truncated


def test_pcap_cut_off_inside_a_record_header(tmp_path):
    data = frames(2)
    whole = pcap_file([(SEC, i, d) for i, d in enumerate(data)])
    packets, stats = read_all(write(tmp_path, whole[:24 + 16 + len(data[0]) + 9]))
    assert [p[2] for p in packets] == data[:1] and stats.truncated


def test_pcap_ending_on_a_record_boundary_is_not_truncated(tmp_path):
    packets, stats = read_all(write(tmp_path, pcap_header()))
    assert packets == [] and stats.truncated is None and stats.linktypes == {1}


@pytest.mark.parametrize("caplen", [0xFFFF_FFF0, 300 << 20, 10_000])
def test_pcap_damaged_length_field_ends_the_file(tmp_path, caplen):
    data = frames(2)
    body = pcap_file([(SEC, 0, data[0])]) + pcap_record(SEC, 1, data[1], caplen=caplen)
    packets, stats = read_all(write(tmp_path, body))
    assert [p[2] for p in packets] == data[:1] and stats.truncated


def test_pcapng_cut_off_inside_a_block(tmp_path):
    data = frames(3)
    whole = shb() + idb(1) + b"".join(epb(0, i, d) for i, d in enumerate(data))
    packets, stats = read_all(write(tmp_path, whole[:-10], "c.pcapng"))
    assert [p[2] for p in packets] == data[:2] and stats.truncated


def test_pcapng_cut_off_inside_a_block_header(tmp_path):
    data = frames(2)
    whole = shb() + idb(1) + b"".join(epb(0, i, d) for i, d in enumerate(data))
    cut = len(whole) - len(epb(0, 1, data[1])) + 6
    packets, stats = read_all(write(tmp_path, whole[:cut], "c.pcapng"))
    assert [p[2] for p in packets] == data[:1] and stats.truncated


@pytest.mark.parametrize("blen", [8, 30, 1 << 30])
def test_pcapng_damaged_block_length_ends_the_file(tmp_path, blen):
    data = frames(2)
    damaged = bytearray(epb(0, 1, data[1]))
    damaged[4:8] = blen.to_bytes(4, "little")
    packets, stats = read_all(write(tmp_path, shb() + idb(1) + epb(0, 0, data[0]) +
                                    bytes(damaged), "c.pcapng"))
    assert [p[2] for p in packets] == data[:1] and stats.truncated


def test_pcapng_bad_byte_order_magic_is_a_capture_error(tmp_path):
    bad = bytearray(shb())
    bad[8:12] = b"\x01\x02\x03\x04"
    path = write(tmp_path, bytes(bad), "c.pcapng")
    with pytest.raises(CaptureError, match="byte-order"):
        read_all(path)


@pytest.mark.parametrize("content", [
    b"this is a text file, not a capture\n",
    b"",
    b"\xd4\xc3",                                  # half a magic
], ids=["text", "empty", "two-bytes"])
def test_not_a_capture_is_one_line_naming_the_file(tmp_path, content):
    path = write(tmp_path, content, "notes.txt")
    with pytest.raises(CaptureError) as err:
        open_capture(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_pcap_header_cut_off_is_a_capture_error(tmp_path):
    path = write(tmp_path, pcap_header()[:10])
    with pytest.raises(CaptureError) as err:
        read_all(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_capture_error(tmp_path):
    with pytest.raises(CaptureError) as err:
        open_capture(tmp_path / "nope.pcap")
    assert "nope.pcap" in str(err.value)
