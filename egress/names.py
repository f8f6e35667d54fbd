"""DNS bindings: the names a task resolved, bound to the addresses it got.

Names over addresses (DESIGN.md principle 3): a purpose names domains, and
an address means a name only for the task that resolved it, from the time
of the answer until its TTL runs out (never sooner than the minimum TTL,
as live set elements are kept at least that long).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from egress.records import DnsQuery, FlowRecord, NameBinding
from tagging.rules import normalize_name

DEFAULT_MIN_TTL_S = 3600
"""Cilium's ``--tofqdns-min-ttl`` default: programs cache answers past short TTLs."""


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def bindings_from(flow: FlowRecord) -> list[NameBinding]:
    """Every (name, address) an observed DNS flow's answers give its task.

    The flow's start, not its end, is when they bind: a later query on the
    same socket must not delay the first answer's binding.
    """
    if flow.dns is None:
        return []
    return [b for q in flow.dns.queries
            for b in query_bindings(q, flow.task, flow.start, flow.flow_id, flow.dst,
                                    flow.dport)]


def query_bindings(q: DnsQuery, task: str | None, time: int, flow_id: str | None,
                   resolver: str | None = None, port: int | None = None) -> list[NameBinding]:
    """Each answer binds every name of its CNAME chain to the chain's addresses."""
    addresses = [a for a in q.answers if _is_address(a)]
    if not addresses:
        return []
    out = []
    for raw in [q.name] + [a for a in q.answers if not _is_address(a)]:
        try:
            name = normalize_name(raw)
        except ValueError:
            continue  # a malformed name in an answer binds nothing
        for address in addresses:
            out.append(NameBinding(task=task, name=name, address=str(ipaddress.ip_address(address)),
                                   ttl=q.ttl or 0, time=time, flow_id=flow_id,
                                   resolver=resolver, resolver_port=port))
    return out


class DnsBindings:
    """Per-task name bindings, looked up by address at a point in time."""

    def __init__(self, min_ttl_s: int = DEFAULT_MIN_TTL_S):
        self.min_ttl_s = min_ttl_s
        self._by_key: dict[tuple[str | None, str], list[NameBinding]] = defaultdict(list)

    def learn(self, flow: FlowRecord) -> list[NameBinding]:
        """Add the bindings of a DNS flow; returns them (for the store)."""
        found = bindings_from(flow)
        for b in found:
            self._by_key[(b.task, b.address)].append(b)
        return found

    def add(self, binding: NameBinding) -> None:
        self._by_key[(binding.task, binding.address)].append(binding)

    def lookup(self, task: str | None, address: str, at: int) -> list[NameBinding]:
        """Bindings of ``address`` for ``task`` valid at ``at``, the latest resolved first."""
        found = self._by_key.get((task, address))
        if found is None and ":" in address:   # IPv6 text has many spellings
            try:
                found = self._by_key.get((task, str(ipaddress.ip_address(address))))
            except ValueError:
                return []
        valid = []
        for b in found or ():
            lifetime_us = max(b.ttl, self.min_ttl_s) * 1_000_000
            if b.time <= at <= b.time + lifetime_us:
                valid.append(b)
        valid.sort(key=lambda b: b.time, reverse=True)
        return valid


def strip_port(host: str) -> str:
    """An HTTP Host or authority without its port (``[v6]:port`` too)."""
    if host.startswith("["):  # [v6]:port
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host
