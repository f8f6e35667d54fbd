"""The live source: conntrack's counters end a flow, but only the entry of that connection
(an older one with the same tuple, from a reused port or an earlier run, is not its)."""

import queue
import time

from scapy.layers.inet import IP, TCP

from egress.enforce.ctevents import CtEvent, CtTuple
from egress.records import FlowRecord
from egress.sources.live import LiveSource
from tagging.attribution import Attribution, parse_networks

TASK, SERVER = "10.213.0.2", "203.0.113.10"


def run(events):
    items = queue.Queue()
    now = time.time_ns() // 1000
    items.put(("packet", now, bytes(IP(src=TASK, dst=SERVER) / TCP(sport=40000, dport=443,
                                                                     flags="S")), False))
    for event in events(now):
        items.put(("ct", event))
    items.put(None)
    who = Attribution(task="t1", local=parse_networks(["10.213.0.0/30"]))
    source = LiveSource(items, who)
    out = [r for r in source if isinstance(r, FlowRecord)]
    return out, source.stats


def destroy(start_us, out_bytes=5000):
    t = CtTuple(family=4, src=TASK, dst=SERVER, proto=6, sport=40000, dport=443)
    return CtEvent(kind="destroy", orig=t, orig_packets=10, orig_bytes=out_bytes,
                   reply_packets=12, reply_bytes=90000, start_ns=start_us * 1000,
                   stop_ns=(start_us + 500_000) * 1000)


def test_the_flows_own_entry_gives_its_counters():
    (flow,), _ = run(lambda now: [destroy(now)])
    assert (flow.bytes_out, flow.bytes_in, flow.packets_in) == (5000, 90000, 12)


def test_an_older_entry_with_the_same_tuple_is_not_the_flows():
    (flow,), stats = run(lambda now: [destroy(now - 30_000_000)])
    assert flow.bytes_in == 0 and flow.packets_out == 1
    assert stats.table["conntrack entries older than their flow"] == 1


def test_a_headers_only_packet_counts_at_its_full_length():
    items = queue.Queue()
    now = time.time_ns() // 1000
    hello = IP(src=TASK, dst=SERVER) / TCP(sport=40000, dport=22, flags="S", seq=1)
    whole = bytes(IP(src=TASK, dst=SERVER) / TCP(sport=40000, dport=22, flags="PA", seq=2)
                  / (b"x" * 900))
    items.put(("packet", now, bytes(hello), False))
    items.put(("packet", now + 10, whole[:128], True))     # cut after its headers
    items.put(None)
    source = LiveSource(items, Attribution(task="t1", local=parse_networks(["10.213.0.0/30"])))
    (flow,) = [r for r in source if isinstance(r, FlowRecord)]
    assert flow.bytes_out == 40 + len(whole) and flow.packets_out == 2
