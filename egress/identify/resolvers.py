"""Known public encrypted-DNS resolvers, for the ``encrypted-dns`` finding.

``resolvers.toml`` next to this module lists them (names, addresses, the
protocols each provider documents, and the page that says so). It is read
strictly, once: an unknown key, a bad address or a duplicate name is an
error naming the key. ``lookup`` finds a resolver by name (SNI, DNS) or
address; ``kind`` says whether a flow is DoT, DoQ or DoH.
"""

from __future__ import annotations

import functools
import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("resolvers.toml")
PROTOCOLS = ("doh", "dot", "doq")
DOT_DOQ_PORT = 853
DOH_PORT = 443

_TOP_KEYS = {"source", "resolver"}
_ENTRY_KEYS = {"name", "source", "hosts", "addresses", "protocols"}


class ResolverListError(ValueError):
    """``FILE: KEY: problem``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolver:
    name: str
    """Our short name for the provider (cloudflare, google, ...)."""
    hosts: tuple[str, ...]
    """Its DoH/DoT names, lower case, no trailing dot; ``*.suffix`` for names below suffix."""
    addresses: tuple[str, ...]
    """Its resolver addresses, normalised text."""
    protocols: tuple[str, ...]
    """The encrypted transports it documents: doh, dot, doq."""
    source: str
    """The documentation the entry was checked against."""


def _normal_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _normal_address(text: str) -> str | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except (ValueError, AttributeError):
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


class Resolvers:
    """A list of resolvers, indexed by name and address."""

    def __init__(self, resolvers: list[Resolver], source: str):
        self.resolvers = tuple(resolvers)
        self.source = source
        self._by_host: dict[str, Resolver] = {}
        self._by_suffix: dict[str, Resolver] = {}
        self._by_address: dict[str, Resolver] = {}
        for r in resolvers:
            for host in r.hosts:
                if host.startswith("*."):
                    self._by_suffix[host[2:]] = r
                else:
                    self._by_host[host] = r
            for address in r.addresses:
                self._by_address[address] = r

    def lookup(self, name: str | None, address: str | None) -> Resolver | None:
        """The resolver with this name (exact, or below a ``*.`` suffix), else this address."""
        if name:
            key = _normal_name(name)
            found = self._by_host.get(key)
            if found is not None:
                return found
            labels = key.split(".")
            for i in range(1, len(labels)):
                found = self._by_suffix.get(".".join(labels[i:]))
                if found is not None:
                    return found
        if address:
            key = _normal_address(address)
            if key is not None:
                return self._by_address.get(key)
        return None


def _fail(path, key: str, problem: str) -> ResolverListError:
    return ResolverListError(f"{path}: {key}: {problem}")


def _strings(path, key: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, "expected a list of strings")
    return value


def parse(text: str, path: str | Path = "<resolvers>") -> Resolvers:
    """Resolvers from TOML text; raises ResolverListError naming the key at fault."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ResolverListError(f"{path}: not valid TOML: {e}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise _fail(path, key, "unknown key")
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise _fail(path, "source", "required, a non-empty string")
    entries = data.get("resolver", [])
    if not isinstance(entries, list):
        raise _fail(path, "resolver", "expected [[resolver]] tables")
    out: list[Resolver] = []
    names: set[str] = set()
    claimed: dict[str, str] = {}  # host or address -> the resolver that has it
    for i, entry in enumerate(entries):
        where = f"resolver[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, "expected a table")
        for key in entry:
            if key not in _ENTRY_KEYS:
                raise _fail(path, f"{where}.{key}", "unknown key")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, f"{where}.name", "required, a non-empty string")
        where = f"resolver {name!r}"
        if name in names:
            raise _fail(path, f"{where}.name", "listed twice")
        names.add(name)
        src = entry.get("source")
        if not isinstance(src, str) or not src.strip():
            raise _fail(path, f"{where}.source", "required: the page the entry was checked against")
        hosts = []
        for host in _strings(path, f"{where}.hosts", entry.get("hosts", [])):
            normal = _normal_name(host)
            bare = normal[2:] if normal.startswith("*.") else normal
            if not bare or "*" in bare or " " in bare or "." not in bare:
                raise _fail(path, f"{where}.hosts", f"not a host name: {host!r}")
            hosts.append(normal)
        addresses = []
        for text in _strings(path, f"{where}.addresses", entry.get("addresses", [])):
            normal = _normal_address(text)
            if normal is None:
                raise _fail(path, f"{where}.addresses", f"not an address: {text!r}")
            addresses.append(normal)
        if not hosts and not addresses:
            raise _fail(path, where, "needs hosts or addresses")
        for item in hosts + addresses:
            if item in claimed:
                raise _fail(path, where, f"{item} also belongs to {claimed[item]!r}")
            claimed[item] = name
        protocols = _strings(path, f"{where}.protocols", entry.get("protocols"))
        if not protocols:
            raise _fail(path, f"{where}.protocols", "required, one or more of doh, dot, doq")
        for p in protocols:
            if p not in PROTOCOLS:
                raise _fail(path, f"{where}.protocols", f"{p!r} is not one of doh, dot, doq")
        out.append(Resolver(name=name, hosts=tuple(hosts), addresses=tuple(addresses),
                            protocols=tuple(protocols), source=src))
    return Resolvers(out, source)


def load(path: str | Path | None = None) -> Resolvers:
    """Resolvers from a file; without a path, the packaged list (read once)."""
    if path is None:
        return _packaged()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResolverListError(f"{path}: cannot read: {e}") from None
    return parse(text, path)


@functools.cache
def _packaged() -> Resolvers:
    return load(DEFAULT_PATH)


def lookup(name: str | None, address: str | None) -> Resolver | None:
    """The known resolver with this name or address, from the packaged list."""
    return _packaged().lookup(name, address)


def kind(transport: str, dport: int | None, app: str | None,
         resolver: Resolver | None) -> str | None:
    """``dot``, ``doq``, ``doh`` or None for a flow's transport, port and identified app.

    dot: TCP to 853 speaking TLS; doq: UDP to 853 speaking QUIC (any server:
    nothing else is expected there). doh: TLS or QUIC to 443 of a known
    resolver (by name or address) that offers DoH; other 443 traffic is not
    told apart from the web by this.
    """
    transport = (transport or "").lower()
    app = (app or "").lower()
    tls = transport == "tcp" and app == "tls"
    quic = transport == "udp" and app == "quic"
    if dport == DOT_DOQ_PORT:
        return "dot" if tls else "doq" if quic else None
    if dport == DOH_PORT and (tls or quic) and resolver is not None \
            and "doh" in resolver.protocols:
        return "doh"
    return None
