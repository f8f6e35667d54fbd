"""NFQUEUE: the kernel side of the inline gate, over nfnetlink_queue.

Why: an unjudged packet with payload must wait for our verdict before it leaves. On these
kernels nft has no ``queue`` statement, so the gate is an iptables-nft rule
(``-j NFQUEUE --queue-num N``, never ``--queue-bypass`` in enforce mode), and this module
binds queue N in the network namespace of the calling thread. pyroute2 has no NFQUEUE, so
this is a small module over ``socket.AF_NETLINK`` and ``struct``, sharing the framing of
nflog.py.

The verdict can only accept or drop and set the *packet* mark (NFQA_MARK): without
NETFILTER_NETLINK_GLUE_CT a conntrack mark in a verdict is ignored (KERNEL.md). An nft chain
later at the same hook copies the mark's bits to the ct mark and drops the block value. The
mark in a verdict replaces the whole ``skb->mark``: keep other tools' bits by sending
``(packet.mark & ~mask) | value``.

Fail closed: with no reader bound, a full queue or a message the kernel cannot deliver
(ENOBUFS here), the kernel drops the packet; closing the socket (or dying) destroys the
instance and drops every packet still held. NFQA_CFG_F_FAIL_OPEN (accept instead, for a full
queue or an undeliverable message) is set only when asked, for audit mode; it is always in
the mask, so an instance never keeps it by accident.

NFQA_CFG_F_GSO is not mainly about drops: it tells the kernel we take GSO packets whole.
Without it the kernel segments each GSO packet in software before queueing (one message and
one verdict per segment; a failed segmentation or checksum completion drops the packet) and
completes partial checksums. With it a TCP send above the MTU arrives as one packet (the
copy cut at copy_range, the full length in ``cap_len``, ``skb_info & NFQA_SKB_GSO``) whose
checksum may be unfinished (``NFQA_SKB_CSUMNOTREADY``): we never check or rewrite checksums,
and one verdict releases the whole packet. Every packet of a flow that reaches the gate
before the first verdict sets the ct mark is queued too: answer a flow's packets alike.

Constants are named as in linux/netfilter/nfnetlink_queue.h (nfnetlink.h, netfilter.h).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from egress.enforce.nflog import (NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, BoundReader, attrs,
                                  messages, netlink_error, nfmsg, nla, u32_attrs)

# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_QUEUE = 3
# linux/netfilter.h
NF_DROP, NF_ACCEPT = 0, 1
# linux/netfilter/nfnetlink_queue.h
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = range(4)
(NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_TIMESTAMP, NFQA_IFINDEX_INDEV,
 NFQA_IFINDEX_OUTDEV, NFQA_IFINDEX_PHYSINDEV, NFQA_IFINDEX_PHYSOUTDEV, NFQA_HWADDR,
 NFQA_PAYLOAD, NFQA_CT, NFQA_CT_INFO, NFQA_CAP_LEN, NFQA_SKB_INFO, NFQA_EXP, NFQA_UID,
 NFQA_GID, NFQA_SECCTX, NFQA_VLAN, NFQA_L2HDR, NFQA_PRIORITY) = range(1, 22)
(NFQNL_CFG_CMD_NONE, NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND, NFQNL_CFG_CMD_PF_BIND,
 NFQNL_CFG_CMD_PF_UNBIND) = range(5)
NFQNL_COPY_NONE, NFQNL_COPY_META, NFQNL_COPY_PACKET = range(3)
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = range(1, 6)
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_CONNTRACK, NFQA_CFG_F_GSO, NFQA_CFG_F_UID_GID = 1, 2, 4, 8
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED = 1, 2, 4
NFQNL_MAX_COPY_RANGE = 0xFFFF - 4   # the kernel clamps copy_range to this (0 means this too)

_U32 = struct.Struct(">I")
_PACKET_HDR = struct.Struct(">IHB")     # nfqnl_msg_packet_hdr: packet_id, hw_protocol, hook
_VERDICT_HDR = struct.Struct(">II")     # nfqnl_msg_verdict_hdr: verdict, id
_PARAMS = struct.Struct(">IB")          # nfqnl_msg_config_params: copy_range, copy_mode
_CMD = struct.Struct(">BxH")            # nfqnl_msg_config_cmd: command, pad, pf
_TIMESTAMP = struct.Struct(">QQ")       # nfqnl_msg_packet_timestamp: sec, usec
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(slots=True)
class QueuedPacket:
    """One packet held by the kernel until ``verdict(packet_id, ...)``. ``time`` is µs since
    the epoch: the kernel's stamp (NFQA_TIMESTAMP, only on ingress hooks and when stamping is
    on) else when we read it. ``payload`` is the IP packet, up to copy_range; ``cap_len`` is
    its full length when it was cut (None otherwise). ``mark`` is 0 when the packet has none."""
    packet_id: int
    hw_protocol: int        # ethertype: 0x0800, 0x86DD
    hook: int               # NF_INET_*: 0 prerouting .. 3 output, 4 postrouting
    family: int             # 4, 6, or 0 when unknown
    mark: int
    indev: int              # ifindex, 0 when none
    outdev: int
    payload: bytes
    time: int
    uid: int | None
    gid: int | None
    cap_len: int | None
    skb_info: int           # NFQA_SKB_* flags


def parse_packet(buf: bytes, start: int, end: int, now_us: int) -> tuple[QueuedPacket | None, int]:
    """An NFQNL_MSG_PACKET body -> (packet or None, malformed count). Without a packet header
    there is no id to answer: the packet stays held and is dropped when we close (fail
    closed)."""
    if end - start < 4:
        return None, 1
    found, bad = attrs(buf, start + 4, end)
    raw = found.get(NFQA_PACKET_HDR)
    if raw is None or len(raw) < _PACKET_HDR.size:
        return None, bad + 1
    packet_id, hw_proto, hook = _PACKET_HDR.unpack_from(raw)
    vals, more = u32_attrs(found, (NFQA_MARK, NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV, NFQA_UID,
                                   NFQA_GID, NFQA_CAP_LEN, NFQA_SKB_INFO))
    bad += more
    stamp = now_us
    raw = found.get(NFQA_TIMESTAMP)
    if raw is not None:
        if len(raw) == _TIMESTAMP.size:
            sec, usec = _TIMESTAMP.unpack(raw)
            stamp = sec * 1_000_000 + usec
        else:
            bad += 1
    payload = found.get(NFQA_PAYLOAD, b"")
    family = _FAMILY.get(buf[start], 0) or \
        {0x0800: 4, 0x86DD: 6}.get(hw_proto, 0) or (payload[0] >> 4 if payload else 0)
    return QueuedPacket(packet_id, hw_proto, hook, family if family in (4, 6) else 0,
                        vals.get(NFQA_MARK, 0), vals.get(NFQA_IFINDEX_INDEV, 0),
                        vals.get(NFQA_IFINDEX_OUTDEV, 0), payload, stamp, vals.get(NFQA_UID),
                        vals.get(NFQA_GID), vals.get(NFQA_CAP_LEN),
                        vals.get(NFQA_SKB_INFO, 0)), bad


class NfqDecoder:
    """Datagrams -> packets, with counts: ``received`` packets, ``malformed`` messages or
    attributes skipped, ``errors`` (NLMSG_ERROR from the kernel, e.g. ENOENT for a verdict on
    an id it no longer holds; ``last_error`` is the errno). No socket: testable on bytes."""

    def __init__(self) -> None:
        self.received = self.malformed = self.errors = self.last_error = 0

    def feed(self, data: bytes, now_us: int | None = None) -> list[QueuedPacket]:
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        out = []
        found, bad = messages(data)
        for mtype, _flags, _seq, start, end in found:
            if mtype == NLMSG_ERROR:
                err = netlink_error(data, start, end)
                if err:                 # 0 is an acknowledgement
                    self.errors += 1
                    self.last_error = err
                continue
            if mtype != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            packet, more = parse_packet(data, start, end, now_us)
            bad += more
            if packet is not None:
                self.received += 1
                out.append(packet)
        self.malformed += bad
        return out


def verdict_message(queue: int, packet_id: int, accept: bool, mark: int | None = None, *,
                    batch: bool = False) -> bytes:
    """NFQNL_MSG_VERDICT (or _BATCH: every held id up to ``packet_id``) for one queue: the
    verdict header and, when given, the new packet mark. No ACK asked: the kernel answers only
    a failure, which ``read`` counts in ``errors``."""
    body = nla(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(NF_ACCEPT if accept else NF_DROP,
                                                   packet_id & 0xFFFFFFFF))
    if mark is not None:
        body += nla(NFQA_MARK, _U32.pack(mark & 0xFFFFFFFF))
    return nfmsg(NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT,
                 NLM_F_REQUEST, body, res_id=queue)


def config_message(queue: int, *, copy_range: int, maxlen: int, fail_open: bool,
                   uid_gid: bool, seq: int = 0) -> bytes:
    """One NFQNL_MSG_CONFIG that binds the queue and sets copy mode, length and flags (the
    kernel checks the flags before it binds, so a refusal leaves nothing bound)."""
    flags = NFQA_CFG_F_GSO | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | \
        (NFQA_CFG_F_UID_GID if uid_gid else 0)
    mask = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_UID_GID
    body = (nla(NFQA_CFG_CMD, _CMD.pack(NFQNL_CFG_CMD_BIND, 0))
            + nla(NFQA_CFG_PARAMS, _PARAMS.pack(copy_range, NFQNL_COPY_PACKET))
            + nla(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
            + nla(NFQA_CFG_FLAGS, _U32.pack(flags)) + nla(NFQA_CFG_MASK, _U32.pack(mask)))
    return nfmsg(NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, body,
                 res_id=queue, seq=seq)


class NfQueue(BoundReader):
    """Binds NFQUEUE ``num`` in the network namespace of the calling thread.

    ``copy_range`` bytes of each packet are copied (the kernel's maximum is 65531);
    ``maxlen`` packets may be held before the kernel drops (or, with ``fail_open``, accepts)
    new ones. Counts: ``received``, ``verdicts`` sent, ``malformed``, ``errors`` the kernel
    returned, ``overruns`` (ENOBUFS: our receive buffer overflowed and the kernel dropped
    packets it could not deliver; ``kernel_stats`` gives how many). One reader per queue and
    namespace: a second bind fails with EBUSY.
    """

    def __init__(self, num: int, *, copy_range: int = 0xFFFF, maxlen: int = 4096,
                 rcvbuf: int = 16 << 20, fail_open: bool = False, uid_gid: bool = True):
        super().__init__(NfqDecoder(), rcvbuf, f"NFQUEUE {num}")
        self.num = num
        self.verdicts = 0
        seq = int.from_bytes(os.urandom(4), "little") or 1
        self._bind(config_message(num, copy_range=copy_range, maxlen=maxlen,
                                  fail_open=fail_open, uid_gid=uid_gid, seq=seq), seq)

    errors = property(lambda self: self.decoder.errors)

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None) -> None:
        """Release (NF_ACCEPT) or drop (NF_DROP) one packet; ``mark`` replaces its mark."""
        self.sock.send(verdict_message(self.num, packet_id, accept, mark))
        self.verdicts += 1

    def verdict_batch(self, max_id: int, accept: bool, mark: int | None = None) -> None:
        """One verdict (and mark) for every packet held with an id up to ``max_id``."""
        self.sock.send(verdict_message(self.num, max_id, accept, mark, batch=True))
        self.verdicts += 1

    def kernel_stats(self) -> dict[str, int] | None:
        """The kernel's view of this queue (/proc/net/netfilter/nfnetlink_queue, read in this
        thread's namespace): ``held`` now, ``queue_dropped`` (full queue),
        ``user_dropped`` (undeliverable to us), ``id_sequence`` (last packet id)."""
        try:
            with open("/proc/thread-self/net/netfilter/nfnetlink_queue") as f:
                rows = [line.split() for line in f]
        except OSError:
            return None
        for row in rows:
            if len(row) >= 8 and row[0] == str(self.num):
                return {"held": int(row[2]), "copy_range": int(row[4]),
                        "queue_dropped": int(row[5]), "user_dropped": int(row[6]),
                        "id_sequence": int(row[7])}
        return None

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "verdicts": self.verdicts,
                "malformed": self.malformed, "errors": self.errors, "overruns": self.overruns}
