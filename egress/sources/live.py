"""A live task as a source: the first packets of each flow (NFLOG), the resolver's answers
and conntrack's accounting, through the same decoding, flow table and identification as a
capture.

nftables logs only the first packets of each flow in each direction (the
window identification and the detectors need), so bulk traffic never passes
through Python; records say ``observed = "first-packets"``. Their counters,
start and end come from conntrack: a flow ends when conntrack destroys its
entry (or when the task ends, with the counters of a last dump), not when
its logged packets stop. A feeder puts on the queue, in arrival order:

    ("packet", time_us, ip_bytes, headers_only)
                                      a logged packet; headers_only: the watch feed of a
                                      watched flow, cut after its headers
    ("binding", NameBinding)          an answer of the task's resolver
    ("ct", CtEvent)                   a conntrack DESTROY event or dumped entry
    ("ct-interim", CtEvent)           a periodic dump's entry: an interim record
    ("resume", CtEvent, task, record) an entry open before we began (a restarted agent),
                                      and the flow's last stored record, if any
    ("suspend",)                      we stop, the flows do not: their records are interim
    ("end-task", task)                a task of a shared host ended: its flows end with it
    None                              the task has ended

Watched flows (SSH) are judged again, as interim records, every few entries
of their watch feed, and long flows at each periodic dump: a tunnel held for
hours is on the record, and judged, before it closes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import queue
import time

from egress.records import stable_flow_id
from egress.replay import FLUSH
from egress.sources.capture import CaptureSource

LINKTYPE_RAW = 101
"""Raw IPv4 or IPv6, which is what NFLOG hands over."""
ACCOUNTED = (6, 17, 132)
"""Protocols whose conntrack entries we match to flows by their ports."""
STALE_US = 1_000_000
"""A conntrack entry that started this long before a flow's first packet belongs to an
earlier connection with the same tuple (both clocks are the kernel's wall clock)."""
FLUSH_EVERY_S = 1.0
"""How often what was judged is written out (egress.replay.FLUSH), busy or idle."""
WATCH_EVERY = 8
"""Watch-feed entries between two interim judgments of a watched (SSH) flow: a reverse
tunnel is found while it is open, and can be cut."""


class LiveSource(CaptureSource):
    observed = "first-packets"
    sweeps = False

    def __init__(self, items: "queue.Queue", attribution, *, owners: "Owners | None" = None,
                 claim=None, **kw):
        """``claim(key, final)``: the task of a flow logged untagged (a shared host's socket
        no task's rule claimed), by its (proto, src, sport, dst, dport); "" for none.
        ``final``: asked again when the flow is recorded, the last word."""
        super().__init__([], attribution, **kw)
        self.items = items
        self.owners = owners
        self.claim = claim
        self._watched: dict = {}            # flow -> watch entries at its last judgment
        self._labels: dict = {}
        """flow -> its task on a shared host: the NFLOG prefix of its first logged packet
        (the agent logs each task's sockets under its own; "" is untagged)."""
        self._last_ts = 0
        self._resumed: dict = {}            # flow -> its record stored before a restart
        self._suspending = False

    def _observed(self, flow) -> str:
        watched = flow.watch or flow.watched
        return "first-packets+watch" if watched else "first-packets"

    def _process(self, flow):
        if self.owners is None:
            return None
        return self.owners.of(flow.proto, self._addr(flow.src), flow.sport,
                              self._addr(flow.dst), flow.dport)

    def _frames(self):
        next_flush = time.monotonic() + FLUSH_EVERY_S
        while True:
            try:
                item = self.items.get(timeout=FLUSH_EVERY_S)
            except queue.Empty:
                item = ()
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + FLUSH_EVERY_S
                self._out.append(FLUSH)
                yield LINKTYPE_RAW, 0, b"", 0, 0, 0
            if item is None:
                return
            if not item:
                continue
            if item[0] == "packet":
                _, ts, payload, headers_only, *label = item
                # Packets come in the kernel's logging order, but with mixed clocks: the
                # kernel's stamp on forwarded packets, the read time on the host's own (DNS
                # answers). Time never runs backwards here, so an answer always binds its
                # name before the connection it let through starts.
                ts = self._last_ts = max(ts, self._last_ts)
                self.stats.packets += 1
                if headers_only:
                    self._headers(ts, payload)
                    yield LINKTYPE_RAW, 0, b"", 0, 0, 0
                else:
                    if self.owners is not None:
                        self.owners.first_packet(payload)
                    yield LINKTYPE_RAW, ts, payload, 0, len(payload), len(payload)
                flow = self._flow_of(payload)         # the flow the packet went to, once
                if flow is not None:
                    if label and flow not in self._labels:
                        self._labels[flow] = label[0] or self._claimed(flow)
                    self._watch(flow)
                continue
            if item[0] == "binding":
                self._out.append(item[1])
            elif item[0] == "ct":
                self._account(item[1])
            elif item[0] == "ct-interim":
                flow = self._account(item[1])
                if flow is not None:
                    self._interim(flow)
            elif item[0] == "resume":
                self._resume(*item[1:])
            elif item[0] == "suspend":
                self._suspending = True
                return
            elif item[0] == "end-task":
                for flow in [f for f, task in self._labels.items() if task == item[1]]:
                    self._table.finish(flow)
            yield LINKTYPE_RAW, 0, b"", 0, 0, 0       # lets what is pending out now

    def _account(self, event) -> None:
        """Conntrack's totals onto the flow; a destroyed entry ends it."""
        t = event.orig
        if t is None or t.proto not in ACCOUNTED or event.orig_bytes is None:
            return
        flow = self._table.find(t.proto, ipaddress.ip_address(t.src).packed,
                                ipaddress.ip_address(t.dst).packed, t.sport, t.dport)
        if flow is None:
            self.stats.table["conntrack entries without a logged flow"] += 1
            return None
        if event.start_ns and event.start_ns // 1000 + STALE_US < flow.start:
            # An older connection with the same addresses and ports (a reused port, or a
            # run before this one on the same subnet): not this flow's entry.
            self.stats.table["conntrack entries older than their flow"] += 1
            return None
        flow.pkts_o, flow.bytes_o = event.orig_packets, event.orig_bytes
        flow.pkts_r, flow.bytes_r = event.reply_packets or 0, event.reply_bytes or 0
        if event.stop_ns:
            flow.last = max(flow.last, event.stop_ns // 1000)
        if event.kind == "destroy":
            self._table.finish(flow)
            return None
        return flow

    def _resume(self, event, task: str | None, stored) -> None:
        """A flow open before we began: its conntrack entry, and what was stored of it (its
        observations, flow id and start), so it goes on as the same flow, judged as before.
        No entry: the stored flow ended while no one watched; it is closed as last seen."""
        if event is None:
            self._out.append(dataclasses.replace(stored, event="final", verdict=None,
                                                 decided_at=None, action=None))
            return
        t = event.orig
        if t is None or t.proto not in ACCOUNTED:
            return
        src, dst = ipaddress.ip_address(t.src), ipaddress.ip_address(t.dst)
        if self._table.find(t.proto, src.packed, dst.packed, t.sport, t.dport) is not None:
            return
        start = stored.start if stored is not None else (event.start_ns or 0) // 1000
        flow = self._table.adopt(start, src.version, t.proto, src.packed, dst.packed, t.sport,
                                 t.dport)
        self._labels[flow] = task
        if stored is not None:
            flow.flow_id = stored.flow_id
            self._resumed[flow] = stored
        self._account(dataclasses.replace(event, kind="entry", start_ns=None))

    def _claimed(self, flow, final: bool = False) -> str | None:
        if self.claim is None:
            return None
        return self.claim((flow.proto, self._addr(flow.src), flow.sport, self._addr(flow.dst),
                           flow.dport), final) or None

    def _flow_of(self, payload: bytes):
        """The open flow a logged packet belongs to (either direction), or None."""
        key = _packed_tuple(payload)
        return self._table.find(*key[:5]) if key is not None else None

    def _record(self, flow):
        stored = self._resumed.get(flow)
        if stored is not None:              # as stored, with conntrack's counters since
            return dataclasses.replace(
                stored, event="final", end=max(flow.last, stored.end or 0),
                bytes_out=max(flow.bytes_o, stored.bytes_out),
                bytes_in=max(flow.bytes_r, stored.bytes_in),
                packets_out=max(flow.pkts_o, stored.packets_out),
                packets_in=max(flow.pkts_r, stored.packets_in),
                verdict=None, decided_at=None, action=None)
        if flow in self._labels and self._labels[flow] is None:
            self._labels[flow] = self._claimed(flow, final=True)   # after its first packet
        record = super()._record(flow)
        if flow in self._labels:
            record.task = self._labels[flow]
            record.flow_id = stable_flow_id(record.task, flow.proto, flow.src.hex(), flow.sport,
                                            flow.dst.hex(), flow.dport, flow.start)
        return record

    def _headers(self, ts: int, payload: bytes) -> None:
        """A packet of the headers-only watch feed: counted at its real payload size (from
        its IP length; the payload was not copied, and these flows' payload is no longer
        read: an SSH session past its key exchange)."""
        d = self._decoder.decode(LINKTYPE_RAW, ts, payload, 0, len(payload))
        if d is None:
            return
        iplen, poff = d[8], d[10]
        self._table.packet(ts, *d[:-1], max(0, iplen - poff))

    def _watch(self, flow) -> None:
        """A watched (SSH) flow is judged again, as an interim record, every few entries of
        its watch feed: a tunnel is found while open."""
        if flow.watch is None or flow.ident is None or flow.ident.app != "ssh":
            return
        if len(flow.watch) - self._watched.get(flow, 0) >= WATCH_EVERY:
            self._watched[flow] = len(flow.watch)
            self._interim(flow)

    def _interim(self, flow) -> None:
        record = self._record(flow)
        record.event = "interim"
        self._out.append(record)

    def _finish(self, flow) -> None:
        if self._suspending:                # open still; the next agent goes on with it
            self._interim(flow)
        else:
            super()._finish(flow)
        self._watched.pop(flow, None)
        self._labels.pop(flow, None)
        self._resumed.pop(flow, None)
        if self.owners is not None:
            self.owners.forget(flow.proto, self._addr(flow.src), flow.sport,
                               self._addr(flow.dst), flow.dport)


class Owners:
    """The process behind each new flow of a task, looked up when its first packet is logged
    (the socket and process still exist then): sock_diag in the task's network namespace,
    then the task's process tree (egress.enforce.owners). Misses are counted, not fatal."""

    def __init__(self, netns_path: str, root_pid, nets):
        from egress.enforce.owners import SockDiag
        self.diag = SockDiag(netns_path)
        self.root_pid, self.nets = root_pid, nets
        self.found: dict[tuple, object] = {}
        self.misses = 0

    def first_packet(self, payload: bytes) -> None:
        from egress.enforce.owners import owner_of
        key = packet_tuple(payload)
        if key is None or key in self.found or self.root_pid() is None:
            return
        proto, src, sport, dst, dport, syn = key
        if (proto == 6 and not syn) or not any(ipaddress.ip_address(src) in n for n in self.nets):
            return
        try:
            sock = self.diag.find("tcp" if proto == 6 else "udp", src, sport, dst, dport)
            info = owner_of(sock.inode, self.root_pid()) if sock is not None else None
        except OSError:
            info = None
        if info is None:
            self.misses += 1
            return
        self.found[key[:5]] = info.record()

    def add(self, key: tuple, info) -> None:
        """An owner found elsewhere (the gate, for a first packet it refused)."""
        self.found[tuple(key)] = info

    def of(self, proto, src, sport, dst, dport):
        return self.found.get((proto, src, sport, dst, dport))

    def forget(self, proto, src, sport, dst, dport) -> None:
        self.found.pop((proto, src, sport, dst, dport), None)

    def close(self) -> None:
        self.diag.close()


def _packed_tuple(p: bytes):
    """(proto, src, dst, sport, dport, is a bare SYN) of a TCP or UDP packet, addresses as
    bytes (the flow table's own form), or None."""
    if len(p) < 20:
        return None
    if p[0] >> 4 == 4:
        ihl, proto, src, dst = (p[0] & 15) * 4, p[9], p[12:16], p[16:20]
    elif p[0] >> 4 == 6 and len(p) >= 40:
        ihl, proto, src, dst = 40, p[6], p[8:24], p[24:40]
    else:
        return None
    if proto not in (6, 17) or len(p) < ihl + 14:
        return None
    sport, dport = int.from_bytes(p[ihl:ihl + 2], "big"), int.from_bytes(p[ihl + 2:ihl + 4], "big")
    return proto, src, dst, sport, dport, proto == 6 and p[ihl + 13] & 0x12 == 0x02


def packet_tuple(p: bytes):
    """(proto, src, sport, dst, dport, is a bare SYN), addresses as text, or None."""
    key = _packed_tuple(p)
    if key is None:
        return None
    proto, src, dst, sport, dport, syn = key
    return (proto, str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)),
            dport, syn)
