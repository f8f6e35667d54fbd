"""icmp-tunnel: ICMP echo carrying payloads that are not ping-shaped.

Ping tools fill echo payloads with a timestamp and a counting pattern, or a
fixed alphabet; tunnels (ptunnel-ng, icmpsh, hans) carry encrypted or
encapsulated data: random-looking bytes, embedded IP headers, replies that do
not echo their request. The shape is computed by ``egress.identify.icmp``
from the first echo payloads of the flow (the observation window).
"""

from __future__ import annotations

from egress.detectors import Context, Window
from egress.identify import icmp
from egress.records import Finding, FlowRecord, Step


class IcmpTunnel:
    name = "icmp-tunnel"
    steps = frozenset({Step.END})
    window = Window(packets=16, bytes=16 * 1500)

    def inspect(self, flow: FlowRecord, ctx: Context):
        seen = flow.observation
        if flow.app != "icmp" or seen is None or not seen.echo:
            return []
        shape = icmp.echo_shape(seen.echo)
        if shape.packets == 0 or icmp.ping_shaped(shape):
            return []
        return [Finding.make("icmp-tunnel", packets=shape.packets, max_payload=shape.max_payload,
                             entropy=round(shape.mean_entropy, 2), embedded_ip=shape.embeds_ip)]
