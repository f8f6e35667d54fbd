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
from typing import Iterator, Protocol

from egress.capture.decode import Decoder
from egress.capture.files import CaptureError, open_capture
from egress.community_id import community_id_packed
from egress.detectors import Window, live_window
from egress.flowtable import WATCH_CAP, Flow, FlowTable, conn_state
from egress.identify import Identifier
from egress.names import query_bindings
from egress.records import DnsQuery, FlowRecord, NameBinding, Observation, stable_flow_id

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 132: "sctp", 47: "gre",
               50: "esp", 51: "ah", 46: "rsvp", 41: "ipv6", 4: "ipip"}

class Attribution(Protocol):
    """Which task owns a flow and which way it goes (``tagging.attribution.Attribution``)."""

    def owner(self, initiator: str, responder: str, start: int) -> str | None: ...
    def direction(self, initiator: str, responder: str) -> str: ...


def sniff(path: str | Path) -> str:
    """``capture`` or ``flowlog`` by the file's first bytes (inside gzip too); SourceError else."""
    import gzip
    from egress.capture.files import PCAP_MAGICS, PCAPNG_SHB
    from egress.sources.flowlog import SourceError
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:2] == b"\x1f\x8b":
                f.seek(0)
                try:
                    head = gzip.open(f).read(64)
                except (OSError, EOFError) as e:
                    raise SourceError(f"{path}: broken gzip data: {e}") from None
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    if not head:
        raise SourceError(f"{path}: empty: neither a capture nor a flow log")
    if head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_SHB:
        return "capture"
    if head.lstrip()[:1] == b"{":
        return "flowlog"
    raise SourceError(f"{path}: neither a capture (pcap, pcapng) nor a flow log "
                      "(JSON lines of flow records)")


@dataclass
class CaptureStats:
    packets: int = 0
    """Packet records read, every file."""
    decoded: int = 0
    """Packets that reached the flow table."""
    snapped: int = 0
    """Packets the capture's snap length cut short (their payload may be missing)."""
    malformed: Counter = field(default_factory=Counter)
    """Packets skipped as malformed, by reason."""
    other: Counter = field(default_factory=Counter)
    """Packets that are not IP, by kind."""
    truncated: dict[str, str] = field(default_factory=dict)
    """Files cut off mid-record, with where."""
    table: Counter = field(default_factory=Counter)
    """Flow table counters (flows, finished idle, finished early at the bound)."""


def _observation(flow: Flow, ssh_kex) -> Observation | None:
    kex_end, reversed_roles = ssh_kex if ssh_kex is not None else (None, None)
    if flow.icmp is not None and flow.icmp[2]:
        return Observation(echo=[("out" if orig else "in", data)
                                 for orig, data in flow.icmp[2]])
    watch = flow.watch if flow.watch is not None else flow.watched
    if watch and kex_end is not None:
        return Observation(watch=watch, ssh_kex_end=kex_end, ssh_role_reversed=reversed_roles)
    return None


class CaptureSource:
    def __init__(self, paths: list[str], attribution: Attribution, *,
                 max_flows: int = 200_000, window: Window | None = None):
        """``window``: what of each flow to keep for identification and detectors
        (default: the live window, what live recording would provide)."""
        self.paths = [str(p) for p in paths]
        self.attribution = attribution
        self.stats = CaptureStats()
        self._out: list[FlowRecord | NameBinding] = []
        self._text: dict[bytes, str] = {}
        self._identifier = Identifier(on_answer=self._answer)
        self._decoder = Decoder()
        window = window or live_window()
        self._table = FlowTable(self._finish, self._identifier.update, max_flows=max_flows,
                                stream_cap=window.bytes, datagram_cap=window.packets,
                                echo_cap=window.packets,
                                watch_cap=WATCH_CAP if window.watch else 0,
                                sweep=self.sweeps)

    observed = "full"
    """What a record of this source saw of its flow (the contract's ``observed``)."""
    sweeps = True
    """Flows end when idle or closed, by packet times (a capture has every packet)."""

    def _frames(self):
        """(linktype, time µs, buffer, offset, caplen, original length) of every packet."""
        for path in self.paths:
            packets, read = open_capture(path)   # CaptureError: not a capture
            for frame in packets:
                if frame[4] < frame[5]:
                    self.stats.snapped += 1
                yield frame
            self.stats.packets += read.packets
            if read.truncated:
                self.stats.truncated[path] = read.truncated

    def __iter__(self) -> Iterator[FlowRecord | NameBinding]:
        out = self._out
        table, decoder = self._table, self._decoder
        decode, packet, fast = decoder.decode, table.packet, table.fast_ipv4
        dropped = 0
        for linktype, ts, buf, off, caplen, origlen in self._frames():
            # Ethernet carrying IPv4 of a flow that only needs counting: the fast path.
            # (An empty frame only lets pending items out: see sources.live.)
            if caplen and not (linktype == 1 and buf[off + 12] == 8 and buf[off + 13] == 0
                    and caplen >= 54 and fast(ts, buf, off + 14, off + caplen)):
                d = decode(linktype, ts, buf, off, caplen)
                if d is None:
                    dropped += 1
                else:
                    packet(ts, *d)
            if out:
                yield from out
                out.clear()
        self.stats.decoded = self.stats.packets - dropped
        decoder.finish()
        table.close()
        yield from out
        out.clear()
        self.stats.malformed.update(decoder.malformed)
        self.stats.other.update(decoder.other)
        self.stats.table.update(table.stats)

    # --------------------------------------------------------------- callbacks

    def _observed(self, flow: Flow) -> str:
        return self.observed

    def _process(self, flow: Flow):
        """The owning process: known live only (a capture has no processes)."""
        return None

    def _addr(self, packed: bytes) -> str:
        text = self._text.get(packed)
        if text is None:
            text = self._text[packed] = str(ipaddress.ip_address(packed))
        return text

    def _flow_id(self, flow: Flow) -> str:
        if flow.flow_id is None:
            # The owner is part of it: the same capture replayed for another task gives
            # that task its own flows instead of taking over the first task's.
            task = self.attribution.owner(self._addr(flow.src), self._addr(flow.dst), flow.start)
            flow.flow_id = stable_flow_id(task, flow.proto, flow.src.hex(), flow.sport,
                                          flow.dst.hex(), flow.dport, flow.start)
        return flow.flow_id

    def _answer(self, flow: Flow, query: DnsQuery, ts: int) -> None:
        self._flow_id(flow)
        task = self.attribution.owner(self._addr(flow.src), self._addr(flow.dst), flow.start)
        self._out.extend(query_bindings(query, task, ts, flow.flow_id, self._addr(flow.dst),
                                        flow.dport))

    def _finish(self, flow: Flow) -> None:
        self._out.append(self._record(flow))

    def _record(self, flow: Flow) -> FlowRecord:
        """The flow's record as seen so far (final when the flow has ended)."""
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
        fields = self._identifier.fields(flow)
        record = FlowRecord(
            flow_id=self._flow_id(flow),
            task=self.attribution.owner(src, dst, flow.start),
            direction=self.attribution.direction(src, dst),
            community_id=cid,
            proto=PROTO_NAMES.get(flow.proto, str(flow.proto)),
            ip_version=flow.ipver,
            src=src, sport=None if portless else flow.sport,
            dst=dst, dport=None if portless else flow.dport,
            start=flow.start, end=flow.last,
            conn_state=conn_state(flow),
            observed=self._observed(flow),
            process=self._process(flow),
            bytes_out=flow.bytes_o, bytes_in=flow.bytes_r,
            packets_out=flow.pkts_o, packets_in=flow.pkts_r,
            weird=sorted(flow.weird),
            observation=_observation(flow, fields.pop("kex_end", None)),
            **fields)
        return record
