"""NFLOG reader: the first packets of each flow, copied by nft, read over nfnetlink_log.

Why: the live record needs every flow, also the ones nft rejects or drops before conntrack
confirms them (those leave no conntrack event at all, KERNEL.md). An nft rule such as
``ct original packets < 3 log group 7 snaplen 256`` copies a few packets per flow to one
NFLOG group; bulk traffic never reaches Python. pyroute2 0.9 has no NFLOG, so this is a
small module over ``socket.AF_NETLINK`` and ``struct``.

Losses are counted, never silent: the instance numbers its messages (NFULNL_CFG_F_SEQ), and
a gap in those numbers is packets the kernel could not deliver; an overrun of our receive
buffer also makes ``recv`` fail with ENOBUFS, counted in ``overruns``. Parsing never raises:
a message or attribute that does not fit is counted in ``malformed`` and skipped.

No NFULNL_CFG_CMD_PF_BIND/PF_UNBIND is sent: since Linux 3.x ``log group N`` reaches
nfnetlink_log through its per-type logger, and PF_(UN)BIND only changes the namespace's
*default* logger, which other tools (ulogd, conntrack's log_invalid) may rely on.

The netlink framing here (messages, attributes, the socket) is shared with ctevents.py.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

# linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_BROADCAST_ERROR, NETLINK_NO_ENOBUFS = 1, 4, 5
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLA_TYPE_MASK = 0x3FFF              # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
NLA_F_NESTED = 0x8000
# asm-generic/socket.h (Python's socket module does not export it)
SO_RCVBUFFORCE = 33
# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_ULOG = 1, 4
NFNETLINK_V0 = 0
# linux/netfilter/nfnetlink_log.h
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
(NFULA_PACKET_HDR, NFULA_MARK, NFULA_TIMESTAMP, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV,
 NFULA_IFINDEX_PHYSINDEV, NFULA_IFINDEX_PHYSOUTDEV, NFULA_HWADDR, NFULA_PAYLOAD, NFULA_PREFIX,
 NFULA_UID, NFULA_SEQ, NFULA_SEQ_GLOBAL, NFULA_GID) = range(1, 15)
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, \
    NFULA_CFG_FLAGS = range(1, 7)
NFULNL_COPY_PACKET = 0x02
NFULNL_CFG_F_SEQ, NFULNL_CFG_F_SEQ_GLOBAL = 0x0001, 0x0002

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NLA = struct.Struct("=HH")          # len, type (host order)
_NFGEN = struct.Struct("=BBH")       # family, version, res_id (res_id big-endian, packed apart)
_U32, _U16, _U64 = struct.Struct(">I"), struct.Struct(">H"), struct.Struct(">Q")
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
RECV_SIZE = 1 << 18                 # above the largest nfnetlink_log batch (128 KiB)


# ------------------------------------------------------------------ framing, shared


def nla(atype: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _NLA.pack(4 + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def nfmsg(subsys: int, msg: int, flags: int, attrs: bytes = b"", *, family: int = 0,
          res_id: int = 0, seq: int = 0) -> bytes:
    """A whole nfnetlink message: nlmsghdr, nfgenmsg, attributes."""
    body = struct.pack("=BB", family, NFNETLINK_V0) + _U16.pack(res_id) + attrs
    return _NLMSGHDR.pack(16 + len(body), (subsys << 8) | msg, flags, seq, 0) + body


def messages(buf: bytes) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """Split a datagram: ([(type, flags, seq, body_start, body_end)], malformed count).
    A header that does not fit ends the walk (nothing after it can be trusted)."""
    out, off, end = [], 0, len(buf)
    while off + 16 <= end:
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < 16 or off + length > end:
            return out, 1
        out.append((mtype, flags, seq, off + 16, off + length))
        off += (length + 3) & ~3
    return out, int(off < end)


def attrs(buf: bytes, off: int, end: int) -> tuple[dict[int, bytes], int]:
    """Attributes of one level: ({type: value}, malformed count)."""
    found: dict[int, bytes] = {}
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            return found, 1
        found[atype & NLA_TYPE_MASK] = buf[off + 4:off + alen]
        off += (alen + 3) & ~3
    return found, int(off < end)


def u32_attrs(found: dict[int, bytes], keys) -> tuple[dict[int, int], int]:
    """The 32-bit big-endian attributes among ``keys`` that are there: ({type: value},
    count of those of the wrong size)."""
    vals: dict[int, int] = {}
    bad = 0
    for key in keys:
        raw = found.get(key)
        if raw is not None:
            if len(raw) == 4:
                vals[key] = _U32.unpack(raw)[0]
            else:
                bad += 1
    return vals, bad


def netlink_error(buf: bytes, start: int, end: int) -> int:
    """The errno of an NLMSG_ERROR body (0 for an acknowledgement, -1 when truncated)."""
    return -struct.unpack_from("=i", buf, start)[0] if end - start >= 4 else -1


def open_socket(rcvbuf: int) -> tuple[socket.socket, int]:
    """A netfilter netlink socket with a large receive buffer (SO_RCVBUFFORCE needs
    CAP_NET_ADMIN; without it, SO_RCVBUF up to rmem_max). Returns the socket and the size
    the kernel granted."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    return sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def receive(sock: socket.socket, buf: bytearray, timeout: float | None, handle,
            max_datagrams: int) -> int:
    """Wait up to ``timeout`` for data, then hand every datagram already queued (at most
    ``max_datagrams``) to ``handle(bytes)``. Returns how many ENOBUFS overruns were seen.
    ``buf`` is reused: a fresh 256 KiB buffer per recv would cost an mmap each time."""
    overruns = 0
    if not select.select([sock], [], [], timeout)[0]:
        return 0
    view = memoryview(buf)
    for _ in range(max_datagrams):
        try:
            data = bytes(view[:sock.recv_into(buf, 0, socket.MSG_DONTWAIT)])
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            overruns += 1
            continue
        handle(data)
    return overruns


# ------------------------------------------------------------------ NFLOG


@dataclass(slots=True)
class LoggedPacket:
    """One packet nft logged. ``time`` is µs since the epoch (the kernel's stamp when the
    packet has one, else when we read it); ``payload`` is the IP packet, up to the snaplen."""
    time: int
    family: int             # 4, 6, or 0 when unknown
    prefix: str
    mark: int
    indev: int              # ifindex, 0 when none
    outdev: int
    uid: int | None
    gid: int | None
    seq: int | None
    seq_global: int | None
    hook: int | None
    payload: bytes
    stamped: bool = True
    """False: the kernel gave no stamp (a locally sent packet), ``time`` is the read time."""


def parse_packet(buf: bytes, start: int, end: int, now_us: int) -> tuple[LoggedPacket | None, int]:
    """An NFULNL_MSG_PACKET body -> (packet or None, malformed count)."""
    if end - start < 4:
        return None, 1
    found, bad = attrs(buf, start + 4, end)
    vals, more = u32_attrs(found, (NFULA_MARK, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV,
                                   NFULA_UID, NFULA_GID, NFULA_SEQ, NFULA_SEQ_GLOBAL))
    bad += more
    stamp, stamped, hook, hw_proto = now_us, False, None, 0
    raw = found.get(NFULA_TIMESTAMP)
    if raw is not None:
        if len(raw) == 16:
            sec, usec = struct.unpack(">QQ", raw)
            stamp, stamped = sec * 1_000_000 + usec, True
        else:
            bad += 1
    raw = found.get(NFULA_PACKET_HDR)
    if raw is not None:
        if len(raw) >= 3:
            hw_proto, hook = _U16.unpack_from(raw)[0], raw[2]
        else:
            bad += 1
    payload = found.get(NFULA_PAYLOAD, b"")
    family = _FAMILY.get(buf[start], 0) or \
        {0x0800: 4, 0x86DD: 6}.get(hw_proto, 0) or (payload[0] >> 4 if payload else 0)
    prefix = found.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    return LoggedPacket(stamp, family if family in (4, 6) else 0, prefix,
                        vals.get(NFULA_MARK, 0), vals.get(NFULA_IFINDEX_INDEV, 0),
                        vals.get(NFULA_IFINDEX_OUTDEV, 0), vals.get(NFULA_UID),
                        vals.get(NFULA_GID), vals.get(NFULA_SEQ), vals.get(NFULA_SEQ_GLOBAL),
                        hook, payload, stamped), bad


class NflogDecoder:
    """Turns datagrams into packets and keeps the counts: ``received`` packets, ``lost``
    packets (gaps in the instance's sequence numbers: a loss shows once a later packet
    arrives), ``malformed`` messages or attributes skipped. No socket, so it can be tested
    and measured on bytes."""

    def __init__(self) -> None:
        self.received = self.lost = self.malformed = 0
        self._next_seq = 0              # a new instance numbers from 0

    def feed(self, data: bytes, now_us: int | None = None) -> list[LoggedPacket]:
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        out = []
        last_stamp = None       # a packet without a stamp was logged after the one before it
        found, bad = messages(data)
        for mtype, _flags, _seq, start, end in found:
            if mtype != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                continue                # NLMSG_DONE closes a batch; nothing else is ours
            packet, more = parse_packet(data, start, end, now_us)
            bad += more
            if packet is None:
                continue
            self.received += 1
            if packet.stamped:
                last_stamp = packet.time
            elif last_stamp is not None:    # not the read time, later than what came next
                packet.time = last_stamp
            if packet.seq is not None:
                gap = (packet.seq - self._next_seq) & 0xFFFFFFFF
                if gap < 1 << 31:       # else a replay or a reordering: not a loss
                    self.lost += gap
                self._next_seq = (packet.seq + 1) & 0xFFFFFFFF
            out.append(packet)
        self.malformed += bad
        return out


class BoundReader:
    """A netfilter netlink socket bound to one NFLOG group or NFQUEUE queue, read through a
    decoder: the bind (sent with an ACK request, answered before anything else is trusted)
    and the reads the two readers share. ``what`` names it in errors ("NFLOG group 7")."""

    def __init__(self, decoder, rcvbuf: int, what: str):
        self.what = what
        self.overruns = 0
        self.decoder = decoder
        self._out: list = []
        self._buf = bytearray(RECV_SIZE)
        self.sock, self.rcvbuf = open_socket(rcvbuf)

    def _bind(self, message: bytes, seq: int) -> None:
        """Send the config and wait for the kernel's answer; packets that arrive meanwhile
        are kept for the next ``read``. The socket is closed when the bind fails."""
        try:
            self.sock.send(message)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
                data = self.sock.recv(RECV_SIZE)
                for mtype, _flags, mseq, start, end in messages(data)[0]:
                    if mtype == NLMSG_ERROR and mseq == seq:
                        err = netlink_error(data, start, end)
                        if err:
                            hint = " (another reader has it)" if err == errno.EBUSY else ""
                            raise OSError(err, f"{self.what}: {os.strerror(err)}{hint}")
                        self.sock.settimeout(None)
                        return
                self._handle(data)
            raise TimeoutError(f"{self.what}: no answer to the bind")
        except BaseException:
            self.sock.close()
            raise

    def _handle(self, data: bytes) -> None:
        self._out.extend(self.decoder.feed(data))

    received = property(lambda self: self.decoder.received)
    malformed = property(lambda self: self.decoder.malformed)

    def read(self, timeout: float | None = 1.0, max_datagrams: int = 256) -> list:
        """What arrived: waits up to ``timeout`` seconds for the first, then takes what is
        queued without waiting. Never raises for a malformed message."""
        self.overruns += receive(self.sock, self._buf, 0 if self._out else timeout,
                                 self._handle, max_datagrams)
        out, self._out = self._out, []
        return out

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Closing the socket destroys the kernel instance (the group or queue is free
        again; a queue's held packets are dropped)."""
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NflogReader(BoundReader):
    """Reads one NFLOG group in the network namespace of the calling thread.

    Counts as ``NflogDecoder`` does, plus ``overruns``: ENOBUFS from our receive buffer,
    which shows a loss at once but not its size. Only one reader per group and namespace:
    the kernel refuses a second with EBUSY.
    """

    def __init__(self, group: int, *, snaplen: int = 256, rcvbuf: int = 8 << 20,
                 qthresh: int = 16, flush_cs: int = 1):
        super().__init__(NflogDecoder(), rcvbuf, f"NFLOG group {group}")
        self.group = group
        config = (nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
                  + nla(NFULA_CFG_MODE, struct.pack(">IBB", snaplen, NFULNL_COPY_PACKET, 0))
                  + nla(NFULA_CFG_FLAGS, _U16.pack(NFULNL_CFG_F_SEQ | NFULNL_CFG_F_SEQ_GLOBAL))
                  + nla(NFULA_CFG_QTHRESH, _U32.pack(qthresh))
                  + nla(NFULA_CFG_TIMEOUT, _U32.pack(flush_cs)))
        seq = int.from_bytes(os.urandom(4), "little") or 1
        self._bind(nfmsg(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK,
                         config, res_id=group, seq=seq), seq)

    lost = property(lambda self: self.decoder.lost)

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "lost": self.lost, "overruns": self.overruns,
                "malformed": self.malformed}

