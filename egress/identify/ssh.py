"""SSH from the first bytes of each direction: banners, KEXINIT, HASSH.

RFC 4253: each side first sends an identification string ("SSH-2.0-...",
the banner) ending in CR LF, then binary packets in cleartext until
SSH_MSG_NEWKEYS. The first binary packet is SSH_MSG_KEXINIT, whose
algorithm lists give the HASSH fingerprints (salesforce/hassh):

- ``hassh``        = md5("kex;enc_c2s;mac_c2s;comp_c2s") of the client's KEXINIT
- ``hassh_server`` = md5("kex;enc_s2c;mac_s2c;comp_s2c") of the server's KEXINIT

Every function takes bytes as they arrived and never raises: ``None`` means
not SSH (or malformed), ``NEED_MORE`` that more bytes could still make it SSH.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from egress.identify.common import NEED_MORE, NeedMore

BANNER_MAX = 255
"""Longest identification string, CR LF included (RFC 4253 §4.2)."""
PRELUDE_MAX = 4096
"""Bytes of other lines a server may send before its banner that we read."""
PACKET_MAX = 35000
"""Largest packet RFC 4253 §6.1 requires implementations to accept; beyond it, not SSH."""
CLEARTEXT_PACKETS_MAX = 8
"""Cleartext packets after KEXINIT we walk looking for NEWKEYS (the kex has 2 to 5)."""

MSG_KEXINIT = 20
MSG_NEWKEYS = 21
_PREFIX = b"SSH-"


def looks_like_ssh(data: bytes) -> bool:
    """Cheap check for a client stream: it starts with ``SSH-`` (or a prefix of it so far)."""
    head = data[:4]
    return _PREFIX.startswith(head) if len(head) < 4 else head == _PREFIX


@dataclass(frozen=True, kw_only=True)
class Banner:
    text: str
    """The identification string without its line end, e.g. ``SSH-2.0-OpenSSH_9.2p1 Debian-2``."""
    proto_version: str
    """The protocol version: ``2.0``, ``1.99`` (SSH 2 with SSH 1 fallback), ``1.5``."""
    end: int
    """Offset just past the banner's line end: where the binary packets start."""

    @property
    def ssh2(self) -> bool:
        """True when binary packets follow in SSH 2 format (versions 2.0 and 1.99)."""
        return self.proto_version in ("2.0", "1.99")


def read_banner(data: bytes, *, server: bool = False) -> Banner | None | NeedMore:
    """The identification string at the start of one direction's bytes.

    A server may send other lines first (RFC 4253 §4.2), a client may not.
    The line end may be CR LF or a bare LF (older implementations send LF).
    """
    start = 0
    while True:
        head = data[start:start + 4]
        if not server and head != _PREFIX[:len(head)]:
            return None
        line_end = data.find(b"\n", start, start + BANNER_MAX)
        if head == _PREFIX[:len(head)]:  # the banner, or its start so far
            if line_end < 0:
                return NEED_MORE if len(data) - start < BANNER_MAX else None
            return _banner_line(data[start:line_end], line_end + 1)
        # A server's other line: text, of banner length at most, and not forever.
        if line_end < 0:
            if len(data) - start >= BANNER_MAX or b"\0" in data[start:]:
                return None
            return NEED_MORE if len(data) < PRELUDE_MAX else None
        if b"\0" in data[start:line_end]:
            return None
        start = line_end + 1
        if start > PRELUDE_MAX:
            return None


def _banner_line(line: bytes, end: int) -> Banner | None:
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.startswith(_PREFIX) or b"\0" in line:
        return None
    proto, dash, software = line[4:].partition(b"-")
    if not dash or not software or not _is_version(proto):
        return None
    text = line.decode("utf-8", "replace")
    return Banner(text=text, proto_version=proto.decode("ascii"), end=end)


def _is_version(proto: bytes) -> bool:
    major, dot, minor = proto.partition(b".")
    return bool(dot) and major.isdigit() and minor.isdigit() and proto.isascii()


def banner(data: bytes, *, server: bool = False) -> str | None | NeedMore:
    """The identification string (without CR LF) at the start of ``data``."""
    found = read_banner(data, server=server)
    return found.text if isinstance(found, Banner) else found


@dataclass(frozen=True, kw_only=True)
class KexInit:
    """An SSH_MSG_KEXINIT (RFC 4253 §7.1); name-lists as sent, comma-separated."""

    cookie: bytes
    """The 16 random bytes."""
    kex_algorithms: str
    server_host_key_algorithms: str
    encryption_c2s: str
    encryption_s2c: str
    mac_c2s: str
    mac_s2c: str
    compression_c2s: str
    compression_s2c: str
    languages_c2s: str
    languages_s2c: str
    first_kex_packet_follows: bool
    """True when a guessed key exchange packet follows."""
    end: int
    """Offset just past the packet in the bytes given to ``kexinit``."""


def kexinit(data: bytes) -> KexInit | None | NeedMore:
    """The KEXINIT packet at the start of ``data`` (the bytes after the banner)."""
    if len(data) < 6:
        return NEED_MORE
    packet_length, padding_length, msg = struct.unpack_from(">IBB", data)
    if msg != MSG_KEXINIT or not _plausible(packet_length, padding_length):
        return None
    end = 4 + packet_length
    if len(data) < end:
        return NEED_MORE
    payload = data[5:end - padding_length]
    return _parse_kexinit(payload, end)


def _plausible(packet_length: int, padding_length: int) -> bool:
    # The payload holds at least the message number.
    return packet_length <= PACKET_MAX and padding_length + 1 < packet_length


def _parse_kexinit(payload: bytes, end: int) -> KexInit | None:
    pos = 17  # message number and cookie
    if len(payload) < pos:
        return None
    lists = []
    for _ in range(10):
        if pos + 4 > len(payload):
            return None
        (n,) = struct.unpack_from(">I", payload, pos)
        pos += 4
        if pos + n > len(payload):
            return None
        # latin-1 maps each byte to one character, so hashing can restore the exact bytes.
        lists.append(payload[pos:pos + n].decode("latin-1"))
        pos += n
    follows = pos < len(payload) and payload[pos] != 0
    return KexInit(cookie=payload[1:17], kex_algorithms=lists[0],
                   server_host_key_algorithms=lists[1], encryption_c2s=lists[2],
                   encryption_s2c=lists[3], mac_c2s=lists[4], mac_s2c=lists[5],
                   compression_c2s=lists[6], compression_s2c=lists[7],
                   languages_c2s=lists[8], languages_s2c=lists[9],
                   first_kex_packet_follows=follows, end=end)


def hassh_string(kex: KexInit) -> str:
    """The client HASSH input: ``kex;enc_c2s;mac_c2s;comp_c2s``."""
    return ";".join((kex.kex_algorithms, kex.encryption_c2s, kex.mac_c2s,
                     kex.compression_c2s))


def hassh_server_string(kex: KexInit) -> str:
    """The server HASSH input: ``kex;enc_s2c;mac_s2c;comp_s2c``."""
    return ";".join((kex.kex_algorithms, kex.encryption_s2c, kex.mac_s2c,
                     kex.compression_s2c))


def hassh(kex: KexInit) -> str:
    """HASSH of a client's KEXINIT (md5, hex)."""
    return hashlib.md5(hassh_string(kex).encode("latin-1")).hexdigest()


def hassh_server(kex: KexInit) -> str:
    """HASSHServer of a server's KEXINIT (md5, hex)."""
    return hashlib.md5(hassh_server_string(kex).encode("latin-1")).hexdigest()


SERVER_KEX_MESSAGES = (31, 33)
"""KEXDH_REPLY / KEX_ECDH_REPLY / KEX_DH_GEX_GROUP (31) and KEX_DH_GEX_REPLY (33): only a
server sends them, so they say which side of a connection is the SSH server."""


def kex_messages(data: bytes, start: int) -> list[int]:
    """Message numbers of the cleartext packets from ``start`` up to NEWKEYS (or the data's end)."""
    out, pos = [], start
    for _ in range(CLEARTEXT_PACKETS_MAX):
        if len(data) < pos + 6:
            break
        packet_length, padding_length, msg = struct.unpack_from(">IBB", data, pos)
        if not _plausible(packet_length, padding_length):
            break
        out.append(msg)
        pos += 4 + packet_length
        if msg == MSG_NEWKEYS:
            break
    return out


def newkeys_end(data: bytes, start: int) -> int | None | NeedMore:
    """Offset just past SSH_MSG_NEWKEYS, walking cleartext packets from ``start``.

    After NEWKEYS a side's packets are encrypted: this is where its key
    exchange stops. ``None`` when a packet is not a plausible cleartext one.
    """
    pos = start
    for _ in range(CLEARTEXT_PACKETS_MAX):
        if len(data) < pos + 6:
            return NEED_MORE
        packet_length, padding_length, msg = struct.unpack_from(">IBB", data, pos)
        if not _plausible(packet_length, padding_length):
            return None
        pos += 4 + packet_length
        if msg == MSG_NEWKEYS:
            return pos if len(data) >= pos else NEED_MORE
    return None


@dataclass(frozen=True, kw_only=True)
class SshSession:
    """What the first bytes of both directions say; None where not (yet) seen."""

    client_banner: str | None
    """The client's identification string."""
    server_banner: str | None
    """The server's identification string."""
    client_kexinit: KexInit | None
    """The client's KEXINIT; None while incomplete, or for SSH 1."""
    server_kexinit: KexInit | None
    """The server's KEXINIT; None while incomplete, or for SSH 1."""
    hassh: str | None
    """HASSH of the client's KEXINIT."""
    hassh_server: str | None
    """HASSHServer of the server's KEXINIT."""
    client_kexinit_end: int | None
    """Offset in the client stream just past its KEXINIT."""
    server_kexinit_end: int | None
    """Offset in the server stream just past its KEXINIT."""
    client_newkeys_end: int | None
    """Offset in the client stream past its NEWKEYS: encrypted from here on."""
    server_newkeys_end: int | None
    """Offset in the server stream past its NEWKEYS: encrypted from here on."""


def session(client: bytes, server: bytes) -> SshSession:
    """Banners, KEXINITs, HASSHes and key-exchange offsets of both directions."""
    c_banner, c_kex, c_newkeys = _side(client, server=False)
    s_banner, s_kex, s_newkeys = _side(server, server=True)
    return SshSession(
        client_banner=c_banner.text if c_banner else None,
        server_banner=s_banner.text if s_banner else None,
        client_kexinit=c_kex, server_kexinit=s_kex,
        hassh=hassh(c_kex) if c_kex else None,
        hassh_server=hassh_server(s_kex) if s_kex else None,
        client_kexinit_end=c_banner.end + c_kex.end if c_banner and c_kex else None,
        server_kexinit_end=s_banner.end + s_kex.end if s_banner and s_kex else None,
        client_newkeys_end=c_newkeys, server_newkeys_end=s_newkeys)


def _side(data: bytes, *, server: bool):
    found = read_banner(data, server=server)
    if not isinstance(found, Banner):
        return None, None, None
    if not found.ssh2:
        return found, None, None
    kex = kexinit(data[found.end:])
    if not isinstance(kex, KexInit):
        return found, None, None
    done = newkeys_end(data, found.end + kex.end)
    return found, kex, done if isinstance(done, int) else None
