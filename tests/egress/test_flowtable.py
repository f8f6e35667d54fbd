"""The flow table: orientation, counters, Zeek's conn_state, first bytes, timeouts, bounds."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from egress.capture.decode import Decoder
from egress.flowtable import DATAGRAM_CAP, MAX_PENDING, STREAM_CAP, FlowTable, conn_state

C4, S4 = "10.213.0.2", "203.0.113.10"
C6, S6 = "2001:db8::2", "2001:db8::10"
CPORT, SPORT = 40000, 443
SEC = 1_000_000

# Zeek's defaults (base/init-bare.zeek), written here rather than read from the module.
TCP_IDLE, UDP_IDLE, ICMP_IDLE, CLOSE_DELAY = 300 * SEC, 60 * SEC, 60 * SEC, 5 * SEC


def packed(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def tcp(frm: str, flags: str, seq: int = 0, data: bytes = b"", *, sport: int = CPORT):
    """A segment of the test conversation, from the client ("c") or the server ("s")."""
    if frm == "c":
        return IP(src=C4, dst=S4) / TCP(sport=sport, dport=SPORT, flags=flags, seq=seq) / data
    return IP(src=S4, dst=C4) / TCP(sport=SPORT, dport=sport, flags=flags, seq=seq) / data


def udp(frm: str, data: bytes = b"q", *, sport: int = 5353):
    if frm == "c":
        return IP(src=C4, dst=S4) / UDP(sport=sport, dport=53) / data
    return IP(src=S4, dst=C4) / UDP(sport=53, dport=sport) / data


def ping(frm: str, ident: int = 0x77, data: bytes = b"ping"):
    if frm == "c":
        return IP(src=C4, dst=S4) / ICMP(type=8, id=ident, seq=1) / data
    return IP(src=S4, dst=C4) / ICMP(type=0, id=ident, seq=1) / data


class Harness:
    """A flow table fed through the decoder, recording what it hands out."""

    def __init__(self, max_flows: int = 200_000, on_payload=None):
        self.finished = []
        self.payload_calls = []
        self.hook = on_payload
        self.table = FlowTable(self.finished.append, self._payload, max_flows=max_flows)
        self.decoder = Decoder()
        self.sent = {True: 0, False: 0}

    def _payload(self, flow, is_orig):
        self.payload_calls.append((flow, is_orig))
        if self.hook:
            self.hook(flow, is_orig)

    def send(self, ts: int, pkt) -> int:
        raw = bytes(pkt)
        decoded = self.decoder.decode(101, ts, raw, 0, len(raw))
        assert decoded is not None
        self.table.packet(ts, *decoded)
        return len(raw)

    def conversation(self, steps, ts: int = 0, step_us: int = 1000):
        """Send (from, flags) steps with sensible sequence numbers; returns bytes sent by side."""
        sent = {"c": 0, "s": 0}
        seq = {"c": 1000, "s": 5000}
        for frm, flags in steps:
            sent[frm] += self.send(ts, tcp(frm, flags, seq[frm]))
            if "S" in flags or "F" in flags:
                seq[frm] += 1
            ts += step_us
        return sent

    def close(self):
        self.table.close()
        return self.finished

    def only(self):
        flows = self.close()
        assert len(flows) == 1
        return flows[0]


# --------------------------------------------------------------- orientation

def test_orientation_and_counters_from_the_syn_sender():
    h = Harness()
    out = h.send(0, tcp("c", "S", 1000))
    back = h.send(1, tcp("s", "SA", 5000))
    out += h.send(2, tcp("c", "A", 1001)) + h.send(3, tcp("c", "PA", 1001, b"hello"))
    back += h.send(4, tcp("s", "PA", 5001, b"world!"))
    flow = h.only()
    assert (flow.src, flow.sport, flow.dst, flow.dport) == (packed(C4), CPORT, packed(S4), SPORT)
    assert (flow.pkts_o, flow.pkts_r, flow.bytes_o, flow.bytes_r) == (3, 2, out, back)
    assert out == 3 * 40 + 5 and back == 2 * 40 + 6          # IP lengths
    assert flow.start == 0 and flow.last == 4
    assert not flow.midstream and flow.weird == set()
    assert conn_state(flow) == "S1"


def test_syn_ack_seen_first_still_orients_from_the_syn_sender():
    h = Harness()
    back = h.send(0, tcp("s", "SA", 5000))
    out = h.send(1, tcp("c", "S", 1000)) + h.send(2, tcp("c", "A", 1001))
    back += h.send(3, tcp("s", "PA", 5001, b"SSH-2.0-srv\r\n"))
    flow = h.only()
    assert (flow.src, flow.sport, flow.dst, flow.dport) == (packed(C4), CPORT, packed(S4), SPORT)
    assert (flow.pkts_o, flow.pkts_r, flow.bytes_o, flow.bytes_r) == (2, 2, out, back)
    assert not flow.midstream and "midstream" not in flow.weird
    assert bytes(flow.sstream.data) == b"SSH-2.0-srv\r\n"
    assert conn_state(flow) == "S1"


def test_capture_starting_mid_stream():
    h = Harness()
    h.send(0, tcp("s", "PA", 777_000, b"late bytes"))
    h.send(1, tcp("c", "A", 1234))
    h.send(2, tcp("s", "PA", 777_010, b", more"))
    flow = h.only()
    assert flow.midstream and flow.weird == {"midstream"}
    # No SYN: the side on a well-known port sending to an ephemeral one is the server
    # (Zeek's likely_server_ports), so the client is still the initiator.
    assert flow.src == packed(C4)
    assert (flow.pkts_o, flow.pkts_r) == (1, 2)
    assert bytes(flow.sstream.data) == b"late bytes, more"
    assert conn_state(flow) == "OTH"


def test_udp_is_oriented_from_the_first_sender():
    h = Harness()
    out = h.send(0, udp("c", b"query"))
    back = h.send(1, udp("s", b"answer!")) + h.send(2, udp("s", b"again"))
    flow = h.only()
    assert (flow.src, flow.sport, flow.dst, flow.dport) == (packed(C4), 5353, packed(S4), 53)
    assert (flow.pkts_o, flow.pkts_r, flow.bytes_o, flow.bytes_r) == (1, 2, out, back)
    assert flow.cgrams == [b"query"] and flow.sgrams == [b"answer!", b"again"]
    assert conn_state(flow) == "SF"


def test_udp_without_a_reply_is_s0():
    h = Harness()
    h.send(0, udp("c"))
    h.send(1, udp("c"))
    flow = h.only()
    assert (flow.pkts_o, flow.pkts_r) == (2, 0) and conn_state(flow) == "S0"


def test_bytes_count_the_ip_length_not_what_was_captured():
    finished = []
    table = FlowTable(finished.append, lambda flow, is_orig: None)
    # A 1500-byte datagram of which the snap length kept 100 bytes, and its reply.
    table.packet(0, 4, packed(C4), packed(S4), 17, 1, 2, 0, 0, 1500, b"x" * 100, 28, 72)
    table.packet(1, 4, packed(S4), packed(C4), 17, 2, 1, 0, 0, 9000, b"", 0, 0)
    table.close()
    (flow,) = finished
    assert (flow.bytes_o, flow.bytes_r, flow.pkts_o, flow.pkts_r) == (1500, 9000, 1, 1)


def test_icmp_echo_request_and_reply_pair_into_one_flow():
    h = Harness()
    out = h.send(0, ping("c", data=b"abc"))
    back = h.send(1, ping("s", data=b"abc"))
    h.send(2, ping("c", ident=0x78))                  # another identifier: another flow
    first, second = h.close()
    assert (first.src, first.dst, first.proto) == (packed(C4), packed(S4), 1)
    assert (first.pkts_o, first.pkts_r, first.bytes_o, first.bytes_r) == (1, 1, out, back)
    assert first.icmp == [8, 0, [(True, b"abc"), (False, b"abc")], True]
    assert (second.pkts_o, second.pkts_r) == (1, 0)
    assert conn_state(first) == "SF" and conn_state(second) == "S0"


def test_icmp_echo_reply_seen_first_orients_from_the_pinger():
    h = Harness()
    h.send(0, ping("s", data=b"r"))
    h.send(1, ping("c", data=b"q"))
    flow = h.only()
    assert (flow.src, flow.dst) == (packed(C4), packed(S4))
    assert (flow.pkts_o, flow.pkts_r) == (1, 1)
    assert flow.icmp[2] == [(False, b"r"), (True, b"q")] and flow.icmp[3] is False


def test_icmp6_echo_pairs():
    h = Harness()
    h.send(0, IPv6(src=C6, dst=S6) / ICMPv6EchoRequest(id=5, data=b"six"))
    h.send(1, IPv6(src=S6, dst=C6) / ICMPv6EchoReply(id=5, data=b"six"))
    flow = h.only()
    assert (flow.src, flow.proto, flow.pkts_o, flow.pkts_r) == (packed(C6), 58, 1, 1)
    assert flow.icmp[:2] == [128, 0]


def test_icmp6_reply_seen_first_keeps_its_type_and_code():
    h = Harness()
    h.send(0, IPv6(src=S6, dst=C6) / ICMPv6EchoReply(id=5, data=b"six"))
    flow = h.only()
    assert flow.icmp[:2] == [129, 0] and flow.icmp[3] is False


def test_ping_to_itself_is_finished():
    h = Harness()
    h.send(0, IP(src="127.0.0.1", dst="127.0.0.1") / ICMP(type=8, id=9) / b"x")
    h.send(1, IP(src="127.0.0.1", dst="127.0.0.1") / ICMP(type=0, id=9) / b"x")
    flows = h.close()
    assert len(flows) == 1 and flows[0].pkts_o + flows[0].pkts_r == 2
    assert h.table.open == 0


# ---------------------------------------------------------------- conn_state

# Zeek's conn_state codes (base/protocols/conn/main.zeek), by the packets that make them.
CONN_STATES = {
    "S0": [("c", "S")],                                   # attempt, no reply
    "S1": [("c", "S"), ("s", "SA"), ("c", "A")],          # established, not terminated
    "SF": [("c", "S"), ("s", "SA"), ("c", "A"), ("c", "FA"), ("s", "FA"), ("c", "A")],
    "REJ": [("c", "S"), ("s", "RA")],                     # attempt rejected
    "S2": [("c", "S"), ("s", "SA"), ("c", "A"), ("c", "FA")],   # originator closed only
    "S3": [("c", "S"), ("s", "SA"), ("c", "A"), ("s", "FA")],   # responder closed only
    "RSTO": [("c", "S"), ("s", "SA"), ("c", "A"), ("c", "RA")],
    "RSTR": [("c", "S"), ("s", "SA"), ("c", "A"), ("s", "R")],
    "RSTOS0": [("c", "S"), ("c", "R")],                   # SYN then RST, no SYN-ACK
    "SH": [("c", "S"), ("c", "F")],                       # SYN then FIN, no SYN-ACK
    "RSTRH": [("s", "SA"), ("s", "R")],                   # SYN-ACK then RST, no SYN seen
    "SHR": [("s", "SA"), ("s", "FA")],                    # SYN-ACK then FIN, no SYN seen
    "OTH": [("c", "PA"), ("s", "A")],                     # no SYN: mid-stream
}


@pytest.mark.parametrize("state", list(CONN_STATES))
def test_tcp_conn_state(state):
    h = Harness()
    h.conversation(CONN_STATES[state])
    flow = h.only()
    assert conn_state(flow) == state
    assert flow.src == packed(C4)


def test_retransmitted_syns_stay_s0():
    h = Harness()
    for ts in (0, SEC, 3 * SEC):
        h.send(ts, tcp("c", "S", 1000))
    flow = h.only()
    assert flow.pkts_o == 3 and conn_state(flow) == "S0"


# ---------------------------------------------------------------- first bytes

def handshake(h: Harness, isn_c: int = 1000, isn_s: int = 5000, ts: int = 0) -> None:
    h.send(ts, tcp("c", "S", isn_c))
    h.send(ts + 1, tcp("s", "SA", isn_s))
    h.send(ts + 2, tcp("c", "A", (isn_c + 1) & 0xFFFFFFFF))


def stream_of(h: Harness, orig: bool = True) -> bytes:
    flow = h.table.open_flows()[0]
    s = flow.cstream if orig else flow.sstream
    return bytes(s.data)


def client_calls(h: Harness) -> int:
    return sum(1 for _, is_orig in h.payload_calls if is_orig)


def test_out_of_order_segments_are_reassembled_in_sequence_order():
    h = Harness()
    handshake(h)
    h.send(10, tcp("c", "PA", 1008, b"hij"))
    h.send(11, tcp("c", "PA", 1005, b"efg"))
    assert stream_of(h) == b"" and client_calls(h) == 0
    h.send(12, tcp("c", "PA", 1001, b"abcd"))
    assert stream_of(h) == b"abcdefghij" and client_calls(h) == 1
    h.send(13, tcp("c", "PA", 1011, b"k"))
    assert stream_of(h) == b"abcdefghijk" and client_calls(h) == 2
    flow = h.only()
    assert flow.weird == set()


def test_identical_retransmissions_are_fine():
    h = Harness()
    handshake(h)
    for _ in range(2):
        h.send(10, tcp("c", "PA", 1001, b"hello "))
        h.send(11, tcp("c", "PA", 1007, b"world"))
    h.send(12, tcp("c", "PA", 1004, b"lo wo"))          # a repacketised retransmission
    assert stream_of(h) == b"hello world"
    assert h.only().weird == set()


def test_overlapping_retransmission_with_different_bytes_is_weird():
    h = Harness()
    handshake(h)
    h.send(10, tcp("c", "PA", 1001, b"GET /a"))
    h.send(11, tcp("c", "PA", 1005, b"/b HTTP"))        # overlaps "/a" with "/b"
    assert stream_of(h) == b"GET /a HTTP"                # first bytes win; the new tail is kept
    assert h.only().weird == {"overlap-conflict"}


def test_conflicting_out_of_order_segments_are_weird():
    h = Harness()
    handshake(h)
    h.send(10, tcp("c", "PA", 1005, b"AAAA"))
    h.send(11, tcp("c", "PA", 1005, b"BBBB"))
    assert h.only().weird == {"overlap-conflict"}


def test_held_segment_overlapping_the_new_end_is_checked_and_trimmed():
    h = Harness()
    handshake(h)
    h.send(10, tcp("c", "PA", 1004, b"dXfgh"))           # held; overlaps what comes next
    h.send(11, tcp("c", "PA", 1001, b"abcde"))
    assert stream_of(h) == b"abcdefgh"
    assert h.only().weird == {"overlap-conflict"}


def test_held_segment_overlapping_the_new_end_with_the_same_bytes_is_fine():
    h = Harness()
    handshake(h)
    h.send(10, tcp("c", "PA", 1004, b"defgh"))
    h.send(11, tcp("c", "PA", 1001, b"abcde"))
    assert stream_of(h) == b"abcdefgh"
    assert h.only().weird == set()


def test_data_in_a_syn_lands_at_the_first_offset():
    h = Harness()
    h.send(0, tcp("c", "S", 1000, b"\x16\x03\x01early"))      # TCP Fast Open
    h.send(1, tcp("s", "SA", 5000, b"srv"))
    h.send(2, tcp("c", "S", 1000, b"\x16\x03\x01early"))      # the SYN again
    h.send(3, tcp("c", "PA", 1009, b" data"))
    assert stream_of(h) == b"\x16\x03\x01early data"
    assert stream_of(h, orig=False) == b"srv"
    assert h.only().weird == set()


def test_sequence_numbers_wrap():
    h = Harness()
    isn = 0xFFFFFFF8
    handshake(h, isn_c=isn)
    h.send(10, tcp("c", "PA", 0x00000001, b"ijkl"))          # after the wrap, first
    h.send(11, tcp("c", "PA", 0xFFFFFFF9, b"abcdefgh"))      # 0xFFFFFFF9 .. 0x00000000
    assert stream_of(h) == b"abcdefghijkl"


def test_stream_cap_bounds_the_first_bytes():
    h = Harness()
    handshake(h)
    content = bytes(i % 251 for i in range(STREAM_CAP + 5000))
    seq = 1001
    for i in range(0, len(content), 1000):
        h.send(10 + i, tcp("c", "PA", seq, content[i:i + 1000]))
        seq += len(content[i:i + 1000])
    flow = h.table.open_flows()[0]
    assert bytes(flow.cstream.data) == content[:STREAM_CAP] and flow.cstream.full
    assert client_calls(h) == -(-STREAM_CAP // 1000)          # none once full


def test_stream_filled_exactly_to_the_cap_is_full():
    h = Harness()
    handshake(h)
    seg = 1024
    assert STREAM_CAP % seg == 0
    for i in range(STREAM_CAP // seg + 2):
        h.send(10 + i, tcp("c", "PA", 1001 + seg * i, bytes([i % 256]) * seg))
    flow = h.table.open_flows()[0]
    assert flow.cstream.full and len(flow.cstream.data) == STREAM_CAP
    assert client_calls(h) == STREAM_CAP // seg


def test_out_of_order_segments_held_are_bounded():
    h = Harness()
    handshake(h)
    pieces = [bytes([65 + i % 26]) * 10 for i in range(MAX_PENDING + 10)]
    for i in range(1, len(pieces)):                           # everything but the first
        h.send(10 + i, tcp("c", "PA", 1001 + 10 * i, pieces[i]))
    h.send(100, tcp("c", "PA", 1001, pieces[0]))
    assert stream_of(h) == b"".join(pieces[:MAX_PENDING + 1])


# ------------------------------------------------------------ the callback

def test_payload_is_kept_only_while_collecting():
    def stop(flow, is_orig):
        flow.collecting = False

    h = Harness(on_payload=stop)
    handshake(h)
    h.send(10, tcp("c", "PA", 1001, b"first"))
    h.send(11, tcp("c", "PA", 1006, b"second"))
    h.send(12, tcp("s", "PA", 5001, b"reply"))
    h.send(13, udp("c", b"u1"))
    h.send(14, udp("c", b"u2"))
    h.send(15, ping("c", data=b"p1"))
    h.send(16, ping("s", data=b"p2"))
    tcp_flow, udp_flow, icmp_flow = h.close()
    assert bytes(tcp_flow.cstream.data) == b"first" and bytes(tcp_flow.sstream.data) == b""
    assert udp_flow.cgrams == [b"u1"]
    assert icmp_flow.icmp[2] == [(True, b"p1")]
    assert len(h.payload_calls) == 3


def test_udp_datagrams_kept_are_bounded():
    h = Harness()
    for i in range(DATAGRAM_CAP + 3):
        h.send(i, udp("c", bytes([i])))
    flow = h.only()
    assert flow.cgrams == [bytes([i]) for i in range(DATAGRAM_CAP)]
    assert len(h.payload_calls) == DATAGRAM_CAP
    assert flow.pkts_o == DATAGRAM_CAP + 3


def test_empty_udp_datagrams_are_not_payload():
    h = Harness()
    h.send(0, udp("c", b""))
    assert h.only().cgrams == [] and h.payload_calls == []


# --------------------------------------------------------------- finishing

def test_idle_timeouts_per_protocol():
    h = Harness()
    h.send(0, tcp("c", "S", 1000))
    h.send(0, udp("c"))
    h.send(0, ping("c"))
    h.send(0, IP(src=C4, dst=S4, proto=47) / Raw(b"\0\0\x08\0gre"))
    sweep = h.table.sweep
    sweep(min(UDP_IDLE, ICMP_IDLE) - 1)
    assert h.finished == []
    sweep(max(UDP_IDLE, ICMP_IDLE) + 1)
    assert [f.proto for f in h.finished] == [17, 1, 47]
    sweep(TCP_IDLE - 1)
    assert len(h.finished) == 3
    sweep(TCP_IDLE + 1)
    assert [f.proto for f in h.finished] == [17, 1, 47, 6]
    assert h.table.stats["finished idle"] == 4 and h.table.open == 0 and h.table.open_flows() == []


def test_packets_keep_a_flow_alive():
    h = Harness()
    for ts in range(0, 10 * UDP_IDLE, UDP_IDLE // 2):
        h.send(ts, udp("c"))
    assert h.finished == []


def test_packets_drive_the_sweep():
    h = Harness()
    h.send(0, udp("c", sport=1111))
    ts = 0
    while ts <= UDP_IDLE + 15 * SEC:
        ts += 5 * SEC
        h.send(ts, udp("c", sport=2222))
    assert [f.sport for f in h.finished] == [1111]
    assert h.table.stats["finished idle"] == 1


def test_a_closed_flow_finishes_after_the_close_delay():
    h = Harness()
    h.conversation(CONN_STATES["SF"], ts=0, step_us=1000)
    closed_at = 4000                                   # the responder's FIN, fifth packet
    flow = h.table.open_flows()[0]
    assert flow.closed_at == closed_at
    h.table.sweep(closed_at + CLOSE_DELAY - 1)
    assert h.finished == []
    h.table.sweep(closed_at + CLOSE_DELAY + 1)
    assert h.finished == [flow] and conn_state(flow) == "SF"


def test_a_reset_flow_finishes_after_the_close_delay():
    h = Harness()
    h.conversation(CONN_STATES["REJ"], ts=0, step_us=1000)
    h.table.sweep(1000 + CLOSE_DELAY - 1)
    assert h.finished == []
    h.table.sweep(1000 + CLOSE_DELAY + 1)
    assert conn_state(h.finished[0]) == "REJ"


def test_a_new_syn_after_the_close_starts_a_new_flow():
    h = Harness()
    h.conversation(CONN_STATES["SF"], ts=0)
    h.send(SEC, tcp("c", "S", 9_000_000))
    assert len(h.finished) == 1 and conn_state(h.finished[0]) == "SF"
    old, new = h.close()
    assert old is h.finished[0] and new.start == SEC
    assert (new.pkts_o, new.pkts_r) == (1, 0) and conn_state(new) == "S0"
    assert h.table.stats["flows"] == 2


def test_a_syn_on_an_open_flow_is_not_a_new_flow():
    h = Harness()
    h.conversation(CONN_STATES["S1"])
    h.send(SEC, tcp("c", "S", 1000))
    assert len(h.close()) == 1


def test_max_flows_finishes_the_least_recently_seen_early():
    h = Harness(max_flows=20)
    for i in range(20):
        h.send(i, udp("c", sport=10_000 + i))
    h.send(100, udp("c", sport=10_000))                # the first flow is seen again
    assert h.finished == []
    h.send(200, udp("c", sport=20_000))                # one over the bound: a tenth goes
    assert [f.sport for f in h.finished] == [10_001, 10_002]
    assert h.table.stats["finished early at the table's bound"] == 2
    assert h.table.open == 19
    rest = h.close()[2:]
    assert sorted(f.sport for f in rest) == sorted([10_000] + list(range(10_003, 10_020))
                                                   + [20_000])


def test_small_max_flows_still_finishes_one():
    h = Harness(max_flows=3)
    for i in range(4):
        h.send(i, udp("c", sport=10_000 + i))
    assert [f.sport for f in h.finished] == [10_000]
    assert h.table.stats["finished early at the table's bound"] == 1


def test_close_finishes_everything_in_start_order():
    h = Harness()
    starts = {3000: 7, 1000: 5, 2000: 6}
    for ts, port in starts.items():
        h.send(ts, udp("c", sport=port))
    h.send(4000, udp("s", sport=5))                    # seen last, started first
    flows = h.close()
    assert [f.start for f in flows] == [1000, 2000, 3000]
    assert [f.sport for f in flows] == [5, 6, 7]
    assert h.table.open_flows() == [] and h.table.open == 0


def test_a_packet_after_the_idle_timeout_starts_a_new_flow():
    h = Harness()
    h.send(0, udp("c"))
    h.send(2 * UDP_IDLE, udp("c"))
    flows = h.close()
    assert [(f.start, f.pkts_o) for f in flows] == [(0, 1), (2 * UDP_IDLE, 1)]
