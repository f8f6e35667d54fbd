"""Zeek conn.log (ASCII writer, tab-separated, with its header lines).

One line per flow, from its final record, with Zeek's field names and
types (Conn::Info as Zeek 7 writes it, ``ip_proto`` included) and the
``community_id`` column of Zeek's community-id logging. What egress does
not know is unset (``-``), never guessed:

  ts             start                     uid          flow_id (f-...)
  id.orig_h/_p   src, sport                id.resp_h/_p dst, dport (unset when none: ICMP)
  proto          tcp, udp, icmp (ICMPv6 too), else unknown_transport
  service        app as Zeek names it: ssl (TLS), http, ssh, dns, quic; else unset
  duration       end - start               conn_state   conn_state
  local_orig     T for an outbound flow    local_resp   T for an inbound flow
  orig_pkts      packets_out               orig_ip_bytes  bytes_out
  resp_pkts      packets_in                resp_ip_bytes  bytes_in
  ip_proto       the IP protocol number    community_id   community_id
  orig_bytes, resp_bytes, missed_bytes, history, tunnel_parents: unset (egress
  counts IP bytes, not payload, and keeps no history string)

Values are escaped as Zeek's writer escapes them: the separator, the set
separator inside a set, a backslash and bytes that are not printable as
``\\xNN``; a string equal to the unset or empty marker gets its first
character escaped. UTF-8 passes through (Zeek's ``LogAscii::enable_utf_8``).
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from egress.records import FlowRecord

SEPARATOR = "\t"
SET_SEPARATOR = ","
EMPTY = "(empty)"
UNSET = "-"

FIELDS = (
    ("ts", "time"), ("uid", "string"), ("id.orig_h", "addr"), ("id.orig_p", "port"),
    ("id.resp_h", "addr"), ("id.resp_p", "port"), ("proto", "enum"), ("service", "string"),
    ("duration", "interval"), ("orig_bytes", "count"), ("resp_bytes", "count"),
    ("conn_state", "string"), ("local_orig", "bool"), ("local_resp", "bool"),
    ("missed_bytes", "count"), ("history", "string"), ("orig_pkts", "count"),
    ("orig_ip_bytes", "count"), ("resp_pkts", "count"), ("resp_ip_bytes", "count"),
    ("tunnel_parents", "set[string]"), ("ip_proto", "count"), ("community_id", "string"),
)
"""conn.log's columns and their Zeek types, in Zeek's order."""

SERVICE = {"tls": "ssl", "http": "http", "ssh": "ssh", "dns": "dns", "quic": "quic"}
"""egress's app as Zeek's service (the analyzers Zeek has); the rest stay unset."""

TRANSPORT = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmp6": "icmp", "ipv6-icmp": "icmp"}

IP_PROTO = {"icmp": 1, "tcp": 6, "udp": 17, "icmp6": 58, "ipv6-icmp": 58, "sctp": 132,
            "gre": 47, "esp": 50, "ah": 51}


def escape(text: str, *, in_set: bool = False) -> str:
    """A string value as Zeek's ASCII writer writes it."""
    if text == "":
        return EMPTY
    if text in (UNSET, EMPTY):
        return f"\\x{ord(text[0]):02x}" + text[1:]
    out = []
    for ch in text:
        if ch == "\\" or ch == SEPARATOR or (in_set and ch == SET_SEPARATOR) \
                or ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _time(us: int) -> str:
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


def _bool(value: bool) -> str:
    return "T" if value else "F"


def _ip_proto(proto: str) -> int | None:
    if proto.isdigit():
        return int(proto)
    return IP_PROTO.get(proto.lower())


def row(flow: FlowRecord) -> list[str]:
    """One flow's values, in FIELDS order, written and escaped."""
    def port(value):
        return UNSET if value is None else str(value)

    ip_proto = _ip_proto(flow.proto)
    values = {
        "ts": _time(flow.start), "uid": escape(flow.flow_id),
        "id.orig_h": flow.src, "id.orig_p": port(flow.sport),
        "id.resp_h": flow.dst, "id.resp_p": port(flow.dport),
        "proto": TRANSPORT.get(flow.proto, "unknown_transport"),
        "service": escape(SERVICE[flow.app]) if flow.app in SERVICE else UNSET,
        "duration": _time(flow.end - flow.start) if flow.end is not None else UNSET,
        "conn_state": escape(flow.conn_state) if flow.conn_state else UNSET,
        "local_orig": _bool(flow.direction == "outbound"),
        "local_resp": _bool(flow.direction == "inbound"),
        "orig_pkts": str(flow.packets_out), "orig_ip_bytes": str(flow.bytes_out),
        "resp_pkts": str(flow.packets_in), "resp_ip_bytes": str(flow.bytes_in),
        "ip_proto": str(ip_proto) if ip_proto is not None else UNSET,
        "community_id": escape(flow.community_id) if flow.community_id else UNSET,
    }
    return [values.get(name, UNSET) for name, _ in FIELDS]


def _stamp(us: int) -> str:
    return time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(us // 1_000_000))


def conn_log(flows: Sequence[FlowRecord], *, now_us: int | None = None) -> Iterator[str]:
    """The whole conn.log: header lines, one line per flow (by start), #close."""
    stamp = _stamp(now_us if now_us is not None else time.time_ns() // 1000)
    yield "#separator " + "".join(f"\\x{ord(c):02x}" for c in SEPARATOR)
    yield f"#set_separator{SEPARATOR}{SET_SEPARATOR}"
    yield f"#empty_field{SEPARATOR}{EMPTY}"
    yield f"#unset_field{SEPARATOR}{UNSET}"
    yield f"#path{SEPARATOR}conn"
    yield f"#open{SEPARATOR}{stamp}"
    yield SEPARATOR.join(["#fields", *(name for name, _ in FIELDS)])
    yield SEPARATOR.join(["#types", *(kind for _, kind in FIELDS)])
    for flow in sorted(flows, key=lambda f: (f.start, f.flow_id)):
        yield SEPARATOR.join(row(flow))
    yield f"#close{SEPARATOR}{stamp}"
