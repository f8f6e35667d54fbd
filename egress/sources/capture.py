"""Captures as a source: packets -> decoded -> flow table -> identified -> flow records.

Yields, in capture time order, the DNS bindings as each answer is seen and
each flow's record when the flow ends (closed, idle, or the capture ended).
Several files are read as one capture, in the order given.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from egress.capture.decode import Decoder
from egress.capture.files import CaptureError, open_capture
from egress.community_id import community_id_packed
from egress.flowtable import Flow, FlowTable, conn_state
from egress.identify import Identifier
from egress.names import query_bindings
from egress.records import DnsQuery, FlowRecord, NameBinding, stable_flow_id

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 132: "sctp", 47: "gre",
               50: "esp", 51: "ah", 46: "rsvp", 41: "ipv6", 4: "ipip"}

Owner = Callable[[Flow, str, str], "str | None"]
"""Which task owns a flow, given it and its initiator and responder addresses as text."""


def is_capture(path: str | Path) -> bool:
    """Does the file start like a pcap, pcapng or gzip file?"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    from egress.capture.files import PCAP_MAGICS, PCAPNG_SHB
    return head in PCAP_MAGICS or head == PCAPNG_SHB or head[:2] == b"\x1f\x8b"


@dataclass
class CaptureStats:
    packets: int = 0
    """Packet records read, every file."""
    decoded: int = 0
    """Packets that reached the flow table."""
    malformed: Counter = field(default_factory=Counter)
    """Packets skipped as malformed, by reason."""
    other: Counter = field(default_factory=Counter)
    """Packets that are not IP, by kind."""
    truncated: dict[str, str] = field(default_factory=dict)
    """Files cut off mid-record, with where."""
    table: Counter = field(default_factory=Counter)
    """Flow table counters (flows, finished idle, finished early at the bound)."""


class CaptureSource:
    def __init__(self, paths: list[str], owner: Owner, *, max_flows: int = 200_000):
        self.paths = [str(p) for p in paths]
        self.owner = owner
        self.stats = CaptureStats()
        self._out: list[FlowRecord | NameBinding] = []
        self._text: dict[bytes, str] = {}
        self._identifier = Identifier(on_answer=self._answer)
        self._table = FlowTable(self._finish, self._identifier.update, max_flows=max_flows)

    def __iter__(self) -> Iterator[FlowRecord | NameBinding]:
        out = self._out
        table, decoder = self._table, Decoder()
        decode, packet = decoder.decode, table.packet
        for path in self.paths:
            packets, read = open_capture(path)   # CaptureError: not a capture
            decoded = 0
            for linktype, ts, buf, off, caplen, _ in packets:
                d = decode(linktype, ts, buf, off, caplen)
                if d is not None:
                    decoded += 1
                    packet(ts, *d)
                    if out:
                        yield from out
                        out.clear()
            self.stats.packets += read.packets
            self.stats.decoded += decoded
            if read.truncated:
                self.stats.truncated[path] = read.truncated
        decoder.finish()
        table.close()
        yield from out
        out.clear()
        self.stats.malformed.update(decoder.malformed)
        self.stats.other.update(decoder.other)
        self.stats.table.update(table.stats)

    # --------------------------------------------------------------- callbacks

    def _addr(self, packed: bytes) -> str:
        text = self._text.get(packed)
        if text is None:
            text = self._text[packed] = str(ipaddress.ip_address(packed))
        return text

    def _flow_id(self, flow: Flow) -> str:
        if flow.flow_id is None:
            flow.flow_id = stable_flow_id(flow.proto, flow.src.hex(), flow.sport, flow.dst.hex(),
                                          flow.dport, flow.start)
        return flow.flow_id

    def _answer(self, flow: Flow, query: DnsQuery, ts: int) -> None:
        self._flow_id(flow)
        task = self.owner(flow, self._addr(flow.src), self._addr(flow.dst))
        self._out.extend(query_bindings(query, task, ts, flow.flow_id))

    def _finish(self, flow: Flow) -> None:
        src, dst = self._addr(flow.src), self._addr(flow.dst)
        portless = flow.sport is None or flow.proto not in (6, 17, 132)
        try:
            if flow.icmp is not None:
                itype, code, _, first_is_orig = flow.icmp
                a, b = (flow.src, flow.dst) if first_is_orig else (flow.dst, flow.src)
                cid = community_id_packed(flow.proto, a, b, itype, code)
            else:
                cid = community_id_packed(flow.proto, flow.src, flow.dst,
                                          None if portless else flow.sport,
                                          None if portless else flow.dport)
        except ValueError:
            cid = None      # a tuple the spec cannot hash; the record says unknown
            self.stats.table["flows without a community id"] += 1
        record = FlowRecord(
            flow_id=self._flow_id(flow),
            task=self.owner(flow, src, dst),
            community_id=cid,
            proto=PROTO_NAMES.get(flow.proto, str(flow.proto)),
            ip_version=flow.ipver,
            src=src, sport=None if portless else flow.sport,
            dst=dst, dport=None if portless else flow.dport,
            start=flow.start, end=flow.last,
            conn_state=conn_state(flow),
            observed="full",
            bytes_out=flow.bytes_o, bytes_in=flow.bytes_r,
            packets_out=flow.pkts_o, packets_in=flow.pkts_r,
            weird=sorted(flow.weird),
            **self._identifier.fields(flow))
        self._out.append(record)
