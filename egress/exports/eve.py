"""Suricata EVE JSON ``flow`` events, one JSON object a line.

One event per flow, from its final record, with the field names and types
Suricata writes (its EVE format documentation, ``Event type: flow``):

  timestamp, flow.start   start, as Suricata writes times: 2026-03-11T02:14:07.120000+0000
  flow.end                end (start when not known)
  flow_id                 the 8 base62 characters of egress's flow_id as a number
                          (f-7Kq2mB9x -> 25834986897717, below 2^53; reversible)
  src_ip, src_port        src, sport (the initiator: Suricata's client)
  dest_ip, dest_port      dst, dport; ports left out for ICMP, as Suricata does
  proto                   TCP, UDP, ICMP, IPv6-ICMP, else the protocol's name upper-cased
  app_proto               tls, http, ssh, dns, quic (Suricata's parsers); left out else
  flow.pkts_toserver ...  packets_out, packets_in, bytes_out, bytes_in (IP bytes)
  flow.age                whole seconds from start to end
  flow.state              closed (TCP with a conn_state of an ended connection),
                          established (packets both ways), else new
  flow.reason             timeout (the record is final: the flow ended or expired)
  flow.alerted            the verdict is flag or block
  community_id            community_id (left out when egress has none)
"""

from __future__ import annotations

import json
import time
from typing import Iterator, Sequence

from egress.records import FlowRecord, Verdict

PROTO = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP", "icmp6": "IPv6-ICMP",
         "ipv6-icmp": "IPv6-ICMP", "sctp": "SCTP"}

APP_PROTO = frozenset({"tls", "http", "ssh", "dns", "quic"})

ENDED = frozenset({"SF", "REJ", "RSTO", "RSTR", "RSTOS0", "RSTRH", "SH", "SHR"})
"""Zeek conn_states of a TCP connection that was closed or refused (Suricata: closed)."""

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def timestamp(us: int) -> str:
    """A time as Suricata's EVE writes it (here always UTC, +0000)."""
    seconds, micro = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micro:06d}+0000"


def numeric_flow_id(flow_id: str) -> int:
    """egress's ``f-`` + 8 base62 characters as the integer EVE's flow_id is."""
    digits = flow_id[2:] if flow_id.startswith("f-") else flow_id
    n = 0
    for ch in digits:
        value = BASE62.find(ch)
        if value < 0:
            raise ValueError(f"flow id {flow_id!r} is not f- and base62 characters")
        n = n * 62 + value
    return n


def _state(flow: FlowRecord) -> str:
    if flow.proto == "tcp" and flow.conn_state in ENDED:
        return "closed"
    return "established" if flow.packets_out and flow.packets_in else "new"


def event(flow: FlowRecord) -> dict:
    """One flow as an EVE flow event (an object in Suricata's key order)."""
    end = flow.end if flow.end is not None else flow.start
    out: dict = {"timestamp": timestamp(flow.start), "flow_id": numeric_flow_id(flow.flow_id),
                 "event_type": "flow", "src_ip": flow.src}
    ports = flow.sport is not None and flow.dport is not None
    if ports:
        out["src_port"] = flow.sport
    out["dest_ip"] = flow.dst
    if ports:
        out["dest_port"] = flow.dport
    out["proto"] = PROTO.get(flow.proto, flow.proto.upper())
    if flow.app in APP_PROTO:
        out["app_proto"] = flow.app
    out["flow"] = {
        "pkts_toserver": flow.packets_out, "pkts_toclient": flow.packets_in,
        "bytes_toserver": flow.bytes_out, "bytes_toclient": flow.bytes_in,
        "start": timestamp(flow.start), "end": timestamp(end),
        "age": (end - flow.start) // 1_000_000, "state": _state(flow), "reason": "timeout",
        "alerted": flow.verdict in (Verdict.FLAG, Verdict.BLOCK),
    }
    if flow.community_id:
        out["community_id"] = flow.community_id
    return out


def flow_events(flows: Sequence[FlowRecord]) -> Iterator[str]:
    """Each flow's event as one JSON line, by start."""
    for flow in sorted(flows, key=lambda f: (f.start, f.flow_id)):
        yield json.dumps(event(flow), separators=(",", ":"))
