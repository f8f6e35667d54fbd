"""QUIC: the client's Initial packets, decrypted, and the ClientHello inside them.

Initial packets are protected with keys anyone can derive from the client's
first Destination Connection ID (RFC 9001 §5.2), so a passive observer can read
the ClientHello: SNI, ALPN and the JA4 (with ``q``). Versions 1 (RFC 9000) and
2 (RFC 9369). Pure parsing: nothing here raises on malformed input.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from egress.identify.common import NEED_MORE, NeedMore
from egress.identify.tls import MAX_HELLO, ClientHello, client_hello_message

VERSION_1 = 0x00000001
VERSION_2 = 0x6B3343CF


@dataclass(frozen=True)
class _Version:
    salt: bytes
    """initial_salt for HKDF-Extract of the initial secret."""
    label_prefix: bytes
    """``quic `` (v1) or ``quicv2 `` (v2): the prefix of the key, iv and hp labels."""
    initial_type: int
    """The long-header packet type bits of an Initial packet."""


_VERSIONS = {
    VERSION_1: _Version(  # RFC 9001 §5.2
        salt=bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
        label_prefix=b"quic ", initial_type=0b00),
    VERSION_2: _Version(  # RFC 9369 §3.3
        salt=bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
        label_prefix=b"quicv2 ", initial_type=0b01),
}

MIN_INITIAL_DATAGRAM = 1200
"""A client's datagrams carrying Initial packets are at least this long (RFC 9000 §14.1)."""
MAX_CID = 20
"""Connection IDs are at most 20 bytes in versions 1 and 2."""

_FRAME_PADDING = 0x00
_FRAME_PING = 0x01
_FRAME_ACK = 0x02
_FRAME_ACK_ECN = 0x03
_FRAME_CRYPTO = 0x06
_FRAME_CONNECTION_CLOSE = 0x1C

_VERSION_FIELD = struct.Struct("!I")
_NOT_ZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True)
class QuicInitial:
    """What the client's Initial packets say."""

    version: str
    """The QUIC version, hex as ``0x00000001``."""
    sni: str | None
    """The ClientHello's SNI; None when absent or when the ClientHello was not read."""
    alpn: list[str] | None
    """ALPN protocols offered; None when absent or not read."""
    ja4: str | None
    """JA4 of the ClientHello (``q`` prefix); None when not read."""
    ech: bool | None
    """True when the ClientHello carries encrypted_client_hello; None when not read."""
    complete: bool
    """True when the whole ClientHello was decrypted and parsed."""
    hello: ClientHello | None
    """The ClientHello itself; None when not read."""


def is_quic_initial_start(datagram: bytes) -> bool:
    """Cheap test: is this a client's first datagram, opening with an Initial of version 1 or 2?"""
    if len(datagram) < MIN_INITIAL_DATAGRAM or not datagram[0] & 0x80:
        return False
    version = _VERSIONS.get(_VERSION_FIELD.unpack_from(datagram, 1)[0])
    return (version is not None and (datagram[0] >> 4) & 0b11 == version.initial_type
            and datagram[5] <= MAX_CID)


def initial(datagrams: list[bytes], *, final: bool = False) -> QuicInitial | None | NeedMore:
    """The client's Initial packets from its first UDP payloads, in order.

    ``None`` unless the first datagram opens with an Initial packet that
    decrypts. ``NEED_MORE`` while the ClientHello is not complete; with
    ``final`` (no more datagrams will come) a ``QuicInitial`` with
    ``complete=False`` instead. Keys come from the first Initial's Destination
    Connection ID and serve every later client Initial (RFC 9001 §5.2).
    """
    if not datagrams or not is_quic_initial_start(datagrams[0]):
        return None
    first = datagrams[0]
    version_number = _VERSION_FIELD.unpack_from(first, 1)[0]
    version = _VERSIONS[version_number]
    keys = _client_keys(version_number, bytes(first[6:6 + first[5]]))

    crypto: list[tuple[int, bytes]] = []
    decrypted = False
    for datagram in datagrams:
        pos = 0
        while pos < len(datagram):
            packet = _next_packet(datagram, pos, version_number, version)
            if packet is None:
                break  # the rest of the datagram is not a packet we can read
            pos, initial_packet = packet
            if initial_packet is None:
                continue  # a coalesced packet of another type
            payload = _decrypt(keys, datagram, *initial_packet)
            if payload is None:
                if not decrypted:
                    return None  # the first Initial does not decrypt: not QUIC
                continue
            decrypted = True
            _frames(payload, crypto)
    if not decrypted:
        return None

    hello = client_hello_message(_crypto_stream(crypto))
    label = f"0x{version_number:08x}"
    if isinstance(hello, ClientHello):
        return QuicInitial(version=label, sni=hello.sni, alpn=hello.alpn,
                           ja4=hello.ja4("q"), ech=hello.ech, complete=True,
                           hello=hello)
    if hello is NEED_MORE and not final:
        return NEED_MORE
    return QuicInitial(version=label, sni=None, alpn=None, ja4=None, ech=None,
                       complete=False, hello=None)


# --------------------------------------------------------------------------
# Keys (RFC 9001 §5.1, §5.2; RFC 9369 §3.3)


@dataclass(frozen=True)
class _Keys:
    aead: AESGCM
    iv: bytes
    hp: bytes


def client_initial_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """The client's Initial key, IV and header-protection key for a Destination Connection ID."""
    spec = _VERSIONS[version]
    initial_secret = HKDF.extract(hashes.SHA256(), spec.salt, dcid)
    client_secret = hkdf_expand_label(initial_secret, b"client in", 32)
    return (hkdf_expand_label(client_secret, spec.label_prefix + b"key", 16),
            hkdf_expand_label(client_secret, spec.label_prefix + b"iv", 12),
            hkdf_expand_label(client_secret, spec.label_prefix + b"hp", 16))


@functools.lru_cache(maxsize=256)  # callers ask again, with more datagrams, for the same flow
def _client_keys(version: int, dcid: bytes) -> _Keys:
    key, iv, hp = client_initial_keys(version, dcid)
    return _Keys(aead=AESGCM(key), iv=iv, hp=hp)


def hkdf_expand_label(secret: bytes, label: bytes, length: int, context: bytes = b"") -> bytes:
    """HKDF-Expand-Label of TLS 1.3 (RFC 8446 §7.1) with SHA-256."""
    full_label = b"tls13 " + label
    info = (length.to_bytes(2, "big") + bytes((len(full_label),)) + full_label
            + bytes((len(context),)) + context)
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


# --------------------------------------------------------------------------
# Packets


def _next_packet(datagram: bytes, pos: int, version_number: int, version: _Version
                  ) -> tuple[int, tuple[int, int, int] | None] | None:
    """The long-header packet at ``pos``: where the next one starts, and for an
    Initial of our version (header start, packet-number offset, packet end).
    None when no long-header packet of our version can be read there."""
    end = len(datagram)
    if pos + 7 > end or not datagram[pos] & 0x80:
        return None  # a short-header packet or padding ends what we can read
    if _VERSION_FIELD.unpack_from(datagram, pos + 1)[0] != version_number:
        return None
    packet_type = (datagram[pos] >> 4) & 0b11
    cursor = pos + 5
    for _ in range(2):  # destination, then source connection ID
        if cursor >= end or datagram[cursor] > MAX_CID:
            return None
        cursor += 1 + datagram[cursor]
    is_initial = packet_type == version.initial_type
    if is_initial:
        token = _varint(datagram, cursor)
        if token is None:
            return None
        token_length, cursor = token
        cursor += token_length
    length = _varint(datagram, cursor)
    if length is None:
        return None
    length, pn_offset = length
    packet_end = pn_offset + length
    if packet_end > end:
        return None
    if not is_initial:
        return packet_end, None
    return packet_end, (pos, pn_offset, packet_end)


def _decrypt(keys: _Keys, datagram: bytes, start: int, pn_offset: int, end: int) -> bytes | None:
    """One Initial's payload: header protection removed, then decrypted (RFC 9001 §5.3, §5.4)."""
    sample = datagram[pn_offset + 4:pn_offset + 20]
    if len(sample) < 16 or pn_offset + 20 > end:
        return None
    mask = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor().update(sample)
    first = datagram[start] ^ (mask[0] & 0x0F)
    pn_length = (first & 0x03) + 1
    packet_number = int.from_bytes(
        bytes(b ^ m for b, m in zip(datagram[pn_offset:pn_offset + pn_length], mask[1:])), "big")
    header = (bytes((first,)) + datagram[start + 1:pn_offset]
              + packet_number.to_bytes(pn_length, "big"))
    # An Initial's packet number is small; its truncated form is the full number.
    nonce = (int.from_bytes(keys.iv, "big") ^ packet_number).to_bytes(12, "big")
    try:
        return keys.aead.decrypt(nonce, datagram[pn_offset + pn_length:end], header)
    except InvalidTag:
        return None


# --------------------------------------------------------------------------
# Frames (RFC 9000 §19)


def _frames(payload: bytes, crypto: list[tuple[int, bytes]]) -> None:
    """Collect the CRYPTO frames of a decrypted Initial; stop at a frame we cannot skip."""
    pos = 0
    end = len(payload)
    while pos < end:
        kind = payload[pos]
        if kind == _FRAME_PADDING:
            # Padding fills most of an Initial: jump the run, not byte by byte.
            run = _NOT_ZERO.search(payload, pos)
            pos = run.start() if run else end
        elif kind == _FRAME_PING:
            pos += 1
        elif kind == _FRAME_CRYPTO:
            fields = _varints(payload, pos + 1, 2)
            if fields is None:
                return
            (offset, length), pos = fields
            if pos + length > end:
                return
            if offset + length <= 4 + MAX_HELLO:
                crypto.append((offset, payload[pos:pos + length]))
            pos += length
        elif kind in (_FRAME_ACK, _FRAME_ACK_ECN):
            fields = _varints(payload, pos + 1, 4)  # largest, delay, range count, first range
            if fields is None:
                return
            (_, _, ranges, _), pos = fields
            if ranges > end:  # each range needs bytes; a bigger count is malformed
                return
            skipped = _varints(payload, pos, 2 * ranges + (3 if kind == _FRAME_ACK_ECN else 0))
            if skipped is None:
                return
            pos = skipped[1]
        elif kind == _FRAME_CONNECTION_CLOSE:
            fields = _varints(payload, pos + 1, 3)  # error code, frame type, reason length
            if fields is None:
                return
            (_, _, reason_length), pos = fields
            pos += reason_length
        else:
            return  # not allowed in an Initial, and of unknown length


def _crypto_stream(pieces: list[tuple[int, bytes]]) -> bytes:
    """The contiguous start of the CRYPTO stream from frames in any order, overlaps allowed."""
    stream = bytearray()
    for offset, data in sorted(pieces, key=lambda piece: piece[0]):
        if offset > len(stream):
            break  # a gap: what follows it must wait
        stream += data[len(stream) - offset:]
    return bytes(stream)


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """A variable-length integer (RFC 9000 §16) and the position after it."""
    if pos >= len(data):
        return None
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        return None
    value = int.from_bytes(data[pos:pos + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size


def _varints(data: bytes, pos: int, count: int) -> tuple[list[int], int] | None:
    values = []
    for _ in range(count):
        read = _varint(data, pos)
        if read is None:
            return None
        value, pos = read
        values.append(value)
    return values, pos
