"""Test factories for captures: link framing, pcap and pcapng files built byte by byte.

Packets are built with scapy and turned into bytes here; nothing of scapy's
travels past these helpers. Capture files are written with ``struct`` so a
test controls every field (byte order, timestamp resolution, damage).
"""

from __future__ import annotations

import struct

from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Ether
from scapy.packet import Raw

from egress.capture.decode import Decoder

# ------------------------------------------------------------------ framing

ETHERTYPE = {4: 0x0800, 6: 0x86DD}
AF_INET, AF_INET6_LINUX, AF_INET6_BSD = 2, 10, 24


def ip_version(ip: bytes) -> int:
    return ip[0] >> 4 if ip else 0


MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
"""Always give scapy both addresses: without them it resolves one over the network."""


def ethernet(ip: bytes, ethertype: int | None = None) -> bytes:
    ethertype = ethertype or ETHERTYPE.get(ip_version(ip), 0x0800)
    return bytes(Ether(**MACS, type=ethertype) / Raw(ip))


def null_le(ip: bytes, family: int | None = None) -> bytes:
    """DLT_NULL as written by a little-endian host."""
    fam = family if family is not None else (AF_INET if ip_version(ip) == 4 else AF_INET6_LINUX)
    return struct.pack("<I", fam) + ip


def null_be(ip: bytes, family: int | None = None) -> bytes:
    """DLT_NULL as written by a big-endian host."""
    fam = family if family is not None else (AF_INET if ip_version(ip) == 4 else 30)
    return struct.pack(">I", fam) + ip


def loop(ip: bytes, family: int | None = None) -> bytes:
    """OpenBSD DLT_LOOP: the family in network byte order."""
    fam = family if family is not None else (AF_INET if ip_version(ip) == 4 else AF_INET6_BSD)
    return struct.pack(">I", fam) + ip


def sll(ip: bytes) -> bytes:
    return bytes(CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=b"\x02\0\0\0\0\x01\0\0",
                             proto=ETHERTYPE.get(ip_version(ip), 0x0800)) / Raw(ip))


def sll2(ip: bytes) -> bytes:
    return bytes(CookedLinuxV2(proto=ETHERTYPE.get(ip_version(ip), 0x0800), ifindex=3,
                               lladdrtype=1, pkttype=4, lladdrlen=6,
                               src=b"\x02\0\0\0\0\x01\0\0") / Raw(ip))


def tlv(tlv_type: int, value: bytes) -> bytes:
    """One NFLOG TLV: length and type little-endian (host order), padded to 4 bytes."""
    body = struct.pack("<HH", 4 + len(value), tlv_type) + value
    return body + b"\0" * (-len(body) % 4)


def nflog(ip: bytes, family: int | None = None, with_payload: bool = True) -> bytes:
    """An NFLOG record: header, a packet-header TLV, a prefix TLV, then the payload TLV (9)."""
    fam = family if family is not None else (AF_INET if ip_version(ip) == 4 else AF_INET6_LINUX)
    out = struct.pack("!BBH", fam, 0, 7)
    out += tlv(1, struct.pack("!HBB", ETHERTYPE.get(ip_version(ip), 0), 3, 0))
    out += tlv(10, b"egress\0")         # NFULA_PREFIX, odd length so padding matters
    if with_payload:
        out += tlv(9, ip)
    return out


FRAMERS = {
    1: ethernet,
    0: null_le,
    108: loop,
    101: lambda ip: ip,
    12: lambda ip: ip,
    14: lambda ip: ip,
    228: lambda ip: ip,
    229: lambda ip: ip,
    113: sll,
    276: sll2,
    239: nflog,
}
"""Link type -> a function putting a raw IP datagram in that link's framing."""


def decode(packet, linktype: int = 101, decoder: Decoder | None = None, ts: int = 0):
    """Decode one scapy IP packet (or raw IP bytes) framed for ``linktype``."""
    raw = packet if isinstance(packet, (bytes, bytearray)) else bytes(packet)
    framed = FRAMERS[linktype](raw) if linktype in FRAMERS else raw
    return (decoder or Decoder()).decode(linktype, ts, framed, 0, len(framed))


def payload_of(decoded) -> bytes:
    """The transport payload bytes a decoded tuple points at."""
    buf, poff, plen = decoded[9:12]
    return bytes(buf[poff:poff + plen])


# -------------------------------------------------------------------- pcap

def pcap_header(linktype: int = 1, *, order: str = "<", nano: bool = False,
                snaplen: int = 65535) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(sec: int, frac: int, data: bytes, *, order: str = "<",
                origlen: int | None = None, caplen: int | None = None) -> bytes:
    """One record; ``frac`` is micro- or nanoseconds depending on the file's magic."""
    return struct.pack(order + "IIII", sec, frac, len(data) if caplen is None else caplen,
                       len(data) if origlen is None else origlen) + data


def pcap_file(records, linktype: int = 1, *, order: str = "<", nano: bool = False) -> bytes:
    """``records``: (sec, frac, data) triples."""
    return pcap_header(linktype, order=order, nano=nano) + b"".join(
        pcap_record(sec, frac, data, order=order) for sec, frac, data in records)


# ------------------------------------------------------------------ pcapng

def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body = _pad(body)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + _pad(value)


def end_of_options(order: str = "<") -> bytes:
    return struct.pack(order + "HH", 0, 0)


def shb(order: str = "<") -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    body += option(4, b"egress tests", order) + end_of_options(order)   # shb_userappl
    return block(0x0A0D0D0A, body, order)


def idb(linktype: int, *, snaplen: int = 0, tsresol: int | None = None, order: str = "<") -> bytes:
    body = struct.pack(order + "HHI", linktype, 0, snaplen)
    body += option(2, b"eth0", order)                                     # if_name first
    if tsresol is not None:
        body += option(9, bytes([tsresol]), order)
    body += end_of_options(order)
    return block(1, body, order)


def epb(iface: int, ticks: int, data: bytes, *, origlen: int | None = None,
        caplen: int | None = None, order: str = "<") -> bytes:
    body = struct.pack(order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF,
                       len(data) if caplen is None else caplen,
                       len(data) if origlen is None else origlen)
    body += _pad(data) + option(1, b"a comment", order) + end_of_options(order)
    return block(6, body, order)


def opb(iface: int, ticks: int, data: bytes, *, order: str = "<") -> bytes:
    """The obsolete Packet Block (type 2) that old writers still produce."""
    body = struct.pack(order + "HHIIII", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF,
                       len(data), len(data))
    return block(2, body + _pad(data), order)


def spb(data: bytes, *, origlen: int | None = None, order: str = "<") -> bytes:
    return block(3, struct.pack(order + "I", len(data) if origlen is None else origlen) + data,
                 order)


def nrb(order: str = "<") -> bytes:
    """A Name Resolution Block: one IPv4 record, then the end."""
    rec = struct.pack(order + "HH", 1, 4 + 12) + bytes([192, 0, 2, 7]) + b"example.org\0"
    return block(4, _pad(rec) + struct.pack(order + "HH", 0, 0), order)


def isb(order: str = "<") -> bytes:
    """An Interface Statistics Block."""
    return block(5, struct.pack(order + "III", 0, 0, 0), order)


# ----------------------------------------------------------------- reading

def read_all(path):
    """Every packet of a capture as (linktype, ts_us, bytes, origlen), and the stats."""
    from egress.capture.files import open_capture
    packets, stats = open_capture(path)
    out = [(lt, ts, bytes(buf[off:off + caplen]), origlen)
           for lt, ts, buf, off, caplen, origlen in packets]
    return out, stats
