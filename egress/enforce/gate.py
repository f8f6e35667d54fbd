"""The inline gate: each new flow's first payload is held until the flow is judged.

L3/L4 rules admit an address and a port; they cannot see that an allowed
address is spoken to in SSH or Stratum. The kernel queues (NFQUEUE) the
original-direction packets of a task's flows that carry no verdict yet; the
gate holds those with payload, reassembles them with the same flow table and
identification as replay, and judges the flow at the ``gate`` step as soon as
its protocol is known (a whole ClientHello, an SSH banner, a request line),
or when a cap is reached (packets, bytes or time held). The verdict sets a
packet mark and accepts; the nft chain after the gate copies the mark to the
flow's conntrack mark (so later packets skip the queue, or are reset) and
drops the packet when the mark says block (KERNEL.md: a verdict cannot set
the conntrack mark here, and an accepted packet leaves unless dropped).

Packets without payload (the handshake, bare ACKs) are accepted at once and
leave the flow unjudged. In audit mode nothing is blocked; the record flags.
A flow held past a cap and still unidentified is judged on what was seen: a
rule that names a protocol does not admit unknown bytes (``protocol-mismatch``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from egress.capture.decode import Decoder
from egress.flowtable import Flow, FlowTable
from egress.identify import Identifier
from egress.judge import Judge, TaskPolicy
from egress.names import DnsBindings
from egress.records import FlowRecord, Mode, NameBinding, Step, Verdict
from egress.sources.capture import PROTO_NAMES

LINKTYPE_RAW = 101
WATCHED_APPS = ("ssh", "unknown")
"""Allowed flows whose shape over time the detectors watch: SSH (reverse tunnels) and bytes
no parser knew (on an address a rule with protocol "any" allows)."""


@dataclass(frozen=True)
class Caps:
    """What the gate holds of one flow before it judges on what it has."""
    packets: int = 8
    bytes: int = 16 * 1024
    millis: int = 200


@dataclass
class _Held:
    first: float                                # monotonic time of the first held packet
    ids: list[int] = field(default_factory=list)
    size: int = 0


class Gate:
    """Packets in, verdicts out: ``(packet_id, accept, mark)``; ``mark`` None leaves the
    flow unjudged (a packet without payload)."""

    def __init__(self, task: str, purpose, mode: Mode, *, allow_mark: int, block_mark: int,
                 own_resolvers: frozenset[str] = frozenset(), min_ttl: int = 30,
                 caps: Caps = Caps(), deny_mark: int | None = None, mask: int = 0,
                 owner_of=None, watch_mark: int = 0):
        """``deny_mark``: what the ruleset marks a first packet it refuses with; such a
        packet is refused here, after ``owner_of(proto, src, sport, dst, dport)`` found its
        process while the socket still exists (``owners`` keeps what it found)."""
        self.task, self.mode, self.caps = task, Mode(mode), caps
        self.allow_mark, self.block_mark = allow_mark, block_mark
        self.deny_mark, self.mask, self.owner_of = deny_mark, mask, owner_of
        self.watch_mark = watch_mark
        self.owners: list[tuple] = []
        self.judge = Judge([TaskPolicy(task, purpose, self.mode, own_resolvers)],
                           mode=self.mode, bindings=DnsBindings(min_ttl))
        self.identifier = Identifier(on_answer=lambda *a: None)
        self.table = FlowTable(self._finished, self.identifier.update,
                               stream_cap=caps.bytes, datagram_cap=caps.packets,
                               watch_cap=0)
        self.decoder = Decoder()
        self.held: dict[Flow, _Held] = {}
        self.decided: dict[Flow, int] = {}      # flow -> its mark
        self.stats: Counter = Counter()
        self.decisions: list[FlowRecord] = []   # what was judged, for the caller to report

    # ------------------------------------------------------------ input

    def bind(self, binding: NameBinding) -> None:
        """A name the task's resolver gave: the gate judges names as the recorder does."""
        if self.judge.admits(binding):
            self.judge.bindings.add(binding)

    def packet(self, packet_id: int, payload: bytes, now_us: int | None = None,
               mark: int = 0) -> list[tuple]:
        now_us = now_us or time.time_ns() // 1000
        d = self.decoder.decode(LINKTYPE_RAW, now_us, payload, 0, len(payload))
        if d is None:                       # not a packet we can judge: never let it through
            self.stats["malformed"] += 1
            return [(packet_id, self.mode is not Mode.ENFORCE, None)]
        _, src, dst, proto, sport, dport, _, seq, _, _, _, plen = d
        if self.deny_mark and mark & self.mask == self.deny_mark:
            self._find_owner(proto, src, sport, dst, dport)
            self.stats["refused"] += 1
            return [(packet_id, True, self.block_mark)]
        self.table.packet(now_us, *d)
        if not plen:
            self.stats["no payload"] += 1
            return [(packet_id, True, None)]
        flow = self.table.find(proto, src, dst, sport, dport, seq)
        if flow is None:                    # the table refused it (bound reached)
            self.stats["no flow"] += 1
            return [(packet_id, self.mode is not Mode.ENFORCE, None)]
        if flow in self.decided:            # a retransmission, or ahead of the ct mark
            mark = self.decided[flow]
            return [(packet_id, True, mark)]
        held = self.held.setdefault(flow, _Held(time.monotonic()))
        held.ids.append(packet_id)
        held.size += plen
        self.stats["held"] += 1
        st = flow.ident
        if st is not None and st.app is not None:
            return self._decide(flow, "identified")
        if len(held.ids) >= self.caps.packets or held.size >= self.caps.bytes:
            return self._decide(flow, "cap")
        return []

    def tick(self) -> list[tuple]:
        """Decide flows held past the time cap (a client that sends a little and waits)."""
        now, out = time.monotonic(), []
        for flow, held in list(self.held.items()):
            if (now - held.first) * 1000 >= self.caps.millis:
                out += self._decide(flow, "time cap")
        return out

    def _find_owner(self, proto, src: bytes, sport, dst: bytes, dport):
        """The process behind a flow (while its socket exists), kept for the recorder."""
        if self.owner_of is None:
            return None
        import ipaddress
        key = (proto, str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)),
               dport)
        try:
            found = self.owner_of(*key)
        except OSError:
            found = None
        if found is not None:
            self.owners.append((key, found))
        return found

    # ------------------------------------------------------------ judging

    def _record(self, flow: Flow) -> FlowRecord:
        fields = self.identifier.fields(flow)
        fields.pop("kex_end", None)
        portless = flow.proto not in (6, 17, 132)
        import ipaddress
        return FlowRecord(flow_id="gate", task=self.task, direction="outbound",
                          proto=PROTO_NAMES.get(flow.proto, str(flow.proto)),
                          ip_version=flow.ipver,
                          src=str(ipaddress.ip_address(flow.src)),
                          sport=None if portless else flow.sport,
                          dst=str(ipaddress.ip_address(flow.dst)),
                          dport=None if portless else flow.dport,
                          start=flow.start, observed="first-packets", **fields)

    def _decide(self, flow: Flow, why: str) -> list[tuple]:
        held = self.held.pop(flow)
        record = self._record(flow)
        if record.app is None and why != "identified":
            record.app = "unknown"          # unknown bytes: admitted only by protocol "any"
        owner = lambda: self._find_owner(flow.proto, flow.src, flow.sport,  # noqa: E731
                                         flow.dst, flow.dport)
        if record.app == "ssh":             # its command line can say "remote forwarding"
            record.process = owner()
        self.judge.decide(record, Step.START)
        self.judge.decide(record, Step.GATE)
        block = record.verdict is Verdict.BLOCK and self.mode is Mode.ENFORCE
        if block and record.process is None:
            owner()                         # the task sees a reset next: its socket goes
        mark = self.block_mark if block else self.allow_mark
        if not block and record.app in WATCHED_APPS:
            mark |= self.watch_mark         # the recorder follows its sizes and times
        self.decided[flow] = mark
        self.stats["blocked" if block else "allowed"] += 1
        self.stats[f"decided on {why}"] += 1
        self.decisions.append(record)
        return [(pid, True, mark) for pid in held.ids]

    def _finished(self, flow: Flow) -> None:
        self.decided.pop(flow, None)
        self.held.pop(flow, None)
