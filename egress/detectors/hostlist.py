"""Host lists shipped as data, matched like manifest hosts; the names a flow was made to.

The spend-endpoint and mining-pool detectors each ship a TOML list of hosts.
A host is an exact name or ``*.`` + suffix (one or more labels below the
suffix, never the suffix itself), case-insensitive, IDNA-normalised, trailing
dot ignored: the manifest's own rules (``tagging.rules``), so a list entry and
an allow rule mean the same thing by the same text.
"""

from __future__ import annotations

import functools
import ipaddress
import tomllib
from pathlib import Path
from typing import Generic, Iterable, TypeVar

from egress.names import strip_port
from egress.records import FlowRecord
from tagging.rules import RuleError, normalize_host_pattern, normalize_name

T = TypeVar("T")


class HostListError(ValueError):
    """``FILE: KEY: problem`` for a shipped host list that does not parse."""


def fail(cls: type[HostListError], path, key: str, problem: str) -> HostListError:
    return cls(f"{path}: {key}: {problem}")


def load_toml(cls: type[HostListError], text: str, path) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise cls(f"{path}: not valid TOML: {e}") from None


def read_text(cls: type[HostListError], path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise cls(f"{path}: cannot read: {e}") from None


def check_keys(cls: type[HostListError], path, where: str, table: dict, known) -> None:
    """Strict: the first key not in ``known`` is an error naming it."""
    for key in table:
        if key not in known:
            raise fail(cls, path, f"{where}.{key}" if where else key, "unknown key")


def text_field(cls: type[HostListError], path, key: str, value, why: str = "") -> str:
    """A required, non-empty, one-line string."""
    if not isinstance(value, str) or not value.strip():
        raise fail(cls, path, key, "required, a non-empty string" + (f": {why}" if why else ""))
    if "\n" in value.strip():
        raise fail(cls, path, key, "one line expected")
    return value.strip()


def host_patterns(cls: type[HostListError], path, key: str, value) -> list[str]:
    """A non-empty list of host patterns, normalised like a manifest's ``host``."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail(cls, path, key, "expected a non-empty list of host names")
    out = []
    for text in value:
        try:
            out.append(normalize_host_pattern(text))
        except RuleError as e:
            raise fail(cls, path, key, e.problem) from None
    return out


class HostSet(Generic[T]):
    """Host patterns mapped to what they stand for; a pattern may be listed once."""

    def __init__(self):
        self._exact: dict[str, T] = {}
        self._suffix: dict[str, T] = {}  # "example.org" for "*.example.org"

    def add(self, pattern: str, value: T) -> T | None:
        """Add a normalised pattern; returns what already had it (and keeps that)."""
        table, key = (self._suffix, pattern[2:]) if pattern.startswith("*.") \
            else (self._exact, pattern)
        if key in table:
            return table[key]
        table[key] = value
        return None

    def match(self, name: str) -> T | None:
        """What a normalised name is listed as: exactly, else under the nearest suffix."""
        found = self._exact.get(name)
        if found is not None:
            return found
        labels = name.split(".")
        for i in range(1, len(labels)):
            found = self._suffix.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None


@functools.lru_cache(maxsize=65536)
def _normal(name: str | None) -> str | None:
    if not name:
        return None
    try:
        name = normalize_name(name)
    except ValueError:
        return None
    try:
        ipaddress.ip_address(name)
        return None  # an address is not a name
    except ValueError:
        return name


def flow_names(flow: FlowRecord, extra: Iterable[str] = ()) -> list[str]:
    """The names a flow was made to, normalised, each once, in this order: the
    judge's ``server_name``, the SNI (TLS or QUIC) and HTTP Host it sent, the
    inner target of a proxy tunnel, then ``extra`` (names the task resolved)."""
    raw = [flow.server_name,
           flow.tls.sni if flow.tls else None,
           flow.quic.sni if flow.quic else None,
           strip_port(flow.http.host) if flow.http and flow.http.host
           and flow.http.method != "CONNECT" else None,
           flow.tunnel.host if flow.tunnel else None,
           *extra]
    out: list[str] = []
    for text in raw:
        name = _normal(text)
        if name is not None and name not in out:
            out.append(name)
    return out
