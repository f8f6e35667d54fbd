"""Conntrack events and filtered dumps over ctnetlink: every flow's start, end and byte counts.

Why our own code: pyroute2 0.9 receives events only through an undocumented async path
(KERNEL.md), and its dump skips the mark filter when the mark is 0. Events are how a flow's
end and its final counters reach the record without any bulk traffic passing through Python.

Reliability, as conntrackd's reliable mode: a large SO_RCVBUFFORCE buffer, and
NETLINK_BROADCAST_ERROR, so a DESTROY event the kernel could not deliver keeps the entry on
the dying list and is sent again later. NETLINK_NO_ENOBUFS stays off: an overrun makes
``recv`` fail with ENOBUFS, and each one is counted in ``lost`` (NEW and UPDATE events
are not re-sent; how many were lost in an overrun is unknown, so ``lost`` counts overruns).

Counters and timestamps come only with DESTROY events and dumps, and only when
net.netfilter.nf_conntrack_acct and nf_conntrack_timestamp are 1 in the namespace
(``enable_accounting``). Conntrack sends nothing when counters change, so long flows get
interim figures from ``dump(mark=...)``: cumulative counters, read with IPCTNL_MSG_CT_GET.
Never IPCTNL_MSG_CT_GET_CTRZERO, which zeroes the counters for every other user.

DESTROY comes when the garbage collector reaps an expired entry, which can be tens of
seconds after the flow ended (CTA_TIMESTAMP_STOP still says when it expired). A dump reaps
the expired entries it meets and their DESTROY events go out at once, so the periodic dumps
also keep the end of flows timely.
"""

from __future__ import annotations

import os
import socket
import sys
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from egress.enforce.nflog import (NETLINK_ADD_MEMBERSHIP, NETLINK_BROADCAST_ERROR,
                                  NFNL_SUBSYS_CTNETLINK, NLM_F_CREATE, NLM_F_DUMP,
                                  NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, RECV_SIZE,
                                  SOL_NETLINK, BoundReader, attrs, messages, netlink_error,
                                  nfmsg, nla, open_socket)

# linux/netfilter/nfnetlink.h
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY = 1, 2, 3
# linux/netfilter/nfnetlink_conntrack.h
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS = 1, 2, 3
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID = 8, 9, 10, 12
CTA_TIMESTAMP, CTA_MARK_MASK, CTA_LABELS = 20, 21, 22
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
(CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID,
 CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE,
 CTA_PROTO_ICMPV6_CODE) = range(1, 10)
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2

GROUPS = {"new": NFNLGRP_CONNTRACK_NEW, "update": NFNLGRP_CONNTRACK_UPDATE,
          "destroy": NFNLGRP_CONNTRACK_DESTROY}
_U64, _U32, _U16 = struct.Struct(">Q"), struct.Struct(">I"), struct.Struct(">H")
_ADDRS = {CTA_IP_V4_SRC: (4, "src"), CTA_IP_V4_DST: (4, "dst"),
          CTA_IP_V6_SRC: (6, "src"), CTA_IP_V6_DST: (6, "dst")}
_PROTO_U16 = {CTA_PROTO_SRC_PORT: "sport", CTA_PROTO_DST_PORT: "dport",
              CTA_PROTO_ICMP_ID: "icmp_id", CTA_PROTO_ICMPV6_ID: "icmp_id"}
_PROTO_U8 = {CTA_PROTO_NUM: "proto", CTA_PROTO_ICMP_TYPE: "icmp_type",
             CTA_PROTO_ICMP_CODE: "icmp_code", CTA_PROTO_ICMPV6_TYPE: "icmp_type",
             CTA_PROTO_ICMPV6_CODE: "icmp_code"}


@dataclass(slots=True)
class CtTuple:
    """One direction of a connection; ports for TCP/UDP/SCTP, id/type/code for ICMP(v6)."""
    family: int = 0
    src: str = ""
    dst: str = ""
    proto: int = 0
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(slots=True)
class CtEvent:
    """An event ("new", "update", "destroy") or a dumped entry ("entry"). Counters and
    timestamps are None when the kernel did not send them (see the module docstring)."""
    kind: str
    orig: CtTuple | None = None
    reply: CtTuple | None = None
    id: int | None = None
    status: int | None = None
    mark: int = 0               # the kernel leaves a zero mark out of events
    orig_packets: int | None = None
    orig_bytes: int | None = None
    reply_packets: int | None = None
    reply_bytes: int | None = None
    start_ns: int | None = None
    stop_ns: int | None = None
    labels: int = 0
    """The entry's connlabel bits (``ct label set N`` sets bit N); 0 when it has none."""


def _labels(raw: bytes) -> int:
    """CTA_LABELS: the kernel's ``unsigned long`` words, in host byte order, lowest first."""
    words = len(raw) // 8
    return sum(int.from_bytes(raw[8 * i:8 * i + 8], sys.byteorder) << (64 * i)
               for i in range(words))


def _tuple(raw: bytes) -> tuple[CtTuple, int]:
    """A CTA_TUPLE_ORIG/REPLY nest: CTA_TUPLE_IP and CTA_TUPLE_PROTO, each a nest."""
    top, bad = attrs(raw, 0, len(raw))
    ip, proto = top.get(CTA_TUPLE_IP, b""), top.get(CTA_TUPLE_PROTO, b"")
    ip, more = attrs(ip, 0, len(ip))
    proto, more2 = attrs(proto, 0, len(proto))
    bad += more + more2
    t = CtTuple()
    for key, value in ip.items():
        if key in _ADDRS:
            fam, side = _ADDRS[key]
            if len(value) != (4 if fam == 4 else 16):
                bad += 1
                continue
            t.family = fam
            af = socket.AF_INET if fam == 4 else socket.AF_INET6
            setattr(t, side, socket.inet_ntop(af, value))
    for key, value in proto.items():
        name, size = (_PROTO_U8[key], 1) if key in _PROTO_U8 else (_PROTO_U16.get(key), 2)
        if name is None:
            continue
        if len(value) != size:
            bad += 1
            continue
        setattr(t, name, value[0] if size == 1 else _U16.unpack(value)[0])
    return t, bad


def _pair(raw: bytes, first: int, second: int) -> tuple[int | None, int | None, int]:
    """Two u64 attributes of a nest (packets/bytes, start/stop)."""
    found, bad = attrs(raw, 0, len(raw))
    out = []
    for key in (first, second):
        value = found.get(key)
        if value is not None and len(value) != 8:
            bad, value = bad + 1, None
        out.append(None if value is None else _U64.unpack(value)[0])
    return out[0], out[1], bad


def parse_event(buf: bytes, mtype: int, flags: int, start: int,
                end: int) -> tuple[CtEvent | None, int]:
    """One ctnetlink message body -> (event or None when not a conntrack entry, malformed)."""
    msg = mtype & 0xFF
    if mtype >> 8 != NFNL_SUBSYS_CTNETLINK or msg > IPCTNL_MSG_CT_DELETE:
        return None, 0
    if end - start < 4:
        return None, 1
    kind = {IPCTNL_MSG_CT_DELETE: "destroy", IPCTNL_MSG_CT_GET: "entry"}.get(
        msg, "new" if flags & NLM_F_CREATE else "update")
    found, bad = attrs(buf, start + 4, end)
    ev = CtEvent(kind)
    for key, value in found.items():
        if key in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            t, more = _tuple(value)
            bad += more
            if key == CTA_TUPLE_ORIG:
                ev.orig = t
            else:
                ev.reply = t
        elif key in (CTA_STATUS, CTA_MARK, CTA_ID):
            if len(value) != 4:
                bad += 1
                continue
            setattr(ev, {CTA_STATUS: "status", CTA_MARK: "mark", CTA_ID: "id"}[key],
                    _U32.unpack(value)[0])
        elif key == CTA_COUNTERS_ORIG:
            ev.orig_packets, ev.orig_bytes, more = _pair(value, CTA_COUNTERS_PACKETS,
                                                         CTA_COUNTERS_BYTES)
            bad += more
        elif key == CTA_COUNTERS_REPLY:
            ev.reply_packets, ev.reply_bytes, more = _pair(value, CTA_COUNTERS_PACKETS,
                                                           CTA_COUNTERS_BYTES)
            bad += more
        elif key == CTA_TIMESTAMP:
            ev.start_ns, ev.stop_ns, more = _pair(value, CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP)
            bad += more
        elif key == CTA_LABELS:
            ev.labels = _labels(value)
    return ev, bad


class CtDecoder:
    """Turns datagrams into events and counts ``received`` events and ``malformed``
    messages or attributes skipped. No socket, so it can be tested and measured on bytes."""

    def __init__(self) -> None:
        self.received = self.malformed = 0

    def feed(self, data: bytes) -> list[CtEvent]:
        out = []
        found, bad = messages(data)
        for mtype, flags, _seq, start, end in found:
            ev, more = parse_event(data, mtype, flags, start, end)
            bad += more
            if ev is not None:
                self.received += 1
                out.append(ev)
        self.malformed += bad
        return out


class ConntrackEvents(BoundReader):
    """Conntrack events of the network namespace of the calling thread.

    ``groups``: any of "new", "update", "destroy". Counters: ``received`` events, ``lost``
    (ENOBUFS overruns; each lost one or more NEW/UPDATE events), ``malformed`` items skipped.
    Keep reading: with ``reliable`` on, undelivered DESTROY events hold their entries on
    the kernel's dying list until we take them.
    """

    def __init__(self, groups=("new", "destroy"), *, rcvbuf: int = 32 << 20,
                 reliable: bool = True):
        super().__init__(CtDecoder(), rcvbuf, "conntrack events")
        try:
            if reliable:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
            for name in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, GROUPS[name])
        except BaseException:
            self.sock.close()
            raise

    lost = property(lambda self: self.overruns)
    """Overruns: the kernel does not say how many events each one dropped."""

    def read(self, timeout: float | None = 1.0, max_datagrams: int = 1024) -> list[CtEvent]:
        return super().read(timeout, max_datagrams)

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "lost": self.lost, "malformed": self.malformed}


def dump_request(mark: int | None = None, mask: int | None = None, *,
                 family: int = socket.AF_UNSPEC, seq: int = 1) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP (cumulative counters), filtered by the kernel to
    entries with ``ct mark & mask == mark`` when a mark is given."""
    filt = b""
    if mark is not None:
        mask = 0xFFFFFFFF if mask is None else mask
        filt = nla(CTA_MARK, _U32.pack(mark & mask)) + nla(CTA_MARK_MASK, _U32.pack(mask))
    elif mask is not None:
        raise ValueError("a mask needs a mark")
    return nfmsg(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                 filt, family=family, seq=seq)


def dump(mark: int | None = None, mask: int | None = None, *, family: int = socket.AF_UNSPEC,
         timeout: float = 10.0) -> list[CtEvent]:
    """The current entries of this namespace (kind "entry"), filtered by mark kernel-side."""
    seq = int.from_bytes(os.urandom(4), "little") or 1
    sock, _ = open_socket(8 << 20)
    out: list[CtEvent] = []
    try:
        sock.send(dump_request(mark, mask, family=family, seq=seq))
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = sock.recv(RECV_SIZE)
            for mtype, flags, mseq, start, end in messages(data)[0]:
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err = netlink_error(data, start, end)
                    if err:
                        raise OSError(err, f"conntrack dump: {os.strerror(err)}")
                    return out
                ev, _bad = parse_event(data, mtype, flags, start, end)
                if ev is not None:
                    ev.kind = "entry"
                    out.append(ev)
    finally:
        sock.close()


def enable_accounting(proc: Path = Path("/proc/sys/net/netfilter")) -> dict[str, str]:
    """Turn on byte/packet counters and start/stop timestamps in the *current* network
    namespace (these sysctls are per namespace); flows that already exist stay without.
    Returns the previous values. Loads conntrack first (a dump does) when it is absent."""
    names = ("nf_conntrack_acct", "nf_conntrack_timestamp")
    if not (proc / names[0]).exists():
        dump()
    before = {}
    for name in names:
        before[name] = (proc / name).read_text().strip()
        (proc / name).write_text("1\n")
    return before
