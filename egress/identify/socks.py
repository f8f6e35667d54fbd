"""SOCKS proxies from the first bytes of both directions: the inner target, and
where the tunnelled bytes start, so identification can go on inside.

SOCKS5 (RFC 1928), client and server messages in turn::

    client  05 nmethods methods...              server  05 method
    client  01 ulen user plen pass  (RFC 1929,  server  01 status
            only when method 02 was chosen)
    client  05 cmd 00 atyp addr port            server  05 rep 00 atyp addr port

SOCKS4 and 4a (no RFC; the NEC protocol documents)::

    client  04 cmd port ip userid 00 [domain 00 when ip is 0.0.0.x, x != 0]
    server  00 5a port ip   (5a granted, 5b..5d refused)

The client stream describes itself (an auth message starts 01, a request 05),
so the target is known as soon as the client's request is complete, before
the server answers. Every function never raises: ``None`` means not SOCKS (or
malformed or inconsistent), ``NEED_MORE`` that more bytes could still make it
SOCKS.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from egress.identify.common import NEED_MORE, NeedMore

NAME_MAX = 255
"""Longest SOCKS4 user id or 4a domain name we read (SOCKS5 lengths are one byte)."""

COMMANDS = {1: "connect", 2: "bind", 3: "udp-associate"}
"""SOCKS command codes (3 is SOCKS5 only)."""
AUTH_METHODS = {0: "none", 1: "gssapi", 2: "username-password"}
"""SOCKS5 method names (RFC 1928 §3); others are shown as ``0xNN``."""
_NO_ACCEPTABLE = 0xFF


def looks_like_socks(client: bytes) -> bool:
    """Cheap check on the client stream: a SOCKS5 greeting or a SOCKS4 request start."""
    if not client:
        return True
    if client[0] == 5:
        return len(client) < 2 or client[1] > 0
    if client[0] == 4:
        return len(client) < 2 or client[1] in (1, 2)
    return False


@dataclass(frozen=True, kw_only=True)
class SocksTunnel:
    version: int
    """4 (4a included) or 5."""
    command: str
    """connect, bind or udp-associate."""
    host: str
    """The target: an IPv4 or IPv6 address, or the domain name as sent."""
    port: int
    """The target port."""
    auth: str | None
    """SOCKS5: the method the server chose (none, username-password, ...); None
    before the server chose, and for SOCKS4."""
    granted: bool | None
    """True when the server granted the request, False when it refused (or no
    method was acceptable, or authentication failed); None before it answered."""
    client_offset: int
    """Offset in the client stream just past its request: tunnelled bytes start here."""
    server_offset: int | None
    """Offset in the server stream just past its reply; None unless granted and
    the reply is complete."""


def tunnel(client: bytes, server: bytes = b"") -> SocksTunnel | None | NeedMore:
    """The SOCKS request at the start of the client stream, and the server's answer."""
    if not client:
        return NEED_MORE
    if client[0] == 5:
        return _socks5(client, server)
    if client[0] == 4:
        return _socks4(client, server)
    return None


# --------------------------------------------------------------------------
# SOCKS5


def _socks5(client: bytes, server: bytes):
    if len(client) < 2:
        return NEED_MORE
    n = client[1]
    if n == 0:
        return None
    pos = 2 + n
    if len(client) <= pos:
        return NEED_MORE
    methods = client[2:pos]
    authenticates = client[pos] == 1
    if authenticates:
        if 2 not in methods:
            return None  # GSSAPI or another method we cannot follow
        pos = _userpass_end(client, pos)
        if not isinstance(pos, int):
            return pos
        if len(client) <= pos:
            return NEED_MORE
    if client[pos] != 5:
        return None
    request = _socks5_request(client, pos)
    if not isinstance(request, tuple):
        return request
    code, host, port, client_offset = request
    if code not in COMMANDS:
        return None
    answer = _socks5_server(server, methods, authenticates)
    if answer is None:
        return None
    auth, granted, server_offset = answer
    return SocksTunnel(version=5, command=COMMANDS[code], host=host, port=port, auth=auth,
                       granted=granted, client_offset=client_offset,
                       server_offset=server_offset)


def _userpass_end(data: bytes, pos: int):
    """Offset past an RFC 1929 username/password message at ``pos``."""
    if len(data) < pos + 2:
        return NEED_MORE
    ulen = data[pos + 1]
    if ulen == 0:
        return None
    plen_at = pos + 2 + ulen
    if len(data) <= plen_at:
        return NEED_MORE
    return plen_at + 1 + data[plen_at]


def _socks5_request(data: bytes, pos: int):
    """(command, host, port, offset past it) of a request or reply at ``pos``."""
    if len(data) < pos + 4:
        return NEED_MORE
    _, code, reserved, atyp = data[pos:pos + 4]
    if reserved != 0:
        return None
    address = _address(data, pos + 4, atyp)
    if not isinstance(address, tuple):
        return address
    host, end = address
    if len(data) < end + 2:
        return NEED_MORE
    (port,) = struct.unpack_from(">H", data, end)
    return code, host, port, end + 2


def _address(data: bytes, pos: int, atyp: int):
    """(host, offset past it) of a SOCKS5 address of type ``atyp`` at ``pos``."""
    if atyp == 1:
        if len(data) < pos + 4:
            return NEED_MORE
        return str(ipaddress.IPv4Address(data[pos:pos + 4])), pos + 4
    if atyp == 4:
        if len(data) < pos + 16:
            return NEED_MORE
        return str(ipaddress.IPv6Address(data[pos:pos + 16])), pos + 16
    if atyp == 3:
        if len(data) <= pos:
            return NEED_MORE
        end = pos + 1 + data[pos]
        if len(data) < end:
            return NEED_MORE
        name = _name(data[pos + 1:end])
        return (name, end) if name else None
    return None


def _name(raw: bytes) -> str | None:
    if not raw or any(b < 0x21 or b == 0x7F for b in raw):
        return None
    return raw.decode("utf-8", "replace")


def _socks5_server(server: bytes, methods: bytes, authenticates: bool):
    """(auth, granted, server offset) from what the server sent so far; None if inconsistent."""
    if len(server) < 2:
        return (None, None, None) if server[:1] in (b"", b"\x05") else None
    if server[0] != 5:
        return None
    method = server[1]
    if method == _NO_ACCEPTABLE:
        return None, False, None
    if method not in methods or (method == 2) != authenticates:
        return None
    auth = AUTH_METHODS.get(method, f"0x{method:02x}")
    pos = 2
    if method == 2:
        if len(server) < 4:
            return auth, None, None
        if server[2] != 1:
            return None
        if server[3] != 0:
            return auth, False, None
        pos = 4
    if len(server) <= pos:
        return auth, None, None
    if server[pos] != 5:
        return None
    if len(server) < pos + 2:
        return auth, None, None
    granted = server[pos + 1] == 0
    reply = _socks5_request(server, pos)
    if reply is None:
        return None
    end = reply[3] if isinstance(reply, tuple) and granted else None
    return auth, granted, end


# --------------------------------------------------------------------------
# SOCKS4 and 4a


def _socks4(client: bytes, server: bytes):
    if len(client) < 2:
        return NEED_MORE
    if client[1] not in (1, 2):
        return None
    if len(client) < 9:
        return NEED_MORE
    (port,) = struct.unpack_from(">H", client, 2)
    ip = client[4:8]
    userid_end = _nul(client, 8)
    if not isinstance(userid_end, int):
        return userid_end
    end = userid_end + 1
    if ip[:3] == b"\0\0\0" and ip[3] != 0:
        name_end = _nul(client, end)
        if not isinstance(name_end, int):
            return name_end
        host = _name(client[end:name_end])
        if host is None:
            return None
        end = name_end + 1
    elif ip == b"\0\0\0\0":
        return None
    else:
        host = str(ipaddress.IPv4Address(ip))
    granted, server_offset = None, None
    if server:
        # The reply's version byte is 0; a few servers echo 4.
        if server[0] not in (0, 4):
            return None
        if len(server) >= 2:
            if not 0x5A <= server[1] <= 0x5D:
                return None
            granted = server[1] == 0x5A
            if granted and len(server) >= 8:
                server_offset = 8
    return SocksTunnel(version=4, command=COMMANDS[client[1]], host=host, port=port,
                       auth=None, granted=granted, client_offset=end,
                       server_offset=server_offset)


def _nul(data: bytes, pos: int):
    """Offset of the NUL ending a string at ``pos``; NEED_MORE or None (too long)."""
    nul = data.find(b"\0", pos, pos + NAME_MAX + 1)
    if nul >= 0:
        return nul
    return NEED_MORE if len(data) - pos <= NAME_MAX else None
