"""Capture files: pcap and pcapng, either byte order, any timestamp resolution, gzip.

A reader yields one tuple per packet without copying it:
``(linktype, ts_us, buf, offset, caplen, origlen)``; ``buf[offset:offset+caplen]``
is the packet. A file that is not a capture is a ``CaptureError`` (one line);
a capture cut off mid-record ends cleanly and says so in ``stats.truncated``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

CHUNK = 8 << 20
"""Bytes read at a time; a record larger than this is still read whole."""
MAX_RECORD = 256 << 20
"""A record or block claiming more than this is damage, not data."""

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000), b"\xa1\xb2\xc3\xd4": (">", 1_000),   # microseconds
    b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1),            # nanoseconds
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"

Packet = tuple[int, int, bytes, int, int, int]


class CaptureError(ValueError):
    """A file that cannot be read as a capture; the message names the file."""


@dataclass
class ReadStats:
    packets: int = 0
    """Packet records read."""
    truncated: str | None = None
    """Why the file ended early (cut off mid-record), or None."""
    skipped_blocks: int = 0
    """pcapng blocks we do not use (statistics, name resolution, ...)."""
    linktypes: set[int] = field(default_factory=set)
    """Link types of the interfaces seen."""


def open_capture(path: str | Path) -> tuple[Iterator[Packet], ReadStats]:
    """The packets of a capture file and the stats that fill in as they are read."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise CaptureError(f"{path}: cannot open: {e.strerror}") from None
    head = raw.read(4)
    stream: BinaryIO = raw
    if head[:2] == b"\x1f\x8b":
        raw.seek(0)
        stream = gzip.open(raw, "rb")
        try:
            head = stream.read(4)
        except (OSError, EOFError) as e:
            raise CaptureError(f"{path}: broken gzip data: {e}") from None
    stats = ReadStats()
    if head in PCAP_MAGICS:
        return _pcap(path, stream, head, stats), stats
    if head == PCAPNG_SHB:
        return _pcapng(path, stream, head, stats), stats
    stream.close()
    raise CaptureError(f"{path}: not a pcap or pcapng capture")


class _Buffer:
    """A growing window over a stream: ``need(n)`` makes n bytes available at ``off``."""

    def __init__(self, path: Path, stream: BinaryIO, first: bytes):
        self.path, self.stream = path, stream
        self.buf, self.off, self.eof = first, 0, False

    def need(self, n: int) -> bool:
        if self.off + n <= len(self.buf):
            return True
        if self.eof:
            return False
        parts, have = [self.buf[self.off:]], len(self.buf) - self.off
        want = max(CHUNK, n)
        while have < want:
            try:
                # read1: a damaged gzip tail loses only the last piece, not a whole chunk
                chunk = self.stream.read1(min(want - have, 1 << 20))
            except (OSError, EOFError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf, self.off = b"".join(parts), 0
        return self.off + n <= len(self.buf)

    def at_end(self) -> bool:
        return not self.need(1)


def _pcap(path: Path, stream: BinaryIO, magic: bytes, stats: ReadStats) -> Iterator[Packet]:
    order, ns_per_tick = PCAP_MAGICS[magic]
    b = _Buffer(path, stream, magic)
    try:
        if not b.need(24):
            raise CaptureError(f"{path}: pcap header cut off")
        (network,) = struct.unpack_from(order + "I", b.buf, 20)
        linktype = network & 0xFFFF  # libpcap's LT_LINKTYPE: upper bits carry FCS information
        stats.linktypes.add(linktype)
        b.off += 24
        unpack = struct.Struct(order + "IIII").unpack_from
        micro = ns_per_tick == 1_000
        buf, off, size = b.buf, b.off, len(b.buf)
        while True:
            if off + 16 > size:              # refill only at a chunk's end: the common case is fast
                b.off = off
                if not b.need(16):
                    if b.off < len(b.buf):
                        stats.truncated = "cut off inside a record header"
                    return
                buf, off, size = b.buf, b.off, len(b.buf)
            sec, frac, caplen, origlen = unpack(buf, off)
            end = off + 16 + caplen
            if end > size:
                if caplen > MAX_RECORD:
                    stats.truncated = f"record of {caplen} bytes: the file is damaged here"
                    return
                b.off = off
                if not b.need(16 + caplen):
                    stats.truncated = "cut off inside a packet"
                    return
                buf, off, size = b.buf, b.off, len(b.buf)
                end = off + 16 + caplen
            stats.packets += 1
            yield linktype, sec * 1_000_000 + (frac if micro else frac // 1_000), buf, off + 16, \
                caplen, origlen
            off = end
    finally:
        stream.close()


_SHB, _IDB, _OPB, _SPB, _EPB = 0x0A0D0D0A, 1, 2, 3, 6


def _pcapng(path: Path, stream: BinaryIO, magic: bytes, stats: ReadStats) -> Iterator[Packet]:
    b = _Buffer(path, stream, magic)
    order = "<"
    interfaces: list[tuple[int, int, int, int]] = []  # linktype, snaplen, tick numerator, denominator
    try:
        while True:
            if not b.need(12):
                if b.off < len(b.buf):
                    stats.truncated = "cut off inside a block header"
                return
            buf, off = b.buf, b.off
            if buf[off:off + 4] == PCAPNG_SHB:
                bom = buf[off + 8:off + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    raise CaptureError(f"{path}: pcapng section with a bad byte-order magic")
                interfaces = []
            btype, blen = struct.unpack_from(order + "II", buf, off)
            if blen < 12 or blen % 4 or blen > MAX_RECORD:
                stats.truncated = f"block of {blen} bytes: the file is damaged here"
                return
            if not b.need(blen):
                stats.truncated = "cut off inside a block"
                return
            buf, off = b.buf, b.off
            body = off + 8
            if btype == _EPB and blen >= 32:
                iface, hi, lo, caplen, origlen = struct.unpack_from(order + "IIIII", buf, body)
                if iface < len(interfaces) and 32 + caplen <= blen:
                    linktype, _, num, den = interfaces[iface]
                    stats.packets += 1
                    yield linktype, ((hi << 32) | lo) * num // den, buf, body + 20, caplen, origlen
            elif btype == _SPB and blen >= 16 and interfaces:
                (origlen,) = struct.unpack_from(order + "I", buf, body)
                linktype, snaplen, _, _ = interfaces[0]
                caplen = min(origlen, blen - 16, snaplen or origlen)
                stats.packets += 1
                yield linktype, 0, buf, body + 4, caplen, origlen
            elif btype == _OPB and blen >= 32:
                iface, _, hi, lo, caplen, origlen = struct.unpack_from(order + "HHIIII", buf, body)
                if iface < len(interfaces) and 32 + caplen <= blen:
                    linktype, _, num, den = interfaces[iface]
                    stats.packets += 1
                    yield linktype, ((hi << 32) | lo) * num // den, buf, body + 20, caplen, origlen
            elif btype == _IDB and blen >= 20:
                linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, body)
                num, den = _tsresol(buf, body + 8, off + blen - 4, order)
                interfaces.append((linktype, snaplen, num, den))
                stats.linktypes.add(linktype)
            elif btype != _SHB:
                stats.skipped_blocks += 1
            b.off += blen
    finally:
        stream.close()


def _tsresol(buf: bytes, off: int, end: int, order: str) -> tuple[int, int]:
    """(numerator, denominator) turning timestamp ticks into microseconds."""
    while off + 4 <= end:
        code, length = struct.unpack_from(order + "HH", buf, off)
        if code == 0:
            break
        if code == 9 and length >= 1:  # if_tsresol
            r = buf[off + 4]
            if r & 0x80:
                return 1_000_000, 1 << (r & 0x7F)
            n = r & 0x7F
            return (10 ** (6 - n), 1) if n <= 6 else (1, 10 ** (n - 6))
        off += 4 + ((length + 3) & ~3)
    return 1, 1  # default resolution: microseconds
