"""A live task as a source: the first packets of each flow (NFLOG) and the resolver's
answers, through the same decoding, flow table and identification as a capture.

nftables logs only the first packets of each flow in each direction (the
window identification and the detectors need), so bulk traffic never passes
through Python; records say ``observed = "first-packets"``. A feeder thread
puts ``("packet", time_us, ip_bytes)`` and ``("binding", NameBinding)``
items on the queue in arrival order, and ``None`` when the task has ended.
"""

from __future__ import annotations

import queue
from egress.sources.capture import CaptureSource

LINKTYPE_RAW = 101
"""Raw IPv4 or IPv6, which is what NFLOG hands over."""


class LiveSource(CaptureSource):
    observed = "first-packets"

    def __init__(self, items: "queue.Queue", attribution, **kw):
        super().__init__([], attribution, **kw)
        self.items = items

    def _frames(self):
        while True:
            item = self.items.get()
            if item is None:
                return
            if item[0] == "binding":
                self._out.append(item[1])
                yield LINKTYPE_RAW, 0, b"", 0, 0, 0       # lets the bindings out now
                continue
            _, ts, payload = item
            self.stats.packets += 1
            yield LINKTYPE_RAW, ts, payload, 0, len(payload), len(payload)
