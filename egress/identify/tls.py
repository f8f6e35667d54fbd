"""TLS: the client's ClientHello, its SNI, ALPN and ECH, and its JA3 and JA4 fingerprints.

Pure parsing of the first bytes a client sent on a TCP stream. Nothing here
raises on malformed input: the answer is ``None`` (not TLS, or malformed),
``NEED_MORE`` (a ClientHello whose end has not arrived yet) or a
``ClientHello``.

JA3 follows salesforce/ja3 (BSD-3-Clause). JA4 is FoxIO's TLS client
fingerprint (technical_details/JA4.md, BSD-3-Clause, Copyright (c) FoxIO);
nothing else of JA4+ is implemented here.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass

from egress.identify.common import NEED_MORE, NeedMore

MAX_HELLO = 0x10000
"""The largest ClientHello body we wait for (64 KiB, as Go's crypto/tls). A
longer one is refused rather than buffered: post-quantum key shares make
hellos of a few KiB, not tens."""

GREASE = frozenset(range(0x0A0A, 0x10000, 0x1010))
"""RFC 8701's reserved values 0x0a0a, 0x1a1a, ... 0xfafa, left out of fingerprints."""

# Extension types (IANA TLS ExtensionType registry).
EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D

_RECORD_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 1

_U16 = struct.Struct("!H")
_RECORD_HEADER = struct.Struct("!BBBH")  # type, version major, minor, length
_SWAP = sys.byteorder == "little"

# JA4's two-character version codes; anything else is "00".
_JA4_VERSIONS = {
    0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10",
    0x0300: "s3", 0x0200: "s2", 0x0100: "s1",
    0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3",
}
_EMPTY_HASH = "000000000000"


class _Malformed(Exception):
    """Internal: the bytes do not fit the structure; the public functions answer None."""


@dataclass(frozen=True)
class ClientHello:
    """A parsed ClientHello. Lists keep the client's order and its GREASE values."""

    legacy_version: int
    """The ClientHello's legacy_version (client_version), e.g. 0x0303; not the record's."""
    cipher_suites: list[int]
    """Cipher suites offered, in order."""
    extensions: list[int]
    """Extension types, in order."""
    supported_groups: list[int]
    """supported_groups (elliptic_curves); empty when the extension is absent."""
    ec_point_formats: list[int]
    """ec_point_formats; empty when the extension is absent."""
    signature_algorithms: list[int]
    """signature_algorithms, in order; empty when the extension is absent."""
    supported_versions: list[int]
    """supported_versions, in order; empty when the extension is absent."""
    alpn: list[str] | None
    """ALPN protocols offered, decoded for display (invalid UTF-8 as ``\\xNN``);
    None when the extension is absent."""
    alpn_raw: list[bytes] | None
    """ALPN protocol ids as sent; None when the extension is absent."""
    sni: str | None
    """The server_name host_name (as sent, invalid UTF-8 as ``\\xNN``); None when absent."""
    ech: bool
    """True when the encrypted_client_hello extension (0xfe0d) is present."""

    @property
    def ja3_string(self) -> str:
        """JA3's SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats.

        Decimal values joined by ``-``, GREASE left out of every list.
        """
        return ",".join((
            str(self.legacy_version),
            _dash(self.cipher_suites),
            _dash(self.extensions),
            _dash(self.supported_groups),
            _dash(self.ec_point_formats),
        ))

    @property
    def ja3(self) -> str:
        """The JA3 fingerprint: MD5 of ``ja3_string``, lower-case hex."""
        return hashlib.md5(self.ja3_string.encode("ascii"), usedforsecurity=False).hexdigest()

    def ja4(self, transport: str = "t") -> str:
        """JA4, with the transport letter ``t`` (TLS over TCP), ``q`` (QUIC) or ``d`` (DTLS)."""
        prefix, ciphers, exts_sigs, has_exts = self._ja4_parts(transport)
        cipher_hash = _sha12(ciphers) if ciphers else _EMPTY_HASH
        ext_hash = _sha12(exts_sigs) if has_exts else _EMPTY_HASH
        return f"{prefix}_{cipher_hash}_{ext_hash}"

    def ja4_raw(self, transport: str = "t") -> str:
        """JA4_r, JA4 before hashing: sorted ciphers, sorted extensions_signature algorithms."""
        prefix, ciphers, exts_sigs, _ = self._ja4_parts(transport)
        return f"{prefix}_{ciphers}_{exts_sigs}"

    def _ja4_parts(self, transport: str) -> tuple[str, str, str, bool]:
        ciphers = [c for c in self.cipher_suites if c not in GREASE]
        exts = [e for e in self.extensions if e not in GREASE]
        versions = [v for v in self.supported_versions if v not in GREASE]
        version = max(versions) if versions else self.legacy_version
        prefix = "".join((
            transport,
            _JA4_VERSIONS.get(version, "00"),
            "d" if EXT_SERVER_NAME in exts else "i",
            f"{min(len(ciphers), 99):02d}",
            f"{min(len(exts), 99):02d}",
            _ja4_alpn(self.alpn_raw),
        ))
        hashed_exts = sorted(e for e in exts if e not in (EXT_SERVER_NAME, EXT_ALPN))
        sigs = [s for s in self.signature_algorithms if s not in GREASE]
        exts_sigs = _hex4(hashed_exts)
        if sigs:
            exts_sigs += "_" + _hex4(sigs)
        return prefix, _hex4(sorted(ciphers)), exts_sigs, bool(hashed_exts)


def is_tls_client_start(data: bytes) -> bool:
    """Cheap test: do the first 6 bytes look like a TLS record carrying a ClientHello?"""
    return (len(data) >= 6 and data[0] == _RECORD_HANDSHAKE and data[1] == 3
            and data[2] <= 4 and data[5] == _HANDSHAKE_CLIENT_HELLO)


def client_hello(data: bytes) -> ClientHello | None | NeedMore:
    """The ClientHello at the start of a client's TCP stream (bytes in stream order).

    The ClientHello may span several TLS records. ``NEED_MORE`` while it could
    still be one whose end has not arrived; ``None`` for anything else (not
    TLS, malformed, or longer than ``MAX_HELLO``). Bytes after the ClientHello
    are ignored.
    """
    # The bytes we have so far must fit a handshake record header.
    n = len(data)
    if ((n > 0 and data[0] != _RECORD_HANDSHAKE) or (n > 1 and data[1] != 3)
            or (n > 2 and data[2] > 4)):
        return None
    handshake = _handshake_bytes(data)
    if handshake is None or handshake is NEED_MORE:
        return handshake
    return client_hello_message(handshake)


def client_hello_message(data: bytes) -> ClientHello | None | NeedMore:
    """The ClientHello handshake message (type, 24-bit length, body) without a record layer.

    What QUIC carries in its CRYPTO frames. ``NEED_MORE`` when ``data`` holds
    only the start of one; ``None`` when it is not a well-formed ClientHello.
    """
    if not data:
        return NEED_MORE
    if data[0] != _HANDSHAKE_CLIENT_HELLO:
        return None
    if len(data) < 4:
        return NEED_MORE
    length = int.from_bytes(data[1:4], "big")
    if length > MAX_HELLO:
        return None
    if len(data) < 4 + length:
        return NEED_MORE
    try:
        return _parse_body(data, 4, 4 + length)
    except (_Malformed, struct.error):
        return None


# --------------------------------------------------------------------------
# Record layer


def _handshake_bytes(data: bytes) -> bytes | None | NeedMore:
    """The ClientHello message collected from the handshake records at the start of ``data``."""
    fragments = []
    have = 0
    needed = None  # the message's length with its 4-byte header, once that is known
    pos = 0
    while True:
        if len(data) < pos + 5:
            return NEED_MORE
        kind, major, minor, length = _RECORD_HEADER.unpack_from(data, pos)
        if kind != _RECORD_HANDSHAKE or major != 3 or minor > 4:
            return None
        fragment = data[pos + 5:pos + 5 + length]  # short when the record is cut off
        fragments.append(fragment)
        have += len(fragment)
        if needed is None and have:
            head = (fragments[0] if len(fragments[0]) >= 4 else b"".join(fragments))[:4]
            if head[0] != _HANDSHAKE_CLIENT_HELLO:
                return None
            if len(head) == 4:
                needed = 4 + int.from_bytes(head[1:4], "big")
                if needed > 4 + MAX_HELLO:
                    return None
        if needed is not None and have >= needed:
            message = fragments[0] if len(fragments) == 1 else b"".join(fragments)
            return message[:needed]
        if len(fragment) < length:
            return NEED_MORE
        pos += 5 + length


# --------------------------------------------------------------------------
# ClientHello body


def _parse_body(data: bytes, pos: int, end: int) -> ClientHello:
    legacy_version = _u16(data, pos, end)
    pos += 2 + 32  # random
    session_id_len = _u8(data, pos, end)
    pos += 1 + session_id_len
    ciphers_len = _u16(data, pos, end)
    pos += 2
    if ciphers_len % 2:
        raise _Malformed("odd cipher_suites length")
    cipher_suites = _u16_list(data, pos, _within(pos + ciphers_len, end))
    pos += ciphers_len
    compression_len = _u8(data, pos, end)
    pos = _within(pos + 1 + compression_len, end)

    hello = dict(legacy_version=legacy_version, cipher_suites=cipher_suites,
                 extensions=[], supported_groups=[], ec_point_formats=[],
                 signature_algorithms=[], supported_versions=[], alpn=None,
                 alpn_raw=None, sni=None, ech=False)
    if pos < end:  # extensions are optional (SSL 3.0, early TLS 1.0 clients)
        exts_end = _within(pos + 2 + _u16(data, pos, end), end)
        pos += 2
        extensions = hello["extensions"]
        seen = set()
        while pos < exts_end:
            kind = _u16(data, pos, exts_end)
            ext_end = _within(pos + 4 + _u16(data, pos + 2, exts_end), exts_end)
            extensions.append(kind)
            if kind not in seen:  # a repeated extension is not allowed; the first counts
                seen.add(kind)
                _parse_extension(hello, kind, data, pos + 4, ext_end)
            pos = ext_end
    return ClientHello(**hello)


def _parse_extension(hello: dict, kind: int, data: bytes, pos: int, end: int) -> None:
    if kind == EXT_SERVER_NAME:
        hello["sni"] = _server_name(data, pos, end)
    elif kind == EXT_ALPN:
        raw = _alpn(data, pos, end)
        hello["alpn_raw"] = raw
        hello["alpn"] = [p.decode("utf-8", "backslashreplace") for p in raw]
    elif kind == EXT_SUPPORTED_GROUPS:
        hello["supported_groups"] = _u16_vector(data, pos, end)
    elif kind == EXT_EC_POINT_FORMATS:
        n = _u8(data, pos, end)
        hello["ec_point_formats"] = list(data[pos + 1:_within(pos + 1 + n, end)])
    elif kind == EXT_SIGNATURE_ALGORITHMS:
        hello["signature_algorithms"] = _u16_vector(data, pos, end)
    elif kind == EXT_SUPPORTED_VERSIONS:
        n = _u8(data, pos, end)
        if n % 2:
            raise _Malformed("odd supported_versions length")
        hello["supported_versions"] = _u16_list(data, pos + 1, _within(pos + 1 + n, end))
    elif kind == EXT_ENCRYPTED_CLIENT_HELLO:
        hello["ech"] = True


def _server_name(data: bytes, pos: int, end: int) -> str | None:
    """The first host_name of a server_name list (RFC 6066 §3)."""
    list_end = _within(pos + 2 + _u16(data, pos, end), end)
    pos += 2
    while pos < list_end:
        name_type = _u8(data, pos, list_end)
        name_end = _within(pos + 3 + _u16(data, pos + 1, list_end), list_end)
        if name_type == 0:
            return data[pos + 3:name_end].decode("utf-8", "backslashreplace")
        pos = name_end
    return None


def _alpn(data: bytes, pos: int, end: int) -> list[bytes]:
    list_end = _within(pos + 2 + _u16(data, pos, end), end)
    pos += 2
    protocols = []
    while pos < list_end:
        n = _u8(data, pos, list_end)
        protocols.append(bytes(data[pos + 1:_within(pos + 1 + n, list_end)]))
        pos += 1 + n
    return protocols


# --------------------------------------------------------------------------
# Bounds-checked reads: every length read is checked against its enclosing end.


def _within(pos: int, end: int) -> int:
    if pos > end:
        raise _Malformed("length past the end of its enclosing structure")
    return pos


def _u8(data: bytes, pos: int, end: int) -> int:
    if pos + 1 > end:
        raise _Malformed("truncated")
    return data[pos]


def _u16(data: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _Malformed("truncated")
    return _U16.unpack_from(data, pos)[0]


def _u16_list(data: bytes, start: int, end: int) -> list[int]:
    values = array("H")
    values.frombytes(data[start:end])
    if _SWAP:
        values.byteswap()
    return values.tolist()


def _u16_vector(data: bytes, pos: int, end: int) -> list[int]:
    """A list of 16-bit values behind a 16-bit byte length."""
    n = _u16(data, pos, end)
    if n % 2:
        raise _Malformed("odd length of a 16-bit list")
    return _u16_list(data, pos + 2, _within(pos + 2 + n, end))


# --------------------------------------------------------------------------
# Fingerprint helpers


def _dash(values: list[int]) -> str:
    return "-".join(str(v) for v in values if v not in GREASE)


def _hex4(values: list[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def _sha12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]


def _ja4_alpn(protocols: list[bytes] | None) -> str:
    """JA4's two ALPN characters: the first and last byte of the first ALPN id.

    Alphanumeric bytes stand for themselves. Otherwise JA4.md gives the hex
    digits of the id (the first's high nibble, the last's low nibble), but
    FoxIO's reference tools write a non-ASCII byte as ``9``, and their vector
    (tls-non-ascii-alpn, ``0xba 0xad`` -> ``99``) is what other tools compare
    with; so a non-ASCII byte is ``9``, and the hex rule covers the rest.
    """
    if not protocols or not protocols[0]:
        return "00"
    first, last = protocols[0][0], protocols[0][-1]
    if first >= 0x80 or last >= 0x80 or (_alnum(first) and _alnum(last)):
        return _alpn_char(first, first >> 4) + _alpn_char(last, last & 0x0F)
    return f"{first >> 4:x}{last & 0x0F:x}"


def _alpn_char(byte: int, nibble: int) -> str:
    if _alnum(byte):
        return chr(byte)
    return "9" if byte >= 0x80 else f"{nibble:x}"


def _alnum(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A
