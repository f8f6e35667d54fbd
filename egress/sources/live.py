"""A live task as a source: the first packets of each flow (NFLOG), the resolver's answers
and conntrack's accounting, through the same decoding, flow table and identification as a
capture.

nftables logs only the first packets of each flow in each direction (the
window identification and the detectors need), so bulk traffic never passes
through Python; records say ``observed = "first-packets"``. Their counters,
start and end come from conntrack: a flow ends when conntrack destroys its
entry (or when the task ends, with the counters of a last dump), not when
its logged packets stop. A feeder puts on the queue, in arrival order:

    ("packet", time_us, ip_bytes)     a logged packet
    ("binding", NameBinding)          an answer of the task's resolver
    ("ct", CtEvent)                   a conntrack DESTROY event or dumped entry
    None                              the task has ended
"""

from __future__ import annotations

import ipaddress
import queue

from egress.sources.capture import CaptureSource

LINKTYPE_RAW = 101
"""Raw IPv4 or IPv6, which is what NFLOG hands over."""
ACCOUNTED = (6, 17, 132)
"""Protocols whose conntrack entries we match to flows by their ports."""


class LiveSource(CaptureSource):
    observed = "first-packets"
    sweeps = False

    def __init__(self, items: "queue.Queue", attribution, **kw):
        super().__init__([], attribution, **kw)
        self.items = items

    def _frames(self):
        while True:
            item = self.items.get()
            if item is None:
                return
            if item[0] == "packet":
                _, ts, payload = item
                self.stats.packets += 1
                yield LINKTYPE_RAW, ts, payload, 0, len(payload), len(payload)
                continue
            if item[0] == "binding":
                self._out.append(item[1])
            elif item[0] == "ct":
                self._account(item[1])
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
            return
        flow.pkts_o, flow.bytes_o = event.orig_packets, event.orig_bytes
        flow.pkts_r, flow.bytes_r = event.reply_packets or 0, event.reply_bytes or 0
        if event.stop_ns:
            flow.last = max(flow.last, event.stop_ns // 1000)
        if event.kind == "destroy":
            self._table.finish(flow)
