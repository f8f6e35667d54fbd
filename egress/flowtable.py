"""The flow table: bidirectional flows oriented from the initiator.

One dict lookup per packet (each flow is filed under both directions'
keys), counters updated in place, and payload kept only while the flow's
protocol is still being identified: the first bytes of each direction,
reassembled in sequence order, up to ``STREAM_CAP``. A flow whose
identification is done costs its counters and nothing more.

Memory bound: at most ``max_flows`` open flows (default 200,000); each
holds a few hundred bytes of state plus, while unidentified, at most
``STREAM_CAP`` bytes and ``MAX_PENDING`` out-of-order segments per
direction. Past the bound the least recently seen tenth is finished early
(and counted), never dropped.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Callable

TCP, UDP = 6, 17
SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10

STREAM_CAP = 16 * 1024
"""Payload bytes kept per direction for identification (a post-quantum ClientHello fits)."""
DATAGRAM_CAP = 8
"""UDP payloads kept per direction for identification."""
MAX_PENDING = 32
"""Out-of-order segments held per direction while waiting for a gap to fill."""
WATCH_CAP = 4096
"""Packets kept in a watched flow's feed of sizes and times (a reverse tunnel shows early)."""

# Zeek's defaults: tcp_inactivity_timeout, udp/icmp_inactivity_timeout, tcp_close_delay.
IDLE_US = {TCP: 300_000_000, UDP: 60_000_000}
IDLE_OTHER_US = 60_000_000
CLOSE_DELAY_US = 5_000_000
SWEEP_EVERY_US = 10_000_000

# flow.tcp bits
O_SYN, R_SYNACK, O_FIN, R_FIN, O_RST, R_RST, R_SYN = 1, 2, 4, 8, 16, 32, 64


class Stream:
    """One direction's first bytes, reassembled by sequence number."""

    __slots__ = ("base", "next", "data", "pending", "full", "cap")

    def __init__(self, isn: int | None, cap: int = STREAM_CAP):
        self.cap = cap           # bytes kept (the observation window's)
        self.base = isn          # sequence number of data[0]
        self.next = isn          # next sequence number expected
        self.data = bytearray()
        self.pending: dict[int, bytes] = {}
        self.full = False

    def add(self, seq: int, payload: bytes, weird: set) -> bool:
        """Add a segment; True when in-order bytes were appended."""
        if self.next is None:    # picked up mid-stream: start where we are
            self.base = self.next = seq
        rel = (seq - self.next) & 0xFFFFFFFF
        if rel >= 0x80000000:    # starts before what we expect: a retransmission or overlap
            back = 0x100000000 - rel
            self._check_overlap(seq, payload[:back], weird)
            if back >= len(payload):
                return False
            payload, seq = payload[back:], self.next
        elif rel:
            if len(self.pending) < MAX_PENDING:
                old = self.pending.get(seq)
                if old is not None and old[:len(payload)] != payload[:len(old)]:
                    weird.add("overlap-conflict")
                self.pending[seq] = payload
            return False
        self._append(payload)
        while self.pending and not self.full:
            nxt = self.pending.pop(self.next, None)
            if nxt is None:
                # a held segment may overlap the new end; take its new part
                for s in list(self.pending):
                    r = (s - self.next) & 0xFFFFFFFF
                    if r >= 0x80000000:
                        seg = self.pending.pop(s)
                        back = 0x100000000 - r
                        self._check_overlap(s, seg[:back], weird)
                        if back < len(seg):
                            self._append(seg[back:])
                            break
                else:
                    break
                continue
            self._append(nxt)
        return True

    def _append(self, payload: bytes) -> None:
        room = self.cap - len(self.data)
        if len(payload) >= room:
            payload, self.full = payload[:room], True
        self.data += payload
        self.next = (self.next + len(payload)) & 0xFFFFFFFF

    def _check_overlap(self, seq: int, chunk: bytes, weird: set) -> None:
        start = (seq - self.base) & 0xFFFFFFFF
        if start >= 0x80000000:
            return            # before our first byte: nothing to compare
        have = bytes(self.data[start:start + len(chunk)])
        if have and have != chunk[:len(have)]:
            weird.add("overlap-conflict")


class Flow:
    """A conversation, oriented from its initiator ("o") to its responder ("r")."""

    __slots__ = ("key", "rkey", "ipver", "proto", "src", "dst", "sport", "dport", "start",
                 "last", "pkts_o", "pkts_r", "bytes_o", "bytes_r", "tcp", "cstream",
                 "sstream", "cgrams", "sgrams", "icmp", "collecting", "ident", "weird",
                 "closed_at", "midstream", "flow_id", "idle", "watch", "watched")

    def __init__(self, key, rkey, ipver, proto, src, dst, sport, dport, ts):
        self.key, self.rkey = key, rkey
        self.ipver, self.proto = ipver, proto
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.start = self.last = ts
        self.pkts_o = self.pkts_r = self.bytes_o = self.bytes_r = 0
        self.tcp = 0
        self.cstream = self.sstream = None
        self.cgrams: list[bytes] | None = None
        self.sgrams: list[bytes] | None = None
        self.icmp: list | None = None    # [type, code, [(is_orig, payload), ...], first_is_orig]
        self.collecting = True
        self.ident = None                # the identifier's per-flow state
        self.weird: set[str] = set()
        self.closed_at = None
        self.midstream = False
        self.flow_id: str | None = None  # given when first needed (a DNS answer names it)
        self.idle = IDLE_US.get(proto, IDLE_OTHER_US)
        # The watch feed: (time, from the initiator, payload bytes) of packets with payload,
        # kept for TCP flows until identification says the flow needs no watching.
        self.watch: list | None = [] if proto == TCP else None
        self.watched: list | None = None     # the feed once full (the fast path resumes)


class FlowTable:
    """Packets in, finished flows out (through ``on_finish``), in capture time order."""

    def __init__(self, on_finish: Callable[[Flow], None],
                 on_payload: Callable[[Flow, bool], None], *, max_flows: int = 200_000,
                 stream_cap: int = STREAM_CAP, datagram_cap: int = DATAGRAM_CAP,
                 echo_cap: int = 2 * DATAGRAM_CAP, watch_cap: int = WATCH_CAP,
                 sweep: bool = True):
        """The caps are the observation window: bytes per direction of a stream, UDP
        payloads and ICMP echo payloads per direction kept, entries of the watch feed.
        ``sweep=False``: flows end only when told (``finish``) or at ``close``; live,
        where conntrack says when a flow ends and the packets seen are only its first."""
        self.stream_cap, self.datagram_cap = stream_cap, datagram_cap
        self.echo_cap, self.watch_cap = echo_cap, watch_cap
        # One dict a protocol, keyed by the bytes of the tuple as IPv4 lays them out
        # (addresses, then ports): the fast path keys a packet by one slice of it.
        self.tables: dict[int, dict[bytes, tuple[Flow, bool]]] = {TCP: {}, UDP: {}}
        self._tcp, self._udp = self.tables[TCP], self.tables[UDP]
        self.open = 0
        self.on_finish = on_finish
        self.on_payload = on_payload
        self.max_flows = max_flows
        self.stats: Counter = Counter()
        self._next_sweep = None if sweep else float("inf")

    def packet(self, ts, ipver, src, dst, proto, sport, dport, flags, seq, iplen, buf, poff,
               plen) -> None:
        """Account one decoded packet (the tuple ``Decoder.decode`` returns)."""
        table = self.tables.get(proto)
        if table is None:
            table = self.tables[proto] = {}
        key = _key(proto, src, dst, sport, dport, seq)
        hit = table.get(key)
        if hit is not None:
            flow, is_orig = hit
            if ts - flow.last > flow.idle or (
                    proto == TCP and flags & SYN and not flags & ACK and flow.closed_at is not None):
                self._finish(flow)            # idle past its timeout, or a port reused: a new flow
                hit = None
        if hit is None:
            flow, is_orig = self._new(table, key, ts, ipver, src, dst, proto, sport, dport,
                                      flags, seq)
        flow.last = ts
        if is_orig:
            flow.pkts_o += 1
            flow.bytes_o += iplen
        else:
            flow.pkts_r += 1
            flow.bytes_r += iplen
        if proto == TCP:
            if flags & (SYN | FIN | RST):
                self._tcp_flags(flow, is_orig, flags, seq)
            if plen and flow.watch is not None:
                flow.watch.append((ts, is_orig, plen))
                if len(flow.watch) >= self.watch_cap:
                    flow.watched, flow.watch = flow.watch, None
            if plen and flow.collecting:
                stream = flow.cstream if is_orig else flow.sstream
                if stream is None:
                    stream = Stream(None, self.stream_cap)
                    if is_orig:
                        flow.cstream = stream
                    else:
                        flow.sstream = stream
                data_seq = (seq + 1) & 0xFFFFFFFF if flags & SYN else seq  # SYN takes one number
                if not stream.full and stream.add(data_seq, bytes(buf[poff:poff + plen]),
                                                  flow.weird):
                    self.on_payload(flow, is_orig)
        elif flow.collecting and (plen or proto != UDP):
            if proto == UDP:
                grams = flow.cgrams if is_orig else flow.sgrams
                if len(grams) < self.datagram_cap:
                    grams.append(bytes(buf[poff:poff + plen]))
                    self.on_payload(flow, is_orig)
            elif flow.icmp is not None:
                if len(flow.icmp[2]) < self.echo_cap:
                    flow.icmp[2].append((is_orig, bytes(buf[poff:poff + plen])))
                    self.on_payload(flow, is_orig)
        if self._next_sweep is None:
            self._next_sweep = ts + SWEEP_EVERY_US
        elif ts >= self._next_sweep:
            self.sweep(ts)

    def finish(self, flow: Flow) -> None:
        """End an open flow now (live: conntrack destroyed its entry)."""
        self._finish(flow)

    def adopt(self, ts: int, ipver: int, proto: int, src: bytes, dst: bytes, sport,
              dport) -> Flow:
        """A flow already open when we began (live: an entry of a conntrack dump, oriented as
        conntrack has it): counted from now on, never identified from its payload."""
        table = self.tables.setdefault(proto, {})
        key, rkey = _key(proto, src, dst, sport, dport, -1), _key(proto, dst, src, dport, sport, -1)
        flow = Flow(key, rkey, ipver, proto, src, dst, sport, dport, ts)
        flow.watch, flow.collecting = None, False
        flow.midstream = True
        flow.weird.add("midstream")
        if proto == UDP:
            flow.cgrams, flow.sgrams = [], []
        table[rkey] = (flow, False)
        table[key] = (flow, True)
        self.open += 1
        self.stats["flows adopted"] += 1
        return flow

    def find(self, proto, src: bytes, dst: bytes, sport, dport, seq: int = -1) -> Flow | None:
        """The open flow a packet with this tuple belongs to (either direction), if any."""
        hit = self.tables.get(proto, {}).get(_key(proto, src, dst, sport, dport, seq))
        return hit[0] if hit is not None else None

    def fast_ipv4(self, ts: int, buf: bytes, ip: int, end: int) -> bool:
        """Account an IPv4 packet of an open TCP or UDP flow that needs nothing but counting.

        The bulk of a capture: no IP options, not a fragment, no SYN, FIN or RST, a
        flow already identified. Anything else returns False and takes the full path
        (``Decoder.decode`` then ``packet``), which does the same for these packets.
        """
        if buf[ip] != 0x45 or buf[ip + 6] & 0x3F or buf[ip + 7]:
            return False
        proto = buf[ip + 9]
        if proto == TCP:
            if ip + 40 > end or buf[ip + 33] & 0x07 or buf[ip + 32] < 0x50:
                return False
            hit = self._tcp.get(buf[ip + 12:ip + 24])
        elif proto == UDP:
            if ip + 28 > end:
                return False
            hit = self._udp.get(buf[ip + 12:ip + 24])
        else:
            return False
        if hit is None:
            return False
        flow, is_orig = hit
        total = buf[ip + 2] << 8 | buf[ip + 3]
        if flow.collecting or flow.watch is not None or ts - flow.last > flow.idle \
                or total < 28:
            return False
        flow.last = ts
        if is_orig:
            flow.pkts_o += 1
            flow.bytes_o += total
        else:
            flow.pkts_r += 1
            flow.bytes_r += total
        if self._next_sweep is not None and ts >= self._next_sweep:
            self.sweep(ts)
        return True

    def open_flows(self) -> list[Flow]:
        """The flows still open, each once."""
        return [f for table in self.tables.values() for f, o in table.values() if o]

    def _new(self, table, key, ts, ipver, src, dst, proto, sport, dport, flags, seq):
        rkey = _key(proto, dst, src, dport, sport, seq)
        first_type, first_code = sport, dport   # ICMP: the first packet's own type and code
        swap = False
        if proto == TCP and flags & SYN and flags & ACK:
            swap = True                       # a SYN-ACK first: the other side initiated
        elif proto in (1, 58) and seq >= 0 and sport in (0, 129):
            swap = True                       # an echo reply first: the other side pinged
        elif (proto == UDP or (proto == TCP and not flags & SYN)) and sport < 1024 <= dport:
            # Picked up mid-way (no SYN; or a UDP reply seen first): a well-known port
            # sending to an ephemeral one is the server's side (Zeek's likely_server_ports).
            swap = True
        if swap:
            key, rkey = rkey, key
            src, dst, sport, dport = dst, src, dport, sport
        flow = Flow(key, rkey, ipver, proto, src, dst, sport, dport, ts)
        if not self.watch_cap:
            flow.watch = None
        if proto == TCP:
            flow.midstream = not (flags & SYN)
            if flow.midstream:
                flow.weird.add("midstream")
        elif proto == UDP:
            flow.cgrams, flow.sgrams = [], []
        elif proto in (1, 58):
            flow.icmp = [first_type, first_code, [], not swap]  # payloads; the first packet's side
        table[rkey] = (flow, False)
        table[key] = (flow, True)             # a flow to itself has one key: the initiator's
        self.open += 1
        self.stats["flows"] += 1
        if self.open > self.max_flows:
            self._shed(ts)
        return flow, not swap

    def _tcp_flags(self, flow: Flow, is_orig: bool, flags: int, seq: int) -> None:
        if flags & SYN:
            if is_orig and not flags & ACK:
                flow.tcp |= O_SYN
                if flow.cstream is None:
                    flow.cstream = Stream((seq + 1) & 0xFFFFFFFF, self.stream_cap)
            elif not is_orig:
                flow.tcp |= R_SYNACK if flags & ACK else R_SYN
                if flow.sstream is None:
                    flow.sstream = Stream((seq + 1) & 0xFFFFFFFF, self.stream_cap)
        if flags & FIN:
            flow.tcp |= O_FIN if is_orig else R_FIN
        if flags & RST:
            flow.tcp |= O_RST if is_orig else R_RST
        if flow.tcp & (O_RST | R_RST) or (flow.tcp & O_FIN and flow.tcp & R_FIN):
            if flow.closed_at is None:
                flow.closed_at = flow.last

    # ------------------------------------------------------------- finishing

    def _finish(self, flow: Flow) -> None:
        table = self.tables[flow.proto]
        if table.get(flow.key, (None,))[0] is flow:
            del table[flow.key]
        if table.get(flow.rkey, (None,))[0] is flow:
            del table[flow.rkey]
        self.open -= 1
        self.on_finish(flow)

    def sweep(self, now: int) -> None:
        """Finish flows that went idle, or closed more than the close delay ago."""
        self._next_sweep = now + SWEEP_EVERY_US
        done = []
        for flow in self.open_flows():
            if flow.closed_at is not None:
                if now - flow.closed_at > CLOSE_DELAY_US:
                    done.append(flow)
            elif now - flow.last > IDLE_US.get(flow.proto, IDLE_OTHER_US):
                done.append(flow)
        done.sort(key=lambda f: f.start)
        for flow in done:
            self._finish(flow)
            self.stats["finished idle"] += 1

    def _shed(self, now: int) -> None:
        oldest = sorted(self.open_flows(), key=lambda f: f.last)
        for flow in oldest[:max(1, self.max_flows // 10)]:
            self._finish(flow)
            self.stats["finished early at the table's bound"] += 1

    def close(self) -> None:
        """The capture ended: finish every open flow, in start order."""
        rest = sorted(self.open_flows(), key=lambda f: f.start)
        for flow in rest:
            self._finish(flow)


_PORTS = struct.Struct("!HH").pack
_ECHO = struct.Struct("!Hc").pack


def _key(proto, src: bytes, dst: bytes, sport, dport, seq: int) -> bytes:
    """A flow's key in its protocol's table: the tuple's bytes, addresses first."""
    if proto == TCP or proto == UDP or proto == 132:
        return src + dst + _PORTS(sport, dport)
    if seq >= 0:                     # ICMP echo: the identifier pairs request and reply
        return src + dst + _ECHO(seq, b"E")
    if sport is not None:            # other ICMP: type and code (swapped in the reverse key)
        return src + dst + bytes((sport, dport))
    return src + dst


def conn_state(flow: Flow) -> str:
    """Zeek's conn_state code for a finished flow."""
    if flow.proto != TCP:
        return "SF" if flow.pkts_r else "S0"
    t = flow.tcp
    if not t & O_SYN:
        if t & R_SYNACK:
            if t & R_RST:
                return "RSTRH"
            if t & R_FIN:
                return "SHR"
        return "OTH"
    if not t & (R_SYNACK | R_SYN):
        if t & R_RST:
            return "REJ"
        if t & O_RST:
            return "RSTOS0"
        if t & O_FIN:
            return "SH"
        return "S0"
    if t & O_RST:
        return "RSTO"
    if t & R_RST:
        return "RSTR"
    if t & O_FIN and t & R_FIN:
        return "SF"
    if t & O_FIN:
        return "S2"
    if t & R_FIN:
        return "S3"
    return "S1"
