"""spend-endpoint: a cloud control plane, payment or exchange API the purpose did not declare.

These APIs turn a task's credentials into spending: new instances, charges,
trades. An endpoint counts as declared only when the allow rule that matched
names it: an exact host or a CIDR, not a wildcard that happens to cover it
(``*.amazonaws.com`` for a package mirror is not a decision to allow
``iam.amazonaws.com``). The endpoints ship as data, ``spend_endpoints.toml``
beside this module, each entry with the provider documentation naming it; it
is read strictly, once: an unknown key is an error naming it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from egress.detectors import Context, Window
from egress.detectors.hostlist import (HostListError, HostSet, check_keys, fail, flow_names,
                                       host_patterns, load_toml, read_text, text_field)
from egress.records import Finding, FlowRecord, Step

DEFAULT_PATH = Path(__file__).with_name("spend_endpoints.toml")
CATEGORIES = ("cloud-control-plane", "payment", "exchange")

_TOP_KEYS = ("source", "licence", "endpoint")
_ENTRY_KEYS = ("category", "hosts", "source")


class SpendListError(HostListError):
    """``FILE: KEY: problem``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    category: str
    """cloud-control-plane, payment or exchange."""
    hosts: tuple[str, ...]
    """Normalised names, or ``*.`` + suffix for the names below a suffix."""
    source: str
    """The provider's own documentation naming these hosts."""


class SpendList:
    """The listed endpoints, looked up by name."""

    def __init__(self, endpoints: list[Endpoint], source: str, licence: str):
        self.endpoints = tuple(endpoints)
        self.source = source
        self.licence = licence
        self._hosts: HostSet[Endpoint] = HostSet()
        for e in endpoints:
            for host in e.hosts:
                self._hosts.add(host, e)

    def lookup(self, name: str) -> Endpoint | None:
        """The endpoint a normalised name belongs to (exact, or below a ``*.`` suffix)."""
        return self._hosts.match(name)


def parse(text: str, path: str | Path = "<spend endpoints>") -> SpendList:
    """The list from TOML text; raises SpendListError naming the key at fault."""
    data = load_toml(SpendListError, text, path)
    check_keys(SpendListError, path, "", data, _TOP_KEYS)
    source = text_field(SpendListError, path, "source", data.get("source"))
    licence = text_field(SpendListError, path, "licence", data.get("licence"))
    entries = data.get("endpoint", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise fail(SpendListError, path, "endpoint", "expected [[endpoint]] tables")
    out: list[Endpoint] = []
    claimed: HostSet[str] = HostSet()
    for i, entry in enumerate(entries):
        where = f"endpoint[{i}]"
        check_keys(SpendListError, path, where, entry, _ENTRY_KEYS)
        category = entry.get("category")
        if category not in CATEGORIES:
            raise fail(SpendListError, path, f"{where}.category",
                       f"{category!r} is not one of {', '.join(CATEGORIES)}")
        hosts = host_patterns(SpendListError, path, f"{where}.hosts", entry.get("hosts"))
        src = text_field(SpendListError, path, f"{where}.source", entry.get("source"),
                         "the provider's documentation naming these hosts")
        for host in hosts:
            before = claimed.add(host, where)
            if before is not None:
                raise fail(SpendListError, path, f"{where}.hosts",
                           f"{host} is listed already in {before}")
        out.append(Endpoint(category=category, hosts=tuple(hosts), source=src))
    return SpendList(out, source, licence)


def load(path: str | Path | None = None) -> SpendList:
    """The list from a file; without a path, the packaged list (read once)."""
    if path is None:
        return _packaged()
    return parse(read_text(SpendListError, path), path)


@functools.cache
def _packaged() -> SpendList:
    return parse(read_text(SpendListError, DEFAULT_PATH), DEFAULT_PATH)


def declared(ctx: Context) -> bool:
    """Did the purpose name this destination: a CIDR or an exact host, not a wildcard?"""
    rule = ctx.rule
    return rule is not None and (rule.cidr is not None
                                 or (rule.host is not None and not rule.host.startswith("*.")))


class SpendEndpoint:
    name = "spend-endpoint"
    steps = frozenset({Step.START, Step.GATE})   # DNS names at start; SNI or Host at the gate
    window = Window(packets=8, bytes=16384)      # enough for a ClientHello and its SNI

    def __init__(self, endpoints: SpendList | None = None):
        self.endpoints = endpoints if endpoints is not None else load()

    def inspect(self, flow: FlowRecord, ctx: Context):
        if declared(ctx):
            return []
        for name in flow_names(flow):    # the first listed one speaks for the flow
            endpoint = self.endpoints.lookup(name)
            if endpoint is not None:
                return [Finding.make("spend-endpoint", name=name, category=endpoint.category)]
        return []
