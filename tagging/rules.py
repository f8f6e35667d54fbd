"""Allow rules: destinations (names or CIDRs), ports, transports, protocols.

One rule form serves manifests and built-in profiles. Matching is pure:
given what is known of a flow, does this rule cover it?
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

TRANSPORTS = ("tcp", "udp", "icmp")
PROTOCOLS = ("tls", "http", "ssh", "dns", "quic", "stratum", "icmp", "any")

# The protocol a port implies when a rule names none (DESIGN.md).
PORT_PROTOCOLS = {443: "tls", 80: "http", 22: "ssh", 53: "dns"}


class RuleError(ValueError):
    """A rule that does not fit the manifest contract.

    ``key`` is the offending key inside the rule (``host``, ``ports``, ...),
    so callers can name it with the rule's place in the file.
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def normalize_name(name: str) -> str:
    """A DNS name as we compare it: IDNA A-labels, lower case, no trailing dot."""
    name = name.strip().rstrip(".")
    if not name:
        raise ValueError("empty name")
    if name.isascii():
        name = name.lower()
        labels = name.split(".")
        if any(not label or len(label) > 63 for label in labels) or len(name) > 253:
            raise ValueError(f"not a valid DNS name: {name!r}")
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f"not a valid international name {name!r} ({e})") from None


def normalize_host_pattern(pattern: str) -> str:
    """A rule's host: a name, or ``*.`` + suffix; normalised like names."""
    if not isinstance(pattern, str):
        raise RuleError("host", "expected a string")
    wildcard = pattern.startswith("*.")
    rest = pattern[2:] if wildcard else pattern
    if "*" in rest:
        raise RuleError("host", f"{pattern!r}: a wildcard may only be a leading '*.'")
    try:
        name = normalize_name(rest)
    except ValueError as e:
        raise RuleError("host", str(e)) from None
    if _is_ip(name):
        raise RuleError("host", f"{pattern!r} is an address: use cidr = \"{name}/32\" "
                                "(a host rule matches names the task resolved)")
    for label in name.split("."):
        # Host names are letters, digits and hyphens (RFC 1123); A-labels must decode.
        if not _LDH.match(label):
            raise RuleError("host", f"{pattern!r}: {label!r} is not a host name label "
                                    "(letters, digits and inner hyphens)")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise RuleError("host", f"{pattern!r}: {label!r} is not a valid IDNA label") \
                    from None
    return ("*." + name) if wildcard else name


_LDH = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")  # _ for _dmarc-style names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def host_matches(pattern: str, name: str) -> bool:
    """Does a normalised host pattern cover a normalised name?

    ``*.example.org`` covers one or more labels below the suffix, never the
    suffix itself.
    """
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.org"
        return name.endswith(suffix) and len(name) > len(suffix)
    return pattern == name


def parse_ports(value) -> tuple[tuple[int, int], ...]:
    """``[443, "8000-8080"]`` to ((443, 443), (8000, 8080))."""
    if not isinstance(value, list) or not value:
        raise RuleError("ports", "expected a non-empty list of ports or 'lo-hi' ranges")
    out = []
    for item in value:
        if isinstance(item, bool):
            raise RuleError("ports", f"{item!r} is not a port")
        if isinstance(item, int):
            lo = hi = item
        elif isinstance(item, str):
            parts = item.split("-")
            try:
                if len(parts) == 1:
                    lo = hi = int(parts[0])
                elif len(parts) == 2:
                    lo, hi = int(parts[0]), int(parts[1])
                else:
                    raise ValueError
            except ValueError:
                raise RuleError("ports", f"{item!r} is not a port or a 'lo-hi' range") from None
        else:
            raise RuleError("ports", f"{item!r} is not a port")
        for p in (lo, hi):
            if not 1 <= p <= 65535:
                raise RuleError("ports", f"{p} is not a port (1-65535)")
        if lo > hi:
            raise RuleError("ports", f"{item!r}: the range runs backwards")
        out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class AllowRule:
    """One allow rule, expanded: every default applied, every name normalised."""

    origin: str
    """Where it came from: ``allow[2]`` of the manifest, or ``profile pypi allow[0]``."""
    host: str | None
    """A normalised name or ``*.`` suffix pattern; None for a CIDR rule."""
    cidr: str | None
    """A network in CIDR form; None for a host rule."""
    ports: tuple[tuple[int, int], ...] | None
    """Inclusive port ranges; None for ICMP (ports do not apply)."""
    transports: tuple[str, ...]
    """tcp, udp, icmp; a dns rule covers udp and tcp."""
    protocol: str | None
    """The app protocol required; None means the port's default (443 tls, ...)."""

    # ------------------------------------------------------------------ build

    @classmethod
    def parse(cls, table, origin: str) -> "AllowRule":
        """A rule from a manifest or profile ``[[allow]]`` table; RuleError names the key."""
        if not isinstance(table, dict):
            raise RuleError("allow", "expected a table")
        unknown = sorted(set(table) - {"host", "cidr", "ports", "transport", "protocol"})
        if unknown:
            raise RuleError(unknown[0], "unknown key (expected host or cidr, ports, "
                                        "transport, protocol)")
        if ("host" in table) == ("cidr" in table):
            raise RuleError("host", "give exactly one of host or cidr")
        host = normalize_host_pattern(table["host"]) if "host" in table else None
        cidr = None
        if "cidr" in table:
            if not isinstance(table["cidr"], str):
                raise RuleError("cidr", "expected a string such as '198.51.100.0/24'")
            try:
                cidr = str(ipaddress.ip_network(table["cidr"], strict=True))
            except ValueError as e:
                raise RuleError("cidr", str(e)) from None

        protocol = table.get("protocol")
        if protocol is not None and protocol not in PROTOCOLS:
            raise RuleError("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        transport = table.get("transport")
        if transport is not None and transport not in TRANSPORTS:
            raise RuleError("transport", f"{transport!r} is not one of {', '.join(TRANSPORTS)}")

        if transport is None:
            transport = {"quic": "udp", "icmp": "icmp"}.get(protocol, "tcp")
        if transport == "icmp":
            if protocol not in (None, "icmp", "any"):
                raise RuleError("protocol", f"{protocol!r} does not run over icmp")
            protocol = "icmp"
        elif protocol == "icmp":
            raise RuleError("transport", f"protocol icmp needs transport icmp, not {transport}")
        if protocol == "quic" and transport != "udp":
            raise RuleError("transport", "quic runs over udp")
        if protocol in ("tls", "http", "ssh") and transport != "tcp":
            raise RuleError("transport", f"{protocol} runs over tcp")

        if transport == "icmp":
            ports = None  # DESIGN: ports are ignored for icmp
        elif "ports" in table:
            ports = parse_ports(table["ports"])
        else:
            ports = ((53, 53),) if protocol == "dns" else ((443, 443),)
        transports = ("udp", "tcp") if protocol == "dns" else (transport,)
        return cls(origin=origin, host=host, cidr=cidr, ports=ports,
                   transports=transports, protocol=protocol)

    # ----------------------------------------------------------------- match

    def covers_port(self, transport: str, port: int | None) -> bool:
        if transport not in self.transports:
            return False
        if self.ports is None or transport == "icmp":
            return True
        return port is not None and any(lo <= port <= hi for lo, hi in self.ports)

    @functools.cached_property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """The CIDR as a network object, parsed once."""
        return ipaddress.ip_network(self.cidr) if self.cidr is not None else None

    def covers_destination(self, names: list[str], address) -> bool:
        """By address for a CIDR rule; by any of the flow's names for a host rule.

        ``address`` is an ``ipaddress`` object (or text, parsed here; None if unparsable).
        """
        if self.cidr is not None:
            if isinstance(address, str):
                try:
                    address = ipaddress.ip_address(address)
                except ValueError:
                    return False
            return address is not None and address.version == self.network.version \
                and address in self.network
        return any(host_matches(self.host, n) for n in names)

    def protocol_for(self, port: int | None) -> str:
        """The protocol this rule requires on a port (its own, or the port's default)."""
        if self.protocol is not None:
            return self.protocol
        return PORT_PROTOCOLS.get(port, "any")

    def accepts_app(self, app: str, port: int | None) -> bool:
        wanted = self.protocol_for(port)
        return wanted == "any" or wanted == app

    # --------------------------------------------------------------- render

    def destination(self) -> str:
        return self.host if self.host is not None else self.cidr

    def describe(self) -> str:
        """One line: ``allow[0] *.example.org tcp/443 tls``."""
        if self.ports is None:
            where = "/".join(self.transports)
        else:
            ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
            where = "/".join(self.transports) + "/" + ports
        proto = self.protocol or "by-port"
        return f"{self.origin} {self.destination()} {where} {proto}"

    def to_json(self) -> dict:
        return {"origin": self.origin, "host": self.host, "cidr": self.cidr,
                "ports": None if self.ports is None else [list(p) for p in self.ports],
                "transports": list(self.transports), "protocol": self.protocol}

    @classmethod
    def from_json(cls, data: dict) -> "AllowRule":
        """Read back an expanded rule we stored; strict, as our formats are."""
        keys = {"origin", "host", "cidr", "ports", "transports", "protocol"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ValueError(f"stored rule: expected exactly the keys {sorted(keys)}")
        ports = data["ports"]
        return cls(origin=data["origin"], host=data["host"], cidr=data["cidr"],
                   ports=None if ports is None else tuple((lo, hi) for lo, hi in ports),
                   transports=tuple(data["transports"]), protocol=data["protocol"])
