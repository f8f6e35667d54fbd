"""mining-stratum: Stratum or mining JSON-RPC in cleartext, on any port.

Identification (the decoder) names the app ``stratum`` from the parsed
JSON-RPC method; this detector turns that into the critical finding.
"""

from __future__ import annotations

from egress.detectors import Context, Window
from egress.records import Finding, FlowRecord, Step


class MiningStratum:
    name = "mining-stratum"
    steps = frozenset({Step.GATE})
    window = Window(packets=4, bytes=4096)

    def inspect(self, flow: FlowRecord, ctx: Context):
        if flow.app != "stratum":
            return []
        info = flow.stratum
        return [Finding.make("mining-stratum",
                             method=(info.method if info and info.method else "unknown"),
                             agent=info.agent if info else None)]
