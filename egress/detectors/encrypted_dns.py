"""encrypted-dns: DoH, DoT or DoQ to a resolver the purpose did not declare.

Encrypted DNS hides lookups from the task's resolver, so names stop binding
and refused names go unnoticed. A resolver counts as declared only when the
allow rule that matched names it: an exact host or a CIDR, not a wildcard
that happens to cover it (``*.google`` is not a decision to allow dns.google).
"""

from __future__ import annotations

import functools

from egress.detectors import Context, Window
from egress.identify import resolvers
from egress.records import Finding, FlowRecord, Step

TRANSPORT = {"tcp": "tcp", "udp": "udp"}
_lookup = functools.lru_cache(maxsize=65536)(resolvers.lookup)
"""Resolver lookups by (name, address), remembered: the same destinations recur."""


class EncryptedDns:
    name = "encrypted-dns"
    steps = frozenset({Step.GATE})
    window = Window(packets=8, bytes=16384)

    def inspect(self, flow: FlowRecord, ctx: Context):
        sent = (flow.tls.sni if flow.tls else None) or (flow.quic.sni if flow.quic else None)
        resolver = _lookup(sent or flow.server_name, flow.dst)
        kind = resolvers.kind(TRANSPORT.get(flow.proto, flow.proto), flow.dport, flow.app,
                              resolver)
        if kind is None:
            return []
        rule = ctx.rule
        if rule is not None and (rule.cidr is not None or not rule.host.startswith("*.")):
            return []
        return [Finding.make("encrypted-dns", kind=kind,
                             resolver=(resolver.name if resolver else None) or sent or flow.dst)]
