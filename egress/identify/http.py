"""HTTP/1.x from the first bytes of a stream: the request head, and CONNECT's answer.

RFC 9112: a request line ``method SP request-target SP HTTP-version``, header
lines, an empty line. We say "HTTP" only once the request line reaches
`` HTTP/1.``; until then a stream that still could be one gets ``NEED_MORE``.
Bare LF line ends are accepted, as RFC 9112 §2.2 allows a recipient to.

Every function never raises: ``None`` means not HTTP/1.x (or malformed),
``NEED_MORE`` that more bytes could still make it HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from egress.identify.common import NEED_MORE, NeedMore

HEAD_MAX = 16 * 1024
"""Longest request or response head we read; a longer one is judged on what fits."""
METHOD_MAX = 24
"""Longest method token we accept (the registered ones have at most 17 characters)."""

# RFC 9110 §5.6.2 tchar: the characters of a token, such as a method.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VERSION = b"HTTP/1."
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
"""Bytes a request-target never holds: controls and spaces."""
_VERSION_SO_FAR = re.compile(rb"(H(T(T(P(/(1(\.[01]?)?)?)?)?)?)?)?")
"""A prefix of HTTP/1.0 or HTTP/1.1, possibly empty."""
_STATUS = re.compile(rb"HTTP/1\.[01] [0-9]{3}[ \r\n]")
"""The start of a status line: version, status code, then a space or the line end."""
_STATUS_SO_FAR = re.compile(rb"(H(T(T(P(/(1(\.([01]( ([0-9]([0-9]([0-9])?)?)?)?)?)?)?)?)?)?)?)?")
"""A prefix of the start of a status line, possibly empty."""


def looks_like_request(data: bytes) -> bool:
    """Cheap check: the stream starts with a token followed by a space (or not yet)."""
    for i, byte in enumerate(data[:METHOD_MAX + 1]):
        if byte == 0x20:
            return i > 0
        if byte not in _TCHAR:
            return False
    return len(data) <= METHOD_MAX


@dataclass(frozen=True, kw_only=True)
class HttpRequest:
    method: str
    """The request method as sent (GET, CONNECT, ...); methods are case-sensitive."""
    target: str
    """The request-target as sent: ``/path``, an absolute URL, ``host:port`` for CONNECT, ``*``."""
    version: str
    """``HTTP/1.0`` or ``HTTP/1.1``."""
    host: str | None
    """The first Host header's value, trimmed; None without one."""
    connect_host: str | None
    """For CONNECT, the target's host (IPv6 without brackets); else None."""
    connect_port: int | None
    """For CONNECT, the target's port; else None."""
    body_offset: int | None
    """Offset just past the head's empty line; None when the head passed ``HEAD_MAX``
    or was unfinished when parsed with ``final``."""


def request(data: bytes, *, final: bool = False) -> HttpRequest | None | NeedMore:
    """The first request's head at the start of ``data``.

    With ``final`` (no more bytes will come: the observation window or the
    flow ended), a complete request line with an unfinished head still gives
    a request, with the headers seen so far and ``body_offset`` None.
    """
    line = _request_line(data)
    if not isinstance(line, tuple):
        return line
    method, target, version, pos = line
    headers, body_offset = _headers(data, pos)
    if body_offset is None and len(data) < HEAD_MAX and not final:
        return NEED_MORE
    host = headers.get("host")
    connect_host = connect_port = None
    if method == "CONNECT":
        authority = split_authority(target)
        if authority is None:
            return None
        connect_host, connect_port = authority
    return HttpRequest(method=method, target=target, version=version, host=host,
                       connect_host=connect_host, connect_port=connect_port,
                       body_offset=body_offset)


def _request_line(data: bytes):
    """(method, target, version, offset past the line), None or NEED_MORE."""
    sp = -1
    for i, byte in enumerate(data[:METHOD_MAX + 1]):
        if byte == 0x20:
            sp = i
            break
        if byte not in _TCHAR:
            return None
    if sp <= 0:
        return NEED_MORE if sp < 0 and len(data) <= METHOD_MAX else None
    eol = data.find(b"\n", sp, HEAD_MAX)
    if eol < 0:
        if len(data) >= HEAD_MAX:
            return None
        return NEED_MORE if _could_continue(data[sp + 1:]) else None
    line = data[sp + 1:eol]
    if line.endswith(b"\r"):
        line = line[:-1]
    target, space, version = line.rpartition(b" ")
    if not space or not target or not _valid_version(version) or _NOT_IN_TARGET.search(target):
        return None
    return (data[:sp].decode("ascii"), target.decode("utf-8", "replace"),
            version.decode("ascii"), eol + 1)


def _could_continue(rest: bytes) -> bool:
    """Whether a request line's unfinished rest (after the method) may still become valid."""
    if rest.endswith(b"\r"):
        rest = rest[:-1]
    target, space, tail = rest.partition(b" ")
    if _NOT_IN_TARGET.search(target):
        return False
    if not space:
        return True
    return bool(target) and len(tail) <= 8 and _VERSION_SO_FAR.fullmatch(tail) is not None


def _valid_version(version: bytes) -> bool:
    return len(version) == 8 and version.startswith(_VERSION) and version[7:8] in b"01"


def _headers(data: bytes, pos: int) -> tuple[dict[str, str], int | None]:
    """Header fields (first of each name, names lower case) and the offset past the head."""
    headers: dict[str, str] = {}
    limit = min(len(data), HEAD_MAX)
    while pos < limit:
        eol = data.find(b"\n", pos, limit)
        if eol < 0:
            return headers, None
        line = data[pos:eol]
        pos = eol + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return headers, pos
        name, colon, value = line.partition(b":")
        # Folded continuation lines and lines without a name carry nothing we use.
        if colon and name and name[:1] not in b" \t":
            key = name.strip().decode("latin-1").lower()
            headers.setdefault(key, value.strip(b" \t").decode("utf-8", "replace"))
    return headers, None


def split_authority(authority: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); None when malformed."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        host, colon, port = authority.rpartition(":")
        if not colon or ":" in host:
            return None
    if not host or not 0 < len(port) <= 5 or not port.isascii() or not port.isdigit() \
            or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def connect_response(server_data: bytes) -> int | None | NeedMore:
    """Where tunnelled bytes start in the server stream after a successful CONNECT.

    Any 2xx final response opens the tunnel (RFC 9110 §9.3.6); interim 1xx
    responses before it are skipped. ``None`` for a refusal or non-HTTP.
    """
    pos = 0
    while True:
        status = _status_line(server_data, pos)
        if not isinstance(status, tuple):
            return status
        code, pos = status
        _, end = _headers(server_data, pos)
        if end is None:
            return NEED_MORE if len(server_data) < HEAD_MAX else None
        if 200 <= code < 300:
            return end
        if not 100 <= code < 200:
            return None
        pos = end


def _status_line(data: bytes, pos: int):
    """(status code, offset past the line), None or NEED_MORE."""
    head = data[pos:pos + 13]
    if len(head) < 13:
        return NEED_MORE if _STATUS_SO_FAR.fullmatch(head) else None
    if not _STATUS.match(head):
        return None
    eol = data.find(b"\n", pos, pos + HEAD_MAX)
    if eol < 0:
        return NEED_MORE if len(data) - pos < HEAD_MAX else None
    return int(head[9:12]), eol + 1
